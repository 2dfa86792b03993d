"""The fine-tuning loop (SPEC §3.2–3.6).

One loop serves every registered method (:mod:`.methods`): a method is a loss
over a batch. The batch holds preprocessed pixels, tokenised captions,
labels and, for methods that need them, per-image boxes and spurious-region
flags. Every method sees the same data order, seed, steps and batch size, so
they compare fairly.

Pixels are streamed (:func:`batches`): the model's ``compute`` workers
decode and preprocess the next batches while the device trains on this one,
and nothing holds the whole set. On an accelerator the forward passes run
under autocast in the model's precision, with loss scaling in fp16. With
``micro_batch_size`` a step's batch is processed in micro-batches whose
gradients add up to the whole batch's (:mod:`.accumulate`). With a
``resume`` path the loop saves everything a run needs to go on (weights,
optimiser, schedule, scaler, the method's state and the losses so far) every
``checkpoint_every`` steps; a run started again with the same path and
fingerprint goes on from there and ends with the same weights as one that
never stopped.
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..compute import CPU, Compute
from ..config import TrainConfig
from ..core.loader import stream
from ..models import LoadedModel
from .accumulate import accumulated_backward
from .data import TrainData, TrainError, TrainItem, draw_key
from .methods import get_method

__all__ = ["finetune", "iter_batches", "batches", "total_steps", "configure_trainable", "build_optimizer",
           "optimizer_step", "set_seed", "load_resume_state"]

# per-image extras a method reads, carried into each batch (on the model's device)
PER_IMAGE_EXTRAS = ("boxes", "views", "spurious", "spurious_class")


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


def batches(data: TrainData, cfg: TrainConfig, gen: torch.Generator, compute: Compute = CPU, *,
            region_pass: bool = False, start: int = 0,
            select: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[tuple[int, dict]]:
    """``(step, batch)`` of every step from ``start`` on (earlier steps'
    orders are drawn, so the order is that of an uninterrupted run, but
    their images are not read), the batch on ``compute``'s device: index,
    pixels, tokens, labels and the per-image extras a method reads; for
    streamed data with ``region_pass`` the loader makes each image's region
    view and mapped boxes too. ``select`` keeps part of each batch (one
    process's slice under torchrun); ``global_size`` is the whole batch's."""
    sizes: dict[int, int] = {}

    def chosen():
        for step, idx in iter_batches(len(data), cfg, gen, data):
            if step >= start:
                sizes[step] = len(idx)
                yield step, idx if select is None else select(idx)

    for step, batch in _load(data, chosen(), compute, region_pass):
        batch["global_size"] = sizes.pop(step)
        yield step, batch


def _load(data: TrainData, steps, compute: Compute, region_pass: bool) -> Iterator[tuple[int, dict]]:
    """The batches of ``steps`` (``(step, index tensor)``), pixels from memory or streamed."""
    if not data.streamed:
        for step, idx in steps:
            yield step, _with_extras({"index": idx, "pixels": data.pixels[idx]}, data, idx, compute)
        return
    pending: deque = deque()

    n = len(data.pixels.ds)

    def sampler():
        for step, idx in steps:
            pending.append((step, idx))
            yield [draw_key(step, i, n) for i in idx.tolist()]

    region_boxes = data.extras.get("region_boxes") if region_pass else None
    item = TrainItem(data.pixels, region_boxes)
    for items in stream(data.pixels.ds, item, batches=sampler(), compute=compute):
        step, idx = pending.popleft()
        size = data.pixels.spec.image_size
        # under torchrun a process's slice of an epoch's short last batch may be empty
        pixels = torch.stack([p for p, _, _ in items]) if items else torch.zeros(0, 3, size, size)
        batch = {"index": idx, "pixels": pixels}
        if region_boxes is not None:
            batch["views"] = [v for _, v, _ in items]
            batch["boxes"] = [b for _, _, b in items]
        yield step, _with_extras(batch, data, idx, compute)


def _with_extras(batch: dict, data: TrainData, idx: torch.Tensor, compute: Compute) -> dict:
    batch["tokens"] = data.tokens[idx]
    if data.labels is not None:
        batch["labels"] = data.labels[idx]
    rows = idx.tolist()
    for key in PER_IMAGE_EXTRAS:
        if key not in batch and key in data.extras:
            batch[key] = [data.extras[key][i] for i in rows]
    if "groups" in data.extras:
        batch["groups"] = data.extras["groups"][idx]
    return {k: v if k in ("index", "global_size") else [compute.to(x) for x in v] if isinstance(v, list)
            else compute.to(v) for k, v in batch.items()}


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


def optimizer_step(model: torch.nn.Module, opt, sched, loss: torch.Tensor, where: str,
                   scaler: torch.amp.GradScaler | None = None, backward_done: bool = False) -> float:
    """One update shared by every training loop (through ``scaler`` when it
    scales fp16 losses); returns the loss value. ``backward_done``: the
    gradients are already in place (an accumulated step)."""
    if not torch.isfinite(loss):
        raise TrainError(f"non-finite loss {loss.item()} at {where}")
    scaling = scaler is not None and scaler.is_enabled()
    if not backward_done:
        opt.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaling else loss).backward()
    if scaling:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    sched.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the learned temperature
    return float(loss.item())


def finetune(lm: LoadedModel, data: TrainData, cfg: TrainConfig, progress: bool = True,
             on_step: Callable[[int, float], None] | None = None,
             inspect: Callable[[int, torch.nn.Module, dict, dict, torch.Tensor], None] | None = None, *,
             resume: str | os.PathLike | None = None, checkpoint_every: int | None = None,
             fingerprint: str = "") -> dict[str, Any]:
    """Train ``lm.model`` in place with ``cfg.method`` on ``lm.compute``;
    return the history.

    ``inspect(step, model, batch, state, loss)`` runs after the loss of a
    step and before its update (diagnostics: the loss still has its graph,
    and a method may leave its weighted terms in ``state["terms"]``); it
    must not change the model. With ``resume`` (a file path), the run's
    state is saved there every ``checkpoint_every`` steps, and a state
    found there with the same ``fingerprint`` is resumed (module docstring);
    the caller removes the file once the result is saved."""
    method = get_method(cfg.method)
    if len(data) < 2:
        raise TrainError("fine-tuning needs at least two images")
    gen = set_seed(cfg.seed)
    model = lm.model
    compute = lm.compute
    params = configure_trainable(model, cfg.lock_text)
    n_steps = total_steps(len(data), cfg)
    opt, sched = build_optimizer(params, cfg, n_steps)
    scaler = compute.grad_scaler()
    state: dict[str, Any] = {}
    if method.prepare is not None:
        method.prepare(data, cfg, state)
    losses: list[float] = []
    saved = load_resume_state(resume, fingerprint) if resume is not None else None
    if saved is not None:
        losses = _restore(saved, model, opt, sched, scaler, state)
    start = len(losses)
    loss_fn = method.loss
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=n_steps, initial=start, desc=f"finetune ({cfg.method})", disable=not progress, leave=False)
    micro = cfg.micro_batch_size
    if micro and inspect is not None:
        raise TrainError("the diagnostics hook needs whole-batch steps; leave micro_batch_size unset")
    for step, batch in batches(data, cfg, gen, compute, region_pass=method.region_pass, start=start):
        where = f"step {step} (method {cfg.method})"
        if micro and len(batch["index"]) > micro:
            opt.zero_grad(set_to_none=True)
            loss = accumulated_backward(model, method, batch, lambda towers: loss_fn(towers, batch, data, cfg, state),
                                        micro, compute.autocast, scaler.scale if scaler.is_enabled() else _same)
            losses.append(optimizer_step(model, opt, sched, loss, where, scaler, backward_done=True))
        else:
            with compute.autocast():
                loss = loss_fn(model, batch, data, cfg, state)
            if inspect is not None:
                inspect(step, model, batch, state, loss)
            losses.append(optimizer_step(model, opt, sched, loss, where, scaler))
        if resume is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < n_steps:
            _save_resume_state(resume, fingerprint, model, opt, sched, scaler, state, losses)
        if on_step is not None:
            on_step(step, losses[-1])
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    elapsed = time.perf_counter() - t0
    history = {"config": cfg.to_dict(), "steps": len(losses), "losses": losses,
               "seconds": elapsed, "seconds_per_step": elapsed / max(1, len(losses) - start),
               "n_images": len(data)}
    if start:
        history["resumed_at_step"] = start
    if compute.record() is not None:
        history["compute"] = compute.record()
    return history


def _same(loss: torch.Tensor) -> torch.Tensor:
    return loss


# --------------------------------------------------------------------------- resuming

def _save_resume_state(path, fingerprint: str, model, opt, sched, scaler, state: dict, losses: list[float]) -> None:
    """Everything the loop needs to go on after ``len(losses)`` steps, written
    to a temporary file and renamed (a kill leaves the previous state whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"fingerprint": fingerprint, "losses": list(losses), "model": model.state_dict(),
               "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
               "method_state": {k: v for k, v in state.items() if torch.is_tensor(v)},
               "torch_rng": torch.get_rng_state()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_resume_state(path, fingerprint: str) -> dict | None:
    """The saved state at ``path`` when it belongs to the same run
    (``fingerprint``), else ``None``. Read with ``weights_only``: tensors
    and plain values, never arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: start afresh rather than fail
        print(f"note: {path} is not a readable resume state ({type(exc).__name__}); training from step 0",
              file=sys.stderr)
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
        print(f"note: {path} was saved by a different run (configuration, data or model); training from step 0",
              file=sys.stderr)
        return None
    return saved


def _restore(saved: dict, model, opt, sched, scaler, state: dict) -> list[float]:
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    state.update(saved["method_state"])
    torch.set_rng_state(saved["torch_rng"])
    print(f"resuming from step {len(saved['losses'])} ({len(saved['losses'])} steps were saved)", file=sys.stderr)
    return list(saved["losses"])


def _cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor
