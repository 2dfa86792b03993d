"""The Stage-1 K sweep (SPEC §2.1) against the reference algorithm, in one process.

4,000 L2-normalised 64-d region embeddings of 10 classes (three sub-clusters
per class plus a shared "empty" cluster, overlapping), K in [20, 50).

Variants, all on the same distance matrix:

* ``reference``: scikit-learn-extra ``KMedoids`` (default ``alternate``
  method, ``k-medoids++`` init) + scikit-learn's full precomputed silhouette
  per K — the published reference's algorithm;
* ``fasterpam+sklearn-sil``: seeded FasterPAM per K + scikit-learn silhouette
  (this project's sweep before optimisation);
* ``fasterpam+fast-sil``: the same fits, exact silhouette from ``D @ onehot``
  (``cluster_regions()``, the default);
* ``warm+fast-sil``: K started from K-1's medoids plus a greedy BUILD step
  (``cluster_regions()``, the default);
* ``warm+medoid-sil``: the warm fits scored by the medoid silhouette
  (a different, cheaper criterion; timing and chosen K only);
* ``parallel(2)+fast-sil``: independent fits over K in two processes.

scikit-learn-extra 0.3.0 does not install into the project environment
(NumPy 2 ABI, see DESIGN.md), so run this with the benchmark environment:

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install numpy cython scikit-learn kmedoids wheel 'setuptools>=70'
    .venv-bench/bin/pip install --no-build-isolation --no-binary scikit-learn-extra scikit-learn-extra==0.3.0
    PYTHONPATH=. .venv-bench/bin/python benchmarks/perf_cluster.py
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
import warnings

# One BLAS thread: the clock is CPU time, and spinning BLAS worker threads
# would count as work (set before numpy is imported).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from ravl_pipeline.core import cluster as disc  # noqa: E402

N_CLASSES = 10


def make_regions(n: int = 4000, n_classes: int = N_CLASSES, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Overlapping planted clusters: 3 per class + one 'empty' cluster."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3 * n_classes + 1, dim))
    which = rng.integers(0, len(centers), n)
    x = centers[which] + 0.8 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children: on a shared,
    loaded machine far steadier than wall-clock time."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def _timed(fn):
    c0, t0 = _cpu_seconds(), time.perf_counter()
    out = fn()
    return out, _cpu_seconds() - c0, time.perf_counter() - t0


def sweep_reference(dist, ks, seed):
    from sklearn.metrics import silhouette_score
    from sklearn_extra.cluster import KMedoids

    rows = []
    for k in ks:
        model = KMedoids(n_clusters=k, metric="precomputed", method="alternate", init="k-medoids++",
                         random_state=seed).fit(dist)
        sil = float(silhouette_score(dist, model.labels_, metric="precomputed"))
        rows.append({"k": k, "loss": float(model.inertia_), "silhouette": sil})
    return rows


def sweep_fasterpam_sklearn_sil(dist, ks, seed):
    from sklearn.metrics import silhouette_score

    rows = []
    for k in ks:
        labels, _, loss = disc._fit_kmedoids(dist, k, disc._k_seed(seed, k), "fasterpam")
        rows.append({"k": k, "loss": loss,
                     "silhouette": float(silhouette_score(dist, labels, metric="precomputed"))})
    return rows


def sweep_library(dist, ks, seed, sweep, silhouette="exact"):
    import kmedoids

    rows = []
    for k, labels, medoids, loss in disc._sweep_fits(dist, ks, seed, "fasterpam", sweep):
        if silhouette == "exact":
            sil = disc.silhouette_from_distance(dist, labels)
        else:
            sil = float(kmedoids.medoid_silhouette(dist, medoids)[0])
        rows.append({"k": k, "loss": loss, "silhouette": sil})
    return rows


_SHARED = {}


def _fit_one(k):
    dist, seed = _SHARED["dist"], _SHARED["seed"]
    labels, _, loss = disc._fit_kmedoids(dist, k, disc._k_seed(seed, k), "fasterpam")
    return {"k": k, "loss": loss, "silhouette": disc.silhouette_from_distance(dist, labels)}


def sweep_parallel(dist, ks, seed, workers=2):
    # fork shares D copy-on-write; each worker fits whole K values
    _SHARED.update(dist=dist, seed=seed)
    pool = mp.get_context("fork").Pool(workers)
    try:
        rows = pool.map(_fit_one, ks, chunksize=1)
    finally:
        pool.close()
        pool.join()  # reaped children count in RUSAGE_CHILDREN
    return sorted(rows, key=lambda r: r["k"])


def chosen(rows):
    best = max(rows, key=lambda r: (r["silhouette"], -r["k"]))
    return best["k"], best["silhouette"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--embeddings", default=None,
                    help="a .npy [M, D] of real region embeddings instead of the synthetic mixture")
    ap.add_argument("--classes", type=int, default=N_CLASSES, help="|Y| for the K range [2|Y|, 5|Y|)")
    ap.add_argument("--json", default=None, help="write all numbers here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")

    if args.embeddings:
        x = np.load(args.embeddings).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    else:
        x = make_regions(args.n, n_classes=args.classes, seed=args.seed)
    dist = disc.cosine_distance(x)
    ks = disc.k_candidates(args.classes, len(x))
    variants = {}
    if not args.skip_reference:
        variants["reference (sklearn-extra alternate + sklearn silhouette)"] = lambda: sweep_reference(dist, ks, args.seed)
    variants.update({
        "fasterpam + sklearn silhouette (before)": lambda: sweep_fasterpam_sklearn_sil(dist, ks, args.seed),
        "fasterpam + fast exact silhouette (default)": lambda: sweep_library(dist, ks, args.seed, "independent"),
        "warm FasterPAM + fast exact silhouette (sweep=warm)": lambda: sweep_library(dist, ks, args.seed, "warm"),
        "warm FasterPAM + medoid silhouette": lambda: sweep_library(dist, ks, args.seed, "warm", "medoid"),
        "parallel(2 procs) FasterPAM + fast exact silhouette": lambda: sweep_parallel(dist, ks, args.seed),
    })
    results = {}
    for name, fn in variants.items():
        rows, cpu, wall = _timed(fn)
        results[name] = {"seconds": cpu, "wall_seconds": wall, "rows": rows}
        print(f"  {name}: {cpu:.1f}s CPU, {wall:.1f}s wall", file=sys.stderr, flush=True)

    base_name = next(iter(results))
    base = results[base_name]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.1f}; "
          f"n={len(x)} regions, K in [{ks[0]}, {ks[-1] + 1}), {len(ks)} fits per sweep")
    print(f"\nbaseline: {base_name}\n")
    before = results.get("fasterpam + sklearn silhouette (before)", base)
    print("| variant | CPU time (s) | wall (s) | speed-up vs baseline (CPU) | speed-up vs before (CPU) | chosen K | silhouette | "
          "mean loss / baseline | K with lower / equal / higher loss than baseline | "
          "... than before |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, res in results.items():
        k, sil = chosen(res["rows"])
        ratio = np.mean([r["loss"] / b["loss"] for r, b in zip(res["rows"], base["rows"])])
        lower = sum(r["loss"] < b["loss"] - 1e-6 for r, b in zip(res["rows"], base["rows"]))
        higher = sum(r["loss"] > b["loss"] + 1e-6 for r, b in zip(res["rows"], base["rows"]))
        equal = len(ks) - lower - higher
        lo_b = sum(r["loss"] < b["loss"] - 1e-6 for r, b in zip(res["rows"], before["rows"]))
        hi_b = sum(r["loss"] > b["loss"] + 1e-6 for r, b in zip(res["rows"], before["rows"]))
        print(f"| {name} | {res['seconds']:.1f} | {res['wall_seconds']:.1f} | {base['seconds'] / res['seconds']:.2f}× | "
              f"{before['seconds'] / res['seconds']:.2f}× | {k} | {sil:.4f} | "
              f"{ratio:.4f} | {lower} / {equal} / {higher} | {lo_b} / {len(ks) - lo_b - hi_b} / {hi_b} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
