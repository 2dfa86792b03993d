"""What one fine-tuning run trains on, held in memory: preprocessed pixels,
tokenised captions, labels and the extras a method needs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import InputError
from ..core.embed import preprocess_images
from ..models import LoadedModel

__all__ = ["TrainError", "MitigationError", "TrainData", "captions_for", "build_train_data"]


class TrainError(InputError):
    """A training configuration or input that cannot be trained on."""


class MitigationError(InputError):
    """Findings, models or data that Stage 2 cannot use."""


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


def build_train_data(lm: LoadedModel, ds, template: str,
                     classes: list[str] | None = None, progress: bool = False) -> TrainData:
    pixels = preprocess_images(lm, ds, progress=progress)
    tokens = lm.tokenizer(captions_for(ds, template))
    labels = None
    if ds.labels is not None:
        classes = classes or sorted(set(ds.labels))
        index = {c: k for k, c in enumerate(classes)}
        labels = torch.tensor([index[y] for y in ds.labels], dtype=torch.long)
    return TrainData(pixels, tokens, labels, classes)
