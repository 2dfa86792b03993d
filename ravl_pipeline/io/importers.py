"""Importers that build a dataset directory (SPEC §5) from the layouts users
already have: an ImageFolder tree (one folder per class) or a COCO
instances file with its images."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from .dataset import Dataset, load_dataset
from .manifest import IMAGE_EXTENSIONS, ManifestError, write_manifest

__all__ = ["import_imagefolder", "import_coco"]


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
    instances_json: str | os.PathLike | Sequence[str | os.PathLike],
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    label_from: str | None = "largest",
    split: str | Sequence[str] | None = None,
    copy: bool = False,
    include_crowd: bool = False,
) -> Dataset:
    """Make a dataset directory from COCO instances files.

    - Several files (real COCO ships ``instances_train2017.json`` and
      ``instances_val2017.json``) go into one manifest, in the order given;
      ``split`` is then one value per file (each file's rows get its split)
      or one value for all. Image ids must be unique across the files.
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
    - ``image_id``: the COCO image id as a string.
    - Images are referenced relative to ``out_dir`` when ``images_dir`` lies
      inside it (and not ``copy``), otherwise copied to
      ``out_dir/images/<file_name>``.
    """
    if label_from not in ("largest", None):
        raise ManifestError(f"label_from must be 'largest' or None, got {label_from!r}")
    files = [Path(instances_json)] if isinstance(instances_json, (str, os.PathLike)) else \
        [Path(p) for p in instances_json]
    splits = [split] * len(files) if split is None or isinstance(split, str) else list(split)
    if not files or len(splits) != len(files):
        raise ManifestError(f"give one split per instances file ({len(files)} files), or one for all; got {splits}")
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    copying = copy or not _is_within(images_dir, out_dir)
    rows, sources, seen = [], [], {}
    for path, file_split in zip(files, splits):
        for row, file_name in _coco_rows(path, label_from, include_crowd, copying):
            if row["image_id"] in seen:
                raise ManifestError(f"{path}: image id {row['image_id']} is already in {seen[row['image_id']]}")
            seen[row["image_id"]] = path
            if file_split is not None:
                row["split"] = file_split
            rows.append(row)
            sources.append(images_dir / file_name)
    if not rows:
        raise ManifestError(f"{', '.join(map(str, files))}: no images to import")
    # every file is checked before the first image is copied
    for row, src in zip(rows, sources):
        row["path"] = _place_image(src, out_dir, out_dir / "images" / row["path"] if copying else None)
    write_manifest(out_dir, rows)
    return load_dataset(out_dir, require_labels=label_from is not None)


def _coco_rows(instances_json: Path, label_from: str | None, include_crowd: bool,
               copying: bool) -> list[tuple[dict, str]]:
    """Manifest rows of one COCO instances file (see :func:`import_coco`)
    with each image's ``file_name``; ``path`` is still to be placed (when
    ``copying``, the file's path under ``images/``)."""
    try:
        coco = json.loads(instances_json.read_text())
        categories = {c["id"]: c["name"] for c in coco.get("categories", [])}
        images = coco["images"]
        annotations = coco.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{instances_json}: not a readable COCO instances file: {exc}") from exc

    try:
        return _import_coco_rows(categories, images, annotations, instances_json, label_from, include_crowd,
                                 copying)
    except ManifestError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ManifestError(f"{instances_json}: not a COCO instances file ({type(exc).__name__}: {exc}); "
                            "expected images with 'id' and 'file_name', annotations with 'image_id', "
                            "'category_id' and 'bbox'") from exc


def _import_coco_rows(categories, images, annotations, instances_json: Path, label_from, include_crowd,
                      copying: bool) -> list[tuple[dict, str]]:
    """The rows of :func:`_coco_rows`, once the file is parsed."""
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

    rows = []
    for img in images:
        found = regions[img["id"]]
        if label_from == "largest" and not found:
            continue
        rel = PurePosixPath(img["file_name"].replace("\\", "/"))
        if copying and (rel.is_absolute() or ".." in rel.parts):
            raise ManifestError(f"{instances_json}: image {img['id']!r} has an unsafe file_name {img['file_name']!r}")
        row = {
            "image_id": str(img["id"]),
            "path": rel.as_posix(),
            "boxes": [b for b, _, _ in found],
            "region_labels": [name for _, name, _ in found],
        }
        if label_from == "largest":
            row["label"] = max(found, key=lambda r: r[2])[1]  # max() keeps the first on ties
        rows.append((row, img["file_name"]))
    return rows
