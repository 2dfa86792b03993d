"""Image-level discovery baselines on the same embeddings and split as
RaVL (SPEC §4.2).

Each method looks at whole-image embeddings, labels and zero-shot
predictions, picks its top failure slice and ranks images: the top slice's
images first (most typical first), then the rest of the images in the
method's own order, so Precision@k is defined for any ``k``.
Precision@k of an image ranking counts images that contain the feature.

* ``random``      — a seeded random order (what chance gives);
* ``domino``      — error-aware Gaussian mixture (after Domino): a diagonal
  GMM over PCA-reduced image embeddings with label, confidence-in-the-true-
  class and error columns appended; slices ranked by error rate, images by
  their responsibility for the top slice;
* ``george``      — per-class clustering (after GEORGE): k-means inside each
  class, k by silhouette; clusters of all classes ranked by error rate;
  images by distance to their cluster centre;
* ``distill``     — failure directions (after "Distilling model failures as
  directions in latent space"): per class, a linear SVM separating correct
  from incorrect images; the class with the most errors gives the top slice;
  images ranked along the SVM direction toward failure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METHODS = ("random", "domino", "george", "distill")
_MIN_SLICE = 3  # a "slice" of one or two images is noise, not a failure mode

__all__ = ["METHODS", "SliceRanking", "run_baseline", "run_all", "precision_at_k_images",
           "random_ranking", "domino_ranking", "george_ranking", "distill_ranking"]


@dataclass
class SliceRanking:
    """One method's answer: ``images`` ranks every image index, the first
    ``slice_size`` of them forming the top slice."""

    method: str
    images: np.ndarray
    slice_size: int
    info: dict = field(default_factory=dict)

    def to_dict(self, top: int = 50) -> dict:
        return {"method": self.method, "slice_size": int(self.slice_size),
                "images": [int(i) for i in self.images[:top]], **self.info}


def _check(image_emb, image_labels, image_probs):
    emb = np.asarray(image_emb, dtype=np.float64)
    labels = np.asarray(image_labels, dtype=np.int64)
    probs = np.asarray(image_probs, dtype=np.float64)
    if emb.ndim != 2 or labels.shape != (emb.shape[0],) or probs.shape[0] != emb.shape[0] or probs.ndim != 2:
        raise ValueError(f"need image_emb [N, D], image_labels [N], image_probs [N, C]; got "
                         f"{emb.shape}, {labels.shape}, {probs.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"image_labels hold a class index outside 0..{probs.shape[1] - 1}")
    return emb, labels, probs


def _rest_after(first: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``first`` followed by the members of ``order`` not already in it."""
    seen = np.zeros(len(order), dtype=bool)
    seen[first] = True
    return np.concatenate([first, order[~seen[order]]]).astype(np.int64)


def random_ranking(image_emb, image_labels, image_probs, seed: int = 0) -> SliceRanking:
    emb, _, _ = _check(image_emb, image_labels, image_probs)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 101]))
    return SliceRanking("random", rng.permutation(emb.shape[0]).astype(np.int64), emb.shape[0])


def _pca(emb: np.ndarray, dims: int) -> np.ndarray:
    centred = emb - emb.mean(axis=0)
    dims = max(1, min(int(dims), *centred.shape))
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    return u[:, :dims] * s[:dims]


def domino_ranking(image_emb, image_labels, image_probs, seed: int = 0, n_slices: int | None = None,
                   pca_dims: int = 16, error_weight: float = 10.0) -> SliceRanking:
    """Error-aware mixture slices (Domino-style), ranked by error rate."""
    from sklearn.mixture import GaussianMixture

    emb, labels, probs = _check(image_emb, image_labels, image_probs)
    n, c = probs.shape[0], probs.shape[1]
    error = (probs.argmax(axis=1) != labels).astype(np.float64)
    # standardised embedding plus target/prediction columns scaled so that the
    # mixture separates errors of one class from its correct images
    x = _pca(emb, pca_dims)
    x = x / np.maximum(x.std(axis=0), 1e-12)
    extra = np.column_stack([np.eye(c)[labels], probs[np.arange(n), labels], error]) * error_weight
    k = int(n_slices) if n_slices else max(2, min(2 * c, n // 10))
    gmm = GaussianMixture(n_components=k, covariance_type="diag", reg_covar=1e-3, random_state=int(seed),
                          max_iter=200)
    resp = gmm.fit(np.column_stack([x, extra])).predict_proba(np.column_stack([x, extra]))
    mass = resp.sum(axis=0)
    error_rate = (resp * error[:, None]).sum(axis=0) / np.maximum(mass, 1e-12)
    eligible = mass >= _MIN_SLICE
    top = int(np.argmax(np.where(eligible, error_rate, -1.0)))
    order = np.argsort(-resp[:, top], kind="stable")
    hard = resp.argmax(axis=1) == top
    return SliceRanking("domino", order.astype(np.int64), int(hard.sum()),
                        {"slice": top, "n_slices": k, "slice_error_rate": float(error_rate[top])})


def _kmeans_by_silhouette(x: np.ndarray, seed: int, max_k: int):
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    best = None
    for k in range(2, min(max_k, len(x) - 1) + 1):
        km = KMeans(n_clusters=k, n_init=3, random_state=int(seed)).fit(x)
        if len(np.unique(km.labels_)) < 2:
            continue
        sil = silhouette_score(x, km.labels_)
        if best is None or sil > best[0]:
            best = (sil, km)
    return None if best is None else best[1]


def george_ranking(image_emb, image_labels, image_probs, seed: int = 0, max_k: int = 4) -> SliceRanking:
    """Per-class k-means subclasses (GEORGE-style), ranked by error rate."""
    emb, labels, probs = _check(image_emb, image_labels, image_probs)
    error = probs.argmax(axis=1) != labels
    clusters = []  # (error rate, size, members ordered by distance to centre)
    for y in np.unique(labels):
        members = np.flatnonzero(labels == y)
        km = _kmeans_by_silhouette(emb[members], seed, max_k) if len(members) >= 4 else None
        assign = km.labels_ if km is not None else np.zeros(len(members), dtype=np.int64)
        for j in np.unique(assign):
            sub = members[assign == j]
            centre = emb[sub].mean(axis=0)
            dist = np.linalg.norm(emb[sub] - centre, axis=1)
            clusters.append((float(error[sub].mean()), len(sub), sub[np.argsort(dist, kind="stable")]))
    # larger clusters first among equal error rates: a bigger failure mode
    clusters.sort(key=lambda t: (-(t[1] >= _MIN_SLICE), -t[0], -t[1]))
    order = np.concatenate([t[2] for t in clusters])
    return SliceRanking("george", order.astype(np.int64), clusters[0][1],
                        {"slice_error_rate": clusters[0][0], "n_slices": len(clusters)})


def _failure_scores(x: np.ndarray, wrong: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.svm import LinearSVC

    svm = LinearSVC(C=0.1, class_weight="balanced", random_state=int(seed), max_iter=5000)
    return svm.fit(x, wrong.astype(int)).decision_function(x)


def distill_ranking(image_emb, image_labels, image_probs, seed: int = 0) -> SliceRanking:
    """Per-class linear SVM failure directions (Distilling-Failures-style)."""
    emb, labels, probs = _check(image_emb, image_labels, image_probs)
    wrong = probs.argmax(axis=1) != labels
    scores = np.full(len(labels), -np.inf)
    errors = {}
    for y in np.unique(labels):
        members = np.flatnonzero(labels == y)
        n_wrong = int(wrong[members].sum())
        if n_wrong >= 2 and len(members) - n_wrong >= 2:
            scores[members] = _failure_scores(emb[members], wrong[members], seed)
            errors[int(y)] = n_wrong
    overall = np.argsort(-scores, kind="stable")
    if not errors:
        return SliceRanking("distill", overall.astype(np.int64), 0, {"class": None})
    cls = min(errors, key=lambda y: (-errors[y], y))
    members = np.flatnonzero(labels == cls)
    first = members[np.argsort(-scores[members], kind="stable")]
    n_slice = int((scores[members] > 0).sum())
    return SliceRanking("distill", _rest_after(first, overall), n_slice, {"class": cls})


_RANKERS = {"random": random_ranking, "domino": domino_ranking, "george": george_ranking,
            "distill": distill_ranking}


def run_baseline(method: str, image_emb, image_labels, image_probs, seed: int = 0) -> SliceRanking:
    if method not in _RANKERS:
        raise ValueError(f"unknown baseline {method!r}; expected one of {', '.join(METHODS)}")
    return _RANKERS[method](image_emb, image_labels, image_probs, seed=seed)


def run_all(image_emb, image_labels, image_probs, seed: int = 0, methods=METHODS) -> dict[str, SliceRanking]:
    return {m: run_baseline(m, image_emb, image_labels, image_probs, seed) for m in methods}


def precision_at_k_images(ranking, contains_feature, k: int = 10) -> float:
    """Fraction of the first ``k`` ranked images that contain the feature;
    denominator ``k`` (SPEC §4.2)."""
    if k <= 0:
        raise ValueError("k must be positive")
    images = ranking.images if isinstance(ranking, SliceRanking) else np.asarray(ranking, dtype=np.int64)
    present = np.asarray(contains_feature, dtype=bool)
    return float(present[images[:k]].sum()) / k
