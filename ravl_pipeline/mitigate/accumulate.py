"""Gradient accumulation for contrastive losses: a large global batch on a
small device, with the loss of the whole batch.

Splitting a contrastive batch into micro-batches and adding their losses
would change the objective: each image would meet only its micro-batch's
captions (SPEC §3.4: the batch a contrastive method sees matters). Instead
every step of ``micro_batch_size`` runs in three passes:

1. the per-image outputs (image features, region features for a method
   with a region pass, caption features) of every micro-batch, without
   gradients;
2. the method's loss over the whole batch from those outputs, held as leaf
   tensors (:class:`CachedTowers` hands them to the loss in place of the
   encoders; class and attribute texts and the temperature are computed
   as usual), and its backward: gradients for the parameters the loss uses
   directly and for every cached output;
3. each micro-batch again, with gradients, back-propagating its outputs'
   gradients from pass 2.

The sum is the gradient of the whole-batch loss. It is exact for models
normalised per sample (ViT's LayerNorm); a ResNet's BatchNorm normalises
each micro-batch by its own statistics, as any micro-batched forward does
(its running statistics are updated in pass 3 only).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

import torch

from ..core.embed import encode_image_and_regions
from .methods import Method, region_pass_keeps_batchnorm_stats

__all__ = ["CachedTowers", "accumulated_backward", "micro_batches"]


class CachedTowers:
    """``model`` as the loss of an accumulated step sees it: the batch's
    image, region and caption features are the cached leaves; any other
    call (class texts, the temperature, the modules) is the model's own."""

    def __init__(self, model: torch.nn.Module, batch: dict, image: torch.Tensor, regions: torch.Tensor | None,
                 text: torch.Tensor):
        self._model, self._batch = model, batch
        self._image, self._regions, self._text = image, regions, text

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._image if pixels is self._batch["pixels"] else self._model.encode_image(pixels)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._text if tokens is self._batch["tokens"] else self._model.encode_text(tokens)

    def cached_image_and_regions(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._image, self._regions


def micro_batches(batch: dict, size: int) -> list[dict]:
    """``batch`` cut into consecutive micro-batches of at most ``size`` images."""
    n = len(batch["index"])
    out = []
    for start in range(0, n, size):
        part = {}
        for key, value in batch.items():
            if torch.is_tensor(value) or isinstance(value, list):
                part[key] = value[start:start + size]
            else:
                part[key] = value
        out.append(part)
    return out


@contextmanager
def _running_stats_frozen(model: torch.nn.Module):
    """BatchNorm layers normalise with batch statistics but leave their running averages alone."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


def _outputs(model, method: Method, part: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One micro-batch's per-image outputs, as the method's loss would compute them."""
    if method.region_pass:
        with region_pass_keeps_batchnorm_stats(model):
            image, regions = encode_image_and_regions(model, part["pixels"], part["boxes"], views=part.get("views"))
    else:
        image, regions = model.encode_image(part["pixels"]), None
    return image, regions, model.encode_text(part["tokens"])


def accumulated_backward(model, method: Method, batch: dict, loss_of: Callable[[Any], torch.Tensor], size: int,
                         autocast, scale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The three passes of the module docstring for one step; ``loss_of(towers)``
    is the method's loss on a model-like object, ``scale`` the loss scaling
    (fp16) applied before backward. Returns the (unscaled) whole-batch loss;
    the parameters hold its gradient."""
    parts = micro_batches(batch, size)
    with torch.no_grad(), _running_stats_frozen(model), autocast():
        cached = [_outputs(model, method, part) for part in parts]
    image = torch.cat([c[0] for c in cached]).detach().requires_grad_(True)
    text = torch.cat([c[2] for c in cached]).detach().requires_grad_(True)
    regions = (torch.cat([c[1] for c in cached]).detach().requires_grad_(True) if method.region_pass else None)
    with autocast():
        loss = loss_of(CachedTowers(model, batch, image, regions, text))
    scale(loss).backward()
    grads = [image.grad, regions.grad if regions is not None else None, text.grad]
    sizes = [[len(c[k]) for c in cached] if grads[k] is not None else None for k in range(3)]
    split = [g.split(s) if g is not None else None for g, s in zip(grads, sizes)]
    for m, part in enumerate(parts):
        with autocast():
            outputs = _outputs(model, method, part)
        # a frozen tower (lock_text) or an output the loss never read has nothing to pass back
        pairs = [(o, s[m]) for o, s in zip(outputs, split) if o is not None and s is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
    return loss
