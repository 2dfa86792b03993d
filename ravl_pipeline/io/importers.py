"""Importers that build a dataset directory (SPEC §5) from the layouts users
already have: an ImageFolder tree (one folder per class) or a COCO
instances file with its images.

An import is all or nothing. Every row is checked before anything is
written (a COCO file's types, ids, category names and boxes; every source
image a readable regular file). Images referenced in place leave only the
manifest to write, in one atomic rename. Images copied are staged in a
temporary folder beside ``out_dir`` (holding, as hard links, whatever
``out_dir`` already held: it must be new, empty or an earlier dataset),
checked there, and swapped in with one rename
only when every image is copied: a missing or unreadable image, a full
disk or a kill leaves an earlier dataset in ``out_dir`` as it was."""
from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from .dataset import Dataset, load_dataset
from .files import atomic_dir, input_problem, read_json
from .manifest import IMAGE_EXTENSIONS, MANIFEST_NAME, ManifestError, probe_image, write_manifest

__all__ = ["import_imagefolder", "import_coco"]


def _is_within(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def _check_source(src: Path, where: str) -> None:
    """A source image is a regular file PIL can read; otherwise
    :class:`ManifestError` naming ``where`` (the row's origin) and the file."""
    problem = input_problem(src)
    if problem:
        raise ManifestError(f"{where}: image file {src} {problem}")
    try:
        probe_image(src)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ManifestError(f"{where}: image file {src} is unreadable: {exc}") from exc


def _link_or_copy(src: str, dst: str) -> None:
    """What ``out_dir`` held, carried into the staged folder: a hard link
    (no bytes copied), a copy where the file system has none."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(out_dir: Path, stage: Path) -> None:
    """Everything ``out_dir`` holds but its manifest, into ``stage``."""
    if not out_dir.is_dir():
        return
    for entry in os.scandir(out_dir):
        if entry.name == MANIFEST_NAME:
            continue
        target = stage / entry.name
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, str(target))


def _copy_image(src: Path, target: Path, shown: Path) -> None:
    """Copy ``src`` to ``target`` in the stage; a failed write (a full disk)
    names ``shown``, where the image was to go."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(target):  # a link to an earlier file: never write through it
            target.unlink()
        shutil.copyfile(src, target)
    except OSError as exc:
        if exc.errno is not None and exc.filename in (None, str(target), str(target.parent)):
            raise OSError(exc.errno, exc.strerror, str(shown)) from exc
        raise


def _write_dataset(out_dir: Path, rows: list[dict], sources: list[Path], origins: list[str], copying: bool,
                   require_labels: bool, source: str) -> Dataset:
    """Place the images and write the manifest, all or nothing (see the
    module); ``origins`` say where each row came from and ``source`` what
    is imported, for messages."""
    if copying and out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise ManifestError(f"{out_dir}: an existing folder that is not a dataset (no {MANIFEST_NAME}); an import "
                            "that copies its images replaces the folder as a whole, so it writes only into a new or "
                            "empty folder or an earlier dataset")
    for src, where in zip(sources, origins):
        _check_source(src, where)
    if not copying:  # referenced in place: only the manifest is written, once every row is checked
        for row, src in zip(rows, sources):
            row["path"] = src.resolve().relative_to(out_dir.resolve()).as_posix()
        write_manifest(out_dir, rows, check_images=True, require_labels=require_labels)  # boxes against images
        return load_dataset(out_dir, require_labels=require_labels)
    with atomic_dir(out_dir) as stage:
        _carry_over(out_dir, stage)
        for row, src in zip(rows, sources):
            _copy_image(src, stage / "images" / row["path"], out_dir / "images" / row["path"])
            row["path"] = f"images/{row['path']}"
        write_manifest(stage, rows)
        try:
            load_dataset(stage, require_labels=require_labels)  # every image as copied, every box in bounds
        except ManifestError as exc:  # said of what was imported, not of the stage
            def said(text: str) -> str:
                text = text.replace(f"{stage / MANIFEST_NAME}: ", "").replace(str(stage), str(out_dir))
                return f"{source}: not imported ({out_dir} left as it was): {text}"
            raise ManifestError(said(str(exc)), [said(p) for p in exc.problems]) from None
    return load_dataset(out_dir, require_labels=require_labels, check_images=False)  # checked in the stage


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
    problem = input_problem(src_dir, folder=True)
    if problem:
        raise ManifestError(f"{src_dir}: {problem} (an ImageFolder root: one folder per class)")
    copying = copy or not _is_within(src_dir, out_dir)
    rows, sources = [], []
    class_dirs = sorted(d for d in src_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    for class_dir in class_dirs:
        for file in sorted(p for p in class_dir.rglob("*") if _is_image_file(p)):
            rel = file.relative_to(src_dir).as_posix()
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            row = {"image_id": rel, "path": rel, "label": class_dir.name}
            if split is not None:
                row["split"] = split
            rows.append(row)
            sources.append(file)
    if not rows:
        raise ManifestError(f"{src_dir}: no images found in class folders ({', '.join(IMAGE_EXTENSIONS)})")
    return _write_dataset(out_dir, rows, sources, [f"{src_dir}: class {r['label']!r}" for r in rows], copying,
                          require_labels=True, source=str(src_dir))


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
    problem = input_problem(images_dir, folder=True)
    if problem:
        raise ManifestError(f"--images {images_dir}: {problem}")
    rows, sources, origins, seen = [], [], [], {}
    for path, file_split in zip(files, splits):
        for row, file_name in _coco_rows(path, label_from, include_crowd):
            if row["image_id"] in seen:
                raise ManifestError(f"{path}: image id {row['image_id']} is already in {seen[row['image_id']]}")
            seen[row["image_id"]] = path
            if file_split is not None:
                row["split"] = file_split
            rows.append(row)
            sources.append(images_dir / file_name)
            origins.append(f"{path}: image id {row['image_id']}")
    if not rows:
        raise ManifestError(f"{', '.join(map(str, files))}: no images to import")
    # every file is checked before the first image is copied
    return _write_dataset(out_dir, rows, sources, origins, copying, require_labels=label_from is not None,
                          source=", ".join(map(str, files)))


def _coco_rows(instances_json: Path, label_from: str | None, include_crowd: bool) -> list[tuple[dict, str]]:
    """Manifest rows of one COCO instances file (see :func:`import_coco`)
    with each image's ``file_name`` (``path`` is that name, still to be
    placed). Every type, id, name and box is checked first, each problem a
    :class:`ManifestError` naming the file and the key."""
    problem = input_problem(instances_json)
    if problem:
        raise ManifestError(f"{instances_json}: {problem} (a COCO instances JSON file)")
    coco = read_json(instances_json, ManifestError)
    where = str(instances_json)
    images = _objects(coco, "images", where, required=True)
    annotations = _objects(coco, "annotations", where)
    categories: dict[Any, str] = {}
    named: dict[str, Any] = {}
    for k, cat in enumerate(_objects(coco, "categories", where)):
        cid, name = _id(cat, f"categories[{k}]", where), cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ManifestError(f"{where}: categories[{k}] (id {cid!r}), key 'name': expected a non-empty "
                                f"string, got {name!r}")
        if cid in categories:
            raise ManifestError(f"{where}: categories[{k}]: category id {cid!r} appears twice")
        if name in named:
            raise ManifestError(f"{where}: categories[{k}]: two categories named {name!r} (ids {named[name]!r} and "
                                f"{cid!r}) would become one class; rename one or give both the same id")
        categories[cid], named[name] = name, cid

    image_info: dict[Any, dict] = {}
    for k, img in enumerate(images):
        iid = _id(img, f"images[{k}]", where)
        if iid in image_info:
            raise ManifestError(f"{where}: images[{k}]: image id {iid!r} appears twice")
        _file_name(img, f"images[{k}] (id {iid!r})", where)
        for key in ("width", "height"):
            value = img.get(key)
            if value is not None and not (_number(value) and value > 0):
                raise ManifestError(f"{where}: images[{k}] (id {iid!r}), key {key!r}: expected a positive number, "
                                    f"got {value!r}")
        image_info[iid] = img

    regions: dict[Any, list[tuple[list[float], str, float]]] = {iid: [] for iid in image_info}
    for k, ann in enumerate(annotations):
        name = f"annotations[{k}] (annotation id {ann.get('id', '?')!r})"
        if ann.get("iscrowd", 0) and not include_crowd:
            continue
        info = image_info.get(ann.get("image_id"))
        if info is None:
            raise ManifestError(f"{where}: {name} refers to unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in categories:
            raise ManifestError(f"{where}: {name} has unknown category_id {ann.get('category_id')!r}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
            raise ManifestError(f"{where}: {name}, key 'bbox': expected [x, y, width, height], four finite "
                                f"numbers, got {_short(bbox)}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise ManifestError(f"{where}: {name}, key 'bbox': width and height must not be negative, got {bbox}")
        box = _coco_box(bbox, info.get("width"), info.get("height"))
        if box is not None:
            regions[info["id"]].append((box, categories[ann["category_id"]], float(bbox[2]) * float(bbox[3])))

    rows = []
    for img in images:
        found = regions[img["id"]]
        if label_from == "largest" and not found:
            continue
        rel = PurePosixPath(img["file_name"].replace("\\", "/"))
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


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _objects(coco: dict, key: str, where: str, required: bool = False) -> list[dict]:
    """``coco[key]``: a list of JSON objects."""
    if key not in coco:
        if required:
            raise ManifestError(f"{where}: missing key {key!r}; not a COCO instances file")
        return []
    value = coco[key]
    if not isinstance(value, list):
        raise ManifestError(f"{where}: key {key!r}: expected a list, got {type(value).__name__}")
    for k, item in enumerate(value):
        if not isinstance(item, dict):
            raise ManifestError(f"{where}: {key}[{k}]: expected a JSON object, got {_short(item)}")
    return value


def _id(item: dict, name: str, where: str) -> Any:
    value = item.get("id")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ManifestError(f"{where}: {name}, key 'id': expected an integer or a string, got {_short(value)}")
    return value


def _file_name(img: dict, name: str, where: str) -> None:
    """An image's ``file_name``: a relative path naming a file under the images folder."""
    value = img.get("file_name")
    if not isinstance(value, str):
        raise ManifestError(f"{where}: {name}, key 'file_name': expected a string, got {_short(value)}")
    rel = PurePosixPath(value.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or rel.name in (".", "") or value.endswith(("/", "\\")):
        raise ManifestError(f"{where}: {name}, key 'file_name': {value!r} does not name a file inside the images "
                            "folder (expected a relative path such as '000001.jpg')")
