"""How the masking check hides a region: the fills (SPEC §1.4, the evidence
of §5).

Masking edits exactly the pixels of the masked boxes and nothing else:

* ``mean``   — the model's normalisation mean colour (a zero input after
  normalisation, so the fill carries no colour of the hidden region);
* ``black``  — zeros;
* ``blur``   — a Gaussian blur of the image, copied back only inside the boxes;
* ``border`` — the median colour of the image's outermost pixels: an estimate
  of its background;
* ``local``  — each box filled with the mean colour of a thin ring of pixels
  around it (outside every masked box): a one-colour inpaint of its
  surroundings (``border`` where no ring pixel is left).

No fill is neutral for every model: a model whose normalisation maps black to
a large negative number sees a grey ``mean`` square on a black background as
a new object, and a model trained on photographs may read a ``black`` box as
an occluder. Which fill disturbs predictions least is therefore measured per
audit (:func:`~.causal.choose_fill`).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from ...config import MASK_FILLS

__all__ = ["FILLS", "box_pixel_mask", "fill_colour", "mask_regions"]

FILLS = MASK_FILLS
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_BLUR_RADIUS = 4.0
RING = 2  # pixels around a box that the ``local`` fill averages


def box_pixel_mask(height: int, width: int, boxes) -> np.ndarray:
    """``[H, W]`` bool: pixels whose centre lies inside any box.

    A pixel ``(row, col)`` covers ``[col, col+1) × [row, row+1)``; its centre
    is inside ``[x1, x2) × [y1, y2)`` exactly for ``ceil(x1 - 0.5) <= col <
    ceil(x2 - 0.5)``, so an integer box ``[0, 0, 28, 28]`` is the 28×28 block.
    """
    mask = np.zeros((int(height), int(width)), dtype=bool)
    for r1, r2, c1, c2 in _pixel_spans(height, width, boxes):
        mask[r1:r2, c1:c2] = True
    return mask


def _pixel_spans(height: int, width: int, boxes) -> list[tuple[int, int, int, int]]:
    spans = []
    for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        x1, y1, x2, y2 = box
        if not (x2 > x1 and y2 > y1):
            raise ValueError(f"box {list(box)} is empty or inverted (need x1 < x2, y1 < y2)")
        c1, c2 = (int(np.clip(np.ceil(v - 0.5), 0, width)) for v in (x1, x2))
        r1, r2 = (int(np.clip(np.ceil(v - 0.5), 0, height)) for v in (y1, y2))
        spans.append((r1, r2, c1, c2))
    return spans


def fill_colour(preprocess_cfg: dict | None = None) -> np.ndarray:
    """RGB uint8 colour that normalises to zero under the model's transform."""
    mean = (preprocess_cfg or {}).get("mean") or OPENAI_MEAN
    return np.clip(np.rint(np.asarray(mean, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def border_colour(image: np.ndarray) -> np.ndarray:
    """Median colour of the image's outermost pixels (its background, usually)."""
    frame = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    return np.median(frame, axis=0).round().astype(np.uint8)


def mask_regions(image: np.ndarray, boxes, fill: str, mean_colour=None,
                 blur_radius: float = DEFAULT_BLUR_RADIUS) -> np.ndarray:
    """A copy of ``image`` ([H, W, 3] uint8) with the pixels of ``boxes``
    replaced; every other pixel is returned unchanged."""
    if fill not in FILLS:
        raise ValueError(f"unknown mask fill {fill!r}; expected one of {', '.join(FILLS)}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    mask = box_pixel_mask(height, width, boxes)
    out = image.copy()
    if fill == "black":
        out[mask] = 0
    elif fill == "mean":
        out[mask] = fill_colour() if mean_colour is None else np.asarray(mean_colour, dtype=np.uint8)
    elif fill == "blur":
        blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur_radius)))
        out[mask] = blurred[mask]
    elif fill == "border":
        out[mask] = border_colour(image)
    else:  # local
        for r1, r2, c1, c2 in _pixel_spans(height, width, boxes):
            ring = np.zeros((height, width), dtype=bool)
            ring[max(0, r1 - RING):r2 + RING, max(0, c1 - RING):c2 + RING] = True
            ring &= ~mask
            out[r1:r2, c1:c2] = (image[ring].mean(axis=0).round().astype(np.uint8) if ring.any()
                                 else border_colour(image))
    return out
