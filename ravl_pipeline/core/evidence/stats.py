"""How much to trust a discovered feature: permutation p-values, Benjamini–
Hochberg q-values and bootstrap confidence intervals (SPEC §2.2, §2.4, §5).

Stage 1 keeps every cluster that passes the spurious criterion; on a small
validation set some clusters pass by chance.  This module asks, for each
cluster, how often an image set of the same per-class sizes, drawn at random,
would score at least as high:

* **Null.**  Shuffle the in-cluster indicator among images of the same label.
  Per-class sizes ``n_in``/``n_out`` (and so the weights ``w_y``) stay fixed;
  only which images are "in" changes.  The number of correctly classified
  images that land in the cluster is then hypergeometric
  (``k_y`` correct among ``n_y`` images, ``n_in`` drawn), so the permutation
  distribution is sampled exactly, without materialising any permutation.
* **Statistic.**  ``T = G_c`` when the cluster has a positive and a negative
  gap (the gap half of SPEC §2.4), else 0.  The influence half of the
  criterion is a region-level property of the observed cluster and is not
  resampled.
* **p-value.**  ``(1 + #{T_null >= T_obs}) / (1 + B)`` — never zero, valid
  (super-uniform) for any number of permutations ``B``.
* **Multiplicity.**  Every cluster of the clustering is one test; BH q-values
  are taken over all of them and a kept feature is ``called`` when
  ``q <= alpha``.

Everything is seeded: cluster ``c`` draws from ``SeedSequence([seed, c])``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ...config import DiscoveryConfig
from ..findings import Findings

# BH over K ~ 20-50 clusters: one extreme cluster reaches q = K / (permutations + 1)
# at best, so fewer than K / alpha draws can never call anything (200 draws: q >= 0.2
# at K = 40); 2000 draws cost ~10 ms per cluster with the hypergeometric null
DEFAULT_PERMUTATIONS = DiscoveryConfig.permutations
DEFAULT_ALPHA = DiscoveryConfig.alpha
DEFAULT_BOOTSTRAP = 1000
DEFAULT_LEVEL = 0.95
_TIE_TOL = 1e-12  # float noise between equal gap sums must count as a tie

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_PERMUTATIONS",
    "ClassCounts",
    "class_counts",
    "gap_statistic",
    "null_gap_statistics",
    "permutation_p_value",
    "benjamini_hochberg",
    "proportion_ci",
    "gap_ci",
    "cluster_p_values",
    "Significance",
    "significance",
    "min_attainable_q",
]


class ClassCounts:
    """Per-class counts that fix one cluster's permutation null.

    Arrays over the classes that enter ``G_c`` (present in the cluster with
    images on both sides): ``n_in``, ``n_out``, ``k`` (correct images of the
    class overall) and ``c_in`` (correct images inside the cluster).
    """

    def __init__(self, n_in, n_out, k, c_in):
        self.n_in = np.asarray(n_in, dtype=np.int64)
        self.n_out = np.asarray(n_out, dtype=np.int64)
        self.k = np.asarray(k, dtype=np.int64)
        self.c_in = np.asarray(c_in, dtype=np.int64)

    @property
    def weights(self) -> np.ndarray:
        """``w_y = 2 min(n_in, n_out) / (n_in + n_out)`` (SPEC §2.2)."""
        return 2.0 * np.minimum(self.n_in, self.n_out) / (self.n_in + self.n_out)


def class_counts(in_cluster: np.ndarray, image_labels: np.ndarray, image_correct: np.ndarray,
                 n_classes: int | None = None) -> ClassCounts:
    """The counts of :class:`ClassCounts` for one in-cluster image mask."""
    mask = np.asarray(in_cluster, dtype=bool)
    labels = np.asarray(image_labels, dtype=np.int64)
    correct = np.asarray(image_correct, dtype=bool)
    if not (mask.shape == labels.shape == correct.shape) or mask.ndim != 1:
        raise ValueError("in_cluster, image_labels and image_correct must be 1-D of equal length")
    c = int(n_classes) if n_classes is not None else (int(labels.max()) + 1 if labels.size else 0)
    n_tot = np.bincount(labels, minlength=c)
    k_tot = np.bincount(labels[correct], minlength=c)
    n_in = np.bincount(labels[mask], minlength=c)
    c_in = np.bincount(labels[mask & correct], minlength=c)
    n_out = n_tot - n_in
    keep = (n_in > 0) & (n_out > 0)  # SPEC §2.2 skips classes missing a side
    return ClassCounts(n_in[keep], n_out[keep], k_tot[keep], c_in[keep])


def gap_statistic(counts: ClassCounts, c_in: np.ndarray | None = None) -> np.ndarray:
    """``T = G_c`` if some gap is positive and some negative, else 0.

    ``c_in`` may carry a leading batch axis ``[B, C']`` (null draws); the
    observed value is used when it is omitted.
    """
    c_in = counts.c_in if c_in is None else np.asarray(c_in)
    if counts.n_in.size == 0:
        return np.zeros(c_in.shape[:-1]) if c_in.ndim > 1 else np.float64(0.0)
    acc_in = c_in / counts.n_in
    acc_out = (counts.k - c_in) / counts.n_out
    gaps = counts.weights * (acc_in - acc_out)
    total = np.abs(gaps).sum(axis=-1)
    both_signs = (gaps > 0).any(axis=-1) & (gaps < 0).any(axis=-1)
    return np.where(both_signs, total, 0.0)


def null_gap_statistics(counts: ClassCounts, n_permutations: int,
                        rng: np.random.Generator) -> np.ndarray:
    """``T`` under ``n_permutations`` within-class shuffles of the in-cluster
    indicator.

    Shuffling which of the ``n_y`` images of class ``y`` are "in" while
    keeping ``n_in`` fixed leaves the number of correct images inside
    hypergeometric(``k_y`` good, ``n_y - k_y`` bad, ``n_in`` drawn); drawing
    that count directly is the same distribution at O(B·C) cost.
    """
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be at least 1, got {n_permutations}")
    if counts.n_in.size == 0:
        return np.zeros(int(n_permutations))
    n_tot = counts.n_in + counts.n_out
    draws = rng.hypergeometric(counts.k, n_tot - counts.k, counts.n_in,
                               size=(int(n_permutations), counts.n_in.size))
    return gap_statistic(counts, draws)


def permutation_p_value(observed: float, null: np.ndarray) -> float:
    """``(1 + #{null >= observed}) / (1 + B)``: conservative, never zero."""
    null = np.asarray(null, dtype=np.float64)
    exceed = int(np.count_nonzero(null >= float(observed) - _TIE_TOL))
    return (1.0 + exceed) / (1.0 + null.size)


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """BH-adjusted q-values, in the input order.

    ``q_(i) = min_{j >= i} p_(j) · m / j`` over the ascending order, capped
    at 1.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError("p_values must be 1-D")
    if p.size and (np.any(~np.isfinite(p)) or p.min() < 0 or p.max() > 1):
        raise ValueError("p_values must lie in [0, 1]")
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate(scaled[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    return q


def _percentile_interval(samples: np.ndarray, level: float) -> list[float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def proportion_ci(n: int, successes: int, rng: np.random.Generator,
                  n_boot: int = DEFAULT_BOOTSTRAP, level: float = DEFAULT_LEVEL) -> list[float] | None:
    """Percentile bootstrap interval of an accuracy ``successes / n``.

    Resampling ``n`` images with replacement from a set with ``successes``
    correct ones gives a binomial count, so the bootstrap is drawn as
    binomials.  ``None`` for an empty set.
    """
    if n <= 0:
        return None
    draws = rng.binomial(int(n), successes / n, size=int(n_boot)) / n
    return _percentile_interval(draws, level)


EXACT_BOOTSTRAP_MAX_N = 7  # up to 7^7 ≈ 824k resamples: enumerate them all


def paired_difference_ci(a: Sequence[float], b: Sequence[float], level: float = DEFAULT_LEVEL,
                         n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """Mean of the paired differences ``a[s] − b[s]`` (one pair per seed) with
    a percentile bootstrap interval, the seed being the resampling unit.

    Up to :data:`EXACT_BOOTSTRAP_MAX_N` pairs every one of the ``n**n``
    resamples is enumerated, so the interval is exact and reproducible
    (``exact: true``); beyond that ``n_boot`` resamples are drawn. The
    interval's ends are quantiles of the inverted empirical distribution
    function of the resampled means. Pairs with a missing value are dropped.
    """
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    d = np.array([x - y for x, y in pairs], dtype=float)
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci": None, "level": float(level), "exact": None, "wins": 0}
    exact = n <= EXACT_BOOTSTRAP_MAX_N
    if exact:
        # every resample is a multiset of the n values; a radix-n counter enumerates them
        digits = np.indices((n,) * n).reshape(n, -1).T
        means = d[digits].mean(axis=1)
    else:
        means = d[np.random.default_rng(seed).integers(0, n, size=(int(n_boot), n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2], method="inverted_cdf")
    return {"n": n, "mean": float(d.mean()), "sd": float(d.std(ddof=1)) if n > 1 else 0.0,
            "ci": [float(lo), float(hi)], "level": float(level), "exact": exact,
            "wins": int((d > 0).sum()), "ties": int((d == 0).sum()), "losses": int((d < 0).sum())}


def gap_ci(row: Mapping, rng: np.random.Generator, n_boot: int = DEFAULT_BOOTSTRAP,
           level: float = DEFAULT_LEVEL) -> dict:
    """Bootstrap intervals of one per-class row: ``acc_present``,
    ``acc_absent`` and the weighted ``gap`` (both sides resampled
    independently, ``w_y`` fixed by the sizes)."""
    n_in, n_out = int(row["n_present"]), int(row["n_absent"])
    s_in = int(round(row["acc_present"] * n_in))
    s_out = int(round(row["acc_absent"] * n_out))
    a_in = rng.binomial(n_in, s_in / n_in, size=int(n_boot)) / n_in
    a_out = rng.binomial(n_out, s_out / n_out, size=int(n_boot)) / n_out
    w = 2.0 * min(n_in, n_out) / (n_in + n_out)
    return {
        "level": float(level),
        "acc_present": _percentile_interval(a_in, level),
        "acc_absent": _percentile_interval(a_out, level),
        "gap": _percentile_interval(w * (a_in - a_out), level),
    }


def _cluster_masks(cluster_labels: np.ndarray, region_image: np.ndarray, n_clusters: int,
                   n_images: int) -> np.ndarray:
    """``[K, N]`` bool: image ``i`` has a region in cluster ``c`` (``In_c``)."""
    masks = np.zeros((n_clusters, n_images), dtype=bool)
    masks[np.asarray(cluster_labels, dtype=np.int64), np.asarray(region_image, dtype=np.int64)] = True
    return masks


def cluster_p_values(cluster_labels, region_image, image_labels, image_pred, n_clusters: int,
                     n_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> list[dict]:
    """Observed ``T`` and permutation p-value of every cluster."""
    image_labels = np.asarray(image_labels, dtype=np.int64)
    correct = image_labels == np.asarray(image_pred, dtype=np.int64)
    n_classes = int(image_labels.max()) + 1 if image_labels.size else 0
    masks = _cluster_masks(cluster_labels, region_image, n_clusters, len(image_labels))
    out = []
    for cid in range(n_clusters):
        counts = class_counts(masks[cid], image_labels, correct, n_classes)
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), cid]))
        observed = float(gap_statistic(counts))
        null = null_gap_statistics(counts, n_permutations, rng)
        out.append({"cluster_id": cid, "statistic": observed,
                    "p_value": permutation_p_value(observed, null)})
    return out


@dataclass
class Significance:
    """The permutation test of every cluster (SPEC §5 ``p_value``, ``q_value``,
    ``called``) and bootstrap intervals of every kept feature's per-class rows."""

    p_values: dict[int, float]  # cluster id -> permutation p-value
    q_values: dict[int, float]  # cluster id -> Benjamini-Hochberg q-value
    alpha: float
    intervals: dict[int, list[dict]] = field(default_factory=dict)  # cluster id -> one ``ci`` per per_class row
    summary: dict = field(default_factory=dict)  # the method, recorded as ``findings.significance``

    def called(self, cluster_id: int) -> bool:
        return bool(self.q_values[int(cluster_id)] <= self.alpha)


def significance(findings: Findings, cluster_labels, region_image, image_labels, image_pred, *,
                 n_permutations: int = DEFAULT_PERMUTATIONS, alpha: float = DEFAULT_ALPHA,
                 seed: int = DiscoveryConfig.seed, n_boot: int = DEFAULT_BOOTSTRAP,
                 level: float = DEFAULT_LEVEL) -> Significance:
    """p- and q-values of every cluster of ``findings`` and intervals of its
    features' per-class rows; a feature is *called* when ``q <= alpha``."""
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if int(n_permutations) < 1:
        raise ValueError(f"permutations must be at least 1, got {n_permutations}")
    n_clusters = int(findings.k or (int(np.max(cluster_labels)) + 1))
    tests = cluster_p_values(cluster_labels, region_image, image_labels, image_pred, n_clusters,
                             n_permutations, seed)
    q = benjamini_hochberg([t["p_value"] for t in tests])
    result = Significance(p_values={t["cluster_id"]: t["p_value"] for t in tests},
                          q_values={t["cluster_id"]: float(qv) for t, qv in zip(tests, q)}, alpha=float(alpha))
    boot_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1_000_003]))
    for feat in findings.features:
        result.intervals[feat.cluster_id] = [gap_ci(row, boot_rng, n_boot, level) for row in feat.per_class]
    best_q = min_attainable_q(n_clusters, n_permutations)
    result.summary = {
        "null": "in-cluster indicator shuffled within each label (hypergeometric, exact)",
        "statistic": "G_c when gaps of both signs exist, else 0",
        "n_permutations": int(n_permutations),
        "n_tests": int(n_clusters),
        "correction": "benjamini-hochberg over all clusters",
        "alpha": float(alpha),
        "bootstrap": {"n": int(n_boot), "level": float(level)},
        "n_called": int(sum(result.called(f.cluster_id) for f in findings.features)),
        "seed": int(seed),
        # the smallest q any single cluster can reach: K tests, p >= 1/(permutations+1)
        "min_attainable_q": best_q,
    }
    if best_q > alpha:
        result.summary["warning"] = (
            f"{n_permutations} permutations over {n_clusters} clusters cannot call a lone finding at "
            f"alpha={alpha:g} (best possible q = {best_q:.3g}); use at least {math.ceil(n_clusters / alpha)} "
            "permutations")
    return result


def min_attainable_q(n_tests: int, n_permutations: int) -> float:
    """The Benjamini–Hochberg q-value of one cluster at the smallest possible
    permutation p-value, ``1 / (permutations + 1)``, among ``n_tests`` others
    that are not significant: the best a lone real finding can get."""
    return float(min(1.0, int(n_tests) / (int(n_permutations) + 1)))
