"""DVC lineage over the Dagster materializations (dvc.yaml): a second
`dvc repro` runs nothing, `dvc metrics show` reads metrics.json, `dvc push`
fills a local remote from which a lost output comes back byte-identical."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.tiny_project import DVC, REPO, make_tiny_project, snapshot

pytestmark = pytest.mark.skipif(not DVC.is_file(), reason=f"DVC is not installed at {DVC}; run `make setup-dvc`")

SET = "synthetic-default"


def dvc(args: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(DVC), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def test_dvc_yaml_declares_stages_params_and_metrics():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages = spec["stages"]
    assert set(stages) == {"audited_model", "synthetic_default_set", "audit"}
    assert "materialize --select key:audited_model" in stages["audited_model"]["cmd"]
    audit = stages["audit"]["do"]
    assert "materialize --partition ${item}" in audit["cmd"]
    # every params.yaml section the per-set assets read is a DVC param
    assert set(audit["params"]) == {"regions", "labels", "scores", "discovery", "mitigation", "evaluation"}
    assert audit["metrics"] == [{"data/outputs/${item}/metrics.json": {"cache": False, "persist": True}}]
    for stage in (stages["audited_model"], stages["synthetic_default_set"], audit):
        assert all(next(iter(o.values()))["persist"] for o in stage["outs"])


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    """A git + DVC repository holding this project's dvc.yaml and a tiny
    data folder, reproduced once."""
    root = tmp_path_factory.mktemp("dvc") / "repo"
    env = make_tiny_project(root)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy2(REPO / ".dvcignore", root / ".dvcignore")
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    (root / ".venv").symlink_to(REPO / ".venv")
    first = dvc(["repro", "--no-run-cache"], root, env)
    return {"root": root, "env": env, "first": first}


@pytest.mark.slow
def test_repro_runs_each_stage_once_then_nothing(dvc_project):
    root, env = dvc_project["root"], dvc_project["env"]
    out = dvc_project["first"].stdout
    for stage in ("audited_model", "synthetic_default_set", f"audit@{SET}"):
        assert f"Running stage '{stage}'" in out
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"audited_model", "synthetic_default_set", f"audit@{SET}"}
    assert lock[f"audit@{SET}"]["params"]["params.yaml"]["mitigation"]["max_steps"] == 2
    before = snapshot(root / "data")
    second = dvc(["repro", "--no-run-cache"], root, env)
    assert "Running stage" not in second.stdout
    assert "didn't change, skipping" in second.stdout
    assert snapshot(root / "data") == before
    assert "up to date" in dvc(["status"], root, env).stdout.lower()


@pytest.mark.slow
def test_params_section_change_reruns_only_its_stages(dvc_project):
    root, env = dvc_project["root"], dvc_project["env"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["discovery"]["top_regions"] = 7
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc(["status", "--json"], root, env).stdout
    changed = set(json.loads(status))
    assert changed == {f"audit@{SET}"}


@pytest.mark.slow
def test_metrics_show_reads_metrics_json(dvc_project):
    root, env = dvc_project["root"], dvc_project["env"]
    shown = json.loads(dvc(["metrics", "show", "--json"], root, env).stdout)
    path = f"data/outputs/{SET}/metrics.json"
    data = next(iter(shown.values()))["data"][path]["data"]
    on_disk = json.loads((root / path).read_text())
    numbers = _numeric_leaves(on_disk)
    assert ("audited", "image_overall") in numbers and ("mitigated", "region_overall") in numbers
    for keys, value in numbers.items():
        shown_value = data
        for key in keys:
            shown_value = shown_value[key]
        assert shown_value == value, keys


def _numeric_leaves(obj, prefix=()) -> dict[tuple, float]:
    """Numbers of a JSON object by key path (lists, strings, nulls and booleans
    are not metrics)."""
    out = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(_numeric_leaves(value, prefix + (key,)))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + (key,)] = value
    return out


@pytest.mark.slow
def test_push_to_local_remote_and_restore(dvc_project, tmp_path):
    root, env = dvc_project["root"], dvc_project["env"]
    remote = tmp_path / "remote"
    dvc(["remote", "add", "--local", "-d", "scratch", str(remote)], root, env)
    pushed = dvc(["push"], root, env)
    assert "pushed" in pushed.stdout.lower()
    assert any(p.is_file() for p in remote.rglob("*"))
    # lose an output and the local cache: it comes back from the remote
    target = root / "data" / "outputs" / SET / "findings.json"
    want = target.read_bytes()
    target.unlink()
    shutil.rmtree(root / ".dvc" / "cache")
    dvc(["pull", f"audit@{SET}"], root, env)
    assert target.read_bytes() == want
