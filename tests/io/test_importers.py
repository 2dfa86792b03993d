"""Importers (SPEC §5, §4.3): ImageFolder trees and COCO instances files
become dataset directories."""

from __future__ import annotations

import errno
import json
import shutil
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


def _tree(folder: Path) -> dict[str, bytes | str]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


def test_an_import_into_an_existing_folder_keeps_its_other_files(tmp_path: Path) -> None:
    """A copying import replaces the folder's manifest and adds its images;
    what else the folder held stays (carried over, not rewritten), and so do
    sources that lie inside it."""
    instances, images = _coco(tmp_path)
    out = tmp_path / "out"
    _imagefolder(out / "raw")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ManifestError, match="not a dataset"):  # copying replaces the folder: not any folder
        import_coco(instances, images, out, split="val")
    import_imagefolder(out / "raw", out)  # an earlier dataset, its images in place
    ds = import_coco(instances, images, out, split="val")
    assert (out / "notes.txt").read_text() == "mine" and (out / "raw" / "cat" / "1.png").is_file()
    assert ds.paths == ["images/000001.png", "images/000002.png"]
    ds = import_imagefolder(out / "raw", out, copy=True)  # sources inside the folder it replaces
    assert ds.paths[0] == "images/cat/1.png" and (out / "raw" / "cat" / "1.png").is_file()
    assert (out / "images" / "000001.png").is_file()  # the earlier import's images stay
    assert not [p for p in tmp_path.iterdir() if ".ravl-" in p.name]


@pytest.mark.parametrize("failure", ["missing", "unreadable", "full-disk", "box-outside"])
def test_a_failed_import_leaves_an_earlier_dataset_as_it_was(tmp_path: Path, monkeypatch, failure) -> None:
    """All or nothing: whatever fails, before or after the first image is
    copied, the earlier dataset in --out is byte-identical and nothing is
    left beside it."""
    instances, images = _coco(tmp_path)
    out = tmp_path / "out"
    import_coco(instances, images, out, split="val")
    before = _tree(out)
    coco = json.loads(instances.read_text())
    if failure == "missing":
        coco["images"][1]["file_name"] = "absent.png"
    elif failure == "unreadable":
        (images / "000002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    elif failure == "box-outside":
        coco["images"][0].update(width=400, height=300)
        coco["annotations"][1]["bbox"] = [100, 100, 200, 100]
    else:
        real, calls = shutil.copyfile, []

        def full_disk(src, dst, *args, **kwargs):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(shutil, "copyfile", full_disk)
    instances.write_text(json.dumps(coco))
    error = OSError if failure == "full-disk" else ManifestError
    with pytest.raises(error) as caught:
        import_coco(instances, images, out, split="test")
    if failure == "full-disk":
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(out / "images" / "000002.png")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco", "out"]


@pytest.mark.parametrize("change, needles", [
    ({"annotations": {"bbox": [0, 0, 1, 1]}}, ("key 'annotations'", "a list")),
    ({"categories": [{"id": 18, "name": "dog"}, {"id": 62, "name": "dog"}]}, ("two categories named 'dog'",)),
    ({"categories": [{"id": 18, "name": 5}]}, ("categories[0]", "'name'")),
    ({"images": [{"id": 1, "file_name": "../x.png"}]}, ("images[0]", "'file_name'")),
    ({"images": [{"id": 1.5, "file_name": "000001.png"}]}, ("images[0]", "'id'")),
    ({"images": [{"id": 1, "file_name": "000001.png", "width": -4}]}, ("images[0]", "'width'")),
])
def test_coco_types_and_values_are_checked_naming_the_key(tmp_path: Path, change, needles) -> None:
    instances, images = _coco(tmp_path)
    coco = json.loads(instances.read_text())
    coco.update(change)
    instances.write_text(json.dumps(coco))
    with pytest.raises(ManifestError) as caught:
        import_coco(instances, images, tmp_path / "out")
    assert str(instances) in str(caught.value)
    for needle in needles:
        assert needle in str(caught.value)
    assert not (tmp_path / "out").exists()
