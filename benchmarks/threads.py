"""Torch threads against the cores actually free: one Stage 2 training loop
with the default (``compute.threads: null``: the cores free when the process
starts), with every core (torch's own default before) and with one thread, on
an idle machine and next to one busy process, in the same invocation.

    .venv/bin/python benchmarks/threads.py --steps 32 --rounds 2

Each variant runs in a fresh process (threads are fixed before torch is
imported): ``ravl finetune --method standard`` on the built-in default
setting's fine-tuning images (built once into ``--work``), ``--steps`` steps
at batch ``--batch-size``, timed by the run's own history (training only).
"Busy" starts one CPU-bound process (a Python busy loop) beside it for the
whole run. Variants alternate ``--rounds`` times; the median is reported with
ratios against the default threads in the same condition. Printed as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAVL = REPO / ".venv" / "bin" / "ravl"


def setting(work: Path) -> Path:
    finetune = work / "setting" / "finetune"
    if not (finetune / "manifest.parquet").is_file():
        subprocess.run([str(RAVL), "synth", "--out", str(work / "setting"), "--n-pretrain", "10",
                        "--n-finetune", "2000", "--n-val", "10", "--n-test", "10"], check=True,
                       capture_output=True)
    return finetune


def one_run(data: Path, threads: int | None, steps: int, batch: int, busy: bool) -> float:
    env = dict(os.environ, TQDM_DISABLE="1")
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(key, None)
        if threads is not None:
            env[key] = str(threads)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            history = Path(tmp) / "history.json"
            subprocess.run([str(RAVL), "finetune", "--model", "ravl-tiny-rn", "--data", str(data),
                            "--out", str(Path(tmp) / "ck"), "--max-steps", str(steps), "--batch-size", str(batch),
                            "--history", str(history), "--quiet"], env=env, check=True, capture_output=True)
            return float(json.loads(history.read_text())["seconds"])
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ravl-threads")
    args = ap.parse_args()
    data = setting(args.work)
    cores = len(os.sched_getaffinity(0))
    variants = [(busy, threads) for busy in (False, True) for threads in (None, cores, 1)]
    seconds: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for busy, threads in variants:
            key = f"{'busy' if busy else 'idle'}, {'default' if threads is None else threads} thread(s)"
            seconds.setdefault(key, []).append(one_run(data, threads, args.steps, args.batch_size, busy))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    out = {"cores": os.cpu_count(), "steps": args.steps, "batch_size": args.batch_size, "rounds": args.rounds,
           "seconds": seconds, "median": med,
           "over_every_core": {c: {t: med[f"{c}, {t} thread(s)"] / med[f"{c}, {cores} thread(s)"]
                                   for t in ("default", "1")} for c in ("idle", "busy")}}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
