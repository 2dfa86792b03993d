"""The own-model path through the pipeline, as README "Your model through the
pipeline" shows it: COCO-style photos imported like real data, a checkpoint
fine-tuned outside the pipeline, ``params.yaml`` pointing at it with relative
paths, and ``ravl materialize --partition`` ending with the answer."""
from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from tests.tiny_project import RAVL

pytestmark = pytest.mark.slow


def ravl(args: list[str], cwd, env=None) -> str:
    proc = subprocess.run([str(RAVL), *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"ravl {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_a_checkpoint_of_ones_own_goes_through_the_pipeline_and_ends_with_the_answer(tmp_path):
    import os

    work = tmp_path / "project"
    work.mkdir()
    ravl(["synth", "--kind", "scenes", "--out", "scenes", "--n-pretrain", "10", "--n-finetune", "48",
          "--n-val", "40", "--n-test", "40", "--seed", "1"], work)
    ravl(["import", "coco", "scenes/finetune/annotations/instances_train.json", "--images", "scenes/finetune/images",
          "--out", "data/finetune", "--split", "train"], work)
    ravl(["import", "coco", "scenes/eval/annotations/instances_val.json", "scenes/eval/annotations/instances_test.json",
          "--images", "scenes/eval/images", "--out", "data/validation_sets/my_photos", "--split", "val",
          "--split", "test"], work)
    # the model to audit, fine-tuned outside the pipeline (plain fine-tuning: no Stage 2 floor)
    out = ravl(["finetune", "--model", "ravl-tiny-rn", "--data", "data/finetune", "--out", "models/audited",
                "--max-steps", "2", "--batch-size", "16", "--caption-template", "a photo of the digit {}."], work)
    assert "plain fine-tuning" in out
    params = yaml.safe_load(open(RAVL.parents[2] / "params.yaml"))
    # init_model and train_data left out: the checkpoint's ravl_model.json records both
    params["audited_model"].update(source="checkpoint", checkpoint="local-dir:models/audited")
    params["regions"]["proposer"] = "boxes"
    params["discovery"].update(permutations=200)
    params["mitigation"].update(max_steps=2, batch_size=16)
    params["evaluation"]["max_accuracy_drop"] = 1.0  # a two-step model: the check is not under test
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, DAGSTER_HOME=str(work / "dagster_home"), TQDM_DISABLE="1", OMP_NUM_THREADS="1",
               RAVL_PARAMS=str(work / "params.yaml"), RAVL_DATA_DIR=str(work / "data"))
    out = ravl(["materialize", "--partition", "my_photos"], work, env)
    record = json.loads((work / "data" / "outputs" / "audited_model.json").read_text())
    assert record["init_model"] == "ravl-tiny-rn" and record["train_data"] == str(work / "data" / "finetune")
    # the headline, as `ravl demo` ends: findings, models, metrics on test, the report
    assert "[my_photos]" in out and "metrics on test (groups from " in out
    assert re.search(r"^  audited, 2 steps: image overall", out, re.M), out[-3000:]
    report = work / "data" / "outputs" / "my_photos" / "report" / "report.html"
    assert f"report: {report.relative_to(work)}" in out or f"report: {report}" in out
    findings = json.loads((work / "data" / "outputs" / "my_photos" / "findings.json").read_text())
    # one prompt everywhere: the checkpoint's recorded caption template (no scores.templates, no setting.json)
    metrics = json.loads((work / "data" / "outputs" / "my_photos" / "metrics.json").read_text())
    assert findings["templates"] == metrics["audited"]["templates"] == ["a photo of the digit {}."]
    assert metrics["groups_from"] in ("findings", "class")  # COCO data names no planted feature
