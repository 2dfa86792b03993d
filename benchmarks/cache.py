"""Embedding work redone when a validation set grows by 10% (SPEC §1.2).

A synthetic validation set of ``--n`` images is embedded through an empty
:class:`~ravl_pipeline.core.cache.EmbeddingCache`; then ``--grow`` (default
10%) new images are added and the grown set is embedded again through the
cache. Reported, in one process:

* **work fraction** = images embedded for the grown set / images in it
  (target ≤ 15%; counts, so the noisy machine does not matter);
* **time ratio** = seconds for the grown set through the warm cache /
  seconds to embed the grown set without a cache (median of ``--repeats``
  alternating runs; includes hashing the image files and reading shards);
* the largest absolute difference between cached and fresh embeddings.

    .venv/bin/python benchmarks/cache.py                      # tiny ResNet, 500 + 50 images
    .venv/bin/python benchmarks/cache.py --model RN50 --n 200  # open_clip RN50 (random init), 224 px
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ravl_pipeline.core.cache import EmbeddingCache, model_key
from ravl_pipeline.core.embed import embed_dataset
from ravl_pipeline.experiments.synth import SynthConfig, make_setting
from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.models import load_model, save_model


def build_sets(root: Path, n: int, extra: int, seed: int):
    make_setting(root / "setting", SynthConfig(n_pretrain=10, n_finetune=10, n_val=n, n_test=extra, seed=seed))
    eval_dir = root / "setting" / "eval"
    ds = load_dataset(eval_dir)
    splits = np.array(ds.splits)
    old = np.flatnonzero(splits == "val")
    new = np.flatnonzero(splits == "test")
    return ds.subset(old), ds.subset(np.concatenate([old, new]))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ravl-tiny-rn")
    parser.add_argument("--n", type=int, default=500, help="images in the original validation set")
    parser.add_argument("--grow", type=float, default=0.10, help="fraction of new images added")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ravl-bench-cache-"))
    try:
        extra = max(1, round(args.n * args.grow))
        old, grown = build_sets(work, args.n, extra, args.seed)
        ckpt = save_model(load_model(args.model, seed=args.seed), work / "model")
        lm = load_model(f"local-dir:{ckpt}")

        cold = EmbeddingCache(work / "cache")
        _, t_cold = timed(lambda: embed_dataset(lm, old, progress=False, cache=cold))
        original_shards = {p.name for p in cold.shards(model_key(lm))}
        first = EmbeddingCache(work / "cache")
        cached, _ = timed(lambda: embed_dataset(lm, grown, progress=False, cache=first))
        embedded = first.stats.misses

        # timings after the grown set is cached: warm lookups vs full recompute
        t_warm, t_plain = [], []
        for _ in range(args.repeats):
            warm = EmbeddingCache(work / "cache")
            _, t = timed(lambda: embed_dataset(lm, grown, progress=False, cache=warm))
            t_warm.append(t)
            fresh, t = timed(lambda: embed_dataset(lm, grown, progress=False))
            t_plain.append(t)
        # one grown-set pass against a cache holding only the original set:
        # the incremental run as it happens (misses embedded + hits read)
        t_incr = []
        for r in range(args.repeats):
            cache_dir = work / f"cache-incr-{r}"
            shutil.copytree(work / "cache", cache_dir)
            for shard in cache_dir.glob("*/shard-*.parquet"):
                if shard.name not in original_shards:
                    shard.unlink()  # keep only what the original set wrote
            inc = EmbeddingCache(cache_dir)
            _, t = timed(lambda: embed_dataset(lm, grown, progress=False, cache=inc))
            assert inc.stats.misses == embedded, (inc.stats.misses, embedded)
            t_incr.append(t)

        diff = max(float(np.abs(cached.image_emb - fresh.image_emb).max()),
                   float(np.abs(cached.region_emb - fresh.region_emb).max()))
        result = {
            "model": args.model, "images_original": len(old), "images_grown": len(grown),
            "images_embedded_after_growth": embedded,
            "work_fraction": embedded / len(grown),
            "seconds_cold_original": round(t_cold, 3),
            "seconds_full_recompute_median": round(statistics.median(t_plain), 3),
            "seconds_incremental_median": round(statistics.median(t_incr), 3),
            "seconds_all_cached_median": round(statistics.median(t_warm), 3),
            "time_ratio_incremental": statistics.median(t_incr) / statistics.median(t_plain),
            "time_ratio_all_cached": statistics.median(t_warm) / statistics.median(t_plain),
            "max_abs_diff_cached_vs_fresh": diff,
        }
        print(json.dumps(result, indent=2))
        print(f"| {args.model} | {len(old)} → {len(grown)} | {embedded} | {result['work_fraction']:.1%} | "
              f"{result['time_ratio_incremental']:.2f} | {result['time_ratio_all_cached']:.2f} | {diff:.1e} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
