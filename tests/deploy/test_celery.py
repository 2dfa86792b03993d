"""One validation set materialized through Dagster's Celery executor with a
Redis broker and two worker processes: every step runs in a worker, the
model-heavy steps still one at a time (the ``ravl_model`` pool), and the
outputs are byte for byte those of the in-process executor."""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import dagster as dg
import pytest

from tests.deploy.services import REDIS, ancestors, background, redis_server
from tests.tiny_project import RAVL, make_tiny_project, snapshot

pytestmark = [
    pytest.mark.skipif(not Path(REDIS).is_file(), reason=f"redis-server not found at {REDIS} (make setup-redis)"),
    pytest.mark.skipif(importlib.util.find_spec("dagster_celery") is None,
                       reason="dagster-celery is not installed (pip install -e '.[dev]')"),
]

SET = "set-a"
POOL_STEPS = {"region_embeddings.shard[0]", "zero_shot_scores", "spurious_features", "mitigated_model",
              "control_model", "mitigation_metrics", "mitigated_findings"}


def ravl(args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(RAVL), *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"ravl {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def outputs(root: Path) -> dict[str, bytes]:
    # the report names its run, and previous/ holds what the run replaced;
    # everything else is a function of the inputs
    return {k: v for k, v in snapshot(root / "data" / "outputs" / SET).items()
            if not k.startswith(("report/", "previous/"))}


def step_spans(instance: dg.DagsterInstance, run_id: str) -> dict[str, tuple[float, float, int]]:
    """step -> (start, end, pid of the process that ran it)."""
    spans = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or not event.step_key:
            continue
        if event.event_type_value == "STEP_START":
            spans[event.step_key] = (entry.timestamp, None, event.pid)
        elif event.event_type_value == "STEP_SUCCESS":
            start, _, pid = spans[event.step_key]
            spans[event.step_key] = (start, entry.timestamp, pid)
    return spans


@pytest.fixture(scope="module")
def celery_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("celery")
    project = tmp / "project"
    env_p = make_tiny_project(project, validation_set=SET)
    ravl(["materialize"], env_p)  # in process
    in_process = outputs(project)
    with redis_server(tmp) as broker:
        env = dict(env_p, RAVL_EXECUTOR="celery", RAVL_CELERY_BROKER=broker)
        with background([str(RAVL), "worker", "--name", "w1"], env, tmp / "w1.log") as w1, \
                background([str(RAVL), "worker", "--name", "w2"], env, tmp / "w2.log") as w2:
            launcher = subprocess.Popen([str(RAVL), "materialize", "--partition", SET], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = launcher.communicate(timeout=600)
            assert launcher.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}"
            with dg.DagsterInstance.from_config(env_p["DAGSTER_HOME"]) as instance:
                run = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": SET}), limit=1)[0]
                spans = step_spans(instance, run.run_id)
                # the worker processes are alive: read who ran each step now
                lineage = {step: ancestors(pid) for step, (_, _, pid) in spans.items()}
            workers = {w1.pid, w2.pid}
    previous = (project / "data" / "outputs" / SET / "previous" / "findings.json").read_bytes()
    return {"in_process": in_process, "celery": outputs(project), "previous": previous, "out": out, "run": run,
            "spans": spans, "lineage": lineage, "launcher": launcher.pid, "workers": workers}


def test_every_step_ran_in_a_celery_worker(celery_run):
    spans, lineage = celery_run["spans"], celery_run["lineage"]
    assert {"region_proposals", "spurious_features", "evaluation_report"} <= set(spans)
    assert celery_run["run"].status == dg.DagsterRunStatus.SUCCESS
    for step, (_, _, pid) in spans.items():
        assert pid != celery_run["launcher"], step
        assert celery_run["workers"] & ({pid} | set(lineage[step])), f"{step} ran in pid {pid}, not a worker"
    # both workers took steps
    used = {next(w for w in [pid, *lineage[s]] if w in celery_run["workers"]) for s, (_, _, pid) in spans.items()}
    assert used == celery_run["workers"]
    # the launcher printed each step as it started and ended
    assert f"  [{SET}] region_embeddings.shard[0] ..." in celery_run["out"]
    assert f"  [{SET}] region_embeddings.merge done in" in celery_run["out"]


def test_model_steps_keep_their_pool_limit(celery_run):
    spans = celery_run["spans"]
    pooled = sorted((start, end, step) for step, (start, end, _) in spans.items() if step in POOL_STEPS)
    assert {step for *_, step in pooled} == POOL_STEPS
    for (_, end, a), (start, _, b) in zip(pooled, pooled[1:]):
        assert start >= end, f"{a} and {b} overlapped in the ravl_model pool"


def test_outputs_equal_the_in_process_executor(celery_run):
    a, b = celery_run["in_process"], celery_run["celery"]
    assert {"findings.json", "metrics.json", "mitigated_model.json", "control_model.json"} <= set(a)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    # the Celery run kept the in-process run's findings as the previous audit
    assert celery_run["previous"] == a["findings.json"]
