"""Stage 1 clustering (SPEC §2.1): cosine distance, the K range, K-medoids
on planted clusters, nearest-medoid assignment, the fast exact silhouette
and the warm-started and parallel sweeps against the reference
computations, and stored clusters."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from sklearn.metrics import silhouette_score

from ravl_pipeline.core import cluster as cluster_module
from ravl_pipeline.core.cluster import (
    ClusterError,
    Clustering,
    assign_to_medoids,
    cluster_regions,
    cosine_distance,
    k_candidates,
    silhouette_from_distance,
)


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# --------------------------------------------------------------------------
# cosine distance, K range, assignment
# --------------------------------------------------------------------------


def test_cosine_distance_properties():
    e = np.array(
        [
            [1, 0, 0],
            [0, 1, 0],  # orthogonal to row 0 -> distance 1
            [-1, 0, 0],  # opposite to row 0 -> 1 - (-1) = 2, clipped to 1
            [1, 0, 0],  # identical to row 0 -> 0
            _unit([1, 1, 0]),  # cos 45° to row 0 -> 1 - 0.7071
        ],
        dtype=np.float32,
    )
    d = cosine_distance(e)
    assert d.dtype == np.float32 and d.shape == (5, 5)
    assert np.all(np.diag(d) == 0)
    assert np.array_equal(d, d.T)
    assert d.min() >= 0 and d.max() <= 1
    assert d[0, 1] == pytest.approx(1.0)
    assert d[0, 2] == 1.0
    assert d[0, 3] == 0.0
    assert d[0, 4] == pytest.approx(1 - math.sqrt(0.5), abs=1e-6)
    assert cosine_distance(e.astype(np.float64)).dtype == np.float64


def test_k_candidates_range_and_clamp():
    # SPEC §2.1: [2|Y|, 5|Y|), upper end excluded
    assert k_candidates(3, 1000) == list(range(6, 15))
    # clamp to K < number of points
    assert k_candidates(3, 10) == [6, 7, 8, 9]
    # nothing left in range: largest feasible K
    assert k_candidates(3, 5) == [4]
    assert k_candidates(3, 2) == []
    assert k_candidates(3, 100, k_range=(2, 4)) == [2, 3]
    assert k_candidates(3, 100, k_range=[5, 3, 9]) == [3, 5, 9]


def test_assign_to_medoids_chunked_matches_bruteforce():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(500, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    med = e[[3, 70, 250]] * np.array([[2.0], [0.5], [1.0]], dtype=np.float32)  # norms ignored
    # 3 medoids * 4 bytes * 10 rows = 120 bytes -> 50 chunks of 10 rows
    got = assign_to_medoids(e, med, chunk_bytes=120)
    want = np.argmax(e @ _normalise_rows(med).T, axis=1)
    assert np.array_equal(got, want)
    assert got[3] == 0 and got[70] == 1 and got[250] == 2


def _normalise_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------
# clustering on planted clusters
# --------------------------------------------------------------------------


def _planted(n_groups, per_group, dim=16, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.eye(dim)[:n_groups]
    x = np.repeat(centers, per_group, axis=0) + noise * rng.normal(size=(n_groups * per_group, dim))
    x = _normalise_rows(x).astype(np.float32)
    truth = np.repeat(np.arange(n_groups), per_group)
    return x, truth


def _same_partition(a, b):
    """True when labelings a and b induce the same partition."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_cluster_regions_picks_planted_k_and_is_deterministic():
    # 3 classes -> K in [6, 15); 7 tight orthogonal groups -> silhouette peaks at K=7
    x, truth = _planted(7, 10)
    res = cluster_regions(x, n_classes=3, seed=0)
    assert res.k == 7
    assert [s["k"] for s in res.sweep] == list(range(6, 15))
    best = max(s["silhouette"] for s in res.sweep)
    assert res.silhouette == best == [s for s in res.sweep if s["k"] == 7][0]["silhouette"]
    assert res.silhouette > 0.9
    assert _same_partition(res.labels, truth)
    assert not res.sampled and res.n_sample == 70
    # medoids[c] is a member of cluster c
    assert len(res.medoids) == 7
    assert all(res.labels[m] == c for c, m in enumerate(res.medoids))
    again = cluster_regions(x, n_classes=3, seed=0)
    assert np.array_equal(res.labels, again.labels)
    assert np.array_equal(res.medoids, again.medoids)
    assert res.sweep == again.sweep


def test_cluster_regions_sampled_assigns_every_region():
    x, truth = _planted(7, 30, seed=3)
    res = cluster_regions(x, n_classes=3, seed=0, max_regions=50)
    assert res.sampled and res.n_sample == 50
    assert res.labels.shape == (210,)
    assert res.k == 7
    assert set(res.labels.tolist()) == set(range(7))
    assert _same_partition(res.labels, truth)
    assert all(res.labels[m] == c for c, m in enumerate(res.medoids))


def test_cluster_regions_sklearn_extra_backend_clear_error():
    try:
        import sklearn_extra  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("scikit-learn-extra importable here")
    x, _ = _planted(3, 5)
    with pytest.raises(ImportError, match="scikit-learn-extra"):
        cluster_regions(x, n_classes=1, backend="sklearn_extra")


def test_clustering_save_and_load_round_trip(tmp_path):
    x, _ = _planted(7, 10)
    res = cluster_regions(x, n_classes=3, seed=5)
    res.sweep[0]["silhouette"] = float("nan")  # an undefined silhouette is stored as null
    n = len(x)
    image_ids = [f"im{i}" for i in range(n // 2)]
    out = res.save(tmp_path / "clusters", image_ids, np.arange(n) // 2, np.arange(n) % 2)
    assert sorted(p.name for p in out.iterdir()) == ["assignments.parquet", "clustering.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clusters"]  # no temporary folder left
    back = Clustering.load(out)
    assert (back.k, back.silhouette, back.sampled, back.n_sample, back.seed) == (
        res.k, res.silhouette, res.sampled, res.n_sample, 5)
    np.testing.assert_array_equal(back.labels, res.labels)
    np.testing.assert_array_equal(back.medoids, res.medoids)
    assert math.isnan(back.sweep[0]["silhouette"]) and back.sweep[1:] == res.sweep[1:]
    assert back.sweep_rows()[0]["silhouette"] is None
    with pytest.raises(ClusterError, match="nowhere"):
        Clustering.load(tmp_path / "nowhere")


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


def _worker_dies(job):
    os._exit(1)


def test_a_sweep_whose_worker_dies_is_fitted_here_instead_of_hanging(monkeypatch):
    x = _mixture()
    serial = cluster_regions(x, n_classes=4, seed=3)
    monkeypatch.setattr(cluster_module, "_fit_and_score", _worker_dies)
    parallel = cluster_regions(x, n_classes=4, seed=3, workers=2)
    assert parallel.sweep == serial.sweep and np.array_equal(parallel.labels, serial.labels)


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
