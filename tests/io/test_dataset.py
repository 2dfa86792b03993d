"""Datasets (SPEC §5): column accessors, subsets, lazy image checks,
immutability."""

from __future__ import annotations

import warnings

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ravl_pipeline.io import dataset as dataset_module
from ravl_pipeline.io.dataset import Dataset, ImageModeWarning, load_dataset
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


def test_a_16_bit_image_keeps_its_grey_levels(tmp_path):
    """16-bit grey levels are scaled to 8 bits, not clipped at 255 (which
    left an all-white image), with one warning naming the first such file."""
    levels = (np.arange(56 * 56).reshape(56, 56) * 20).astype(np.uint16)  # 0 … 62,700
    Image.fromarray(levels).save(tmp_path / "wide.png")
    write_manifest(tmp_path, [{"image_id": "w", "path": "wide.png", "label": "a"}])
    dataset_module._warned_modes.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rgb = np.asarray(load_dataset(tmp_path).load_image(0))
    assert rgb.shape == (56, 56, 3) and rgb.dtype == np.uint8
    np.testing.assert_allclose(rgb[..., 0], np.rint(levels / 65535 * 255), atol=1)
    assert len(np.unique(rgb)) > 200  # clipping kept 14 levels
    assert [w.category for w in caught] == [ImageModeWarning] and "wide.png" in str(caught[0].message)
