"""Mitigation metrics (SPEC §4.2): arithmetic on hand-built predictions,
``pipeline.stages.evaluate`` on a tiny setting, partial results, and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ravl_pipeline.cli import main
from ravl_pipeline.core.metrics import core_regions, group_rows, mitigation_metrics
from ravl_pipeline.experiments.synth import SynthConfig, make_setting
from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.io.manifest import write_manifest
from ravl_pipeline.pipeline.stages import evaluate, write_metrics

CLASSES = ["a", "b"]
LABELS = np.array([0, 0, 0, 1, 1, 1, 1])
PRED = np.array([1, 1, 0, 1, 1, 0, 1])  # image 0 (the only (a, present) image) wrong
PRESENT = np.array([True, False, False, True, True, False, False])
# core regions: image row and predicted class; image 4 has none, image 6 has two
CORE_IMAGE = np.array([0, 1, 2, 3, 5, 6, 6])
CORE_PRED = np.array([0, 0, 1, 1, 0, 1, 0])


def row(rows, label, present):
    return next(r for r in rows if r["label"] == label and r["feature_present"] == present)


def test_group_rows_by_hand():
    rows = group_rows(LABELS, PRED, PRESENT, CLASSES, CORE_IMAGE, CORE_PRED)
    assert len(rows) == 4
    assert row(rows, "a", False) == {"label": "a", "feature_present": False, "n": 2, "image_acc": 0.5,
                                     "n_regions": 2, "region_acc": 0.5}
    assert row(rows, "a", True) == {"label": "a", "feature_present": True, "n": 1, "image_acc": 0.0,
                                    "n_regions": 1, "region_acc": 1.0}
    assert row(rows, "b", False)["image_acc"] == 0.5
    assert row(rows, "b", False)["region_acc"] == pytest.approx(1 / 3)  # img 5 wrong, img 6: right + wrong
    assert row(rows, "b", True) == {"label": "b", "feature_present": True, "n": 2, "image_acc": 1.0,
                                    "n_regions": 1, "region_acc": 1.0}


def test_metrics_by_hand_with_small_group_left_out():
    m = mitigation_metrics(LABELS, PRED, CLASSES, PRESENT, CORE_IMAGE, CORE_PRED, min_group_size=2)
    assert m["image_overall"] == pytest.approx(4 / 7)
    assert m["region_overall"] == pytest.approx(4 / 7)
    # (a, present) has 1 image (acc 0) -> not counted; worst of 0.5, 0.5, 1.0
    assert m["image_worst_group"] == 0.5
    # region groups with >= 2 core regions: (a, absent) 0.5 and (b, absent) 1/3
    assert m["region_worst_group"] == pytest.approx(1 / 3)
    assert m["min_group_size"] == 2 and m["partial"] is False
    assert any("'a', feature_present=True) has 1 images" in w for w in m["warnings"])
    assert any("'b', feature_present=True) has 1 core regions" in w for w in m["warnings"])
    assert [r["counted"] for r in m["groups"]] == [True, False, True, True]
    json.dumps(m, allow_nan=False)  # plain JSON


def test_metrics_count_every_group_when_allowed():
    m = mitigation_metrics(LABELS, PRED, CLASSES, PRESENT, CORE_IMAGE, CORE_PRED, min_group_size=1)
    assert m["image_worst_group"] == 0.0
    assert m["region_worst_group"] == pytest.approx(1 / 3)
    assert m["warnings"] == []


def test_empty_group_is_reported_not_counted():
    present = np.array([True, True, True, True, True, False, False])  # no (a, absent) image
    m = mitigation_metrics(LABELS, PRED, CLASSES, present, min_group_size=1)
    empty = row(m["groups"], "a", False)
    assert empty["n"] == 0 and empty["image_acc"] is None and empty["counted"] is False
    assert any("'a', feature_present=False) is empty" in w for w in m["warnings"])
    assert m["image_worst_group"] == pytest.approx(1 / 3)  # (a, present): 1 right of 3
    assert m["region_overall"] is None and m["region_worst_group"] is None and m["partial"] is True


def test_groups_are_classes_without_presence():
    m = mitigation_metrics(LABELS, PRED, CLASSES, None, min_group_size=1)
    assert [(r["label"], r["feature_present"], r["n"]) for r in m["groups"]] == [("a", None, 3), ("b", None, 4)]
    assert m["image_worst_group"] == pytest.approx(1 / 3) and m["partial"] is True


def test_core_regions():
    rows, idx = core_regions([["empty", "a", "red"], ["b", "b"], ["red"]], ["a", "b", "a"])
    assert rows.tolist() == [0, 1, 1] and idx.tolist() == [1, 0, 1]


def test_write_metrics_is_atomic_json(tmp_path):
    m = mitigation_metrics(LABELS, PRED, CLASSES, PRESENT, min_group_size=1)
    out = write_metrics(m, tmp_path / "sub" / "metrics.json")
    assert json.loads(out.read_text())["image_overall"] == pytest.approx(4 / 7)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["metrics.json"]


# --------------------------------------------------------------------------- on a tiny setting

@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_eval")
    cfg = SynthConfig(classes=["one", "nine"], n_pretrain=4, n_finetune=8, n_val=8, n_test=24, seed=3)
    make_setting(root, cfg)
    return root


def test_evaluate_model_consistent_with_groups(tiny_eval):
    m = evaluate("ravl-tiny-rn", tiny_eval / "eval", split="test", min_group_size=1)
    assert m["features"] == ["red square"] and m["classes"] == ["one", "nine"]
    assert m["n_images"] == 24 and sum(r["n"] for r in m["groups"]) == 24
    assert m["n_core_regions"] == 24  # one digit quadrant per image
    weighted = sum(r["n"] * r["image_acc"] for r in m["groups"] if r["n"]) / 24
    assert m["image_overall"] == pytest.approx(weighted)
    weighted_r = sum(r["n_regions"] * r["region_acc"] for r in m["groups"] if r["n_regions"]) / 24
    assert m["region_overall"] == pytest.approx(weighted_r)
    counted = [r["image_acc"] for r in m["groups"] if r["n"] >= 1]
    assert m["image_worst_group"] == min(counted)
    ds = load_dataset(tiny_eval / "eval", split="test")
    present = sum("red square" in labs for labs in ds.region_labels)
    assert sum(r["n"] for r in m["groups"] if r["feature_present"]) == present


def test_evaluate_without_region_annotations_is_partial(tiny_eval, tmp_path):
    ds = load_dataset(tiny_eval / "eval", split="test")
    rows = [{"image_id": i, "path": str((ds.root / p).resolve()), "label": y}
            for i, p, y in zip(ds.image_ids, ds.paths, ds.labels)]
    plain = tmp_path / "plain"
    plain.mkdir()
    for r in rows:  # relative paths inside the dataset directory
        src = r["path"]
        dst = plain / f"{r['image_id']}.png"
        dst.write_bytes(open(src, "rb").read())
        r["path"] = dst.name
    write_manifest(plain, rows)
    m = evaluate("ravl-tiny-rn", plain, split=None, features=["red square"], min_group_size=1)
    assert m["partial"] is True and m["region_overall"] is None and m["region_worst_group"] is None
    assert m["image_overall"] is not None and m["n_images"] == 24
    assert any("no region annotations" in w for w in m["warnings"])
    assert any("no region_labels" in w for w in m["warnings"])
    full = evaluate("ravl-tiny-rn", tiny_eval / "eval", split="test", min_group_size=1)
    assert m["image_overall"] == pytest.approx(full["image_overall"])  # same images, same predictions


def test_cli_evaluate_writes_metrics(tiny_eval, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    rc = main(["evaluate", "--model", "ravl-tiny-rn", "--data", str(tiny_eval / "eval"), "--out", str(out),
               "--min-group-size", "1", "--quiet"])
    assert rc == 0
    m = json.loads(out.read_text())
    assert set(m) >= {"image_overall", "image_worst_group", "region_overall", "region_worst_group", "groups"}
    assert "image overall" in capsys.readouterr().out


def test_cli_evaluate_bad_input(tmp_path, capsys):
    rc = main(["evaluate", "--model", "ravl-tiny-rn", "--data", str(tmp_path / "missing"),
               "--out", str(tmp_path / "m.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ravl evaluate: error" in err and "manifest" in err
    assert not (tmp_path / "m.json").exists()
