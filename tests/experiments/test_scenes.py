"""COCO-style synthetic scenes (SPEC §4.3): what the generator writes, and
that it enters through the COCO importer like real COCO."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ravl_pipeline.experiments.scenes import (ASPECTS, MAIN_SIZE, MAX_OBJECTS, ScenesConfig, make_scenes_setting,
                                              scene_splits, write_scenes)
from ravl_pipeline.experiments.synth import FeatureSpec, cramers_v
from ravl_pipeline.io.dataset import induced_pairs, load_dataset

SMALL = dict(n_pretrain=40, n_finetune=200, n_val=60, n_test=40)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("scenes")
    return root, make_scenes_setting(root, ScenesConfig(strength=0.9, **SMALL))


def test_images_are_non_square_of_both_orientations_with_two_to_six_objects(scenes):
    root, _ = scenes
    ds = load_dataset(root / "eval")
    sizes = [ds.image_size(i) for i in range(len(ds))]
    assert all(w != h and min(w, h) == 128 for w, h in sizes)
    assert {w > h for w, h in sizes} == {True, False}
    assert all(min(abs(max(w, h) / min(w, h) - a) for a in ASPECTS) < 0.01 for w, h in sizes)
    counts = [len(b) for b in ds.boxes]
    assert min(counts) >= 2 and max(counts) <= MAX_OBJECTS and len(set(counts)) >= 3


def test_the_main_object_is_the_largest_box_and_inside_the_centre_crop(scenes):
    root, _ = scenes
    ds = load_dataset(root / "eval")
    for i in range(len(ds)):
        w, h = ds.image_size(i)
        boxes, labels = ds.boxes[i], ds.region_labels[i]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        main = int(np.argmax(area))
        assert labels[main] == ds.labels[i] and labels.count(ds.labels[i]) == 1  # the importer's label
        side = boxes[main, 2] - boxes[main, 0]
        assert MAIN_SIZE[0] * 128 - 1 <= side <= MAIN_SIZE[1] * 128 + 1
        x0, y0 = (w - 128) / 2, (h - 128) / 2
        assert boxes[main, 0] >= x0 - 1 and boxes[main, 2] <= x0 + 129
        assert boxes[main, 1] >= y0 - 1 and boxes[main, 3] <= y0 + 129
        others = np.delete(area, main)
        assert np.all(others < area[main])


def test_planted_object_sits_anywhere_edges_included_and_at_the_target_strength(scenes):
    root, setting = scenes
    assert induced_pairs(root / "eval") == [("red square", "nine")]
    ft = load_dataset(root / "finetune")
    present = np.array(["red square" in labs for labs in ft.region_labels])
    assert cramers_v(present, np.array(ft.labels) == "nine") == pytest.approx(0.9, abs=0.05)
    assert setting["stats"]["finetune"]["features"]["red square"]["cramers_v"] == pytest.approx(0.9, abs=0.05)
    ev = load_dataset(root / "eval", split="val")
    present = np.array(["red square" in labs for labs in ev.region_labels])
    assert abs(present.mean() - 0.5) < 0.1 and cramers_v(present, np.array(ev.labels) == "nine") < 0.15
    cut, planted = 0, 0  # planted boxes that the model's centre crop cuts or drops
    for i in range(len(ft)):
        w, h = ft.image_size(i)
        x0, y0 = (w - 128) / 2, (h - 128) / 2
        for box, lab in zip(ft.boxes[i], ft.region_labels[i]):
            if lab == "red square":
                planted += 1
                cut += box[0] < x0 or box[2] > x0 + 128 or box[1] < y0 or box[3] > y0 + 128
    assert 0.1 < cut / planted < 0.9
    distractors = {lab for labs in ev.region_labels for lab in labs} - set(ev.labels) - {"red square"}
    assert len(distractors) >= 5


def test_coco_files_enter_through_the_importer_with_their_splits(scenes, tmp_path):
    from ravl_pipeline.cli import main

    root, _ = scenes
    (val, _), (test, _) = scene_splits(root)["eval"]
    coco = json.loads(val.read_text())
    assert {"images", "annotations", "categories"} <= set(coco)
    assert all(len(a["bbox"]) == 4 and a["iscrowd"] == 0 for a in coco["annotations"])
    out = tmp_path / "imported"
    assert main(["import", "coco", str(val), str(test), "--images", str(root / "eval" / "images"),
                 "--out", str(out), "--split", "val", "--split", "test"]) == 0
    ds = load_dataset(out)
    assert ds.splits.count("val") == SMALL["n_val"] and ds.splits.count("test") == SMALL["n_test"]
    assert ds.labels == load_dataset(root / "eval").labels


def test_same_config_same_bytes_and_cli(tmp_path, capsys):
    from ravl_pipeline.cli import main

    cfg = ScenesConfig(n_pretrain=10, n_finetune=10, n_val=10, n_test=10, seed=3,
                       features=[FeatureSpec("red square", (255, 0, 0), "square"),
                                 FeatureSpec("blue circle", (0, 0, 255), "circle")],
                       correlated_classes=["nine", "three"])
    a = write_scenes(tmp_path / "a", cfg)
    b = write_scenes(tmp_path / "b", cfg)
    assert a == b
    for name, files in scene_splits(tmp_path / "a").items():
        for path, _ in files:
            assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
        first = sorted((tmp_path / "a" / name / "images").iterdir())[0]
        assert first.read_bytes() == (tmp_path / "b" / name / "images" / first.name).read_bytes()
    # a planted object never doubles as a distractor
    coco = json.loads(scene_splits(tmp_path / "a")["eval"][0][0].read_text())
    assert [c["name"] for c in coco["categories"]].count("blue circle") == 1
    assert main(["synth", "--kind", "scenes", "--out", str(tmp_path / "c"), "--n-pretrain", "10",
                 "--n-finetune", "10", "--n-val", "10", "--n-test", "10"]) == 0
    assert "ravl import coco" in capsys.readouterr().out


@pytest.mark.parametrize("changes", [{"classes": ["nine"]}, {"strength": 1.5}, {"n_val": 3},
                                     {"features": [FeatureSpec("nine", (1, 2, 3), "square")]},
                                     {"correlated_classes": ["nine", "one"]}, {"short_side": 16}])
def test_bad_scenes_config_is_refused(changes):
    with pytest.raises(ValueError):
        ScenesConfig(**changes)


def test_scenes_with_fewer_images_than_classes_is_one_input_error(tmp_path, capsys):
    from ravl_pipeline.cli import main

    rc = main(["synth", "--kind", "scenes", "--out", str(tmp_path / "s"), "--n-pretrain", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "--n-pretrain" in err and "internal error" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
