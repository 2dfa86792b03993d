"""Importers (SPEC §5, §4.3): ImageFolder trees and COCO instances files
become dataset directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.io.importers import import_coco, import_imagefolder
from ravl_pipeline.io.manifest import ManifestError
from tests.io.test_manifest import _png


def _imagefolder(src: Path) -> None:
    _png(src / "cat" / "1.png")
    _png(src / "cat" / "sub" / "2.jpg")
    _png(src / "dog" / "1.png")
    (src / "dog" / "notes.txt").write_text("not an image")
    _png(src / ".hidden" / "x.png")


def test_import_imagefolder_copies_when_outside(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _imagefolder(src)
    ds = import_imagefolder(src, out, split="train")
    assert ds.image_ids == ["cat/1.png", "cat/sub/2.jpg", "dog/1.png"]
    assert ds.labels == ["cat", "cat", "dog"]
    assert ds.splits == ["train"] * 3
    assert ds.paths == ["images/cat/1.png", "images/cat/sub/2.jpg", "images/dog/1.png"]
    assert all(ds.image_path(i).is_file() for i in range(len(ds)))
    assert load_dataset(out, classes=["cat", "dog"], require_labels=True).classes() == ["cat", "dog"]


def test_import_imagefolder_references_in_place(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _imagefolder(out / "raw")
    ds = import_imagefolder(out / "raw", out)
    assert ds.paths == ["raw/cat/1.png", "raw/cat/sub/2.jpg", "raw/dog/1.png"]
    assert ds.splits is None
    assert not (out / "images").exists()
    assert import_imagefolder(out / "raw", out, copy=True).paths[0] == "images/cat/1.png"


def test_import_imagefolder_without_images(tmp_path: Path) -> None:
    (tmp_path / "src" / "cat").mkdir(parents=True)
    with pytest.raises(ManifestError, match="no images"):
        import_imagefolder(tmp_path / "src", tmp_path / "out")


def _coco(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "coco" / "val2017"
    _png(images / "000001.png", size=(40, 30))
    _png(images / "000002.png", size=(20, 20))
    _png(images / "000003.png", size=(10, 10))
    instances = {
        "images": [
            {"id": 1, "file_name": "000001.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "000002.png", "width": 20, "height": 20},
            {"id": 3, "file_name": "000003.png", "width": 10, "height": 10},
        ],
        "categories": [{"id": 18, "name": "dog"}, {"id": 62, "name": "chair"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 62, "bbox": [2, 3, 10, 5], "iscrowd": 0},  # area 50
            {"id": 11, "image_id": 1, "category_id": 18, "bbox": [10.5, 4, 20, 20], "iscrowd": 0},  # area 400
            {"id": 12, "image_id": 1, "category_id": 62, "bbox": [0, 0, 40, 30], "iscrowd": 1},  # crowd
            {"id": 13, "image_id": 2, "category_id": 62, "bbox": [15, 15, 10, 10], "iscrowd": 0},  # overshoots
        ],
    }
    path = tmp_path / "coco" / "instances_val2017.json"
    path.write_text(json.dumps(instances))
    return path, images


def test_import_coco_converts_boxes_and_labels(tmp_path: Path) -> None:
    instances, images = _coco(tmp_path)
    ds = import_coco(instances, images, tmp_path / "out", split="val")
    assert ds.image_ids == ["1", "2"]  # image 3 has no box, so no label
    np.testing.assert_allclose(ds.boxes[0], [[2, 3, 12, 8], [10.5, 4, 30.5, 24]])
    np.testing.assert_allclose(ds.boxes[1], [[15, 15, 20, 20]])  # clipped to the image
    assert ds.region_labels == [["chair", "dog"], ["chair"]]
    assert ds.labels == ["dog", "chair"]  # category of the largest box
    assert ds.splits == ["val", "val"]
    assert ds.paths == ["images/000001.png", "images/000002.png"]
    assert ds.image_size(0) == (40, 30)


def test_import_coco_without_labels_keeps_every_image(tmp_path: Path) -> None:
    instances, images = _coco(tmp_path)
    out = tmp_path / "coco"  # images_dir lies inside: referenced, not copied
    ds = import_coco(instances, images, out, label_from=None, include_crowd=True)
    assert ds.image_ids == ["1", "2", "3"]
    assert ds.labels is None
    assert ds.region_labels[0] == ["chair", "dog", "chair"]
    assert ds.boxes[2].shape == (0, 4)
    assert ds.paths[0] == "val2017/000001.png"


def test_import_coco_several_files_one_split_each(tmp_path: Path) -> None:
    """Real COCO ships one instances file per split; they go into one
    manifest, each file's rows with its split, ids unique across files."""
    instances, images = _coco(tmp_path)
    second = json.loads(instances.read_text())
    for img in second["images"]:
        img["id"] += 100
    for ann in second["annotations"]:
        ann["image_id"] += 100
    other = instances.with_name("instances_test.json")
    other.write_text(json.dumps(second))
    ds = import_coco([instances, other], images, tmp_path / "out", split=["val", "test"])
    assert ds.image_ids == ["1", "2", "101", "102"]
    assert ds.splits == ["val", "val", "test", "test"]
    assert ds.labels == ["dog", "chair", "dog", "chair"]
    with pytest.raises(ManifestError, match="image id 1 is already in"):
        import_coco([instances, instances], images, tmp_path / "dup", split=["val", "test"])
    with pytest.raises(ValueError, match="one split per instances file"):
        import_coco([instances, other], images, tmp_path / "bad", split=["val", "test", "train"])
    assert not (tmp_path / "dup").exists() and not (tmp_path / "bad").exists()
