"""What the region pass looks at, and where each box lands in it (SPEC §1.2,
"Every box sees its own pixels").

The image embedding is always the model's own: its evaluation transform
(for open_clip's default ``resize_mode`` ``shortest``: resize the short side
to S, centre-crop S×S). That crop drops the ends of a non-square photo, so
the region pass does not read boxes from it. For a non-square image it reads
them from a **region view** of the whole image:

* ``aspect`` (the default): the whole image resized so its short side is S,
  at its own aspect ratio (the long side rounded to a multiple of the
  backbone's stride, so feature cells stay square); a ResNet runs its trunk
  on it (it is convolutional), a ViT interpolates its position embeddings to
  the larger token grid;
* ``letterbox``: the whole image resized so its long side is S and padded to
  S×S with the normalisation's zero (the mean colour): the model's own input
  size, at a lower resolution.

When the model's own input already shows the whole image (a square image,
or ``resize_mode`` ``squash``/``longest``) there is no view: the boxes are
read from the image pass itself, which keeps SPEC §1.2's exact whole-image
identity and the single backbone pass. BENCHMARKS.md compares the two views
on cost and quality; README explains the choice.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from ..models import LoadedModel

REGION_VIEWS = ("aspect", "letterbox")
DEFAULT_REGION_VIEW = "aspect"
RESNET_TRUNK_STRIDE = 16  # stem..layer3 of open_clip's ModifiedResNet
MIN_BOX_SIDE = 1e-3  # input pixels: anything thinner has no area to pool

_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


class ViewError(ValueError):
    """A box that has no area where the region pass would read it."""


def own_transform(width: float, height: float, preprocess_cfg: dict, image_size: int
                  ) -> tuple[float, float, float, float]:
    """``(sx, sy, ox, oy)`` of open_clip's evaluation transform: a point
    ``(x, y)`` of the original image lands at ``(x·sx − ox, y·sy − oy)`` of
    the S×S input (``shortest``: resize the short side, centre-crop;
    ``squash``: resize both sides; ``longest``: resize the long side,
    centre-pad)."""
    s = float(image_size)
    mode = preprocess_cfg.get("resize_mode", "shortest")
    if mode == "squash":
        return s / width, s / height, 0.0, 0.0
    scale = s / (min(width, height) if mode == "shortest" else max(width, height))
    return scale, scale, (width * scale - s) / 2.0, (height * scale - s) / 2.0


def input_boxes(boxes: np.ndarray, width: float, height: float, preprocess_cfg: dict,
                image_size: int) -> np.ndarray:
    """Boxes from original pixels to the model's own input pixels, clipped to
    the input (what the image pass sees of them)."""
    sx, sy, ox, oy = own_transform(width, height, preprocess_cfg, image_size)
    return _apply(boxes, sx, sy, ox, oy, image_size, image_size)


def _apply(boxes, sx, sy, ox, oy, view_w, view_h) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.empty_like(boxes)
    out[:, [0, 2]] = np.clip(boxes[:, [0, 2]] * sx - ox, 0.0, view_w)
    out[:, [1, 3]] = np.clip(boxes[:, [1, 3]] * sy - oy, 0.0, view_h)
    return out.astype(np.float32)


def shows_whole_image(width: int, height: int, preprocess_cfg: dict) -> bool:
    """Does the model's own input show every pixel of the image?"""
    return width == height or preprocess_cfg.get("resize_mode", "shortest") in ("squash", "longest")


@dataclass(frozen=True)
class ViewSpec:
    """What a region view needs of a model, small and picklable (image
    loaders build views in worker processes): its input size, its
    preprocessing configuration and the stride its region views keep to."""

    image_size: int
    preprocess_cfg: dict
    stride: int

    @classmethod
    def of(cls, lm: "LoadedModel | ViewSpec") -> "ViewSpec":
        if isinstance(lm, ViewSpec):
            return lm
        return cls(lm.image_size, dict(lm.preprocess_cfg), view_stride(lm))


def view_stride(lm: LoadedModel) -> int:
    """The size a region view's sides are multiples of: the ResNet trunk's
    stride or the ViT's patch size."""
    if lm.architecture == "resnet":
        return RESNET_TRUNK_STRIDE
    if lm.architecture == "vit":
        patch = lm.model.visual.patch_size
        return int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    return 1


@dataclass(frozen=True)
class RegionView:
    """Where one image's boxes are read: ``pixels`` ([3, H, W], normalised
    like the model's input) or ``None`` for the model's own input; a point
    ``(x, y)`` of the original image lands at ``(x·sx − ox, y·sy − oy)``."""

    pixels: torch.Tensor | None
    sx: float
    sy: float
    ox: float
    oy: float
    width: int  # of the view (or of the model's input)
    height: int

    def boxes(self, boxes: np.ndarray, where: str = "image") -> np.ndarray:
        """``boxes`` (original pixels) in this view's pixels. A box left with
        no area is an error naming ``where`` and the region, never a silent
        zero embedding."""
        out = _apply(boxes, self.sx, self.sy, self.ox, self.oy, self.width, self.height)
        thin = np.flatnonzero(np.minimum(out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]) < MIN_BOX_SIDE)
        if thin.size:
            j = int(thin[0])
            raise ViewError(f"{where}: region {j} box {np.asarray(boxes, dtype=float).reshape(-1, 4)[j].tolist()} "
                            f"has no area in the region pass's {self.width}x{self.height} view "
                            f"({thin.size} such box(es) in this image); remove degenerate boxes")
        return out


def region_view(lm: "LoadedModel | ViewSpec", image: Image.Image, view: str = DEFAULT_REGION_VIEW) -> RegionView:
    """The region view of ``image`` under ``lm`` (a model or its :class:`ViewSpec`; module docstring)."""
    if view not in REGION_VIEWS:
        raise ValueError(f"unknown region view {view!r}; expected one of {', '.join(REGION_VIEWS)}")
    spec = ViewSpec.of(lm)
    w, h = image.size
    s = spec.image_size
    cfg = spec.preprocess_cfg
    if shows_whole_image(w, h, cfg):
        return RegionView(None, *own_transform(w, h, cfg, s), s, s)
    resample = _INTERPOLATION.get(str(cfg.get("interpolation", "bicubic")), Image.BICUBIC)
    if view == "aspect":
        m = spec.stride
        scale = s / min(w, h)
        vw, vh = (max(m, int(round(side * scale / m)) * m) for side in (w, h))
        resized = image.convert("RGB").resize((vw, vh), resample)
        return RegionView(_normalise(resized, cfg), vw / w, vh / h, 0.0, 0.0, vw, vh)
    scale = s / max(w, h)
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    left, top = (s - nw) // 2, (s - nh) // 2
    pixels = torch.zeros(3, s, s)  # the normalisation's zero: the mean colour
    pixels[:, top:top + nh, left:left + nw] = _normalise(image.convert("RGB").resize((nw, nh), resample), cfg)
    return RegionView(pixels, nw / w, nh / h, -float(left), -float(top), s, s)


def _normalise(image: Image.Image, cfg: dict) -> torch.Tensor:
    mean, std = cfg.get("mean", OPENAI_DATASET_MEAN), cfg.get("std", OPENAI_DATASET_STD)
    return TF.normalize(TF.to_tensor(image), list(mean), list(std))
