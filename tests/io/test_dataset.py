"""Datasets (SPEC §5): column accessors, subsets, lazy image checks,
immutability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ravl_pipeline.io.dataset import Dataset, load_dataset
from ravl_pipeline.io.manifest import ManifestError, write_manifest
from tests.io.test_manifest import _rows, _two_images


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return _two_images(tmp_path)


def test_optional_columns_absent_and_extra_columns_kept(root: Path) -> None:
    write_manifest(root, {"image_id": ["a"], "path": ["images/a.png"], "source": ["web"]})
    ds = load_dataset(root)
    assert ds.labels is None and ds.boxes is None and ds.region_labels is None and ds.classes() == []
    assert ds.table.column_names == ["image_id", "path", "source"]


def test_subset_by_split_and_indices(root: Path) -> None:
    write_manifest(root, _rows())
    ds = load_dataset(root)
    assert ds.subset(split="test").image_ids == ["b"]
    assert ds.subset("val").image_ids == ["a"]
    assert ds.subset([1, 0]).image_ids == ["b", "a"]
    assert ds.subset([1]).root == root
    assert ds.subset(np.array([False, True])).image_ids == ["b"]
    assert load_dataset(root, split="val").image_ids == ["a"]


def test_unreadable_image_is_skipped_without_check_images(root: Path) -> None:
    (root / "images" / "b.png").write_bytes(b"not an image at all")
    write_manifest(root, _rows())
    ds = load_dataset(root, check_images=False)
    with pytest.raises(ManifestError, match=r"row 1 \(image_id 'b'\)"):
        ds.load_image(1)


def test_dataset_is_immutable(root: Path) -> None:
    write_manifest(root, _rows())
    ds = load_dataset(root)
    with pytest.raises(AttributeError):
        ds.table = ds.table.slice(0, 1)  # type: ignore[misc]
    assert isinstance(ds.subset([0]), Dataset)
