"""Region proposers (SPEC §1.1): every registered proposer gives float32
boxes ``[x1, y1, x2, y2]`` inside the original image, the right number of
them, in a stable order, on square and non-square images; a bad spec is
refused by name."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ravl_pipeline.core.regions import (
    PROPOSERS,
    ProposerError,
    grid_boxes,
    parse_proposer,
    propose,
    propose_dataset,
    region_labels_for,
)
from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.io.manifest import write_manifest

SIZES = [(56, 56), (80, 56), (56, 90), (57, 31)]  # square, wide, tall, odd
GRID_NS = (1, 2, 3, 5)


def _manifest_boxes(width: int, height: int) -> np.ndarray:
    """Boxes an importer might give: overlapping, fractional, one touching
    the right and bottom edges, deliberately not in reading order."""
    return np.array([
        [width * 0.5, height * 0.25, width, height],
        [0.0, 0.0, width * 0.4, height * 0.6],
        [1.5, 2.25, width - 3.5, height - 1.0],
    ], dtype=np.float64)


def _specs() -> list[str]:
    """Every proposer the grammar registers, ``grid:N`` for a few N."""
    specs = []
    for entry in PROPOSERS:
        if entry == "grid:N":
            specs += [f"grid:{n}" for n in GRID_NS]
        elif entry in ("quadrants", "boxes"):
            specs.append(entry)
        else:
            raise AssertionError(f"proposer {entry!r} is registered but not covered by this test")
    return specs


def _expected_count(spec: str, width: int, height: int) -> int:
    kind, n = parse_proposer(spec)
    return len(_manifest_boxes(width, height)) if kind == "boxes" else n * n


def test_every_registered_proposer_is_covered():
    assert set(PROPOSERS) == {"quadrants", "grid:N", "boxes"}
    assert {"quadrants", "boxes"} <= set(_specs()) and any(s.startswith("grid:") for s in _specs())


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("spec", _specs())
def test_proposer_gives_valid_boxes_inside_the_image(spec: str, size: tuple[int, int]):
    width, height = size
    manifest = _manifest_boxes(width, height)
    boxes = propose(spec, width, height, manifest, image_id="im")
    assert isinstance(boxes, np.ndarray) and boxes.dtype == np.float32
    assert boxes.shape == (_expected_count(spec, width, height), 4)
    assert np.all(np.isfinite(boxes))
    x1, y1, x2, y2 = boxes.T
    assert np.all(x2 > x1) and np.all(y2 > y1)
    assert np.all(x1 >= 0) and np.all(y1 >= 0) and np.all(x2 <= width) and np.all(y2 <= height)
    # stable: the same call gives the same boxes in the same order
    np.testing.assert_array_equal(propose(spec, width, height, manifest.copy(), image_id="im"), boxes)
    if parse_proposer(spec)[0] == "boxes":
        # manifest boxes are kept as given, in manifest order
        np.testing.assert_array_equal(boxes, manifest.astype(np.float32))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("n", GRID_NS)
def test_grid_cells_tile_the_image_row_major(n: int, size: tuple[int, int]):
    width, height = size
    boxes = propose(f"grid:{n}", width, height)
    np.testing.assert_array_equal(boxes, grid_boxes(width, height, n))
    cells = boxes.reshape(n, n, 4)  # [row, column]
    # equal cells: every width W/N, every height H/N
    np.testing.assert_allclose(cells[..., 2] - cells[..., 0], width / n, rtol=1e-6)
    np.testing.assert_allclose(cells[..., 3] - cells[..., 1], height / n, rtol=1e-6)
    # left to right within a row, then top to bottom; neighbours share an edge
    np.testing.assert_allclose(cells[:, 1:, 0], cells[:, :-1, 2])
    np.testing.assert_allclose(cells[1:, :, 1], cells[:-1, :, 3])
    np.testing.assert_allclose(cells[:, 0, 0], 0.0)
    np.testing.assert_allclose(cells[0, :, 1], 0.0)
    np.testing.assert_allclose(cells[:, -1, 2], width, rtol=1e-6)
    np.testing.assert_allclose(cells[-1, :, 3], height, rtol=1e-6)
    # so the cells cover the image exactly once
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert float(area.sum()) == pytest.approx(width * height, rel=1e-5)


def test_quadrants_are_the_two_by_two_grid():
    np.testing.assert_allclose(propose("quadrants", 56, 56),
                               [[0, 0, 28, 28], [28, 0, 56, 28], [0, 28, 28, 56], [28, 28, 56, 56]])
    np.testing.assert_allclose(propose("quadrants", 80, 56),
                               [[0, 0, 40, 28], [40, 0, 80, 28], [0, 28, 40, 56], [40, 28, 80, 56]])
    np.testing.assert_array_equal(propose("quadrants", 57, 31), propose("grid:2", 57, 31))
    assert parse_proposer("quadrants") == ("grid", 2)
    assert parse_proposer("grid:4") == ("grid", 4)
    assert parse_proposer("boxes") == ("boxes", 0)


@pytest.mark.parametrize("spec", ["grid:0", "grid:", "grid:x", "grid:-1", "grid:2.5", "grid", "Grid:2",
                                  "quadrant", "box", "boxes:3", "", "random"])
def test_bad_spec_is_refused_by_name(spec: str):
    for call in (lambda: parse_proposer(spec), lambda: propose(spec, 56, 56)):
        with pytest.raises(ProposerError) as info:
            call()
        message = str(info.value)
        assert repr(spec) in message
        assert all(entry in message for entry in PROPOSERS)  # says what would be accepted


def test_boxes_proposer_needs_boxes():
    with pytest.raises(ProposerError, match="needs manifest boxes for image 'x'"):
        propose("boxes", 10, 10, None, image_id="x")
    with pytest.raises(ProposerError, match="needs manifest boxes for image 'x'"):
        propose("boxes", 10, 10, np.zeros((0, 4)), image_id="x")


# --------------------------------------------------------------------------
# whole datasets
# --------------------------------------------------------------------------


def _dataset(root: Path, with_boxes: bool = True):
    rng = np.random.default_rng(0)
    rows = []
    (root / "img").mkdir(parents=True)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        row = {"image_id": f"im{i}", "path": f"img/{i}.png"}
        if with_boxes:
            row["boxes"] = _manifest_boxes(w, h).tolist()
            row["region_labels"] = ["a", "b", "c"]
        rows.append(row)
    write_manifest(root, rows)
    return load_dataset(root)


@pytest.mark.parametrize("spec", _specs())
def test_propose_dataset_uses_each_images_own_size(spec: str, tmp_path: Path):
    ds = _dataset(tmp_path)
    proposals = propose_dataset(ds, spec)
    assert len(proposals) == len(ds)
    for i, boxes in enumerate(proposals):
        width, height = ds.image_size(i)
        np.testing.assert_array_equal(boxes, propose(spec, width, height, ds.boxes[i], ds.image_ids[i]))
        assert boxes.dtype == np.float32 and len(boxes) == _expected_count(spec, width, height)
    for a, b in zip(proposals, propose_dataset(ds, spec)):
        np.testing.assert_array_equal(a, b)


def test_propose_dataset_errors(tmp_path: Path):
    ds = _dataset(tmp_path, with_boxes=False)
    with pytest.raises(ProposerError, match="proposer 'boxes' needs a 'boxes' column"):
        propose_dataset(ds, "boxes")
    with pytest.raises(ProposerError, match="'grid:0'"):
        propose_dataset(ds, "grid:0")


def test_region_labels_follow_the_proposals(tmp_path: Path):
    ds = _dataset(tmp_path)
    assert region_labels_for(ds, "boxes") == [["a", "b", "c"]] * len(ds)
    assert region_labels_for(ds, "quadrants") is None  # the grid cells are not the labelled boxes
    assert region_labels_for(_dataset(tmp_path / "plain", with_boxes=False), "boxes") is None
    # synthetic settings: the quadrants are the labelled boxes, so their labels apply
    quads = tmp_path / "quads"
    (quads / "img").mkdir(parents=True)
    Image.new("RGB", (56, 56)).save(quads / "img" / "0.png")
    write_manifest(quads, [{"image_id": "q", "path": "img/0.png", "boxes": propose("quadrants", 56, 56).tolist(),
                            "region_labels": ["nine", "empty", "red square", "empty"]}])
    assert region_labels_for(load_dataset(quads), "quadrants") == [["nine", "empty", "red square", "empty"]]
    assert region_labels_for(load_dataset(quads), "grid:3") is None
