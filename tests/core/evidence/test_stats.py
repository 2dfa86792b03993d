"""Significance of findings: permutation null, BH, bootstrap (core/evidence/stats.py)."""
import numpy as np
import pytest

from ravl_pipeline.core.cluster import cluster_regions
from ravl_pipeline.core.evidence import stats
from ravl_pipeline.core.rank import rank_features


def test_benjamini_hochberg_by_hand():
    # sorted: 0.01 (1), 0.03 (2), 0.04 (3), 0.20 (4); p*m/rank = .04, .06, .0533, .20;
    # running minimum from the largest rank down: .04, .0533, .0533, .20
    q = stats.benjamini_hochberg([0.01, 0.04, 0.03, 0.20])
    np.testing.assert_allclose(q, [0.04, 0.16 / 3, 0.16 / 3, 0.20])


def test_benjamini_hochberg_caps_at_one_and_handles_ties():
    # 0.5*2/1 = 1.0, 0.9*2/2 = 0.9 -> running minimum 0.9, 0.9
    np.testing.assert_allclose(stats.benjamini_hochberg([0.5, 0.9]), [0.9, 0.9])
    np.testing.assert_allclose(stats.benjamini_hochberg([0.8, 0.8, 0.8]), [0.8, 0.8, 0.8])
    np.testing.assert_allclose(stats.benjamini_hochberg([1.0]), [1.0])
    assert stats.benjamini_hochberg([]).size == 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.benjamini_hochberg([0.2, 1.5])


def test_gap_statistic_by_hand():
    # class 0: in 2 (both correct), out 2 (1 correct): w=1, gap=+0.5
    # class 1: in 1 (wrong), out 3 (2 correct): w=2*1/4=0.5, gap=0.5*(0-2/3)=-1/3
    counts = stats.ClassCounts(n_in=[2, 1], n_out=[2, 3], k=[3, 2], c_in=[2, 0])
    assert float(stats.gap_statistic(counts)) == pytest.approx(0.5 + 1 / 3)
    # only positive gaps: the criterion's sign half fails, T = 0
    one_sided = stats.ClassCounts(n_in=[2, 1], n_out=[2, 3], k=[3, 3], c_in=[2, 1])
    assert float(stats.gap_statistic(one_sided)) == 0.0


def test_class_counts_skip_classes_missing_a_side():
    labels = np.array([0, 0, 0, 1, 1, 2])
    correct = np.array([1, 0, 1, 1, 1, 0], bool)
    mask = np.array([1, 0, 0, 1, 1, 1], bool)  # class 1 all in, class 2 all in: skipped
    c = stats.class_counts(mask, labels, correct)
    assert c.n_in.tolist() == [1] and c.n_out.tolist() == [2]
    assert c.k.tolist() == [2] and c.c_in.tolist() == [1]


def test_hypergeometric_null_matches_explicit_shuffles():
    # one class pair, small enough that the exact distribution is easy:
    # class 0: 4 images, 2 correct, 2 in the cluster -> c_in in {0,1,2} w.p. 1/6, 4/6, 1/6
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    correct = np.array([1, 1, 0, 0, 1, 0, 1, 0], bool)
    mask = np.array([1, 1, 0, 0, 1, 0, 0, 0], bool)
    counts = stats.class_counts(mask, labels, correct)
    rng = np.random.default_rng(0)
    fast = stats.null_gap_statistics(counts, 20000, rng)
    slow = []
    for _ in range(4000):
        shuffled = mask.copy()
        for y in (0, 1):
            idx = np.flatnonzero(labels == y)
            shuffled[idx] = rng.permutation(mask[idx])
        slow.append(float(stats.gap_statistic(stats.class_counts(shuffled, labels, correct))))
    values = np.union1d(np.round(fast, 9), np.round(slow, 9))
    for v in values:
        assert np.mean(np.isclose(fast, v)) == pytest.approx(np.mean(np.isclose(slow, v)), abs=0.03)


def _p_value(mask, labels, correct, n_perm=200, seed=0):
    counts = stats.class_counts(mask, labels, correct)
    rng = np.random.default_rng(seed)
    return stats.permutation_p_value(float(stats.gap_statistic(counts)),
                                     stats.null_gap_statistics(counts, n_perm, rng))


def test_permutation_p_values_are_roughly_uniform_without_signal():
    rng = np.random.default_rng(123)
    ps = []
    for rep in range(400):
        labels = rng.integers(0, 5, size=300)
        correct = rng.random(300) < 0.7
        mask = rng.random(300) < 0.3  # membership independent of correctness
        ps.append(_p_value(mask, labels, correct, seed=rep))
    ps = np.array(ps)
    # the conservative (1 + #>=)/(1 + B) p-value is super-uniform: at most
    # alpha below alpha (plus sampling noise over 400 replicates), and the
    # bulk is not piled up at 1
    assert np.mean(ps <= 0.05) <= 0.08
    assert np.mean(ps <= 0.10) <= 0.14
    assert 0.35 <= np.mean(ps <= 0.5) <= 0.6
    assert 0.4 <= ps.mean() <= 0.6


def test_permutation_p_value_is_small_for_a_planted_signal():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(5), 60)
    mask = np.tile(np.arange(60) < 20, 5)
    correct = rng.random(300) < 0.7
    correct[(labels == 0) & mask] = True  # the feature helps class 0 ...
    correct[(labels != 0) & mask] = False  # ... and hurts the others
    p = _p_value(mask, labels, correct, n_perm=200)
    assert p == pytest.approx(1 / 201)


def test_p_value_formula_counts_ties():
    assert stats.permutation_p_value(1.0, np.array([0.0, 1.0, 2.0, 0.5])) == pytest.approx(3 / 5)
    assert stats.permutation_p_value(3.0, np.zeros(9)) == pytest.approx(1 / 10)


def test_paired_difference_ci_by_hand():
    """Three seeds, differences 0, 0 and 3 points. The 27 equally likely
    resamples have k = 0..3 copies of the 3 (binomial(3, 1/3): 8, 12, 6, 1
    of 27), so the resampled mean is k with CDF 8/27 = .30, 20/27 = .74,
    26/27 = .963, 1: the 2.5% quantile is 0 and the 97.5% one is 3 (26/27
    falls short of .975). Mean 1, sd sqrt(3)."""
    out = stats.paired_difference_ci([0.5, 0.2, 0.9], [0.5, 0.2, 0.6])
    assert out["n"] == 3 and out["exact"]
    assert out["mean"] == pytest.approx(0.1) and out["sd"] == pytest.approx(np.sqrt(3) * 0.1)
    assert out["ci"] == pytest.approx([0.0, 0.3])
    assert (out["wins"], out["ties"], out["losses"]) == (1, 2, 0)
    # at the 50% level the ends are the 25% and 75% quantiles: 0 (8/27 >= .25) and 1 (20/27 < .75 -> 2)
    assert stats.paired_difference_ci([0, 0, 3], [0, 0, 0], level=0.5)["ci"] == pytest.approx([0.0, 2.0])


def test_paired_difference_ci_pairs_by_seed_and_drops_missing():
    """Two seeds, differences +1 and +3: resampled means 1, 2, 2, 3, so the
    95% interval is [1, 3]; a pair with a missing value is left out; a
    constant difference gives a zero-width interval."""
    out = stats.paired_difference_ci([2.0, 5.0, None], [1.0, 2.0, 0.0])
    assert out["n"] == 2 and out["mean"] == pytest.approx(2.0) and out["ci"] == pytest.approx([1.0, 3.0])
    assert stats.paired_difference_ci([1, 2, 3, 4, 5], [0, 1, 2, 3, 4])["ci"] == pytest.approx([1.0, 1.0])
    assert stats.paired_difference_ci([], [])["ci"] is None
    # beyond the exact range the resamples are drawn, reproducibly
    a, b = list(np.arange(10.0)), [0.0] * 10
    drawn = stats.paired_difference_ci(a, b, seed=1)
    assert not drawn["exact"] and drawn == stats.paired_difference_ci(a, b, seed=1)
    assert drawn["ci"][0] < 4.5 < drawn["ci"][1]


def test_bootstrap_intervals():
    rng = np.random.default_rng(0)
    assert stats.proportion_ci(0, 0, rng) is None
    assert stats.proportion_ci(10, 10, rng) == [1.0, 1.0]
    lo, hi = stats.proportion_ci(100, 70, rng, n_boot=4000)
    # normal approximation: 0.7 +- 1.96 * sqrt(.21/100) = [0.610, 0.790]
    assert lo == pytest.approx(0.61, abs=0.02) and hi == pytest.approx(0.79, abs=0.02)
    row = {"n_present": 50, "acc_present": 1.0, "n_absent": 50, "acc_absent": 0.0, "gap": 1.0}
    ci = stats.gap_ci(row, rng)
    assert ci["acc_present"] == [1.0, 1.0] and ci["acc_absent"] == [0.0, 0.0] and ci["gap"] == [1.0, 1.0]


def _planted_discovery(seed=0):
    """Two regions per image; cluster 'A' regions sit in half the images and
    make class 0 right and class 1 wrong (a planted spurious feature)."""
    rng = np.random.default_rng(seed)
    n = 200
    labels = np.repeat([0, 1], n // 2)
    has_a = np.tile(np.arange(n // 2) < 50, 2)
    pred = labels.copy()
    pred[(labels == 1) & has_a] = 0
    pred[(labels == 0) & ~has_a & (rng.random(n) < 0.4)] = 1
    base = np.eye(8)
    emb, rimg, ridx, scores = [], [], [], []
    for i in range(n):
        first = base[0] if has_a[i] else base[1 + i % 3]
        for j, v in enumerate((first, base[4 + labels[i]])):
            emb.append(v + 0.01 * rng.standard_normal(8))
            rimg.append(i)
            ridx.append(j)
            scores.append([0.9, 0.1] if (j == 0 and has_a[i]) else [0.5, 0.5])
    emb = np.array(emb)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return dict(region_emb=emb, region_image=np.array(rimg), region_index=np.array(ridx),
                region_scores=np.array(scores), image_labels=labels, image_pred=pred, classes=["a", "b"])


def _planted_findings():
    d = _planted_discovery()
    clustering = cluster_regions(d["region_emb"], 2, seed=0, k_range=(4, 6))
    return d, clustering, rank_features(clustering, **d)


def _significance(d, clustering, findings, **kwargs):
    return stats.significance(findings, clustering.labels, d["region_image"], d["image_labels"],
                              d["image_pred"], **kwargs)


def test_significance_calls_the_planted_feature():
    d, clustering, findings = _planted_findings()
    assert findings.features, "the planted cluster should pass the spurious criterion"
    before = findings.to_dict()
    sig = _significance(d, clustering, findings, n_permutations=200, alpha=0.05, seed=0)
    assert findings.to_dict() == before  # a result is returned; the findings are left as they were
    top = findings.features[0]
    assert sig.p_values[top.cluster_id] == pytest.approx(1 / 201)
    assert sig.q_values[top.cluster_id] <= 0.05 and sig.called(top.cluster_id) is True
    assert len(sig.intervals[top.cluster_id]) == len(top.per_class)
    for row, ci in zip(top.per_class, sig.intervals[top.cluster_id]):
        assert ci["acc_present"][0] <= row["acc_present"] <= ci["acc_present"][1]
    assert set(sig.intervals) == {f.cluster_id for f in findings.features}
    assert sig.summary["n_permutations"] == 200 and sig.summary["n_tests"] == findings.k
    assert sig.summary["n_called"] == sum(sig.called(f.cluster_id) for f in findings.features) >= 1
    # every cluster is a test, kept or not
    assert set(sig.p_values) == set(sig.q_values) == set(range(findings.k))
    np.testing.assert_allclose([sig.q_values[c] for c in range(findings.k)],
                               stats.benjamini_hochberg([sig.p_values[c] for c in range(findings.k)]))
    # seeded: the same call gives the same numbers
    _, _, again = _planted_findings()
    repeat = _significance(d, clustering, again, n_permutations=200, alpha=0.05, seed=0)
    assert repeat.p_values == sig.p_values and repeat.q_values == sig.q_values


def test_default_permutations_can_call_a_lone_finding_among_fifty_clusters():
    # K up to 5|Y| = 50 clusters for 10 classes: a single extreme cluster must be callable
    assert stats.min_attainable_q(50, stats.DEFAULT_PERMUTATIONS) <= 0.05 / 2
    assert stats.min_attainable_q(40, 200) == pytest.approx(40 / 201)


def test_too_few_permutations_for_the_number_of_clusters_is_flagged():
    d, clustering, findings = _planted_findings()
    sig = _significance(d, clustering, findings, n_permutations=20, alpha=0.05, seed=0)
    assert sig.summary["min_attainable_q"] == pytest.approx(min(1.0, findings.k / 21))
    warning = sig.summary["warning"]
    assert "permutations" in warning and str(int(np.ceil(findings.k / 0.05))) in warning
    assert not any(sig.called(f.cluster_id) for f in findings.features)  # q >= k/21 > 0.05
    sig = _significance(d, clustering, findings, n_permutations=2000, alpha=0.05, seed=0)
    assert "warning" not in sig.summary


def test_significance_rejects_bad_parameters():
    d, _, findings = _planted_findings()
    with pytest.raises(ValueError, match="alpha"):
        stats.significance(findings, np.zeros(400, int), d["region_image"], d["image_labels"],
                           d["image_pred"], alpha=1.5)
    with pytest.raises(ValueError, match="permutations"):
        stats.significance(findings, np.zeros(400, int), d["region_image"], d["image_labels"],
                           d["image_pred"], n_permutations=0)
