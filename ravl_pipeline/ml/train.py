"""Fine-tuning loop and losses (SPEC §3).

One loop serves every method; a method is a loss over a batch. The batch
holds preprocessed pixels, tokenised captions, labels and, for methods that
need them, per-image boxes and spurious-region flags. Every method sees the
same data order, seed, steps and batch size, so they compare fairly
(SPEC §3.4, §3.6).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .embed import preprocess_images
from .models import LoadedModel

DEFAULT_CAPTION_TEMPLATE = "a photo of a {}."


class TrainError(ValueError):
    pass


@dataclass
class TrainConfig:
    method: str = "standard"
    epochs: float = 4.0
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 0
    seed: int = 0
    lock_text: bool = False
    caption_template: str = DEFAULT_CAPTION_TEMPLATE
    lam: float = 0.8  # λ of the region-aware loss (SPEC §3.3)
    tau: float = 0.07  # τ of the region-aware loss
    max_steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainData:
    """Everything the loop needs, held in memory as tensors."""

    pixels: torch.Tensor  # [N, 3, S, S]
    tokens: torch.Tensor  # [N, L]
    labels: torch.Tensor | None  # [N] class index, or None
    classes: list[str] | None
    extras: dict[str, Any] = field(default_factory=dict)  # method-specific (boxes, groups, …)

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


def captions_for(ds, template: str) -> list[str]:
    """Manifest captions where given, otherwise ``template`` filled with the label."""
    captions = ds.captions
    labels = ds.labels
    out = []
    for i in range(len(ds)):
        cap = captions[i] if captions is not None else None
        if cap:
            out.append(cap)
        elif labels is not None and labels[i]:
            out.append(template.format(labels[i]))
        else:
            raise TrainError(f"{ds.root}/manifest.parquet row {i} ({ds.image_ids[i]!r}): "
                             "no caption and no label to build one from")
    return out


def build_train_data(lm: LoadedModel, ds, template: str = DEFAULT_CAPTION_TEMPLATE,
                     classes: list[str] | None = None, progress: bool = False) -> TrainData:
    pixels = preprocess_images(lm, ds, progress=progress)
    tokens = lm.tokenizer(captions_for(ds, template))
    labels = None
    if ds.labels is not None:
        classes = classes or sorted(set(ds.labels))
        index = {c: k for k, c in enumerate(classes)}
        labels = torch.tensor([index[y] for y in ds.labels], dtype=torch.long)
    return TrainData(pixels, tokens, labels, classes)


# --------------------------------------------------------------------------- losses

def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (the standard CLIP objective)."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale * image_features @ text_features.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def standard_loss(model, batch: dict[str, torch.Tensor], data: TrainData, cfg: TrainConfig,
                  state: dict) -> torch.Tensor:
    image = model.encode_image(batch["pixels"])
    text = model.encode_text(batch["tokens"])
    return clip_loss(image, text, model.logit_scale.exp())


LossFn = Callable[[torch.nn.Module, dict, TrainData, TrainConfig, dict], torch.Tensor]
# Methods register here; Stage-2 methods add themselves from their own module.
METHODS: dict[str, LossFn] = {"standard": standard_loss}
# Optional per-method hooks: prepare(data, cfg, state) before training and a
# sampler(n, generator, data, cfg) that replaces uniform shuffling.
PREPARE: dict[str, Callable] = {}
SAMPLERS: dict[str, Callable] = {}


# --------------------------------------------------------------------------- loop

def _set_seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


def epoch_order(n: int, gen: torch.Generator, data: TrainData, cfg: TrainConfig) -> torch.Tensor:
    sampler = SAMPLERS.get(cfg.method)
    if sampler is not None:
        return sampler(n, gen, data, cfg)
    return torch.randperm(n, generator=gen)


def iter_batches(n: int, cfg: TrainConfig, gen: torch.Generator, data: TrainData):
    """Yield index tensors of each batch, epoch after epoch; fractional epochs allowed."""
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = cfg.max_steps if cfg.max_steps is not None else max(1, round(cfg.epochs * steps_per_epoch))
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
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, round(cfg.epochs * max(1, math.ceil(n / cfg.batch_size))))


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
             on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train ``lm.model`` in place with ``cfg.method``; return the history."""
    if cfg.method not in METHODS:
        from . import mitigate  # noqa: F401  -- registers the Stage-2 methods (SPEC §3)
    if cfg.method not in METHODS:
        raise TrainError(f"unknown method {cfg.method!r}; expected one of {', '.join(sorted(METHODS))}")
    if len(data) < 2:
        raise TrainError("fine-tuning needs at least two images")
    gen = _set_seed(cfg.seed)
    model = lm.model
    params = configure_trainable(model, cfg.lock_text)
    n_steps = total_steps(len(data), cfg)
    opt, sched = build_optimizer(params, cfg, n_steps)
    state: dict[str, Any] = {}
    if cfg.method in PREPARE:
        PREPARE[cfg.method](data, cfg, state)
    loss_fn = METHODS[cfg.method]
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=n_steps, desc=f"finetune ({cfg.method})", disable=not progress, leave=False)
    for step, idx in iter_batches(len(data), cfg, gen, data):
        batch = {"index": idx, "pixels": data.pixels[idx], "tokens": data.tokens[idx]}
        if data.labels is not None:
            batch["labels"] = data.labels[idx]
        loss = loss_fn(model, batch, data, cfg, state)
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
