"""Stage 1, step one: K-medoids over the regions' cosine distances, K chosen
by silhouette (SPEC §2.1).

Pure numpy, plus the ``kmedoids`` package for FasterPAM. Cluster ids are
positions in :attr:`Clustering.medoids` (``medoids[c]`` is the region row of
the medoid of cluster ``c``).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import kmedoids
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import DiscoveryConfig, InputError
from ..io.files import atomic_dir, write_json_atomic
from .findings import finite_or_none

__all__ = ["Clustering", "ClusterError", "cosine_distance", "k_candidates", "cluster_regions",
           "silhouette_from_distance", "assign_to_medoids"]


class ClusterError(InputError):
    """Stored clusters that cannot be read."""


def cosine_distance(emb: np.ndarray) -> np.ndarray:
    """``D = clip(1 - E Eᵀ, 0, 1)`` with an exact zero diagonal (SPEC §2.1).

    Float32 input gives a float32 matrix (half the memory at 20k regions);
    anything else is computed in float64.
    """
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [M, D], got shape {emb.shape}")
    dtype = np.float32 if emb.dtype == np.float32 else np.float64
    emb = emb.astype(dtype, copy=False)
    dist = emb @ emb.T
    # in place: 1 - S, then clip; avoids a second M x M temporary
    np.subtract(dtype(1.0), dist, out=dist)
    np.clip(dist, 0.0, 1.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


@dataclass
class Clustering:
    """Result of :func:`cluster_regions`."""

    k: int
    silhouette: float
    labels: np.ndarray  # [M] cluster id per region
    medoids: np.ndarray  # [k] region row of each cluster's medoid, by cluster id
    sweep: list = field(default_factory=list)  # [{"k", "silhouette", "loss"}]
    sampled: bool = False
    n_sample: int = 0  # regions actually clustered (== M when not sampled)
    seed: int = DiscoveryConfig.seed

    def sweep_rows(self) -> list[dict]:
        """The K sweep as JSON rows (``None`` for an undefined silhouette)."""
        return [{"k": int(s["k"]), "silhouette": finite_or_none(s["silhouette"]), "loss": finite_or_none(s["loss"])}
                for s in self.sweep]

    def save(self, out_dir: str | os.PathLike, image_ids, region_image, region_index) -> Path:
        """``assignments.parquet`` (each region's cluster) and ``clustering.json``, atomically."""
        out = Path(out_dir)
        with atomic_dir(out) as tmp:
            pq.write_table(pa.table({"image_id": [image_ids[i] for i in region_image],
                                     "region_index": pa.array(region_index, pa.int64()),
                                     "cluster": pa.array(self.labels, pa.int64())}), tmp / "assignments.parquet")
            write_json_atomic(tmp / "clustering.json", {
                "k": self.k, "silhouette": finite_or_none(self.silhouette),
                "medoids": [int(m) for m in self.medoids],
                "sweep": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in s.items()}
                          for s in self.sweep],
                "sampled": self.sampled, "n_sample": self.n_sample, "seed": self.seed})
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Clustering":
        path = Path(path)
        try:
            info = json.loads((path / "clustering.json").read_text())
            labels = pq.read_table(path / "assignments.parquet").column("cluster").to_numpy()
        except (OSError, ValueError, pa.ArrowInvalid) as exc:
            raise ClusterError(f"cannot read clusters in {path}: {exc}") from exc
        silhouette = info["silhouette"] if info["silhouette"] is not None else float("nan")
        sweep = [{k: (float("nan") if k == "silhouette" and v is None else v) for k, v in s.items()}
                 for s in info["sweep"]]
        return cls(k=info["k"], silhouette=silhouette, labels=labels.astype(np.int64),
                   medoids=np.asarray(info["medoids"], np.int64), sweep=sweep, sampled=info["sampled"],
                   n_sample=info["n_sample"], seed=int(info.get("seed", DiscoveryConfig.seed)))


def k_candidates(n_classes: int, n_points: int, k_range=None) -> list[int]:
    """Candidate K values: ``[2|Y|, 5|Y|)`` clamped to ``2 <= K < n_points``.

    ``k_range`` overrides the default: a ``range``, a ``(lo, hi)`` pair
    (``hi`` excluded, like the default), or any other iterable of ints.
    When the clamp leaves nothing but there are at least 3 points, the
    largest feasible K (``n_points - 1``) is used so tiny inputs still work.
    """
    if k_range is None:
        ks = range(2 * int(n_classes), 5 * int(n_classes))
    elif isinstance(k_range, range):
        ks = k_range
    elif isinstance(k_range, (tuple, list)) and len(k_range) == 2:
        ks = range(int(k_range[0]), int(k_range[1]))
    else:
        ks = [int(k) for k in k_range]
    ks = sorted({int(k) for k in ks if 2 <= int(k) < n_points})
    if not ks and n_points >= 3:
        ks = [n_points - 1]
    return ks


def _fit_kmedoids(dist: np.ndarray, k: int, seed: int, backend: str):
    """One K-medoids fit; returns (labels, medoids, loss)."""
    if backend == "fasterpam":
        # n_cpu=1: the parallel variant's swap order depends on thread timing
        res = kmedoids.fasterpam(dist, k, init="random", random_state=seed, n_cpu=1)
        return (
            np.asarray(res.labels, dtype=np.int64),
            np.asarray(res.medoids, dtype=np.int64),
            float(res.loss),
        )
    if backend == "sklearn_extra":
        try:
            from sklearn_extra.cluster import KMedoids  # type: ignore
        except Exception as exc:  # ImportError, or numpy ABI errors on NumPy 2
            raise ImportError(
                "backend='sklearn_extra' needs scikit-learn-extra, which could not be "
                f"imported ({type(exc).__name__}: {exc}). scikit-learn-extra 0.3.0 does "
                "not work with NumPy 2; use the default backend='fasterpam' "
                "(pip package 'kmedoids')."
            ) from exc
        model = KMedoids(
            n_clusters=k, metric="precomputed", method="pam", init="k-medoids++",
            random_state=seed,
        ).fit(dist)
        medoids = np.asarray(model.medoid_indices_, dtype=np.int64)
        labels = np.asarray(model.labels_, dtype=np.int64)
        return labels, medoids, float(model.inertia_)
    raise ValueError(f"unknown clustering backend {backend!r}; use 'fasterpam' or 'sklearn_extra'")


SWEEPS = ("warm", "independent")


def silhouette_from_distance(
    dist: np.ndarray, labels: np.ndarray, chunk_bytes: int = 64 * 2**20
) -> float:
    """Mean silhouette of ``labels`` on a precomputed distance matrix (SPEC §2.1).

    The same quantity as ``sklearn.metrics.silhouette_score(dist, labels,
    metric="precomputed")`` (members of singleton clusters score 0), from one
    pass of per-cluster distance sums ``D @ onehot`` in row blocks of at most
    ``chunk_bytes``.  The sums are taken in ``D``'s own precision (a float32
    GEMM is 3x faster and its sums of at most ``n`` terms in [0, 1] stay
    within ~1e-7 relative); everything after them is float64.
    """
    labels = np.asarray(labels)
    n = dist.shape[0]
    _, labels = np.unique(labels, return_inverse=True)
    k = int(labels.max()) + 1
    if not 2 <= k <= n - 1:
        raise ValueError(f"silhouette needs 2 <= n_labels <= n_samples - 1, got {k} labels for {n} samples")
    sizes = np.bincount(labels, minlength=k).astype(np.float64)
    dtype = np.float32 if dist.dtype == np.float32 else np.float64
    onehot = np.zeros((n, k), dtype=dtype)
    onehot[np.arange(n), labels] = 1.0
    rows = max(1, int(chunk_bytes) // (n * np.dtype(dtype).itemsize))
    total = 0.0
    for start in range(0, n, rows):
        block = (np.asarray(dist[start : start + rows], dtype=dtype) @ onehot).astype(np.float64)  # [r, k] sums
        own = labels[start : start + rows]
        r = np.arange(len(own))
        own_size = sizes[own]
        a = block[r, own] / np.maximum(own_size - 1.0, 1.0)
        block /= sizes
        block[r, own] = np.inf
        b = block.min(axis=1)
        denom = np.maximum(a, b)
        with np.errstate(invalid="ignore", divide="ignore"):
            sil = np.where(denom > 0, (b - a) / denom, 0.0)
        sil[own_size <= 1] = 0.0
        total += float(sil.sum())
    return total / n


def _greedy_medoid(dist: np.ndarray, medoids: np.ndarray, chunk_bytes: int = 64 * 2**20) -> int:
    """The point whose addition to ``medoids`` lowers the K-medoids loss most
    (one PAM BUILD step; ties: lowest index)."""
    n = dist.shape[0]
    nearest = np.asarray(dist[:, medoids]).min(axis=1)
    rows = max(1, int(chunk_bytes) // (n * dist.itemsize))
    loss_with = np.zeros(n, dtype=np.float64)
    for start in range(0, n, rows):
        block = np.minimum(dist[start : start + rows], nearest[start : start + rows, None])
        loss_with += block.sum(axis=0, dtype=np.float64)
    loss_with[medoids] = np.inf
    return int(np.argmin(loss_with))


def _k_seed(seed: int, k: int) -> int:
    # each K gets its own seed stream derived from (seed, K): reproducible and,
    # in the independent sweep, independent of which other K values were swept
    return int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1)[0])


def _fit_warm(dist: np.ndarray, medoids: np.ndarray):
    """FasterPAM started from given medoids; returns (labels, medoids, loss)."""
    res = kmedoids.fasterpam(dist, np.asarray(medoids, dtype=np.int64), n_cpu=1)
    return (
        np.asarray(res.labels, dtype=np.int64),
        np.asarray(res.medoids, dtype=np.int64),
        float(res.loss),
    )


def _sweep_fits(dist: np.ndarray, ks: list[int], seed: int, backend: str, sweep: str):
    """Yield ``(k, labels, medoids, loss)`` for every K of the sweep.

    ``independent``: a seeded random-init fit per K.  ``warm``: the smallest
    K as in ``independent``; every later K starts from the previous K's
    medoids plus greedily added ones, so FasterPAM needs few swaps (the
    clusters of neighbouring K differ little).
    """
    if sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}; use one of {', '.join(SWEEPS)}")
    previous = None
    for k in ks:
        if sweep == "warm" and backend == "fasterpam" and previous is not None and len(previous) < k:
            init = np.asarray(previous, dtype=np.int64)
            while len(init) < k:
                init = np.append(init, _greedy_medoid(dist, init))
            labels, medoids, loss = _fit_warm(dist, init)
        else:
            labels, medoids, loss = _fit_kmedoids(dist, k, _k_seed(seed, k), backend)
        previous = medoids
        yield k, labels, medoids, loss


_SHARED_DIST: dict = {}


def _fit_and_score(job) -> tuple:
    """One K of an independent sweep with its silhouette (a worker's task;
    ``D`` is inherited from the forking parent, not copied)."""
    k, seed, backend = job
    dist = _SHARED_DIST["dist"]
    labels, medoids, loss = _fit_kmedoids(dist, k, _k_seed(seed, k), backend)
    return k, labels, medoids, loss, _silhouette_or_nan(dist, labels)


def _silhouette_or_nan(dist: np.ndarray, labels: np.ndarray) -> float:
    n_labels = len(np.unique(labels))
    return silhouette_from_distance(dist, labels) if 2 <= n_labels <= dist.shape[0] - 1 else float("nan")


def _scored_fits(dist: np.ndarray, ks: list[int], seed: int, backend: str, sweep: str, workers: int):
    """``(k, labels, medoids, loss, silhouette)`` for every K, in K order;
    with ``workers > 1`` the independent fits run in forked processes that
    share ``D`` (same seeds, so the same results as one process)."""
    if workers > 1 and sweep != "independent":
        raise ValueError(f"workers={workers} needs sweep='independent' (a warm sweep is sequential)")
    if workers > 1 and len(ks) > 1 and "fork" in mp.get_all_start_methods():
        _SHARED_DIST["dist"] = dist
        try:
            with ProcessPoolExecutor(min(int(workers), len(ks)), mp_context=mp.get_context("fork")) as pool:
                return list(pool.map(_fit_and_score, [(k, seed, backend) for k in ks]))
        except BrokenProcessPool:
            pass  # a worker died: the same fits in this process (a Pool would wait for it forever)
        finally:
            _SHARED_DIST.clear()
    return [(k, labels, medoids, loss, _silhouette_or_nan(dist, labels))
            for k, labels, medoids, loss in _sweep_fits(dist, ks, seed, backend, sweep)]


def cluster_regions(
    emb: np.ndarray,
    n_classes: int,
    seed: int = DiscoveryConfig.seed,
    k_range=DiscoveryConfig.k_range,
    max_regions: int = DiscoveryConfig.max_regions,
    backend: str = "fasterpam",
    *,
    sweep: str = "independent",
    workers: int = DiscoveryConfig.cluster_workers,
) -> Clustering:
    """K-medoids over cosine distance with K chosen by silhouette (SPEC §2.1).

    Sweeps K over :func:`k_candidates`; keeps the highest silhouette, the
    first (smallest K) on ties.  ``D`` is computed once for the whole sweep.
    With more than ``max_regions`` regions a seeded sample is clustered and
    every region is then assigned to its nearest medoid (``sampled=True``).
    ``sweep`` chooses how each K's fit starts (see :func:`_sweep_fits`):
    ``independent`` (default) is one seeded fit per K; ``warm`` takes about
    half the CPU time at the same mean loss, but per K its loss is sometimes
    lower and sometimes higher (within ±0.6% measured), which can change
    the chosen K (BENCHMARKS.md), so it is opt-in.  The silhouette is exact
    either way.  ``workers > 1`` fits the K values of an independent sweep
    in that many forked processes: identical results, less wall time on
    idle cores (where ``fork`` is unavailable it runs in this process).
    """
    if int(workers) < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [M, D], got shape {emb.shape}")
    m = emb.shape[0]
    if m == 0:
        raise ValueError("cannot cluster zero regions")
    rng = np.random.default_rng(seed)
    sampled = m > max_regions
    if sampled:
        sample = np.sort(rng.choice(m, size=int(max_regions), replace=False))
    else:
        sample = np.arange(m)
    n = len(sample)

    ks = k_candidates(n_classes, n, k_range)
    if not ks:
        # one or two points: a single cluster, silhouette undefined
        labels = np.zeros(m, dtype=np.int64)
        return Clustering(
            k=1, silhouette=float("nan"), labels=labels,
            medoids=np.array([int(sample[0])], dtype=np.int64),
            sweep=[], sampled=sampled, n_sample=n, seed=int(seed),
        )

    dist = cosine_distance(emb[sample])
    best = None
    first = None
    results = []
    for k, labels, medoids, loss, sil in _scored_fits(dist, ks, seed, backend, sweep, int(workers)):
        results.append({"k": int(k), "silhouette": sil, "loss": loss})
        if first is None:
            first = (float("nan"), k, labels, medoids)
        if not math.isnan(sil) and (best is None or sil > best[0]):
            best = (sil, k, labels, medoids)
    if best is None:  # every K degenerate; keep the first
        best = first
    sil, k, labels, medoids = best
    del dist

    medoid_rows = sample[medoids].astype(np.int64)
    if sampled:
        labels = assign_to_medoids(emb, emb[medoid_rows])
        # a medoid always belongs to its own cluster, even with duplicate rows
        labels[medoid_rows] = np.arange(len(medoid_rows))
    return Clustering(
        k=int(k), silhouette=float(sil), labels=np.asarray(labels, dtype=np.int64),
        medoids=medoid_rows, sweep=results, sampled=bool(sampled), n_sample=int(n), seed=int(seed),
    )


def assign_to_medoids(
    emb: np.ndarray, medoid_emb: np.ndarray, chunk_bytes: int = 64 * 2**20
) -> np.ndarray:
    """Nearest medoid by cosine similarity for every row (ties: lowest id).

    Works in row chunks so the similarity block stays under ``chunk_bytes``
    whatever the number of rows (SPEC §3.1 assigns millions of training
    regions this way).
    """
    emb = np.asarray(emb)
    med = np.asarray(medoid_emb, dtype=np.float64)
    if emb.ndim != 2 or med.ndim != 2 or emb.shape[1] != med.shape[1]:
        raise ValueError(
            f"shape mismatch: embeddings {emb.shape} vs medoid embeddings {med.shape}"
        )
    if med.shape[0] == 0:
        raise ValueError("no medoids to assign to")
    # the row norm does not change a row's argmax; the medoid norms do
    norms = np.linalg.norm(med, axis=1, keepdims=True)
    med = med / np.where(norms > 0, norms, 1.0)
    dtype = np.float32 if emb.dtype == np.float32 else np.float64
    med = med.astype(dtype)
    rows = max(1, int(chunk_bytes) // (med.shape[0] * np.dtype(dtype).itemsize))
    out = np.empty(emb.shape[0], dtype=np.int64)
    for start in range(0, emb.shape[0], rows):
        block = emb[start : start + rows].astype(dtype, copy=False) @ med.T
        out[start : start + rows] = np.argmax(block, axis=1)
    return out


