"""Stage 1 end to end on the reduced synthetic default (SPEC §4.1–4.2).

A tiny CLIP is pre-trained and fine-tuned in the session fixture; the audited
model must have learned the planted correlation (validity), and discovery
must rank the planted feature first, with its class as the attribute.
"""
from __future__ import annotations

import json

import pytest

from ravl_pipeline.cli import main
from ravl_pipeline.ml.audit import dataset_templates, ground_truth_summary, run_discovery
from ravl_pipeline.ml.data import load_dataset
from ravl_pipeline.ml.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def audit(tiny_setting):
    eval_dir = tiny_setting["setting"] / "eval"
    ds = load_dataset(eval_dir, split="val", require_labels=True)
    classes = ds.classes()
    lm = load_model(f"local-dir:{tiny_setting['audited']}")
    findings, emb, scores = run_discovery(lm, ds, classes, templates=dataset_templates(eval_dir),
                                          progress=False)
    gt = ground_truth_summary(findings, ds, emb, scores, classes, [("red square", "nine")])
    return findings, gt["red square"]


def test_audited_model_learned_the_planted_correlation(audit):
    _, gt = audit
    v = gt["validity"]
    assert v["valid"], v
    assert v["correlated_gap"] >= 0.10 and v["other_mean_gap"] <= -0.10


def test_top_feature_is_the_planted_one(audit):
    findings, gt = audit
    assert findings["features"], "no spurious feature found"
    top = findings["features"][0]
    assert top["attribute"] == "nine"
    assert gt["precision_at_10_top"] >= 0.9
    assert 20 <= findings["k"] < 50  # K swept over [2|Y|, 5|Y|) with |Y| = 10


def test_discover_command_writes_findings(tiny_setting, tmp_path, capsys):
    out = tmp_path / "findings.json"
    rc = main(["discover", "--model", f"local-dir:{tiny_setting['audited']}",
               "--data", str(tiny_setting["setting"] / "eval"), "--split", "val",
               "--out", str(out), "--quiet"])
    assert rc == 0
    findings = json.loads(out.read_text())
    for key in ("model", "dataset", "classes", "k", "silhouette", "features"):
        assert key in findings
    assert findings["ground_truth"]["red square"]["validity"]["valid"]
    printed = capsys.readouterr().out
    assert "findings:" in printed and "Precision@10" in printed


def test_discover_command_reports_bad_input(tmp_path, capsys):
    rc = main(["discover", "--model", "ravl-tiny-rn", "--data", str(tmp_path / "missing"),
               "--out", str(tmp_path / "f.json")])
    assert rc == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()
