"""The closed loop's evaluation on data without an annotation of the feature
(SPEC §4.2, §5 ``groups_from``): groups per discovered finding, rows whose
presence is unknown, paired bootstrap intervals between models scored on the
same images, and the answer lines the report opens with."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ravl_pipeline.core.metrics import (Groups, answer_lines, feature_effect, group_rows, mitigation_metrics,
                                        paired_differences)
from ravl_pipeline.experiments.synth import SynthConfig, make_setting
from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.io.manifest import read_manifest, write_manifest
from ravl_pipeline.pipeline.stages import groups_for

CLASSES = ["a", "b"]
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
PRED = np.array([1, 0, 0, 0, 1, 1, 0, 1])


def test_named_presence_gives_the_groups_of_every_finding_each_row_naming_it():
    f1 = np.array([1, 1, 0, 0, 1, 0, 0, 0], bool)
    f2 = np.array([0, 0, 0, 1, 1, 1, 1, 0], bool)
    rows = group_rows(LABELS, PRED, {"finding 1": f1, "finding 2": f2}, CLASSES)
    assert [(r["feature"], r["label"], r["feature_present"]) for r in rows] == [
        (f, c, p) for f in ("finding 1", "finding 2") for c in CLASSES for p in (False, True)]
    by = {(r["feature"], r["label"], r["feature_present"]): r for r in rows}
    assert by[("finding 1", "a", True)]["n"] == 2 and by[("finding 1", "a", True)]["image_acc"] == 0.5
    assert by[("finding 2", "b", True)]["n"] == 3 and by[("finding 2", "b", True)]["image_acc"] == pytest.approx(2 / 3)
    m = mitigation_metrics(LABELS, PRED, CLASSES, {"finding 1": f1, "finding 2": f2}, min_group_size=1)
    # the worst group over both findings' groups: (finding 1, a, present) at 1/2
    assert m["image_worst_group"] == 0.5
    # with finding 1 alone the worst group is the same; with finding 2 alone it is 2/3
    assert mitigation_metrics(LABELS, PRED, CLASSES, {"finding 2": f2}, min_group_size=1)["image_worst_group"] == \
        pytest.approx(2 / 3)


def test_rows_of_unknown_presence_are_in_no_feature_group_but_in_the_overall():
    present = np.array([1, 0, 0, 0, 1, 0, 0, 0], bool)
    known = np.array([1, 1, 1, 0, 1, 1, 1, 0], bool)
    m = mitigation_metrics(LABELS, PRED, CLASSES, present, min_group_size=1, known=known)
    assert sum(r["n"] for r in m["groups"]) == 6
    assert m["image_overall"] == pytest.approx((LABELS == PRED).mean())  # all eight images
    absent_a = next(r for r in m["groups"] if r["label"] == "a" and r["feature_present"] is False)
    assert absent_a["n"] == 2  # image 3 (unknown) is not taken as "absent"


def test_feature_effect_is_the_gap_for_the_class_and_for_the_others():
    present = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)
    e = feature_effect(LABELS, PRED, present, class_index=0)
    assert e["own_class"] == {"n_present": 2, "acc_present": 0.5, "n_absent": 2, "acc_absent": 1.0, "gap": -0.5}
    assert e["other_classes"] == {"n_present": 2, "acc_present": 1.0, "n_absent": 2, "acc_absent": 0.5, "gap": 0.5}


def _two_models(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    present = rng.random(n) < 0.5
    worse = np.where(rng.random(n) < 0.7, labels, 1 - labels)
    better = np.where(present & (labels == 1), labels, worse)  # fixes the (b, present) group only
    return labels, present, worse, better


def test_paired_intervals_separate_a_real_gain_and_contain_zero_for_a_copy():
    labels, present, worse, better = _two_models()
    out = paired_differences(labels, {"audited": worse, "mitigated": better, "copy": worse.copy()}, CLASSES,
                             [("mitigated", "audited"), ("copy", "audited")], present, draws=400)
    gain = out["mitigated-audited"]["image_overall"]
    ref = mitigation_metrics(labels, better, CLASSES, present)["image_overall"] - \
        mitigation_metrics(labels, worse, CLASSES, present)["image_overall"]
    assert gain["diff"] == pytest.approx(ref) and gain["diff"] > 0
    assert 0 < gain["ci"][0] <= gain["diff"] <= gain["ci"][1]
    same = out["copy-audited"]
    assert same["image_overall"]["diff"] == 0 and same["image_overall"]["ci"] == [0.0, 0.0]
    assert same["region_overall"]["diff"] is None  # no core regions given


def test_paired_worst_group_and_region_metrics_match_the_metrics_on_the_data():
    labels, present, worse, better = _two_models(seed=1)
    core_image = np.arange(len(labels))  # one core region per image, predicted as the image
    out = paired_differences(labels, {"a": better, "b": worse}, CLASSES, [("a", "b")], present,
                             core_image=core_image, core_preds={"a": better, "b": worse}, min_group_size=10,
                             draws=200)["a-b"]
    ma = mitigation_metrics(labels, better, CLASSES, present, core_image, better, 10)
    mb = mitigation_metrics(labels, worse, CLASSES, present, core_image, worse, 10)
    for key in ("image_worst_group", "region_overall", "region_worst_group"):
        assert out[key]["diff"] == pytest.approx(ma[key] - mb[key])
        assert out[key]["ci"] is not None and out[key]["n_valid"] == 200


def test_the_answer_names_the_feature_its_class_and_each_model():
    labels, present = np.zeros(4, int), np.array([1, 1, 1, 0], bool)
    preds = {"audited": [1, 1, 0, 0], "mitigated": [0, 0, 0, 1], "control": [0, 1, 0, 0]}
    metrics = {name: {"by_feature": [{"feature": "finding 1 (ruler)", "class": "nine",
                                      **feature_effect(labels, np.array(p), present, 0)}]}
               for name, p in preds.items()}
    lines = answer_lines(metrics)
    assert lines == ["images with finding 1 (ruler): class nine accuracy 33.3% → 100.0% (control 66.7%); "
                     "without it 100.0% → 0.0% (control 100.0%); other classes with it n/a → n/a (control n/a)"]
    metrics["mitigated"] = None
    metrics["not_trained"] = {"mitigated": "nothing called"}
    assert answer_lines(metrics)[-1] == "nothing was mitigated: nothing called"


def test_rows_with_null_region_labels_are_unknown_not_absent(tmp_path):
    make_setting(tmp_path / "s", SynthConfig(classes=["one", "nine"], n_pretrain=4, n_finetune=4, n_val=4,
                                             n_test=12, seed=3))
    eval_dir = tmp_path / "s" / "eval"
    table = read_manifest(eval_dir)
    labels = table.column("region_labels").to_pylist()
    labels[0] = None
    column = pa.array(labels, type=table.schema.field("region_labels").type)
    write_manifest(eval_dir, table.set_column(table.column_names.index("region_labels"), "region_labels", column))
    ds = load_dataset(eval_dir)
    groups = groups_for(ds, eval_dir)
    assert groups.source == "annotation" and groups.features[0]["feature"] == "red square"
    assert groups.known is not None and not groups.known[0] and groups.known[1:].all()
    assert any("null region_labels" in note for note in groups.notes)


def test_groups_from_the_findings_when_the_data_names_no_feature(tmp_path):
    make_setting(tmp_path / "s", SynthConfig(classes=["one", "nine"], n_pretrain=4, n_finetune=4, n_val=4,
                                             n_test=12, seed=3))
    eval_dir = tmp_path / "s" / "eval"
    (tmp_path / "s" / "setting.json").unlink()
    ds = load_dataset(eval_dir)
    found = Groups("findings", {"finding 1": np.ones(len(ds), bool)}, None,
                   [{"feature": "finding 1", "class": "nine"}])
    assert groups_for(ds, eval_dir).source == "class"
    chosen = groups_for(ds, eval_dir, discovered=found)
    assert chosen.source == "findings" and any("groups from the findings" in n for n in chosen.notes)
    # an explicit annotation wins over the findings
    assert groups_for(ds, eval_dir, ["red square"], discovered=found).source == "annotation"


def test_a_group_under_the_minimum_size_stays_out_of_every_bootstrap_draw():
    """Which groups count is decided on the data as it is, as the point
    estimate decides it; a draw that happens to hold 10 copies of a 9-image
    group must not let it into the worst-group minimum."""
    labels = np.array([0] * 9 + [0] * 40 + [1] * 40)
    present = np.array([True] * 9 + [False] * 40 + [False] * 20 + [True] * 20)
    a = labels.copy()
    a[:9] = 1  # model a: the small (0, present) group all wrong
    b = labels.copy()  # model b: everything right
    a[49:55] = 0  # both wrong on a few (1, absent) images, so worst-group is below 1
    b[49:55] = 0
    out = paired_differences(labels, {"a": a, "b": b}, CLASSES, [("a", "b")], present, min_group_size=10,
                             draws=300)["a-b"]["image_worst_group"]
    assert out["diff"] == 0.0 and out["ci"] == [0.0, 0.0]
