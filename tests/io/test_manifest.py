"""Dataset manifests (SPEC §5): schema, round trip, validation messages,
atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ravl_pipeline.io import manifest
from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.io.manifest import (
    MANIFEST_NAME,
    SCHEMA,
    ManifestError,
    read_manifest,
    validate,
    write_manifest,
)


def _png(path: Path, size=(8, 8), color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _rows() -> list[dict]:
    return [
        {
            "image_id": "a",
            "path": "images/a.png",
            "label": "cat",
            "caption": "a cat",
            "split": "val",
            "boxes": [[0, 0, 4, 4], [4, 4, 8, 8]],
            "region_labels": ["cat", "empty"],
        },
        {
            "image_id": "b",
            "path": "images/b.png",
            "label": "dog",
            "caption": "a dog",
            "split": "test",
            "boxes": [[0.0, 0.0, 8.0, 8.0]],
            "region_labels": ["dog"],
        },
    ]


def _two_images(tmp_path: Path) -> Path:
    """A dataset directory holding two 8×8 PNGs and no manifest yet."""
    root = tmp_path / "ds"
    _png(root / "images" / "a.png")
    _png(root / "images" / "b.png", color=(0, 0, 255))
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return _two_images(tmp_path)


def _write_raw(root: Path, rows: list[dict]) -> Path:
    """Write a manifest without write_manifest's checks, as an outside tool
    might."""
    root.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows) if rows else pa.table({"image_id": pa.array([], pa.string()), "path": pa.array([], pa.string())})
    pq.write_table(table, root / MANIFEST_NAME)
    return root / MANIFEST_NAME


# ---------------------------------------------------------------- round trip


def test_round_trip_keeps_values_and_canonical_types(root: Path) -> None:
    file = write_manifest(root, _rows())
    assert file == root / MANIFEST_NAME
    table = read_manifest(root)
    assert table.schema.equals(SCHEMA)
    assert table.to_pylist()[0]["boxes"] == [[0, 0, 4, 4], [4, 4, 8, 8]]

    ds = load_dataset(root, classes=["cat", "dog"], require_labels=True)
    assert len(ds) == 2
    assert ds.image_ids == ["a", "b"]
    assert ds.labels == ["cat", "dog"]
    assert ds.captions == ["a cat", "a dog"]
    assert ds.splits == ["val", "test"]
    assert ds.classes() == ["cat", "dog"]
    assert ds.boxes[0].dtype == np.float32 and ds.boxes[0].shape == (2, 4)
    assert ds.region_labels == [["cat", "empty"], ["dog"]]
    assert ds.image_path(1) == root / "images" / "b.png"
    assert ds.image_size(0) == (8, 8)
    image = ds.load_image(1)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (0, 0, 255)


def test_manifest_types_are_converted_on_read(root: Path) -> None:
    rows = [{"image_id": 1, "path": "images/a.png", "boxes": [[0, 0, 8, 8]]}]
    _write_raw(root, rows)  # int ids and int64 boxes
    table = read_manifest(root)
    assert table.column("image_id").to_pylist() == ["1"]
    assert table.schema.field("boxes").type == SCHEMA.field("boxes").type


# ---------------------------------------------------------------- validation


def _error(root: Path, rows: list[dict], **kwargs) -> str:
    _write_raw(root, rows)
    with pytest.raises(ManifestError) as info:
        load_dataset(root, **kwargs)
    message = str(info.value)
    assert str(root / MANIFEST_NAME) in message
    return message


def _with(i: int, **changes) -> list[dict]:
    rows = _rows()
    rows[i].update(changes)
    return rows


def test_empty_set(root: Path) -> None:
    assert "empty" in _error(root, [])


def test_duplicate_image_id(root: Path) -> None:
    message = _error(root, _with(1, image_id="a"))
    assert "row 1 (image_id 'a')" in message and "duplicate of row 0" in message


def test_missing_image_file(root: Path) -> None:
    message = _error(root, _with(1, path="images/nope.png"))
    assert "row 1 (image_id 'b')" in message and "does not exist" in message and "'path'" in message


def test_unreadable_image_file(root: Path) -> None:
    (root / "images" / "b.png").write_bytes(b"not an image at all")
    message = _error(root, _rows())
    assert "row 1 (image_id 'b')" in message and "unreadable" in message


def test_label_outside_classes(root: Path) -> None:
    message = _error(root, _with(1, label="horse"), classes=["cat", "dog"])
    assert "row 1 (image_id 'b'), column 'label'" in message and "'horse'" in message


def test_missing_label_when_required(root: Path) -> None:
    message = _error(root, _with(0, label=None), require_labels=True)
    assert "row 0 (image_id 'a'), column 'label'" in message and "missing" in message


def test_label_column_absent_when_required(root: Path) -> None:
    rows = [{"image_id": "a", "path": "images/a.png"}]
    assert "column 'label' is required" in _error(root, rows, require_labels=True)


def test_configured_class_without_images(root: Path) -> None:
    message = _error(root, _rows(), classes=["cat", "dog", "bird"], require_labels=True)
    assert "'bird'" in message and "no images" in message


def test_configured_class_missing_from_selected_split(root: Path) -> None:
    message = _error(root, _rows(), classes=["cat", "dog"], require_labels=True, split="val")
    assert "'dog'" in message and "no images" in message


@pytest.mark.parametrize(
    "box, expected",
    [
        ([0, 0, 9, 8], "outside the 8x8 image"),
        ([-1, 0, 4, 4], "outside the 8x8 image"),
        ([4, 4, 4, 6], "degenerate"),
        ([4, 5, 6, 3], "degenerate"),
        ([1, 2, 3], "not 4 numbers"),
        ([0, 0, float("nan"), 4], "non-finite"),
    ],
)
def test_bad_box(root: Path, box: list, expected: str) -> None:
    message = _error(root, _with(1, boxes=[box], region_labels=["dog"]))
    assert "row 1 (image_id 'b'), column 'boxes'" in message and expected in message


def test_box_within_half_pixel_tolerance_is_accepted(root: Path) -> None:
    write_manifest(root, _with(1, boxes=[[-0.4, 0, 8.4, 8]], region_labels=["dog"]))
    ds = load_dataset(root)
    np.testing.assert_allclose(ds.boxes[1], [[-0.4, 0, 8.4, 8]], rtol=1e-6)


def test_region_labels_length_differs_from_boxes(root: Path) -> None:
    message = _error(root, _with(0, region_labels=["cat"]))
    assert "row 0 (image_id 'a'), column 'region_labels'" in message and "1 labels for 2 boxes" in message


@pytest.mark.parametrize("path", ["../outside.png", "images/../../outside.png", "/etc/hostname", "C:\\x.png"])
def test_path_escaping_the_directory(root: Path, path: str) -> None:
    _png(root.parent / "outside.png")
    message = _error(root, _with(1, path=path))
    assert "row 1 (image_id 'b'), column 'path'" in message


def test_unknown_split(root: Path) -> None:
    assert "row 0 (image_id 'a'), column 'split'" in _error(root, _with(0, split="training"))


def test_several_problems_are_listed_together(root: Path) -> None:
    message = _error(root, _with(1, image_id="a", path="images/nope.png"))
    assert "2 problems" in message and "duplicate" in message and "does not exist" in message


def test_validate_accepts_an_in_memory_table(root: Path) -> None:
    table = pa.Table.from_pylist(_with(1, label="horse"))
    with pytest.raises(ManifestError, match="horse"):
        validate(table, root, classes=["cat", "dog"])
    validate(pa.Table.from_pylist(_rows()), root, classes=["cat", "dog"], require_labels=True)


def test_missing_manifest_and_columns(root: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(root)
    (root / MANIFEST_NAME).write_bytes(b"PAR1 garbage")
    with pytest.raises(ManifestError, match="unreadable manifest"):
        read_manifest(root)
    _write_raw(root, [{"image_id": "a"}])
    with pytest.raises(ManifestError, match=r"missing required column\(s\) \['path'\]") as info:
        read_manifest(root)
    assert str(root / MANIFEST_NAME) in str(info.value)


def test_write_manifest_refuses_invalid_rows(root: Path) -> None:
    with pytest.raises(ManifestError, match="duplicate"):
        write_manifest(root, _with(1, image_id="a"))
    assert not (root / MANIFEST_NAME).exists()


# ---------------------------------------------------------------- atomic writes


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_failed_write_keeps_existing_manifest(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_manifest(root, _rows())
    before = (root / MANIFEST_NAME).read_bytes()

    with pytest.raises(ManifestError, match="'boxes'"):
        write_manifest(root, _with(0, boxes="not boxes"))
    assert (root / MANIFEST_NAME).read_bytes() == before

    def write_half_then_fail(table, where, **kwargs):
        where.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(manifest.pq, "write_table", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(root, _rows()[:1])
    assert (root / MANIFEST_NAME).read_bytes() == before
    assert _leftovers(root) == []


def test_overwrite_false_refuses_existing_manifest(root: Path) -> None:
    write_manifest(root, _rows())
    with pytest.raises(FileExistsError):
        write_manifest(root, _rows()[:1], overwrite=False)
    assert len(read_manifest(root)) == 2
    write_manifest(root / "new", [{"image_id": "x", "path": "x.png"}], overwrite=False)  # creates the directory
