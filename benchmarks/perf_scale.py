"""Stage 1 at scale (SPEC §2.1 note on large region counts): discovery on up
to 1,000,000 regions within 8 GiB.

Synthetic region embeddings with planted clusters (30 directions in 64-d,
four regions per image, 10 classes); a seeded sample of ``--sample``
regions is clustered (K in [20, 50) by silhouette) and every region is then
assigned to its nearest medoid; gaps and influence are scored for all
regions.  Each size runs in its own subprocess so its peak resident memory
(``getrusage`` maxrss) is its own.

    .venv/bin/python benchmarks/perf_scale.py --sizes 10000 100000 1000000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

# One BLAS thread: CPU time then measures work, not spinning worker threads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from ravl_pipeline.core.cluster import cluster_regions  # noqa: E402
from ravl_pipeline.core.rank import rank_features  # noqa: E402

N_CLASSES = 10
N_PLANTED = 30
DIM = 64
REGIONS_PER_IMAGE = 4


def planted_regions(m: int, seed: int = 0, chunk: int = 200_000):
    """Unit embeddings around ``N_PLANTED`` random directions, built in chunks
    so the float64 temporaries stay small; returns (embeddings, planted ids)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(N_PLANTED, DIM))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    planted = rng.integers(0, N_PLANTED, m)
    emb = np.empty((m, DIM), dtype=np.float32)
    for start in range(0, m, chunk):
        ids = planted[start:start + chunk]
        x = centers[ids] + 0.06 * rng.normal(size=(len(ids), DIM))
        emb[start:start + chunk] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return emb, planted


def run_one(m: int, sample: int, seed: int, sweep: str = "warm") -> dict:
    from sklearn.metrics import adjusted_rand_score

    t0 = time.perf_counter()
    emb, planted = planted_regions(m, seed)
    n_images = m // REGIONS_PER_IMAGE
    rng = np.random.default_rng(seed + 1)
    region_image = np.repeat(np.arange(n_images), REGIONS_PER_IMAGE)
    region_index = np.tile(np.arange(REGIONS_PER_IMAGE), n_images)
    logits = rng.normal(size=(m, N_CLASSES)).astype(np.float32)
    region_scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    del logits
    image_labels = rng.integers(0, N_CLASSES, n_images)
    # planted cluster 0 helps class 0 and hurts the rest, so something is found
    has0 = np.zeros(n_images, dtype=bool)
    has0[region_image[planted == 0]] = True
    p_correct = np.where(has0, np.where(image_labels == 0, 0.95, 0.3), 0.7)
    correct = rng.random(n_images) < p_correct
    image_pred = np.where(correct, image_labels, (image_labels + 1 + rng.integers(0, N_CLASSES - 1, n_images)) % N_CLASSES)
    t_data = time.perf_counter() - t0

    t0, c0 = time.perf_counter(), time.process_time()
    clustering = cluster_regions(emb, N_CLASSES, seed=seed, max_regions=sample, sweep=sweep)
    t_cluster, c_cluster = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    findings = rank_features(clustering, emb, region_image, region_index, region_scores, image_labels, image_pred,
                             [f"c{i}" for i in range(N_CLASSES)], top_regions=50)
    t_score, c_score = time.perf_counter() - t0, time.process_time() - c0
    ari = adjusted_rand_score(planted, clustering.labels)
    return {
        "regions": m, "sample": min(sample, m), "sampled": clustering.sampled, "k": clustering.k,
        "silhouette": clustering.silhouette, "ari": float(ari), "features": len(findings.features),
        "seconds_data": t_data, "seconds_cluster": t_cluster, "seconds_score": t_score,
        "cpu_cluster": c_cluster, "cpu_score": c_score,
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--sample", type=int, default=5000, help="regions clustered (the rest are assigned)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", default="warm", choices=["warm", "independent"], help="K-sweep strategy")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.sample, args.seed, args.sweep)))
        return 0

    rows = []
    for m in args.sizes:
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, __file__, "--one", str(m), "--sample", str(args.sample),
                              "--seed", str(args.seed), "--sweep", args.sweep], capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return res.returncode
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["seconds_wall"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  {m}: {row}", file=sys.stderr, flush=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.1f}; "
          f"sample {args.sample} regions clustered, K in [20, 50), {args.sweep} sweep")
    print("\n| regions | K | ARI vs planted | features | sample clustering + assignment, wall (CPU) s | "
          "gap/influence scoring, wall (CPU) s | total CPU s | CPU / CPU at first size | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    first = rows[0]["cpu_cluster"] + rows[0]["cpu_score"]
    for r in rows:
        total = r["cpu_cluster"] + r["cpu_score"]
        print(f"| {r['regions']:,} | {r['k']} | {r['ari']:.4f} | {r['features']} | "
              f"{r['seconds_cluster']:.1f} ({r['cpu_cluster']:.1f}) | {r['seconds_score']:.1f} ({r['cpu_score']:.1f}) | "
              f"{total:.1f} | {total / first:.2f}× | {r['max_rss_gib']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
