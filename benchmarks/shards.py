"""One validation set's embedding split over processes: wall time and equality.

    .venv/bin/python benchmarks/shards.py --model ravl-tiny-rn --n 2000 --shards 2

On ``--n`` scenes photos (SPEC §4.3, ``--short-side`` px) the set is embedded
(image + region embeddings, the COCO boxes as regions) three ways, each in
fresh processes started by this script, alternating ``--rounds`` times:

* ``single``: one process, ``torch.set_num_threads(--shards)``: every core
  on one stream of batches;
* ``single_1thread``: one process, one thread (what each shard has);
* ``sharded``: ``--shards`` processes at once, one thread each, each
  embedding its contiguous rows (``core.embed.shard_rows``), as the Dagster
  ``region_embeddings.shard[i]`` steps or ``ravl embed-shard`` do;
* then the shards merged (``core.embed.merge_embeddings``) and compared with
  ``single``: same image ids in the same order, same boxes, and the largest
  absolute difference of any embedding value.

Printed as JSON: the median wall time of each (processes started and models
loaded included, as a step pays them) and sharded / single (both).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def child(args) -> None:
    import torch

    from ravl_pipeline.core.embed import embed_dataset, shard_rows
    from ravl_pipeline.io.dataset import load_dataset
    from ravl_pipeline.models import load_model

    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data, split="val")
    if args.count > 1:
        ds = ds.subset(list(shard_rows(len(ds), args.count, args.index)))
    emb = embed_dataset(load_model(args.model, seed=0), ds, proposer="boxes", progress=False)
    emb.save(args.save)


def run(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ravl-tiny-rn")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--short-side", type=int, default=128)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("data", "save"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    for name in ("threads", "index", "count"):
        p.add_argument(f"--{name}", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    from ravl_pipeline.core.embed import Embeddings, merge_embeddings
    from ravl_pipeline.experiments.scenes import ScenesConfig, make_scenes_setting

    work = Path(args.work or tempfile.mkdtemp(prefix="ravl-shards-"))
    data = work / "setting" / "eval"
    if not (data / "manifest.parquet").is_file():
        make_scenes_setting(work / "setting", ScenesConfig(short_side=args.short_side, n_pretrain=10,
                                                           n_finetune=10, n_val=args.n, n_test=10))
    base = [sys.executable, __file__, "--child", "--model", args.model, "--data", str(data)]
    times: dict[str, list[float]] = {"single": [], "single_1thread": [], "sharded": []}
    for _ in range(args.rounds):
        for name, threads in (("single", args.shards), ("single_1thread", 1)):
            t0 = time.perf_counter()
            run([*base, "--threads", str(threads), "--save", str(work / name)]).wait()
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        procs = [run([*base, "--threads", "1", "--index", str(i), "--count", str(args.shards),
                      "--save", str(work / f"shard{i}")]) for i in range(args.shards)]
        if any(proc.wait() for proc in procs):
            raise SystemExit("a shard process failed")
        times["sharded"].append(time.perf_counter() - t0)
    single = Embeddings.load(work / "single")
    merged = merge_embeddings([Embeddings.load(work / f"shard{i}") for i in range(args.shards)])
    median = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "model": args.model, "n_images": len(single.image_ids), "n_regions": single.n_regions,
        "shards": args.shards, "rounds": args.rounds, "wall_s": times, "median_s": median,
        "sharded_over_single": round(median["sharded"] / median["single"], 3),
        "sharded_over_single_1thread": round(median["sharded"] / median["single_1thread"], 3),
        "same_ids_and_order": merged.image_ids == single.image_ids,
        "same_boxes": bool(np.array_equal(merged.boxes, single.boxes)),
        "max_abs_difference": float(max(np.abs(merged.image_emb - single.image_emb).max(),
                                        np.abs(merged.region_emb - single.region_emb).max())),
    }, indent=2))


if __name__ == "__main__":
    main()
