"""The fine-tuning loop (SPEC §3.2–3.6).

One loop serves every registered method (:mod:`.methods`): a method is a loss
over a batch. The batch holds preprocessed pixels, tokenised captions,
labels and, for methods that need them, per-image boxes and spurious-region
flags. Every method sees the same data order, seed, steps and batch size, so
they compare fairly.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..models import LoadedModel
from .data import TrainData, TrainError
from .methods import get_method

__all__ = ["finetune", "iter_batches", "total_steps", "configure_trainable", "build_optimizer", "optimizer_step",
           "set_seed"]


# --------------------------------------------------------------------------- loop

def set_seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


def epoch_order(n: int, gen: torch.Generator, data: TrainData, cfg: TrainConfig) -> torch.Tensor:
    sampler = get_method(cfg.method).sampler
    if sampler is not None:
        return sampler(n, gen, data, cfg)
    return torch.randperm(n, generator=gen)


def iter_batches(n: int, cfg: TrainConfig, gen: torch.Generator, data: TrainData):
    """Yield index tensors of each batch, epoch after epoch; fractional epochs allowed."""
    total = total_steps(n, cfg)
    step = 0
    while step < total:
        order = epoch_order(n, gen, data, cfg)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2:  # a contrastive loss needs at least two pairs
                continue
            yield step, idx
            step += 1
            if step >= total:
                return


def total_steps(n: int, cfg: TrainConfig) -> int:
    """Steps of a run on ``n`` images: ``max_steps`` when set, else the
    epochs' steps raised to ``min_steps``."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, round(cfg.epochs * max(1, math.ceil(n / cfg.batch_size))), cfg.min_steps or 0)


def configure_trainable(model: torch.nn.Module, lock_text: bool) -> list[torch.nn.Parameter]:
    """Freeze the text tower when asked; return the parameters to optimise."""
    for p in model.parameters():
        p.requires_grad_(True)
    if lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
        # lock_text_tower leaves the token embedding and projection trainable
        # in some configurations; text features must not move at all.
        for name in ("token_embedding", "positional_embedding", "text_projection", "ln_final"):
            obj = getattr(model, name, None)
            params = [obj] if isinstance(obj, torch.nn.Parameter) else (list(obj.parameters()) if obj is not None else [])
            for p in params:
                p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, n_steps: int):
    """AdamW without weight decay on biases and norms, cosine schedule with warm-up."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine_with_warmup(cfg.warmup_steps, n_steps))
    return opt, sched


def optimizer_step(model: torch.nn.Module, opt, sched, loss: torch.Tensor, where: str) -> float:
    """One update shared by every training loop; returns the loss value."""
    if not torch.isfinite(loss):
        raise TrainError(f"non-finite loss {loss.item()} at {where}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the learned temperature
    return float(loss.item())


def finetune(lm: LoadedModel, data: TrainData, cfg: TrainConfig, progress: bool = True,
             on_step: Callable[[int, float], None] | None = None,
             inspect: Callable[[int, torch.nn.Module, dict, dict, torch.Tensor], None] | None = None) -> dict[str, Any]:
    """Train ``lm.model`` in place with ``cfg.method``; return the history.

    ``inspect(step, model, batch, state, loss)`` runs after the loss of a
    step and before its update (diagnostics: the loss still has its graph,
    and a method may leave its weighted terms in ``state["terms"]``); it
    must not change the model."""
    method = get_method(cfg.method)
    if len(data) < 2:
        raise TrainError("fine-tuning needs at least two images")
    gen = set_seed(cfg.seed)
    model = lm.model
    params = configure_trainable(model, cfg.lock_text)
    n_steps = total_steps(len(data), cfg)
    opt, sched = build_optimizer(params, cfg, n_steps)
    state: dict[str, Any] = {}
    if method.prepare is not None:
        method.prepare(data, cfg, state)
    loss_fn = method.loss
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=n_steps, desc=f"finetune ({cfg.method})", disable=not progress, leave=False)
    for step, idx in iter_batches(len(data), cfg, gen, data):
        batch = {"index": idx, "pixels": data.pixels[idx], "tokens": data.tokens[idx]}
        if data.labels is not None:
            batch["labels"] = data.labels[idx]
        loss = loss_fn(model, batch, data, cfg, state)
        if inspect is not None:
            inspect(step, model, batch, state, loss)
        losses.append(optimizer_step(model, opt, sched, loss, f"step {step} (method {cfg.method})"))
        if on_step is not None:
            on_step(step, losses[-1])
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    elapsed = time.perf_counter() - t0
    return {"config": cfg.to_dict(), "steps": len(losses), "losses": losses,
            "seconds": elapsed, "seconds_per_step": elapsed / max(1, len(losses)),
            "n_images": len(data)}


def _cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor
