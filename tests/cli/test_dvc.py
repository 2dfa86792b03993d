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
    assert audit["metrics"] == [{"data/outputs/${item}/audit_summary.json": {"cache": False, "persist": True}}]
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
    (root / ".gitignore").write_text("/.venv\n/dagster_home/\n")
    first = dvc(["repro", "--no-run-cache"], root, env)
    # the baseline of `dvc exp run`: the reproduced pipeline, committed
    subprocess.run(["git", "config", "user.name", "ravl"], cwd=root, check=True)
    subprocess.run(["git", "config", "user.email", "ravl@localhost"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=root, check=True)
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
def test_metrics_show_reads_the_audit_summary(dvc_project):
    root, env = dvc_project["root"], dvc_project["env"]
    shown = json.loads(dvc(["metrics", "show", "--json"], root, env).stdout)
    path = f"data/outputs/{SET}/audit_summary.json"
    data = next(iter(shown.values()))["data"][path]["data"]
    on_disk = json.loads((root / path).read_text())
    numbers = _numeric_leaves(on_disk)
    assert ("audited", "image_overall") in numbers and ("mitigated", "region_overall") in numbers
    assert ("k",) in numbers and ("n_features",) in numbers
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


def _exp_columns(shown: list, name: str) -> tuple[dict, dict]:
    """Params and metrics of experiment ``name`` in ``dvc exp show --json``."""
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name") == name:
                    data = rev["data"]
                    params = data["params"]["params.yaml"]["data"]
                    metrics = data["metrics"][f"data/outputs/{SET}/audit_summary.json"]["data"]
                    return params, metrics
    raise AssertionError(f"experiment {name} not in dvc exp show: {json.dumps(shown)[:2000]}")


@pytest.mark.slow
def test_experiments_run_through_dagster_and_compare_in_exp_show(dvc_project):
    """`dvc exp run -S` on the Dagster-backed stages: each experiment's audit is
    a Dagster run tagged with its name; `dvc exp show` lists the changed
    parameter beside K, the called findings, the lead attribute and the four
    metrics of each experiment."""
    import dagster as dg

    root, env = dvc_project["root"], dvc_project["env"]
    for name, setting in (("lam09", "mitigation.lam=0.9"), ("seed1", "discovery.seed=1")):
        # each from the baseline's parameters (an experiment leaves its own in the workspace)
        subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=root, check=True)
        run = dvc(["exp", "run", "-n", name, "-S", setting], root, env)
        assert f"Running stage 'audit@{SET}'" in run.stdout
        assert "Running stage 'audited_model'" not in run.stdout  # audited_model reads no changed param
    shown = json.loads(dvc(["exp", "show", "--json"], root, env).stdout)
    params = {}
    for name in ("lam09", "seed1"):
        p, m = _exp_columns(shown, name)
        params[name] = p
        assert {"k", "n_called", "lead_attribute", "audited", "mitigated"} <= set(m)
        # DVC leaves out null values (a worst group too small to count)
        assert {"image_overall", "region_overall"} <= set(m["mitigated"]) <= {
            "image_overall", "image_worst_group", "region_overall", "region_worst_group"}
        assert isinstance(m["k"], int) and isinstance(m["n_called"], int) and isinstance(m["lead_attribute"], str)
    assert params["lam09"]["mitigation"]["lam"] == 0.9 and params["lam09"]["discovery"]["seed"] == 0
    assert params["seed1"]["discovery"]["seed"] == 1 and params["seed1"]["mitigation"]["lam"] == 0.8
    # the last experiment's numbers are the workspace's
    _, last = _exp_columns(shown, "seed1")
    on_disk = json.loads((root / "data" / "outputs" / SET / "audit_summary.json").read_text())
    assert _numeric_leaves(last) == _numeric_leaves(on_disk) and last["lead_attribute"] == on_disk["lead_attribute"]
    # each experiment's audit is recorded in Dagster, under its name
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        for name in ("lam09", "seed1"):
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"dvc/experiment": name}))
            assert [r.tags["dagster/partition"] for r in runs] == [SET]
            assert runs[0].status == dg.DagsterRunStatus.SUCCESS


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
