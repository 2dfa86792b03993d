"""A validated dataset directory (SPEC §5) and the description a synthetic
setting keeps beside it (``setting.json``: its classes, caption template and
the features it correlates with a class)."""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from .files import read_json
from .manifest import (MANIFEST_NAME, SPLITS, ManifestError, _check, _column, dataset_root, outside_link_problem,
                       probe_image, read_manifest)

__all__ = ["Dataset", "ImageModeWarning", "to_rgb", "load_dataset", "dataset_inputs", "dataset_setting",
           "setting_templates", "induced_pairs"]


class ImageModeWarning(UserWarning):
    """An image whose mode had to be converted with a loss (16-bit grey levels to 8)."""


_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # more than 8 bits per sample
_warned_modes: set[str] = set()


def to_rgb(im: Image.Image, path: str | os.PathLike = "") -> Image.Image:
    """``im`` as 8-bit RGB. 16-bit (or wider) grey levels are scaled to the
    full 8-bit range rather than clipped at 255, which would leave a white
    image; the first such image of each mode is named in a warning."""
    if im.mode not in _WIDE_MODES:
        return im.convert("RGB")
    values = np.asarray(im, dtype=np.float64)
    top = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and values.max(initial=0) <= 65535) else \
        max(float(values.max(initial=0)), 1.0)
    if im.mode == "F":
        low, high = float(values.min(initial=0)), float(values.max(initial=1))
        values, top = values - low, max(high - low, 1e-12)
    grey = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
    if im.mode not in _warned_modes:
        _warned_modes.add(im.mode)
        warnings.warn(f"{path}: a {im.mode} image (more than 8 bits per grey level) is scaled to 8 bits, as the "
                      "model sees every image; further images of this mode are converted alike",
                      ImageModeWarning, stacklevel=2)
    return Image.fromarray(grey, mode="L").convert("RGB")


@dataclass(frozen=True)
class Dataset:
    """A validated dataset directory (SPEC §5).

    ``table`` has the canonical schema with only the optional columns that
    are present. Column accessors are computed once per instance; the table
    is immutable, so they never go stale.
    """

    root: Path
    table: pa.Table

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def manifest_file(self) -> Path:
        return self.root / MANIFEST_NAME

    def __len__(self) -> int:
        return self.table.num_rows

    def _optional(self, name: str) -> list | None:
        return _column(self.table, name)

    @cached_property
    def image_ids(self) -> list[str]:
        return self.table.column("image_id").to_pylist()

    @cached_property
    def paths(self) -> list[str]:
        return self.table.column("path").to_pylist()

    @cached_property
    def labels(self) -> list[str] | None:
        return self._optional("label")

    @cached_property
    def captions(self) -> list[str] | None:
        return self._optional("caption")

    @cached_property
    def splits(self) -> list[str] | None:
        return self._optional("split")

    @cached_property
    def boxes(self) -> list[np.ndarray] | None:
        """Per image a float32 ``[R, 4]`` array of ``[x1, y1, x2, y2]``."""
        rows = self._optional("boxes")
        if rows is None:
            return None
        return [np.asarray(r if r else np.zeros((0, 4)), dtype=np.float32).reshape(-1, 4) for r in rows]

    @cached_property
    def region_labels(self) -> list[list[str]] | None:
        rows = self._optional("region_labels")
        return None if rows is None else [list(r) if r is not None else [] for r in rows]

    @cached_property
    def region_labels_known(self) -> np.ndarray | None:
        """Per row: are its ``region_labels`` given (a null row is not
        annotated: whether a feature is present is unknown there)."""
        rows = self._optional("region_labels")
        return None if rows is None else np.array([r is not None for r in rows], dtype=bool)

    def image_path(self, i: int) -> Path:
        return self.root / self.paths[i]

    def _where(self, i: int) -> str:
        return f"{self.manifest_file}: row {i} (image_id {self.image_ids[i]!r}), column 'path'"

    def load_image(self, i: int) -> Image.Image:
        """Image ``i`` as RGB; :class:`ManifestError` naming the row when the
        file cannot be read."""
        path = self.image_path(i)
        escape = outside_link_problem(self.root, self.paths[i])
        if escape:
            raise ManifestError(f"{self._where(i)}: {escape}")
        try:
            with Image.open(path) as im:
                return to_rgb(im, path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ManifestError(f"{self._where(i)}: image file {path} is unreadable: {exc}") from exc

    def image_size(self, i: int) -> tuple[int, int]:
        """``(width, height)`` of image ``i``, cached per file version."""
        path = self.image_path(i)
        try:
            return probe_image(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ManifestError(f"{self._where(i)}: image file {path} is unreadable: {exc}") from exc

    def subset(self, indices: Sequence[int] | np.ndarray | str | None = None, *, split: str | None = None) -> Dataset:
        """Rows ``indices`` (positions, in that order, or a boolean mask), or
        the rows of one split: ``subset(split="val")`` or ``subset("val")``.
        The subset keeps the same root."""
        if isinstance(indices, str):
            indices, split = None, indices
        if (indices is None) == (split is None):
            raise ValueError("subset() takes either indices or split")
        if split is not None:
            if "split" not in self.table.column_names:
                raise ManifestError(f"{self.manifest_file}: no 'split' column to select split {split!r} from")
            return Dataset(self.root, self.table.filter(pc.equal(self.table.column("split"), split)))
        indices = np.asarray(indices)
        if indices.dtype == bool:  # a mask, not positions
            indices = np.flatnonzero(indices)
        return Dataset(self.root, self.table.take(pa.array(indices.astype(np.int64))))

    def classes(self) -> list[str]:
        """Sorted distinct labels ([] without a label column)."""
        return sorted({label for label in self.labels or [] if label})


def load_dataset(
    root: str | os.PathLike,
    classes: Sequence[str] | None = None,
    split: str | None = None,
    require_labels: bool = False,
    check_images: bool = True,
) -> Dataset:
    """Read and validate a dataset directory (SPEC §5), optionally keeping one
    ``split``.

    Every row's structure is validated; with ``split``, images are opened and
    class coverage is checked only for that split's rows (an evaluation on
    ``val`` should not need the training images, and needs every class in
    ``val``).
    """
    root = dataset_root(root)
    table = read_manifest(root)
    selected = None
    if split is not None:
        if split not in SPLITS:
            raise ManifestError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if "split" not in table.column_names:
            raise ManifestError(f"{root / MANIFEST_NAME}: no 'split' column to select split {split!r} from")
        mask = pc.fill_null(pc.equal(table.column("split"), split), False)
        selected = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
        if selected.size == 0:
            raise ManifestError(f"{root / MANIFEST_NAME}: split {split!r} has no rows")
    _check(table, root, classes, require_labels, check_images, selected)
    dataset = Dataset(root, table)
    return dataset if selected is None else dataset.subset(selected)



def dataset_inputs(root: str | os.PathLike, flag: str = "--data") -> list[tuple[str, Path]]:
    """What a command reading dataset ``root`` reads, as ``(name, path)``
    for the output rule (:func:`~ravl_pipeline.io.files.output_problem`):
    its manifest, its ``setting.json`` and every image its manifest names
    (none when the manifest cannot be read: loading it says why)."""
    root = dataset_root(root)
    name = f"{flag} {root}"
    out = [(name, root / MANIFEST_NAME), (name, root / "setting.json"), (name, root.parent / "setting.json")]
    try:
        paths = pq.read_table(root / MANIFEST_NAME, columns=["path"]).column("path").to_pylist()
    except (pa.ArrowException, OSError, KeyError):
        return out
    return out + [(name, root / p) for p in paths if isinstance(p, str) and p]


# --------------------------------------------------------------------------
# setting.json: what a synthetic setting says about itself
# --------------------------------------------------------------------------


def dataset_setting(root: str | os.PathLike) -> dict | None:
    """``setting.json`` beside or above the dataset directory (synthetic
    settings write one); None for user data."""
    root = Path(root)
    for candidate in (root / "setting.json", root.parent / "setting.json"):
        if candidate.is_file():
            return read_json(candidate, ManifestError)
    return None


def setting_templates(root: str | os.PathLike) -> list[str] | None:
    """The caption template a synthetic setting was trained with, as the
    prompt templates to score it with; None for user data."""
    template = (dataset_setting(root) or {}).get("caption_template")
    return [template] if template else None


def induced_pairs(root: str | os.PathLike) -> list[tuple[str, str]]:
    """The (feature, class) pairs a synthetic setting correlates (SPEC §4.1);
    [] for user data."""
    setting = dataset_setting(root) or {}
    cfg = setting.get("config", {})
    feats = cfg.get("features", [])
    # the setting records the resolved list; its config may leave it to the default
    classes = (setting.get("correlated_classes") or cfg.get("correlated_classes")
               or [cfg.get("correlated_class")] * len(feats))
    return [(f["name"], c) for f, c in zip(feats, classes)]
