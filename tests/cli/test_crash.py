"""Crash safety: a step killed with SIGKILL in the middle of its work leaves
the previous outputs byte-identical, and the next run completes."""

from __future__ import annotations

import json
import os
import re
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
    _kill_when(proc, _step_started(home, "region_embeddings.shard[0]", started))

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


# --------------------------------------------------------------------------- SIGKILL at chosen points

# Run `ravl` in a child that kills itself with SIGKILL at one chosen point of
# writing its output: a deterministic stand-in for a kill arriving there.
KILLER = r"""
import os, re, shutil, signal, sys
from ravl_pipeline import models
from ravl_pipeline.io import files

point, argv = sys.argv[1], sys.argv[2:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "file-written-not-renamed":  # atomic_write: content in the temporary, rename not done
    fsync = os.fsync
    def killing_fsync(fd):
        fsync(fd)
        if ".ravl-tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            die()
    os.fsync = killing_fsync
elif point == "checkpoint-half-written":  # atomic_dir: the temporary folder half filled
    def half(state, path, *a, **k):
        with open(path, "wb") as fh:
            fh.write(b"\0" * 4096)
        die()
    models.save_file = half
elif point == "previous-moved-aside":  # replace_dir without an atomic exchange, between its two renames
    files._exchange_paths = lambda a, b: False
    rename = os.replace
    def killing_replace(src, dst):
        rename(src, dst)
        if ".ravl-old-" in str(dst):
            die()
    os.replace = killing_replace
elif point == "swapped-old-not-removed":  # after the exchange, before the previous version is deleted
    def killing_rmtree(path, *a, **k):
        if ".ravl-tmp-" in str(path):
            die()
    shutil.rmtree = killing_rmtree
elif point == "report-twin-renamed-page-not":  # write_files_atomic: between the renames of one unit
    rename = os.replace
    def killing_replace(src, dst):
        rename(src, dst)
        if ".ravl-tmp-" in str(src) and str(dst).endswith("report.json"):
            die()
    os.replace = killing_replace
elif point == "report-page-disk-full":  # the page cannot be written in full (a full disk)
    fsync = os.fsync
    def failing_fsync(fd):
        if ".html.ravl-tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(28, "No space left on device")
        fsync(fd)
    os.fsync = failing_fsync
from ravl_pipeline.cli import main
sys.exit(main(argv))
"""

DEBRIS = re.compile(r"\.ravl-(tmp|old)-")


def _debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if DEBRIS.search(p.name))


def _killed(point: str, argv: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", KILLER, point, *argv], env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]


@pytest.mark.parametrize("point", ["file-written-not-renamed", "checkpoint-half-written", "previous-moved-aside",
                                   "swapped-old-not-removed"])
def test_killed_at_a_write_keeps_the_previous_output_and_the_next_run_leaves_no_debris(point, finetune_set,
                                                                                      tmp_path):
    """SIGKILL at four points of writing an output (a file: after writing its
    temporary; a checkpoint folder: half written, after moving the previous
    one aside, after swapping the new one in). The previous output survives
    (in place, or set aside and put back by the next run), and the next run
    in the folder removes what the killed one left."""
    findings, model = tmp_path / "findings.json", tmp_path / "model"
    discover = ["discover", "--model", f"local-dir:{model}", "--data", str(finetune_set.parent / "eval"),
                "--split", "val", "--no-evidence", "--quiet", "--out", str(findings)]
    train = ["train", "--data", str(finetune_set), "--out", str(model), "--max-steps", "1", "--quiet", *TRAIN]
    assert _in_one_thread(train) == 0
    assert _in_one_thread(discover) == 0
    before = {"model": snapshot(model), "findings": findings.read_bytes()}

    _killed(point, discover if point == "file-written-not-renamed" else train)
    left = _debris(tmp_path)
    assert left, "the kill should leave a temporary behind"
    if point == "previous-moved-aside":
        assert not model.exists()
        assert snapshot(tmp_path / left[0]) == before["model"]  # intact, under its temporary name
    elif point == "swapped-old-not-removed":
        assert snapshot(model) != before["model"]  # the new checkpoint is in place and complete
        load_model(f"local-dir:{model}")
    else:
        assert snapshot(model) == before["model"] and findings.read_bytes() == before["findings"]

    assert _in_one_thread(discover) == 0  # the next run writing into the same folder
    assert _debris(tmp_path) == []
    if point != "swapped-old-not-removed":
        assert snapshot(model) == before["model"]  # put back where it was set aside
    assert load_model(f"local-dir:{model}").architecture == "resnet"


def test_only_stale_temporaries_of_this_tool_are_removed(tmp_path):
    """Removed: this host's temporaries whose process is gone. Kept: those of
    a live process, another host, and anything not named like ours."""
    from ravl_pipeline.io.files import HOST_TAG, remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        f".out.json.ravl-tmp-{HOST_TAG}-{dead.pid}-00ff": "removed",
        f".ck.ravl-tmp-{HOST_TAG}-{dead.pid}-0a0b": "removed",  # a folder
        f".out.json.ravl-tmp-{HOST_TAG}-{os.getpid()}-00ff": "kept",  # this (live) process
        f".out.json.ravl-tmp-{'0' * 8 if HOST_TAG != '0' * 8 else '1' * 8}-{dead.pid}-00ff": "kept",  # other host
        ".out.json.abcd1234.tmp": "kept",
        ".ck.k3j2l1": "kept",
        "out.json": "kept",
    }
    for name in names:
        if name.startswith(".ck"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "weights").write_bytes(b"x")
        else:
            (tmp_path / name).write_text("x")
    aside = tmp_path / f".model.ravl-old-{HOST_TAG}-{dead.pid}-0c0d"
    aside.mkdir()
    (aside / "open_clip_config.json").write_text("{}")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(n for n, what in names.items() if what == "removed")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [n for n, what in names.items() if what == "kept"] + ["model"])
    assert (tmp_path / "model" / "open_clip_config.json").read_text() == "{}"  # the previous version, put back


def _run_point(point: str, argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", KILLER, point, *argv], env=env, capture_output=True, timeout=600)


def test_a_report_and_its_twin_are_replaced_as_one_unit(tmp_path):
    """The page and its JSON twin are never one new and one old once the
    folder is written again: a full disk leaves both earlier files; a kill
    between their renames is completed by the next write into the folder."""
    from ravl_pipeline.io.files import remove_stale_temporaries

    findings = {"schema_version": 1, "dataset": "d", "classes": ["a", "b"], "k": 2, "features": []}
    page, twin = tmp_path / "report.html", tmp_path / "report.json"
    (tmp_path / "a.json").write_text(json.dumps(dict(findings, model="model-A")))
    (tmp_path / "b.json").write_text(json.dumps(dict(findings, model="model-B")))
    assert ravl(["report", "--findings", str(tmp_path / "a.json"), "--out", str(page)]) == 0
    before = {"page": page.read_bytes(), "twin": twin.read_bytes()}
    new = ["report", "--findings", str(tmp_path / "b.json"), "--out", str(page)]

    proc = _run_point("report-page-disk-full", new)
    assert proc.returncode == 2 and b"No space left on device" in proc.stderr and str(page).encode() in proc.stderr
    assert page.read_bytes() == before["page"] and twin.read_bytes() == before["twin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "report.html", "report.json"]

    proc = _run_point("report-twin-renamed-page-not", new)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    assert b"model-B" in twin.read_bytes() and page.read_bytes() == before["page"]  # the moment of the kill
    remove_stale_temporaries(tmp_path)  # what the next write into the folder does first
    assert b"model-B" in twin.read_bytes() and b"model-B" in page.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "report.html", "report.json"]
