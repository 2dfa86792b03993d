"""The K sweep of Stage 1 (SPEC §2.1): the fast exact silhouette and the
warm-started sweep against the reference computations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import silhouette_score

from ravl_pipeline.ml.discover import cluster_regions, cosine_distance, silhouette_from_distance


def _mixture(n=600, groups=12, dim=16, noise=0.6, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(groups, dim))
    x = centers[rng.integers(0, groups, n)] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_silhouette_by_hand():
    # points 0,1 at distance 0.2 (cluster A), point 2 alone (cluster B, singleton -> 0)
    d = np.array([[0.0, 0.2, 0.8], [0.2, 0.0, 0.6], [0.8, 0.6, 0.0]])
    # s0 = (0.8 - 0.2) / 0.8 = 0.75, s1 = (0.6 - 0.2) / 0.6 = 2/3, s2 = 0
    assert silhouette_from_distance(d, np.array([5, 5, 9])) == pytest.approx((0.75 + 2 / 3) / 3)


@pytest.mark.parametrize("k", [2, 7, 30])
def test_silhouette_matches_sklearn(k):
    x = _mixture()
    d = cosine_distance(x)
    labels = np.random.default_rng(k).integers(0, k, len(x))
    labels[:3] = [k + 1, k + 2, k + 3]  # singletons score 0 in both
    want = silhouette_score(d, labels, metric="precomputed")
    assert silhouette_from_distance(d, labels, chunk_bytes=4096) == pytest.approx(want, abs=1e-6)


def test_warm_sweep_loss_not_worse_on_average_and_deterministic():
    x = _mixture()
    warm = cluster_regions(x, n_classes=4, seed=0, sweep="warm")  # K in [8, 20)
    indep = cluster_regions(x, n_classes=4, seed=0)  # the default: one seeded fit per K
    assert [s["k"] for s in warm.sweep] == [s["k"] for s in indep.sweep] == list(range(8, 20))
    # the first K is the same seeded fit in both
    assert warm.sweep[0] == indep.sweep[0]
    total_warm = sum(s["loss"] for s in warm.sweep)
    total_indep = sum(s["loss"] for s in indep.sweep)
    assert total_warm <= total_indep * 1.001
    again = cluster_regions(x, n_classes=4, seed=0, sweep="warm")
    assert again.sweep == warm.sweep and np.array_equal(again.labels, warm.labels)
    with pytest.raises(ValueError, match="unknown sweep"):
        cluster_regions(x, n_classes=4, sweep="parallel")


def test_parallel_sweep_gives_the_same_clustering():
    x = _mixture()
    serial = cluster_regions(x, n_classes=4, seed=3)
    parallel = cluster_regions(x, n_classes=4, seed=3, workers=2)
    assert parallel.sweep == serial.sweep  # same K order, losses and silhouettes
    assert parallel.k == serial.k and np.array_equal(parallel.labels, serial.labels)
    assert np.array_equal(parallel.medoids, serial.medoids)
    with pytest.raises(ValueError, match="sweep='independent'"):
        cluster_regions(x, n_classes=4, sweep="warm", workers=2)
    with pytest.raises(ValueError, match="workers"):
        cluster_regions(x, n_classes=4, workers=0)
