"""Mitigation training throughput: RaVL vs Standard FT in one process (SPEC §3.3).

Both methods train the same tiny model from the same initialisation on the
same fine-tuning images with the same batch size; RaVL's spurious regions are
taken from the setting's ground truth (the region label of the induced
feature), which costs the loop exactly what discovered regions would.  The
methods alternate for ``--rounds`` rounds of ``--steps`` steps; the median
images per CPU-second per method is reported (torch on one thread, so the
figure measures work, not the load of a shared machine).

    .venv/bin/python benchmarks/perf_mitigate.py
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ravl_pipeline.config import TrainConfig
from ravl_pipeline.experiments.synth import CAPTION_TEMPLATE, SynthConfig, make_setting
from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.mitigate.assign import RegionAssignment
from ravl_pipeline.mitigate.data import build_train_data
from ravl_pipeline.mitigate.methods import attach_class_tokens, attach_region_extras
from ravl_pipeline.mitigate.train import finetune
from ravl_pipeline.models import load_model


def build(setting_dir: Path, n_finetune: int, model: str):
    cfg = SynthConfig(n_pretrain=20, n_finetune=n_finetune, n_val=20, n_test=20, seed=0)
    make_setting(setting_dir, cfg)
    ds = load_dataset(setting_dir / "finetune")
    lm = load_model(model, seed=0)
    classes = sorted(set(ds.labels))
    data = build_train_data(lm, ds, CAPTION_TEMPLATE, classes=classes)
    feature = cfg.features[0].name
    counts = [len(b) for b in ds.boxes]
    assignment = RegionAssignment(
        image_ids=list(ds.image_ids),
        region_image=np.repeat(np.arange(len(ds)), counts),
        region_index=np.concatenate([np.arange(c) for c in counts]),
        boxes=np.concatenate(ds.boxes),
        cluster=np.zeros(sum(counts), dtype=np.int64),
        spurious=np.array([lab == feature for labs in ds.region_labels for lab in labs]),
    )
    attach_class_tokens(data, lm, CAPTION_TEMPLATE)
    attach_region_extras(data, lm, ds, assignment)
    return data, CAPTION_TEMPLATE


def run(method: str, data, template: str, model: str, steps: int, batch: int) -> float:
    lm = load_model(model, seed=0)
    cfg = TrainConfig(method=method, max_steps=steps, batch_size=batch, caption_template=template, seed=0)
    c0 = time.process_time()
    hist = finetune(lm, data, cfg, progress=False)
    return hist["steps"] * batch / (time.process_time() - c0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ravl-tiny-rn")
    ap.add_argument("--n-finetune", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data, template = build(Path(tmp) / "setting", args.n_finetune, args.model)
        rates = {"standard": [], "ravl": []}
        for _ in range(args.rounds):
            for method in rates:
                rates[method].append(run(method, data, template, args.model, args.steps, args.batch_size))
                print(f"  {method}: {rates[method][-1]:.1f} img/s", file=sys.stderr, flush=True)
    med = {m: statistics.median(r) for m, r in rates.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread, CPU time, load avg {os.getloadavg()[0]:.1f}; model {args.model}, "
          f"batch {args.batch_size}, {args.steps} steps x {args.rounds} alternating rounds, 4 regions/image")
    print("\n| method | images per CPU-second (median) | all rounds | relative to Standard FT |")
    print("|---|---|---|---|")
    for m, r in rates.items():
        print(f"| {m} | {med[m]:.1f} | {', '.join(f'{x:.1f}' for x in r)} | {med[m] / med['standard']:.2f}× |")
    per_step = args.batch_size / med["ravl"] - args.batch_size / med["standard"]
    print(f"\nRaVL adds {per_step:.2f} CPU-s per step of {args.batch_size} images "
          f"({med['standard'] / med['ravl']:.2f}× the step time of Standard FT).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
