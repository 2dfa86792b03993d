"""Stage 1 of RaVL: discover spurious region features (SPEC §2, findings §5).

Pure numpy (+ the ``kmedoids`` package for FasterPAM and scikit-learn for the
silhouette score).  The inputs are arrays produced by ``embed.py``:

* ``region_emb``    float [M, D]  L2-normalised region embeddings
* ``region_image``  int   [M]     image index (0..N-1) of each region
* ``region_index``  int   [M]     index of the region within its image
* ``region_scores`` float [M, C]  softmax zero-shot scores of each region
* ``image_labels``  int   [N]     true class index of each image
* ``image_pred``    int   [N]     image-level zero-shot prediction

Conventions:

* Cluster ids are positions in ``Clustering.medoids`` (``medoids[c]`` is the
  region row of the medoid of cluster ``c``).
* Per-class gap dicts are keyed by the integer class index.
* Everything returned by :func:`discover` is plain JSON (no numpy scalars, no
  NaN/inf: a non-finite number is written as ``None``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

SCHEMA_VERSION = 1
REQUIRED_FINDINGS_KEYS = ("model", "dataset", "classes", "k", "silhouette", "features")
REQUIRED_FEATURE_KEYS = (
    "rank",
    "cluster_id",
    "score",
    "influence",
    "attribute",
    "per_class",
    "regions",
)

__all__ = [
    "SCHEMA_VERSION",
    "Clustering",
    "cosine_distance",
    "k_candidates",
    "cluster_regions",
    "silhouette_from_distance",
    "assign_to_medoids",
    "cluster_performance_gap",
    "influence_score",
    "is_spurious",
    "discover",
    "region_label_map",
    "precision_at_k",
    "write_findings",
    "check_findings",
    "read_findings",
]


# --------------------------------------------------------------------------
# Clustering (SPEC §2.1)
# --------------------------------------------------------------------------


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
        import kmedoids

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
    import kmedoids

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
    import multiprocessing as mp

    if workers > 1 and sweep != "independent":
        raise ValueError(f"workers={workers} needs sweep='independent' (a warm sweep is sequential)")
    if workers > 1 and len(ks) > 1 and "fork" in mp.get_all_start_methods():
        _SHARED_DIST["dist"] = dist
        try:
            with mp.get_context("fork").Pool(min(int(workers), len(ks))) as pool:
                return pool.map(_fit_and_score, [(k, seed, backend) for k in ks], chunksize=1)
        finally:
            _SHARED_DIST.clear()
    return [(k, labels, medoids, loss, _silhouette_or_nan(dist, labels))
            for k, labels, medoids, loss in _sweep_fits(dist, ks, seed, backend, sweep)]


def cluster_regions(
    emb: np.ndarray,
    n_classes: int,
    seed: int = 0,
    k_range=None,
    max_regions: int = 20000,
    backend: str = "fasterpam",
    *,
    sweep: str = "independent",
    workers: int = 1,
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
            sweep=[], sampled=sampled, n_sample=n,
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
        medoids=medoid_rows, sweep=results, sampled=bool(sampled), n_sample=int(n),
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


# --------------------------------------------------------------------------
# Scoring (SPEC §2.2 - §2.4)
# --------------------------------------------------------------------------


def _gaps_from_counts(n_in, c_in, n_tot, c_tot) -> dict[int, dict]:
    """Per-class gaps from in-cluster and total (count, correct) per class."""
    gaps: dict[int, dict] = {}
    for y in np.flatnonzero(np.asarray(n_in) > 0):
        ni = int(n_in[y])
        no = int(n_tot[y]) - ni
        if no <= 0:
            continue
        acc_in = float(c_in[y]) / ni
        acc_out = (float(c_tot[y]) - float(c_in[y])) / no
        raw = acc_in - acc_out
        w = 2.0 * min(ni, no) / (ni + no)
        gaps[int(y)] = {
            "n_present": ni,
            "acc_present": acc_in,
            "n_absent": no,
            "acc_absent": acc_out,
            "gap": w * raw,
            "raw_gap": raw,
        }
    return gaps


def _class_totals(image_labels: np.ndarray, image_correct: np.ndarray, n_classes: int):
    n_tot = np.bincount(image_labels, minlength=n_classes)
    c_tot = np.bincount(image_labels, weights=image_correct.astype(np.float64), minlength=n_classes)
    return n_tot, c_tot


def cluster_performance_gap(
    in_cluster_images: np.ndarray, image_labels: np.ndarray, image_correct: np.ndarray
) -> dict[int, dict]:
    """Per-class performance gap of one cluster (SPEC §2.2).

    ``in_cluster_images`` is a boolean mask over images (``In_c``).  For each
    label ``y`` present in ``In_c`` with images on both sides,
    ``gap = w_y (acc_in - acc_out)`` with ``w_y = 2 min(n_in, n_out)/(n_in + n_out)``;
    ``raw_gap`` is the unweighted difference.
    """
    mask = np.asarray(in_cluster_images, dtype=bool)
    labels = np.asarray(image_labels, dtype=np.int64)
    correct = np.asarray(image_correct, dtype=bool)
    if not (mask.shape == labels.shape == correct.shape) or mask.ndim != 1:
        raise ValueError("in_cluster_images, image_labels and image_correct must be 1-D of equal length")
    if labels.size and labels.min() < 0:
        raise ValueError("image_labels must be non-negative class indices")
    n_classes = int(labels.max()) + 1 if labels.size else 0
    n_tot, c_tot = _class_totals(labels, correct, n_classes)
    n_in = np.bincount(labels[mask], minlength=n_classes)
    c_in = np.bincount(labels[mask], weights=correct[mask].astype(np.float64), minlength=n_classes)
    return _gaps_from_counts(n_in, c_in, n_tot, c_tot)


def _gap_value(v) -> float:
    return float(v["gap"]) if isinstance(v, Mapping) else float(v)


def _best_regions(region_image, region_index, region_scores, image_pred, n_images):
    """``r*`` per image: the region row with the highest score for the image's
    predicted class (first by region index on ties); -1 for images without
    regions.  Also returns the number of regions per image."""
    m = len(region_image)
    rows = np.arange(m)
    score_for_pred = region_scores[rows, image_pred[region_image]]
    order = np.lexsort((rows, region_index, -score_for_pred, region_image))
    sorted_img = region_image[order]
    first = np.ones(m, dtype=bool)
    first[1:] = sorted_img[1:] != sorted_img[:-1]
    best = np.full(n_images, -1, dtype=np.int64)
    best[sorted_img[first]] = order[first]
    counts = np.bincount(region_image, minlength=n_images)
    return best, counts


def _influence(cluster_id, in_images, labels, best, counts, image_labels, image_correct, gaps):
    """SPEC §2.3 for one cluster given precomputed ``r*`` (``best``)."""
    neg = {int(y) for y, v in gaps.items() if _gap_value(v) < 0}
    if not neg or len(in_images) == 0:
        return float("-inf"), {}
    imgs = np.asarray(in_images, dtype=np.int64)
    y = image_labels[imgs]
    keep = (counts[imgs] >= 2) & ~image_correct[imgs] & np.isin(y, np.fromiter(neg, np.int64))
    imgs, y = imgs[keep], y[keep]
    if len(imgs) == 0:
        return float("-inf"), {}
    present = labels[best[imgs]] == cluster_id
    per_class: dict[int, float] = {}
    for cls in np.unique(y):
        per_class[int(cls)] = float(np.mean(present[y == cls]))
    return max(per_class.values()), per_class


def influence_score(
    cluster_id: int,
    labels: np.ndarray,
    region_image: np.ndarray,
    region_scores: np.ndarray,
    image_labels: np.ndarray,
    image_pred: np.ndarray,
    gaps: Mapping,
    region_index: np.ndarray | None = None,
) -> tuple[float, dict[int, float]]:
    """Cluster influence score ``H_c`` and ``H_c(y)`` per class (SPEC §2.3).

    For every image with a region in the cluster and at least two regions:
    ``r*`` = its region scoring highest for the predicted class.  Only
    misclassified images whose true class has a negative gap are recorded
    (``r*`` in cluster or not).  ``H_c = max_y`` of the recorded fractions,
    ``-inf`` when nothing was recorded.  ``gaps`` maps class index to a gap
    dict (from :func:`cluster_performance_gap`) or to a plain number.
    ``region_index`` only breaks score ties (row order when omitted).
    """
    labels = np.asarray(labels, dtype=np.int64)
    region_image = np.asarray(region_image, dtype=np.int64)
    region_scores = np.asarray(region_scores)
    image_labels = np.asarray(image_labels, dtype=np.int64)
    image_pred = np.asarray(image_pred, dtype=np.int64)
    n_images = len(image_labels)
    if region_index is None:
        region_index = np.zeros(len(region_image), dtype=np.int64)
    best, counts = _best_regions(
        region_image, np.asarray(region_index, dtype=np.int64), region_scores, image_pred, n_images
    )
    in_images = np.unique(region_image[labels == cluster_id])
    return _influence(
        int(cluster_id), in_images, labels, best, counts, image_labels,
        image_labels == image_pred, gaps,
    )


def is_spurious(gaps: Mapping, influence: float, threshold: float = 0.25) -> bool:
    """SPEC §2.4: some gap > 0, some gap < 0, and ``H_c >= threshold``."""
    values = [_gap_value(v) for v in gaps.values()]
    if influence is None or not math.isfinite(float(influence)):
        return False
    return any(v > 0 for v in values) and any(v < 0 for v in values) and float(influence) >= threshold


# --------------------------------------------------------------------------
# Discovery (SPEC §2.5, findings §5)
# --------------------------------------------------------------------------


def _finite_or_none(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _check_inputs(region_emb, region_image, region_index, region_scores, image_labels, image_pred, classes):
    m = region_emb.shape[0]
    n = len(image_labels)
    c = len(classes)
    if region_emb.ndim != 2:
        raise ValueError(f"region_emb must be [M, D], got {region_emb.shape}")
    if region_image.shape != (m,) or region_index.shape != (m,):
        raise ValueError("region_image and region_index must have one entry per region")
    if region_scores.shape != (m, c):
        raise ValueError(f"region_scores must be [M, C] = [{m}, {c}], got {region_scores.shape}")
    if image_pred.shape != (n,):
        raise ValueError("image_pred and image_labels must have the same length")
    if m and (region_image.min() < 0 or region_image.max() >= n):
        raise ValueError("region_image holds an index outside 0..N-1")
    for name, arr in (("image_labels", image_labels), ("image_pred", image_pred)):
        if n and (arr.min() < 0 or arr.max() >= c):
            raise ValueError(f"{name} holds a class index outside 0..{c - 1}")


def discover(
    region_emb,
    region_image,
    region_index,
    region_scores,
    image_labels,
    image_pred,
    classes: Sequence[str],
    *,
    boxes=None,
    image_ids: Sequence[str] | None = None,
    region_labels: Sequence[str] | None = None,
    seed: int = 0,
    influence_threshold: float = 0.25,
    k_range=None,
    max_regions: int = 20000,
    top_regions: int | None = None,
    clustering: Clustering | None = None,
    model: str | None = None,
    dataset: str | None = None,
    backend: str = "fasterpam",
) -> dict:
    """Run Stage 1 and return the findings dict (SPEC §2, §5).

    Every cluster passing the spurious criterion is returned, ranked by
    ``G_c`` descending (ties: lower cluster id); ``features`` is empty when
    none qualifies.  ``top_regions`` caps the regions listed per feature
    (``None``: all members).  ``region_labels`` (evaluation ground truth) is
    copied into each region row as ``region_label`` when given.  Image ids
    default to the image index as a string.
    """
    region_emb = np.asarray(region_emb)
    region_image = np.asarray(region_image, dtype=np.int64)
    region_index = np.asarray(region_index, dtype=np.int64)
    region_scores = np.asarray(region_scores, dtype=np.float64)
    image_labels = np.asarray(image_labels, dtype=np.int64)
    image_pred = np.asarray(image_pred, dtype=np.int64)
    classes = [str(c) for c in classes]
    _check_inputs(region_emb, region_image, region_index, region_scores, image_labels, image_pred, classes)
    m, n, c = region_emb.shape[0], len(image_labels), len(classes)
    if image_ids is None:
        image_ids = [str(i) for i in range(n)]
    elif len(image_ids) != n:
        raise ValueError(f"image_ids has {len(image_ids)} entries for {n} images")
    if boxes is not None:
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.shape != (m, 4):
            raise ValueError(f"boxes must be [M, 4] = [{m}, 4], got {boxes.shape}")
    if region_labels is not None and len(region_labels) != m:
        raise ValueError(f"region_labels has {len(region_labels)} entries for {m} regions")

    if clustering is None:
        clustering = cluster_regions(
            region_emb, c, seed=seed, k_range=k_range, max_regions=max_regions, backend=backend
        )
    labels = np.asarray(clustering.labels, dtype=np.int64)
    medoids = np.asarray(clustering.medoids, dtype=np.int64)
    if labels.shape != (m,):
        raise ValueError(f"clustering has {labels.shape[0]} labels for {m} regions")
    k = len(medoids)

    correct = image_labels == image_pred
    n_tot, c_tot = _class_totals(image_labels, correct, c)
    best, counts = _best_regions(region_image, region_index, region_scores, image_pred, n)

    # distinct (cluster, image) pairs, grouped by cluster: In_c for all c at once
    pair_key = np.unique(labels * np.int64(max(n, 1)) + region_image)
    pair_cluster = pair_key // max(n, 1)
    pair_image = pair_key % max(n, 1)
    bounds = np.searchsorted(pair_cluster, np.arange(k + 1))
    sizes = np.bincount(labels, minlength=k)

    summaries = []
    kept = []
    for cid in range(k):
        in_imgs = pair_image[bounds[cid] : bounds[cid + 1]]
        y_in = image_labels[in_imgs]
        n_in = np.bincount(y_in, minlength=c)
        c_in = np.bincount(y_in, weights=correct[in_imgs].astype(np.float64), minlength=c)
        gaps = _gaps_from_counts(n_in, c_in, n_tot, c_tot)
        score = float(sum(abs(g["gap"]) for g in gaps.values()))
        infl, infl_per_class = _influence(cid, in_imgs, labels, best, counts, image_labels, correct, gaps)
        keep = is_spurious(gaps, infl, influence_threshold)
        summaries.append({
            "cluster_id": cid,
            "size": int(sizes[cid]),
            "n_images": int(len(in_imgs)),
            "medoid": int(medoids[cid]),
            "score": score,
            "influence": _finite_or_none(infl),
            "kept": bool(keep),
        })
        if keep:
            kept.append((cid, score, infl, infl_per_class, gaps))

    kept.sort(key=lambda t: (-t[1], t[0]))
    features = []
    for rank, (cid, score, infl, infl_per_class, gaps) in enumerate(kept, start=1):
        # SPEC §2.5: attribute = class with the largest *unweighted* gap
        attr = max(sorted(gaps), key=lambda y: gaps[y]["raw_gap"])
        members = np.flatnonzero(labels == cid)
        med = int(medoids[cid])
        sim = region_emb[members].astype(np.float64) @ region_emb[med].astype(np.float64)
        order = np.argsort(-sim, kind="stable")  # ties keep region row order
        if top_regions is not None:
            order = order[: int(top_regions)]
        regions = []
        for j in order:
            r = int(members[j])
            row = {
                "image_id": image_ids[int(region_image[r])],
                "region_index": int(region_index[r]),
                "box": None if boxes is None else [float(v) for v in boxes[r]],
                "similarity": float(sim[j]),
                "row": r,
            }
            if region_labels is not None:
                row["region_label"] = None if region_labels[r] is None else str(region_labels[r])
            regions.append(row)
        features.append({
            "rank": rank,
            "cluster_id": int(cid),
            "score": float(score),
            "influence": float(infl),
            "influence_per_class": {classes[y]: float(v) for y, v in sorted(infl_per_class.items())},
            "attribute": classes[attr],
            "per_class": [
                {
                    "label": classes[y],
                    "n_present": g["n_present"],
                    "acc_present": g["acc_present"],
                    "n_absent": g["n_absent"],
                    "acc_absent": g["acc_absent"],
                    "gap": g["gap"],
                    "raw_gap": g["raw_gap"],
                }
                for y, g in sorted(gaps.items())
            ],
            "regions": regions,
            "medoid": med,
            "size": int(sizes[cid]),
        })

    return {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "dataset": dataset,
        "classes": classes,
        "k": int(clustering.k),
        "silhouette": _finite_or_none(clustering.silhouette),
        "features": features,
        "n_images": int(n),
        "n_regions": int(m),
        "sampled": bool(clustering.sampled),
        "n_sample": int(clustering.n_sample),
        "k_sweep": [
            {"k": int(s["k"]), "silhouette": _finite_or_none(s["silhouette"]), "loss": _finite_or_none(s["loss"])}
            for s in clustering.sweep
        ],
        "seed": int(seed),
        "influence_threshold": float(influence_threshold),
        "medoids": [int(x) for x in medoids],
        "clusters": summaries,
    }


# --------------------------------------------------------------------------
# Evaluation helper (SPEC §4.2) and findings I/O (SPEC §5)
# --------------------------------------------------------------------------


def region_label_map(image_ids, region_image, region_index, region_labels) -> dict[tuple, str]:
    """``{(image_id, region_index): label}`` for :func:`precision_at_k`."""
    return {
        (image_ids[int(i)], int(j)): lab
        for i, j, lab in zip(region_image, region_index, region_labels)
    }


def precision_at_k(
    feature: Mapping | None,
    region_label_of: Mapping[tuple, str],
    target_label: str,
    k: int = 10,
) -> float:
    """Fraction of the feature's top-``k`` regions labelled ``target_label`` (SPEC §4.2).

    The denominator is ``k``: a feature listing fewer than ``k`` regions
    counts the missing ones as misses, as does a region without a label.
    ``feature=None`` (nothing discovered) scores 0.
    """
    if k <= 0:
        raise ValueError("k must be positive")
    if not feature:
        return 0.0
    hits = 0
    for row in list(feature.get("regions", []))[:k]:
        key = (row["image_id"], int(row["region_index"]))
        if region_label_of.get(key) == target_label:
            hits += 1
    return hits / k


def write_findings(findings: Mapping, path) -> None:
    """Write findings as JSON atomically (temp file in the same folder + ``os.replace``)."""
    from .data import atomic_write

    text = json.dumps(findings, indent=2, allow_nan=False) + "\n"  # raises before anything is written
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def check_findings(data, where: str, *, required: Sequence[str] = REQUIRED_FINDINGS_KEYS,
                   feature_keys: Sequence[str] = REQUIRED_FEATURE_KEYS, error: type = ValueError) -> dict:
    """Check a findings object against the schema (SPEC §5); ``error``
    naming ``where`` on any problem.

    A missing ``schema_version`` (a plain SPEC §5 file) is accepted; any
    other version than :data:`SCHEMA_VERSION` is refused by name. Readers
    that need less than a full findings file (the report) pass their own
    ``required`` and ``feature_keys``.
    """
    if not isinstance(data, Mapping):
        raise error(f"{where}: findings must be a JSON object, got {type(data).__name__}")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise error(f"{where}: findings schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    missing = [key for key in required if key not in data]
    if missing:
        raise error(f"{where}: findings missing required key(s): {', '.join(missing)}")
    if not isinstance(data.get("features"), list):
        raise error(f"{where}: 'features' must be a list")
    for i, feat in enumerate(data["features"]):
        if not isinstance(feat, Mapping):
            raise error(f"{where}: features[{i}] must be an object")
        missing = [key for key in feature_keys if key not in feat]
        if missing:
            raise error(f"{where}: features[{i}] missing required key(s): {', '.join(missing)}")
    return dict(data)


def read_findings(path) -> dict:
    """Read and validate findings JSON; ``ValueError`` naming the file on any problem."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return check_findings(data, path)
