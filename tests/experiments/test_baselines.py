"""Image-level discovery baselines (experiments/baselines.py)."""
import numpy as np
import pytest

from ravl_pipeline.experiments import baselines


def _planted(seed=0, n_per_class=50, n_classes=4, slice_size=20):
    """Class directions plus noise; 20 images of class 1 also carry a
    'feature' direction and are all misclassified (the planted slice); two
    scattered errors in each other class."""
    rng = np.random.default_rng(seed)
    d = 16
    labels = np.repeat(np.arange(n_classes), n_per_class)
    emb = np.eye(d)[labels] * 3.0 + 0.3 * rng.standard_normal((labels.size, d))
    in_slice = np.zeros(labels.size, bool)
    in_slice[np.flatnonzero(labels == 1)[:slice_size]] = True
    emb[in_slice] += 3.0 * np.eye(d)[10]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pred = labels.copy()
    pred[in_slice] = 2
    for y in (0, 2, 3):
        pred[np.flatnonzero(labels == y)[:2]] = (y + 1) % n_classes
    probs = np.full((labels.size, n_classes), 0.1 / (n_classes - 1))
    probs[np.arange(labels.size), pred] = 0.9
    return emb, labels, probs, in_slice


@pytest.mark.parametrize("method", ["domino", "george", "distill"])
def test_baselines_rank_the_planted_failure_slice_first(method):
    emb, labels, probs, in_slice = _planted()
    ranking = baselines.run_baseline(method, emb, labels, probs, seed=0)
    assert sorted(ranking.images.tolist()) == list(range(labels.size))  # a full ranking
    assert in_slice[ranking.images[:20]].all(), f"{method} top-20: {ranking.images[:20]}"
    assert baselines.precision_at_k_images(ranking, in_slice, k=10) == 1.0
    assert ranking.slice_size >= 3


def test_random_baseline_is_a_seeded_permutation():
    emb, labels, probs, in_slice = _planted()
    a = baselines.run_baseline("random", emb, labels, probs, seed=1)
    b = baselines.run_baseline("random", emb, labels, probs, seed=1)
    np.testing.assert_array_equal(a.images, b.images)
    assert sorted(a.images.tolist()) == list(range(labels.size))
    # chance level: the slice is 10% of the images
    p = np.mean([baselines.precision_at_k_images(baselines.random_ranking(emb, labels, probs, seed=s),
                                                 in_slice, 10) for s in range(200)])
    assert p == pytest.approx(0.1, abs=0.03)


def test_precision_at_k_images_by_hand():
    present = np.array([True, False, True, False, True])
    assert baselines.precision_at_k_images([0, 2, 1, 3], present, k=2) == 1.0
    assert baselines.precision_at_k_images([1, 0, 3], present, k=4) == 0.25  # short list: misses
    with pytest.raises(ValueError):
        baselines.precision_at_k_images([0], present, k=0)


def test_baselines_reject_bad_shapes_and_names():
    emb, labels, probs, _ = _planted()
    with pytest.raises(ValueError, match="unknown baseline 'foo'"):
        baselines.run_baseline("foo", emb, labels, probs)
    with pytest.raises(ValueError, match="image_probs"):
        baselines.run_baseline("random", emb, labels[:-1], probs)
    bad = labels.copy()
    bad[0] = 9
    with pytest.raises(ValueError, match="class index"):
        baselines.run_baseline("george", emb, bad, probs)
