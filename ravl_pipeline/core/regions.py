"""Region proposers (SPEC §1.1).

Every proposer returns float32 boxes ``[x1, y1, x2, y2]`` in pixel
coordinates of the original image, in a stable order; all regions are kept,
empty-looking ones included, so region ids ``(image_id, region_index)`` mean
the same thing in every step.
"""
from __future__ import annotations

import re

import numpy as np

from ..config import InputError

PROPOSERS = ("quadrants", "grid:N", "boxes")


class ProposerError(InputError):
    pass


def grid_boxes(width: float, height: float, n: int) -> np.ndarray:
    """``n × n`` equal cells, row-major (left to right, then top to bottom)."""
    xs = np.linspace(0.0, float(width), n + 1)
    ys = np.linspace(0.0, float(height), n + 1)
    return np.array([[xs[c], ys[r], xs[c + 1], ys[r + 1]] for r in range(n) for c in range(n)],
                    dtype=np.float32)


MAX_GRID = 32  # grid:N at most: N×N regions per image, each embedded and clustered


def parse_proposer(spec: str) -> tuple[str, int]:
    """``quadrants`` → (grid, 2); ``grid:N`` → (grid, N); ``boxes`` → (boxes, 0)."""
    spec = spec.strip()
    if spec == "quadrants":
        return "grid", 2
    if spec == "boxes":
        return "boxes", 0
    match = re.fullmatch(r"grid:(\d+)", spec)
    if match and 1 <= int(match.group(1)) <= MAX_GRID:
        return "grid", int(match.group(1))
    if match:
        raise ProposerError(f"region proposer {spec!r}: N must be in [1, {MAX_GRID}] (grid:N proposes N×N regions "
                            f"per image, and {MAX_GRID ** 2} is already more than a CLIP model's images resolve); "
                            f"expected one of {', '.join(PROPOSERS)}")
    raise ProposerError(f"unknown region proposer {spec!r}; expected one of {', '.join(PROPOSERS)}")


def propose(spec: str, width: float, height: float, boxes: np.ndarray | None = None,
            image_id: str | None = None) -> np.ndarray:
    kind, n = parse_proposer(spec)
    if kind == "grid":
        return grid_boxes(width, height, n)
    if boxes is None or len(boxes) == 0:
        where = f" for image {image_id!r}" if image_id is not None else ""
        raise ProposerError(f"proposer 'boxes' needs manifest boxes{where}, but none are given")
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def propose_dataset(ds, spec: str) -> list[np.ndarray]:
    """Boxes for every image of a :class:`~ravl_pipeline.ml.data.Dataset`."""
    kind, _ = parse_proposer(spec)
    manifest_boxes = ds.boxes if kind == "boxes" else None
    if kind == "boxes" and manifest_boxes is None:
        raise ProposerError(f"proposer 'boxes' needs a 'boxes' column in {ds.root}/manifest.parquet")
    out = []
    for i, image_id in enumerate(ds.image_ids):
        w, h = ds.image_size(i)
        out.append(propose(spec, w, h, None if manifest_boxes is None else manifest_boxes[i], image_id))
    return out


def region_labels_for(ds, spec: str) -> list[list[str]] | None:
    """Ground-truth region labels aligned with the proposals, when they exist.

    Defined for ``boxes`` (labels come with the boxes) and for grid proposers
    whose cells coincide with the manifest boxes (the synthetic quadrants).
    """
    labels = ds.region_labels
    if labels is None or ds.boxes is None:
        return None
    kind, _ = parse_proposer(spec)
    if kind == "boxes":
        return labels
    proposals = propose_dataset(ds, spec)
    out = []
    for props, boxes, labs in zip(proposals, ds.boxes, labels):
        if len(props) != len(boxes) or not np.allclose(props, boxes, atol=0.5):
            return None
        out.append(list(labs))
    return out
