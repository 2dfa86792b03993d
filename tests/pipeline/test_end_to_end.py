"""Stage 1 end to end on the reduced synthetic default (SPEC §4.1–4.2).

A tiny CLIP is pre-trained and fine-tuned in the session fixture; the audited
model must have learned the planted correlation (validity), and discovery
must find the planted feature and make it the lead finding, with its class
as the attribute. (By G_c alone, SPEC §2.5, a cluster of empty quadrants
that marks the feature's absence can outrank it with RoI embeddings: the
masking check is what tells the two apart; README, BENCHMARKS.md.)
"""
from __future__ import annotations

import json

import pytest

from ravl_pipeline.cli import main
from ravl_pipeline.config import DiscoveryConfig
from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.models import load_model
from ravl_pipeline.pipeline.stages import ground_truth, stage1, templates_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def audit(tiny_setting):
    eval_dir = tiny_setting["setting"] / "eval"
    ds = load_dataset(eval_dir, split="val", require_labels=True)
    classes = ds.classes()
    lm = load_model(f"local-dir:{tiny_setting['audited']}")
    result = stage1(lm, ds, classes, templates=templates_for(eval_dir), discovery=DiscoveryConfig(evidence=True))
    gt = ground_truth(result.findings, ds, result.embeddings, result.scores, [("red square", "nine")])
    return result.findings, gt["red square"]


def test_audited_model_learned_the_planted_correlation(audit):
    _, gt = audit
    v = gt["validity"]
    assert v["valid"], v
    assert v["correlated_gap"] >= 0.10 and v["other_mean_gap"] <= -0.10


def test_the_lead_finding_is_the_planted_one(audit):
    findings, gt = audit
    assert findings.features, "no spurious feature found"
    lead = findings.lead()
    assert lead is not None and lead.rank == findings.lead_rank
    assert lead.attribute == "nine" and lead.called and lead.supported
    assert gt["precision_at_10_lead"] >= 0.9
    assert gt["precision_at_10_best"] >= 0.9
    assert 20 <= findings.k < 50  # K swept over [2|Y|, 5|Y|) with |Y| = 10


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
