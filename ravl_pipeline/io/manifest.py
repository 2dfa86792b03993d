"""The dataset manifest (SPEC §5): its schema, reading, writing and row-level
validation — one concept, which is why this module is longer than most.

A dataset directory is ``manifest.parquet`` plus image files that the
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

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..config import InputError
from .files import atomic_write, input_problem

__all__ = [
    "BOX_TOLERANCE",
    "IMAGE_EXTENSIONS",
    "MANIFEST_NAME",
    "ManifestError",
    "REQUIRED_COLUMNS",
    "SCHEMA",
    "SPLITS",
    "canonicalize",
    "dataset_root",
    "manifest_path",
    "outside_link_problem",
    "probe_image",
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


class ManifestError(InputError):
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
    """Whether ``path`` names the manifest file rather than its folder; a
    Parquet file of another name is refused (it would not be what is read)."""
    if path.suffix != ".parquet" or path.is_dir():
        return False
    if path.name != MANIFEST_NAME:
        raise ManifestError(f"{path}: a dataset is its folder with a {MANIFEST_NAME}, and {path.name} is not "
                            f"that file: name the folder ({path.parent}) or a file called {MANIFEST_NAME}")
    return True


def dataset_root(root: str | os.PathLike) -> Path:
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
    problem = input_problem(file)
    if problem == "does not exist":
        raise ManifestError(f"{file}: no manifest (expected a {MANIFEST_NAME} in {file.parent})")
    if problem:
        raise ManifestError(f"{file}: {problem} (the dataset's manifest)")
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
    *,
    check_images: bool = False,
    require_labels: bool = False,
) -> Path:
    """Write a manifest into dataset directory ``root`` (created if needed).

    ``table_or_rows`` is a pyarrow table, a list of row dicts, or a dict of
    columns. The table is converted to the canonical schema and checked with
    :func:`validate` (opening the images only with ``check_images``) *before*
    anything is written,
    then written to a temporary file in ``root`` and moved over the manifest
    with ``os.replace``, so readers see the old manifest or the new one,
    never a partial file. Returns the manifest path.
    """
    root = dataset_root(root)
    file = root / MANIFEST_NAME
    if isinstance(table_or_rows, pa.Table):
        table = table_or_rows
    elif isinstance(table_or_rows, Mapping):
        table = _table_from_columns(table_or_rows, file)
    else:
        table = _table_from_rows(table_or_rows, file)
    table = canonicalize(table, file)
    validate(table, root, require_labels=require_labels, check_images=check_images)
    if file.exists() and not overwrite:
        raise FileExistsError(f"{file}: manifest exists and overwrite=False")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(file, lambda f: pq.write_table(table, f))
    return file



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


def outside_link_problem(root: Path, path: str) -> str | None:
    """Why image ``path`` of dataset directory ``root``, although written as
    a relative path inside it, leads outside it through a symbolic link; or
    None. Such a file is never opened."""
    file = root / path
    try:
        target = file.resolve()
        inside = target.is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a link loop
        return f"{path!r} is a symbolic link that cannot be resolved"
    if inside:
        return None
    return (f"{path!r} is, or lies under, a symbolic link leading outside the dataset directory (to {target}); "
            "copy the image into the dataset directory")


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
    - a ``path`` that is empty, absolute or escapes ``root`` with ``..``
      or (with ``check_images``) through a symbolic link;
    - with ``check_images``: an image file that is missing or that PIL cannot
      open and ``verify()``; a box outside its image (``BOX_TOLERANCE`` px);
    - a missing ``label`` when ``require_labels``; a label outside
      ``classes``; with ``classes`` and ``require_labels``, a configured class
      that has no image;
    - a ``split`` other than train/val/test;
    - a box that is not 4 finite numbers or is degenerate (x2<=x1 or y2<=y1);
    - ``region_labels`` whose length differs from ``boxes``.
    """
    root = dataset_root(root)
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
        escape = outside_link_problem(root, path)
        if escape:
            problems.row(i, "path", escape)
            continue
        file = root / path
        problem = input_problem(file)
        if problem:
            problems.row(i, "path", f"image file {file} {problem}")
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
    if boxes is None and region_labels is not None and any(labels for labels in region_labels):
        problems.table("column 'region_labels' is given without a 'boxes' column; region labels name the "
                       "boxes they are aligned with: add 'boxes' or drop 'region_labels'")
        return
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


