"""What one fine-tuning run trains on: tokenised captions, labels, the
extras a method needs, and the pixels — streamed from the dataset one batch
at a time (:class:`StreamedImages`), or, for small tensors made in code, held
in memory.

Streaming keeps memory flat in the number of images: the per-image extras
(boxes, spurious flags, groups) are small arrays, and pixels (with the
region views and mapped boxes of methods that embed regions) are produced
per batch by the loader's workers (:mod:`~ravl_pipeline.core.loader`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from ..config import InputError, TrainConfig
from ..core.embed import region_inputs
from ..core.views import DEFAULT_REGION_VIEW, ViewSpec
from ..models import LoadedModel

__all__ = ["TrainError", "MitigationError", "StreamedImages", "TrainItem", "TrainData", "draw_key", "captions_for",
           "build_train_data"]


class TrainError(InputError):
    """A training configuration or input that cannot be trained on."""


class MitigationError(InputError):
    """Findings, models or data that Stage 2 cannot use."""


@dataclass(frozen=True)
class StreamedImages:
    """Pixels read from the rows of ``ds`` through ``transform`` when a batch
    needs them; ``spec`` places region boxes in their region views. With
    ``random`` (a random transform, e.g. open_clip's training transform) each
    draw of an image is seeded by ``seed``, its step and its row, so a run is
    the same with any number of workers and after a resume."""

    ds: Any
    transform: Callable
    spec: ViewSpec
    random: bool = False
    seed: int = 0

    def __len__(self) -> int:
        return len(self.ds)


@dataclass(frozen=True)
class TrainItem:
    """Loader item of a training run: image ``i``'s pixels and, for a method
    that embeds regions (``region_boxes``: each image's boxes in original
    pixels), its region view and boxes in the view's pixels — the same
    inputs discovery reads (:func:`~ravl_pipeline.core.embed.region_inputs`)."""

    images: StreamedImages
    region_boxes: Sequence[np.ndarray] | None = None
    view: str = DEFAULT_REGION_VIEW

    def __call__(self, ds, key: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``key`` = step × rows + row (:func:`draw_key`)."""
        step, i = divmod(int(key), len(ds))
        image = ds.load_image(i)
        if self.images.random:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(self.images.seed * 1_000_003 + int(key))
                pixels = self.images.transform(image)
        else:
            pixels = self.images.transform(image)
        if self.region_boxes is None:
            return pixels, None, None
        view, boxes = region_inputs(self.images.spec, ds, i, self.region_boxes[i], self.view, image)
        return pixels, view, boxes


@dataclass
class TrainData:
    """Everything the loop needs: ``pixels`` streamed (:class:`StreamedImages`)
    or in memory (``[N, 3, S, S]``), captions, labels and method extras."""

    pixels: torch.Tensor | StreamedImages
    tokens: torch.Tensor  # [N, L]
    labels: torch.Tensor | None  # [N] class index, or None
    classes: list[str] | None
    extras: dict[str, Any] = field(default_factory=dict)  # method-specific (boxes, groups, …)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def streamed(self) -> bool:
        return isinstance(self.pixels, StreamedImages)


def draw_key(step: int, i: int, n: int) -> int:
    """The loader key of row ``i`` of ``n`` drawn at ``step`` (:class:`TrainItem`)."""
    return step * n + i


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


def build_train_data(lm: LoadedModel, ds, template: str, classes: list[str] | None = None,
                     train_transform: str = TrainConfig.train_transform,
                     seed: int = TrainConfig.seed) -> TrainData:
    """A run's data over the rows of ``ds``, pixels streamed through the
    model's own evaluation transform (``train_transform`` ``none``) or its
    open_clip training transform (``open_clip``, seeded by ``seed``)."""
    tokens = lm.tokenizer(captions_for(ds, template))
    labels = None
    if ds.labels is not None:
        classes = classes or sorted(set(ds.labels))
        index = {c: k for k, c in enumerate(classes)}
        labels = torch.tensor([index[y] for y in ds.labels], dtype=torch.long)
    if train_transform == "open_clip":
        images = StreamedImages(ds, image_transform_v2(PreprocessCfg(**lm.preprocess_cfg), is_train=True),
                                ViewSpec.of(lm), random=True, seed=seed)
    else:
        images = StreamedImages(ds, lm.preprocess, ViewSpec.of(lm))
    return TrainData(images, tokens, labels, classes)
