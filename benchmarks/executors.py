"""Wall time of auditing four validation sets with each Dagster executor.

One project under ``--out`` (default ``runs/executors``): the audited model of
the small synthetic recipe, four validation sets of ``--n-val`` discovery and
``--n-test`` test images cut from its evaluation split, and ``params.yaml``
with Stage 2 shortened to ``--mitigation-steps`` optimiser steps (``--untrained``:
untrained tiny models instead, so the steps are short and the executors'
own costs dominate). Then
``ravl materialize --partition s1 … s4`` (the whole per-set graph, one run per
set) is timed with each executor, alternating, ``--rounds`` times:

* ``multiprocess``: Dagster's multiprocess executor, two processes per run;
* ``celery``: Dagster's Celery executor; a Redis broker on a free loopback
  port and two ``ravl worker`` processes (concurrency 1 each) started here;
* ``in_process`` (reference): every step in the launching process.

The model-heavy steps share the ``ravl_model`` pool (limit 1) whatever the
executor. Printed: the median wall time per executor and the ratio
celery / multiprocess, as JSON lines and a Markdown table.

    .venv/bin/python benchmarks/executors.py --rounds 2
    .venv/bin/python benchmarks/executors.py --untrained --out runs/executors-untrained
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from ravl_pipeline.config import TrainConfig
from ravl_pipeline.experiments.recipe import BASE_MODEL, DEFAULT_RECIPE, build_audited_model
from ravl_pipeline.experiments.synth import make_setting
from ravl_pipeline.io.manifest import read_manifest, write_manifest
from ravl_pipeline.models import load_model, save_model

BIN = Path(sys.executable).parent
SETS = ("s1", "s2", "s3", "s4")


def cut_set(eval_dir: Path, target: Path, offset: int, n_val: int, n_test: int) -> None:
    if target.exists():
        return
    table = read_manifest(eval_dir)
    split = table.column("split")
    val = np.flatnonzero(pc.equal(split, "val").to_numpy(zero_copy_only=False))
    test = np.flatnonzero(pc.equal(split, "test").to_numpy(zero_copy_only=False))
    sub = table.take(pa.array(np.concatenate([val[offset:offset + n_val], test[offset:offset + n_test]])))
    (target / "images").mkdir(parents=True)
    for rel in sub.column("path").to_pylist():
        shutil.copy2(eval_dir / rel, target / rel)
    shutil.copy2(eval_dir.parent / "setting.json", target / "setting.json")
    write_manifest(target, sub)


def untrained_models(out: Path) -> dict:
    """The recipe's setting with untrained tiny models in place of trained
    ones: every step runs its real code, in seconds (nothing is found, so
    Stage 2 keeps the audited model)."""
    paths = {"setting": out / "setting", "pretrained": out / "models" / "pretrained",
             "audited": out / "models" / "audited"}
    if not paths["audited"].exists():
        make_setting(paths["setting"], DEFAULT_RECIPE.small().synth)
        save_model(load_model(BASE_MODEL, seed=0), paths["pretrained"])
        save_model(load_model(BASE_MODEL, seed=1), paths["audited"],
                   {"train": TrainConfig(batch_size=16, max_steps=2).to_dict(),
                    "pretrained_from": str(paths["pretrained"])})
    return paths


def build_project(out: Path, args) -> dict:
    tiny = (untrained_models(out / "untrained") if args.untrained
            else build_audited_model(out / "model", DEFAULT_RECIPE.small()))
    for i, name in enumerate(SETS):
        cut_set(tiny["setting"] / "eval", out / "data" / "validation_sets" / name, i * args.n_val // 2,
                args.n_val, args.n_test)
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["audited_model"].update(source="checkpoint", checkpoint=f"local-dir:{tiny['audited']}",
                                   init_model=f"local-dir:{tiny['pretrained']}",
                                   train_data=str(tiny["setting"] / "finetune"))
    params["mitigation"]["max_steps"] = args.mitigation_steps
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dict(os.environ, RAVL_DATA_DIR=str(out / "data"), RAVL_PARAMS=str(out / "params.yaml"),
                DAGSTER_HOME=str(out / "dagster_home"), TQDM_DISABLE="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, env, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass


def materialize(env: dict, executor: str) -> float:
    run_env = dict(env)
    if executor != "in_process":
        run_env["RAVL_EXECUTOR"] = executor
    t0 = time.perf_counter()
    cmd = [str(BIN / "ravl"), "materialize", *[a for s in SETS for a in ("--partition", s)]]
    proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{executor}: ravl materialize failed\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/executors")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n-val", type=int, default=60)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--mitigation-steps", type=int, default=8)
    ap.add_argument("--executors", nargs="+", default=["multiprocess", "celery", "in_process"])
    ap.add_argument("--untrained", action="store_true",
                    help="untrained tiny models instead of the small recipe's (orchestration cost, in minutes)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = build_project(out, args)
    subprocess.run([str(BIN / "ravl"), "materialize", "--select", "audited_model"], env=env, check=True,
                   capture_output=True)
    port = free_port()
    redis = start([shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port), "--bind",
                   "127.0.0.1", "--save", "", "--appendonly", "no"], env, out / "redis.log")
    env = dict(env, RAVL_CELERY_BROKER=f"redis://127.0.0.1:{port}/0")
    workers = [start([str(BIN / "ravl"), "worker", "--name", f"w{i}"], dict(env, RAVL_EXECUTOR="celery"),
                     out / f"worker{i}.log") for i in (1, 2)]
    times: dict[str, list[float]] = {e: [] for e in args.executors}
    try:
        time.sleep(5)
        for r in range(args.rounds):
            for executor in args.executors:
                seconds = materialize(env, executor)
                times[executor].append(seconds)
                print(json.dumps({"round": r, "executor": executor, "seconds": round(seconds, 1)}), flush=True)
    finally:
        for proc in [*workers, redis]:
            stop(proc)
    median = {e: statistics.median(v) for e, v in times.items()}
    print("\n| executor | wall s (median of %d) | runs | / multiprocess |" % args.rounds)
    print("|---|---:|---|---:|")
    for e, v in times.items():
        ratio = median[e] / median["multiprocess"] if "multiprocess" in median else float("nan")
        print(f"| {e} | {median[e]:.1f} | {', '.join(f'{x:.1f}' for x in v)} | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
