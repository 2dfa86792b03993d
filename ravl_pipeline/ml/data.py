"""Dataset directories: the manifest schema, loading, validation and importers.

A dataset directory (SPEC §5) is ``manifest.parquet`` plus image files that the
manifest references by paths relative to the directory. Columns:

============== ====================== ==========================================
column         type                   meaning
============== ====================== ==========================================
image_id       string (required)      unique id
path           string (required)      image path relative to the directory
label          string                 class name (required for validation/eval)
caption        string                 fine-tuning text
split          string                 ``train`` / ``val`` / ``test``
boxes          list<list<float>>      ``[x1, y1, x2, y2]`` in original pixels
region_labels  list<string>           ground truth aligned with ``boxes``
============== ====================== ==========================================

Only pyarrow is used to read and write tables; nothing is ever unpickled.
Columns outside the schema are kept as they are, after the schema's columns.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

__all__ = [
    "BOX_TOLERANCE",
    "Dataset",
    "IMAGE_EXTENSIONS",
    "MANIFEST_NAME",
    "ManifestError",
    "REQUIRED_COLUMNS",
    "SCHEMA",
    "SPLITS",
    "import_coco",
    "import_imagefolder",
    "load_dataset",
    "read_manifest",
    "validate",
    "write_manifest",
]

MANIFEST_NAME = "manifest.parquet"

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("label", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("split", pa.string()),
        pa.field("boxes", pa.list_(pa.list_(pa.float32()))),
        pa.field("region_labels", pa.list_(pa.string())),
    ]
)
"""Canonical column types (SPEC §5). Every field is nullable at the Arrow
level; which values may be missing is decided by :func:`validate`, which can
then name the offending row instead of failing inside a cast."""

REQUIRED_COLUMNS = ("image_id", "path")
SPLITS = ("train", "val", "test")

BOX_TOLERANCE = 0.5
"""Pixels a box may overshoot the image: importers round and float32 storage
loses precision, neither of which should make a box invalid."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_MAX_LISTED_PROBLEMS = 20


class ManifestError(ValueError):
    """A dataset directory or manifest is unusable.

    The message names the manifest file and, where a row is at fault, its
    0-based index, its ``image_id`` and the column. ``problems`` holds every
    problem found (the message lists the first few).
    """

    def __init__(self, message: str, problems: Sequence[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]


# --------------------------------------------------------------------------
# Reading, canonical schema, writing
# --------------------------------------------------------------------------


def manifest_path(root: str | os.PathLike) -> Path:
    """The manifest file of dataset directory ``root`` (or ``root`` itself
    when it already names a ``.parquet`` file)."""
    root = Path(root)
    return root if _names_manifest_file(root) else root / MANIFEST_NAME


def _names_manifest_file(path: Path) -> bool:
    return path.suffix == ".parquet" and not path.is_dir()


def _dataset_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    return root.parent if _names_manifest_file(root) else root


def canonicalize(table: pa.Table, manifest_file: str | os.PathLike = MANIFEST_NAME) -> pa.Table:
    """Cast the schema's columns to :data:`SCHEMA` types, in schema order,
    extra columns after them. Raises :class:`ManifestError` when a required
    column is missing or a column cannot be converted."""
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise ManifestError(
            f"{manifest_file}: missing required column(s) {missing}; "
            f"found {table.column_names}"
        )
    names, columns = [], []
    for field in SCHEMA:
        if field.name not in table.column_names:
            continue
        column = table.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise ManifestError(
                    f"{manifest_file}: column {field.name!r} of type {column.type} "
                    f"cannot be read as {field.type}: {exc}"
                ) from exc
        names.append(field.name)
        columns.append(column)
    for name in table.column_names:
        if name not in SCHEMA.names:
            names.append(name)
            columns.append(table.column(name))
    return pa.table(columns, names=names)


def read_manifest(root: str | os.PathLike) -> pa.Table:
    """Read ``root/manifest.parquet`` into the canonical schema (SPEC §5).

    Raises :class:`ManifestError` when the file is missing, is not Parquet,
    lacks a required column or has a column of an unconvertible type. Only the
    table is checked here; row-level checks are :func:`validate`'s.
    """
    file = manifest_path(root)
    if not file.is_file():
        raise ManifestError(f"{file}: no manifest (expected a {MANIFEST_NAME} in {file.parent})")
    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{file}: unreadable manifest: {exc}") from exc
    return canonicalize(table, file)


def _plain(value: Any) -> Any:
    """Numpy arrays and scalars as Python lists and numbers, which pyarrow
    converts to nested lists (it rejects 2-D arrays as list elements)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _table_from_rows(rows: Iterable[Mapping[str, Any]], manifest_file: Path) -> pa.Table:
    rows = list(rows)
    seen: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ManifestError(f"{manifest_file}: row {i} is a {type(row).__name__}, not a mapping")
        seen.update(dict.fromkeys(row))
    names = [n for n in SCHEMA.names if n in seen] + [n for n in seen if n not in SCHEMA.names]
    return _table_from_columns({n: [_plain(row.get(n)) for row in rows] for n in names}, manifest_file)


def _table_from_columns(columns: Mapping[str, Any], manifest_file: Path) -> pa.Table:
    arrays = {}
    for name, values in columns.items():
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            arrays[name] = values
            continue
        target = SCHEMA.field(name).type if name in SCHEMA.names else None
        try:
            arrays[name] = pa.array([_plain(v) for v in values], type=target)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise ManifestError(
                f"{manifest_file}: column {name!r} cannot be converted"
                + (f" to {target}" if target is not None else "")
                + f": {exc}"
            ) from exc
    return pa.table(arrays)


def write_manifest(
    root: str | os.PathLike,
    table_or_rows: pa.Table | Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    overwrite: bool = True,
) -> Path:
    """Write a manifest into dataset directory ``root`` (created if needed).

    ``table_or_rows`` is a pyarrow table, a list of row dicts, or a dict of
    columns. The table is converted to the canonical schema and checked with
    :func:`validate` (without opening images) *before* anything is written,
    then written to a temporary file in ``root`` and moved over the manifest
    with ``os.replace``, so readers see the old manifest or the new one,
    never a partial file. Returns the manifest path.
    """
    root = _dataset_root(root)
    file = root / MANIFEST_NAME
    if isinstance(table_or_rows, pa.Table):
        table = table_or_rows
    elif isinstance(table_or_rows, Mapping):
        table = _table_from_columns(table_or_rows, file)
    else:
        table = _table_from_rows(table_or_rows, file)
    table = canonicalize(table, file)
    validate(table, root, check_images=False)
    if file.exists() and not overwrite:
        raise FileExistsError(f"{file}: manifest exists and overwrite=False")
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write(file, lambda f: pq.write_table(table, f))
    return file


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move directory ``new`` to ``target``, replacing any previous one.

    An existing ``target`` is swapped with ``new`` in one step where the
    kernel offers it (Linux ``renameat2(RENAME_EXCHANGE)``), so a process
    killed at any point leaves either the old or the new directory at
    ``target``, never neither; elsewhere the old one is renamed aside first.
    If moving ``new`` in fails, the previous ``target`` is put back.
    """
    new, target = Path(new), Path(target)
    if target.exists():
        if _exchange_paths(new, target):
            shutil.rmtree(new, ignore_errors=True)  # now holds the previous content
            return
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def _exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False when the platform cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def atomic_write(target: str | os.PathLike, write) -> Path:
    """Call ``write(fileobj)`` on a temporary file next to ``target``, then
    move it into place; the temporary file never outlives a failure. Every
    single-file output of the project is written through here."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # outputs are for reading; mkstemp's 0600 would hide them
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


_atomic_write = atomic_write


def write_json_atomic(target: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``target`` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = (json.dumps(obj, indent=2) + "\n").encode()
    _atomic_write(target, lambda f: f.write(text))
    return target


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------

# Image sizes keyed by (absolute path, mtime_ns, size in bytes): validating a
# directory and then asking a Dataset for sizes opens each file once.
_IMAGE_SIZE_CACHE: dict[tuple[str, int, int], tuple[int, int]] = {}


def _image_size_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.absolute()), stat.st_mtime_ns, stat.st_size)


def probe_image(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image file after PIL's ``verify()``.

    Raises ``OSError``/``ValueError`` (from PIL) when the file is missing or
    not a readable image. Results are cached per file version.
    """
    path = Path(path)
    key = _image_size_key(path)
    size = _IMAGE_SIZE_CACHE.get(key)
    if size is None:
        with Image.open(path) as im:
            size = (int(im.width), int(im.height))
            im.verify()
        _IMAGE_SIZE_CACHE[key] = size
    return size


def _path_problem(path: str) -> str | None:
    """Why a manifest path is not a plain relative path inside the dataset
    directory, or None when it is."""
    if not path:
        return "is empty"
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute() or PureWindowsPath(path).drive:
        return f"{path!r} is absolute; paths must be relative to the dataset directory"
    parts = path.replace("\\", "/").split("/")
    if ".." in parts:
        return f"{path!r} escapes the dataset directory ('..')"
    return None


def _box_problem(box: Any) -> str | None:
    """Why ``box`` is not a proper ``[x1, y1, x2, y2]``, or None."""
    if box is None or len(box) != 4:
        return f"{box!r} is not 4 numbers"
    if any(v is None or not math.isfinite(v) for v in box):
        return f"{box!r} has a missing or non-finite coordinate"
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return f"{_fmt_box(box)} is degenerate (needs x2 > x1 and y2 > y1)"
    return None


def _fmt_box(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _box_bounds_problem(box: Sequence[float], size: tuple[int, int]) -> str | None:
    width, height = size
    x1, y1, x2, y2 = box
    t = BOX_TOLERANCE
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        return f"{_fmt_box(box)} lies outside the {width}x{height} image"
    return None


class _Problems:
    """Collects problems phrased as '<file>: row i (image_id ...), column c: ...'."""

    def __init__(self, manifest_file: Path, image_ids: Sequence[Any]):
        self.file = manifest_file
        self.image_ids = image_ids
        self.items: list[str] = []

    def row(self, i: int, column: str, what: str) -> None:
        iid = self.image_ids[i] if i < len(self.image_ids) else None
        self.items.append(f"{self.file}: row {i} (image_id {iid!r}), column {column!r}: {what}")

    def table(self, what: str) -> None:
        self.items.append(f"{self.file}: {what}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            raise ManifestError(self.items[0], self.items)
        shown = self.items[:_MAX_LISTED_PROBLEMS]
        more = len(self.items) - len(shown)
        prefix = f"{self.file}: "  # said once in the heading
        message = f"{self.file}: {len(self.items)} problems:\n" + "\n".join(f"  - {p.removeprefix(prefix)}" for p in shown)
        if more:
            message += f"\n  ... and {more} more"
        raise ManifestError(message, self.items)


def _column(table: pa.Table, name: str) -> list | None:
    return table.column(name).to_pylist() if name in table.column_names else None


def validate(
    table: pa.Table,
    root: str | os.PathLike,
    classes: Sequence[str] | None = None,
    require_labels: bool = False,
    check_images: bool = True,
) -> None:
    """Check a manifest table against dataset directory ``root`` (SPEC §5).

    Raises one :class:`ManifestError` listing every problem found, each naming
    the manifest file and, for row problems, the 0-based row, its image_id
    and the column:

    - no rows; a missing required column; missing or duplicate ``image_id``;
    - a ``path`` that is empty, absolute or escapes ``root`` with ``..``;
    - with ``check_images``: an image file that is missing or that PIL cannot
      open and ``verify()``; a box outside its image (``BOX_TOLERANCE`` px);
    - a missing ``label`` when ``require_labels``; a label outside
      ``classes``; with ``classes`` and ``require_labels``, a configured class
      that has no image;
    - a ``split`` other than train/val/test;
    - a box that is not 4 finite numbers or is degenerate (x2<=x1 or y2<=y1);
    - ``region_labels`` whose length differs from ``boxes``.
    """
    root = _dataset_root(root)
    _check(canonicalize(table, root / MANIFEST_NAME), root, classes, require_labels, check_images)


def _check(
    table: pa.Table,
    root: Path,
    classes: Sequence[str] | None,
    require_labels: bool,
    check_images: bool,
    selected: np.ndarray | None = None,
) -> None:
    """:func:`validate` on a canonical table. With ``selected`` (row indices),
    images are opened and class coverage is checked only for those rows,
    while the per-row structure is checked everywhere."""
    file = root / MANIFEST_NAME
    image_ids = table.column("image_id").to_pylist()
    problems = _Problems(file, image_ids)
    if table.num_rows == 0:
        problems.table("the dataset is empty (no rows)")
        problems.raise_if_any()
    rows = range(table.num_rows) if selected is None else [int(i) for i in selected]

    _check_image_ids(image_ids, problems)
    paths = table.column("path").to_pylist()
    for i, path in enumerate(paths):
        why = "is missing" if path is None else _path_problem(path)
        if why:
            problems.row(i, "path", why)

    sizes = _check_image_files(root, paths, rows, problems) if check_images else {}
    _check_labels(_column(table, "label"), classes, require_labels, rows, problems)
    _check_splits(_column(table, "split"), problems)
    _check_regions(_column(table, "boxes"), _column(table, "region_labels"), sizes, problems)
    problems.raise_if_any()


def _check_image_ids(image_ids: list, problems: _Problems) -> None:
    first_row: dict[str, int] = {}
    for i, iid in enumerate(image_ids):
        if iid is None or iid == "":
            problems.row(i, "image_id", "is missing")
        elif iid in first_row:
            problems.row(i, "image_id", f"duplicate of row {first_row[iid]}")
        else:
            first_row[iid] = i


def _check_image_files(root: Path, paths: list, rows: Iterable[int], problems: _Problems) -> dict[int, tuple[int, int]]:
    sizes = {}
    for i in rows:
        path = paths[i]
        if not path or _path_problem(path):
            continue  # already reported; never open files outside the directory
        file = root / path
        if not file.is_file():
            problems.row(i, "path", f"image file {file} does not exist")
            continue
        try:
            sizes[i] = probe_image(file)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            # PIL signals some corrupt files with SyntaxError
            problems.row(i, "path", f"image file {file} is unreadable: {exc}")
    return sizes


def _check_labels(labels: list | None, classes: Sequence[str] | None, require_labels: bool, rows: Iterable[int], problems: _Problems) -> None:
    if labels is None:
        if require_labels:
            problems.table("column 'label' is required but absent")
        return
    allowed = set(classes) if classes is not None else None
    for i, label in enumerate(labels):
        if label is None or label == "":
            if require_labels:
                problems.row(i, "label", "is missing but labels are required")
        elif allowed is not None and label not in allowed:
            problems.row(i, "label", f"{label!r} is not one of the configured classes {_short(list(classes))}")
    if classes is not None and require_labels:
        present = {labels[i] for i in rows}
        empty = [c for c in classes if c not in present]
        if empty:
            problems.table(f"configured class(es) {empty} have no images")


def _short(items: list, limit: int = 12) -> str:
    return repr(items) if len(items) <= limit else repr(items[:limit])[:-1] + f", ... ({len(items)} in all)]"


def _check_splits(splits: list | None, problems: _Problems) -> None:
    if splits is None:
        return
    for i, split in enumerate(splits):
        if split is not None and split not in SPLITS:
            problems.row(i, "split", f"{split!r} is not one of {list(SPLITS)}")


def _check_regions(boxes: list | None, region_labels: list | None, sizes: dict[int, tuple[int, int]], problems: _Problems) -> None:
    n = len(boxes) if boxes is not None else len(region_labels or [])
    for i in range(n):
        row_boxes = boxes[i] if boxes is not None else None
        for j, box in enumerate(row_boxes or []):
            why = _box_problem(box)
            if why is None and i in sizes:
                why = _box_bounds_problem(box, sizes[i])
            if why:
                problems.row(i, "boxes", f"box {j} {why}")
        if region_labels is None or region_labels[i] is None:
            continue
        n_boxes = len(row_boxes or [])
        if len(region_labels[i]) != n_boxes:
            problems.row(i, "region_labels", f"has {len(region_labels[i])} labels for {n_boxes} boxes")
        elif any(lab is None for lab in region_labels[i]):
            problems.row(i, "region_labels", "contains a missing label")


# --------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------


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

    def image_path(self, i: int) -> Path:
        return self.root / self.paths[i]

    def _where(self, i: int) -> str:
        return f"{self.manifest_file}: row {i} (image_id {self.image_ids[i]!r}), column 'path'"

    def load_image(self, i: int) -> Image.Image:
        """Image ``i`` as RGB; :class:`ManifestError` naming the row when the
        file cannot be read."""
        path = self.image_path(i)
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
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
    root = _dataset_root(root)
    table = read_manifest(root)
    selected = None
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if "split" not in table.column_names:
            raise ManifestError(f"{root / MANIFEST_NAME}: no 'split' column to select split {split!r} from")
        mask = pc.fill_null(pc.equal(table.column("split"), split), False)
        selected = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
        if selected.size == 0:
            raise ManifestError(f"{root / MANIFEST_NAME}: split {split!r} has no rows")
    _check(table, root, classes, require_labels, check_images, selected)
    dataset = Dataset(root, table)
    return dataset if selected is None else dataset.subset(selected)


# --------------------------------------------------------------------------
# Importers
# --------------------------------------------------------------------------


def _is_within(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def _place_image(src: Path, out_dir: Path, copy_to: Path | None) -> str:
    """Manifest path of ``src``: copied to ``copy_to`` when given, otherwise
    referenced relative to ``out_dir`` (which must contain it)."""
    if copy_to is None:
        return src.resolve().relative_to(out_dir.resolve()).as_posix()
    copy_to.parent.mkdir(parents=True, exist_ok=True)
    if not (copy_to.exists() and os.path.samefile(src, copy_to)):
        shutil.copyfile(src, copy_to)
    return copy_to.relative_to(out_dir).as_posix()


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def import_imagefolder(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: str | None = None,
    copy: bool = False,
) -> Dataset:
    """Make a dataset directory from ``src_dir/<class>/<image>`` (searched
    recursively within each class folder; hidden entries skipped).

    ``label`` is the class folder's name, ``image_id`` the image's path
    relative to ``src_dir``, ``split`` the given value for every row.
    Images are copied to ``out_dir/images/<class>/...`` when ``copy`` or when
    ``src_dir`` is not inside ``out_dir``; otherwise referenced in place.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not src_dir.is_dir():
        raise ManifestError(f"{src_dir}: not a directory")
    copying = copy or not _is_within(src_dir, out_dir)
    rows = []
    class_dirs = sorted(d for d in src_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    for class_dir in class_dirs:
        for file in sorted(p for p in class_dir.rglob("*") if _is_image_file(p)):
            rel = file.relative_to(src_dir).as_posix()
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            target = out_dir / "images" / rel if copying else None
            row = {"image_id": rel, "path": _place_image(file, out_dir, target), "label": class_dir.name}
            if split is not None:
                row["split"] = split
            rows.append(row)
    if not rows:
        raise ManifestError(f"{src_dir}: no images found in class folders ({', '.join(IMAGE_EXTENSIONS)})")
    write_manifest(out_dir, rows)
    return load_dataset(out_dir, require_labels=True)


def _coco_box(bbox: Sequence[float], width: float | None, height: float | None) -> list[float] | None:
    """COCO ``[x, y, w, h]`` as ``[x1, y1, x2, y2]`` clipped to the image;
    None when nothing of the box remains."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1, x2, y2 = x, y, x + w, y + h
    if width is not None:
        x1, x2 = max(0.0, x1), min(float(width), x2)
    if height is not None:
        y1, y2 = max(0.0, y1), min(float(height), y2)
    return [x1, y1, x2, y2] if x2 > x1 and y2 > y1 else None


def import_coco(
    instances_json: str | os.PathLike,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    label_from: str | None = "largest",
    split: str | None = None,
    copy: bool = False,
    include_crowd: bool = False,
) -> Dataset:
    """Make a dataset directory from a COCO instances file.

    - ``boxes``: each annotation's ``bbox [x, y, w, h]`` as
      ``[x1, y1, x2, y2] = [x, y, x + w, y + h]``, clipped to the image's
      ``width``/``height``; annotations with nothing left after clipping are
      dropped, and so are crowd annotations unless ``include_crowd``.
      Annotation order follows the JSON.
    - ``region_labels``: the category name of each box.
    - ``label``: with ``label_from="largest"``, the category of the box with
      the largest area ``w*h`` (the first such box on ties); images without
      a box are then left out, since they could not be labelled. With
      ``label_from=None`` there is no label column and every image is kept.
    - ``image_id``: the COCO image id as a string; ``split`` the given value.
    - Images are referenced relative to ``out_dir`` when ``images_dir`` lies
      inside it (and not ``copy``), otherwise copied to
      ``out_dir/images/<file_name>``.
    """
    if label_from not in ("largest", None):
        raise ValueError(f"label_from must be 'largest' or None, got {label_from!r}")
    instances_json, images_dir, out_dir = Path(instances_json), Path(images_dir), Path(out_dir)
    try:
        coco = json.loads(instances_json.read_text())
        categories = {c["id"]: c["name"] for c in coco.get("categories", [])}
        images = coco["images"]
        annotations = coco.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{instances_json}: not a readable COCO instances file: {exc}") from exc

    image_info = {img["id"]: img for img in images}
    regions: dict[Any, list[tuple[list[float], str, float]]] = {img["id"]: [] for img in images}
    for k, ann in enumerate(annotations):
        if ann.get("iscrowd", 0) and not include_crowd:
            continue
        info = image_info.get(ann.get("image_id"))
        if info is None:
            raise ManifestError(f"{instances_json}: annotation {k} refers to unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in categories:
            raise ManifestError(f"{instances_json}: annotation {k} has unknown category_id {ann.get('category_id')!r}")
        box = _coco_box(ann["bbox"], info.get("width"), info.get("height"))
        if box is not None:
            area = float(ann["bbox"][2]) * float(ann["bbox"][3])
            regions[info["id"]].append((box, categories[ann["category_id"]], area))

    copying = copy or not _is_within(images_dir, out_dir)
    rows = []
    for img in images:
        found = regions[img["id"]]
        if label_from == "largest" and not found:
            continue
        src = images_dir / img["file_name"]
        if copying:
            rel = PurePosixPath(img["file_name"].replace("\\", "/"))
            if rel.is_absolute() or ".." in rel.parts:
                raise ManifestError(f"{instances_json}: image {img['id']!r} has an unsafe file_name {img['file_name']!r}")
            path = _place_image(src, out_dir, out_dir / "images" / rel)
        else:
            path = _place_image(src, out_dir, None)
        row = {
            "image_id": str(img["id"]),
            "path": path,
            "boxes": [b for b, _, _ in found],
            "region_labels": [name for _, name, _ in found],
        }
        if label_from == "largest":
            row["label"] = max(found, key=lambda r: r[2])[1]  # max() keeps the first on ties
        if split is not None:
            row["split"] = split
        rows.append(row)
    if not rows:
        raise ManifestError(f"{instances_json}: no images to import")
    write_manifest(out_dir, rows)
    return load_dataset(out_dir, require_labels=label_from is not None)
