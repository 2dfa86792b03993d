"""Crash safety: a step killed with SIGKILL in the middle of its work leaves
the previous outputs byte-identical, and the next run completes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import torch

from ravl_pipeline.cli import main as ravl
from ravl_pipeline.models import load_model
from tests.tiny_project import RAVL, make_tiny_project, snapshot

TRAIN = ["--model", "ravl-tiny-rn", "--batch-size", "8", "--seed", "0"]


def _in_one_thread(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ravl(argv)
    finally:
        torch.set_num_threads(threads)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true; fail if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the moment to kill it")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the moment to kill the run")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_replace_dir_swaps_in_one_step_and_leaves_nothing_behind(tmp_path):
    from ravl_pipeline.io.files import _exchange_paths, replace_dir as _replace_dir

    target, new = tmp_path / "out", tmp_path / ".out.new"
    target.mkdir()
    (target / "f").write_text("old")
    new.mkdir()
    (new / "f").write_text("new")
    (new / "g").write_text("added")
    _replace_dir(new, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {p.name: p.read_text() for p in target.iterdir()} == {"f": "new", "g": "added"}
    if sys.platform.startswith("linux"):
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir()
        b.mkdir()
        (a / "x").write_text("1")
        assert _exchange_paths(a, b)
        assert (b / "x").read_text() == "1" and not any(a.iterdir())


def test_replace_dir_without_exchange_puts_the_old_folder_back_when_the_move_fails(tmp_path, monkeypatch):
    from ravl_pipeline.io import files

    target, new = tmp_path / "out", tmp_path / ".out.new"
    target.mkdir()
    (target / "f").write_text("old")
    new.mkdir()
    (new / "f").write_text("new")
    monkeypatch.setattr(files, "_exchange_paths", lambda a, b: False)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src) == new:
            raise OSError("disk went away")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        files.replace_dir(new, target)
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert (target / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.new", "out"]


@pytest.fixture(scope="module")
def finetune_set(tmp_path_factory) -> Path:
    from ravl_pipeline.experiments.synth import SynthConfig, make_setting

    root = tmp_path_factory.mktemp("crash_setting")
    make_setting(root, SynthConfig(n_pretrain=10, n_finetune=24, n_val=10, n_test=10, seed=0))
    return root / "finetune"


def test_killed_training_keeps_previous_checkpoint(finetune_set, tmp_path):
    out = tmp_path / "model"
    assert _in_one_thread(["train", "--data", str(finetune_set), "--out", str(out), "--max-steps", "1",
                           "--quiet", *TRAIN]) == 0
    before = snapshot(out)
    assert set(before) == {"open_clip_config.json", "open_clip_model.safetensors", "ravl_model.json"}

    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # progress tells us training started
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "ravl_pipeline.cli", "train", "--data", str(finetune_set),
                             "--out", str(out), "--max-steps", "100000", *TRAIN],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = bytearray()
    reader = threading.Thread(target=lambda: [stderr.extend(chunk) for chunk in iter(lambda: proc.stderr.read1(4096), b"")],
                              daemon=True)
    reader.start()
    _kill_when(proc, lambda: b"loss=" in stderr)  # at least one optimiser step done
    reader.join(timeout=10)

    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["model"]
    load_model(f"local-dir:{out}")  # still a loadable checkpoint
    assert _in_one_thread(["train", "--data", str(finetune_set), "--out", str(out), "--max-steps", "2",
                           "--quiet", *TRAIN]) == 0
    after = snapshot(out)
    assert after["open_clip_model.safetensors"] != before["open_clip_model.safetensors"]
    assert load_model(f"local-dir:{out}").meta["history"]["steps"] == 2


def _step_started(dagster_home: Path, step: str, since: float):
    """Whether any run recorded since ``since`` has started ``step``
    (read from the run event-log SQLite files of Dagster's default storage)."""
    def ready() -> bool:
        for db in (dagster_home / "history" / "runs").glob("*.db"):
            if db.stat().st_mtime < since:
                continue
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1) as con:
                    row = con.execute("SELECT 1 FROM event_logs WHERE dagster_event_type = 'STEP_START' "
                                      "AND step_key = ? LIMIT 1", (step,)).fetchone()
            except sqlite3.Error:
                continue  # being written; look again
            if row:
                return True
        return False
    return ready


def _latest_run_of(dagster_home: Path, asset: str, partition: str) -> str | None:
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        found = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1)
        return found.records[0].run_id if found.records else None


def _runs_with_status(dagster_home: Path, status) -> list[str]:
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        return [r.run_id for r in instance.get_runs(filters=dg.RunsFilter(statuses=[status]))]


@pytest.mark.slow
def test_killed_materialization_keeps_previous_outputs(tmp_path):
    root = tmp_path / "project"
    env = make_tiny_project(root, n_val=120, validation_set="tiny")
    home = Path(env["DAGSTER_HOME"])
    argv = [str(RAVL), "materialize", "--partition", "tiny",
            "--select", "key:audited_model or key:region_proposals or key:region_embeddings"]
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    outputs = root / "data" / "outputs"
    before = snapshot(outputs)
    assert {"tiny/embeddings/images.parquet", "tiny/embeddings/regions.parquet",
            "tiny/proposals/proposals.parquet", "audited_model.json"} <= set(before)
    first_run = _latest_run_of(home, "region_embeddings", "tiny")
    assert first_run is not None

    started = time.time()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, _step_started(home, "region_embeddings", started))

    assert snapshot(outputs) == before  # byte-identical, nothing half-written in place
    assert _latest_run_of(home, "region_embeddings", "tiny") == first_run
    killed = _runs_with_status(home, dg.DagsterRunStatus.STARTED)
    assert len(killed) == 1  # Dagster still believes it runs, holding the model pool's slot

    third = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    # the next run released the dead run's slot (else it would wait forever) and marked it failed
    assert killed[0] in _runs_with_status(home, dg.DagsterRunStatus.FAILURE)
    assert _latest_run_of(home, "region_embeddings", "tiny") not in (None, first_run)
    after = snapshot(outputs)
    assert set(after) == set(before)
