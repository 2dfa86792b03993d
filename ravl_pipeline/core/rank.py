"""Stage 1, step two: which clusters are spurious features, and how they rank
(SPEC §2.2–2.6).

Pure numpy. The inputs are arrays produced by the earlier steps:

* ``region_image``  int   [M]     image index (0..N-1) of each region
* ``region_index``  int   [M]     index of the region within its image
* ``region_scores`` float [M, C]  softmax zero-shot scores of each region
* ``image_labels``  int   [N]     true class index of each image
* ``image_pred``    int   [N]     image-level zero-shot prediction

Per-class gap dicts are keyed by the integer class index. The result is a
:class:`~.findings.Findings` of plain JSON values (a non-finite number
becomes ``None``).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from ..config import DiscoveryConfig
from .cluster import Clustering
from .findings import Feature, Findings, finite_or_none

__all__ = ["cluster_performance_gap", "influence_score", "is_spurious", "rank_features"]


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


def is_spurious(gaps: Mapping, influence: float,
                threshold: float = DiscoveryConfig.influence_threshold) -> bool:
    """SPEC §2.4: some gap > 0, some gap < 0, and ``H_c >= threshold``."""
    values = [_gap_value(v) for v in gaps.values()]
    if influence is None or not math.isfinite(float(influence)):
        return False
    return any(v > 0 for v in values) and any(v < 0 for v in values) and float(influence) >= threshold


# --------------------------------------------------------------------------
# Ranking (SPEC §2.5–2.6)
# --------------------------------------------------------------------------


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


def rank_features(
    clustering: Clustering,
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
    influence_threshold: float = DiscoveryConfig.influence_threshold,
    top_regions: int | None = DiscoveryConfig.top_regions,
    model: str | None = None,
    dataset: str | None = None,
) -> Findings:
    """Score every cluster of ``clustering`` and return the findings (SPEC §2, §5).

    Every cluster passing the spurious criterion is returned, ranked by
    ``G_c`` descending (ties: lower cluster id); ``features`` is empty when
    none qualifies.  ``top_regions`` caps the regions listed per feature
    (``None``: all members).  ``region_labels`` (evaluation ground truth) is
    copied into each region row as ``region_label`` when given.  Image ids
    default to the image index as a string.  ``medoid_embeddings`` keeps the
    medoids' vectors, which Stage 2 assigns training regions to (SPEC §3.1):
    ``medoids`` are only row numbers into embeddings that are not kept.
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
            "influence": finite_or_none(infl),
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
        features.append(Feature(
            rank=rank,
            cluster_id=int(cid),
            score=float(score),
            influence=float(infl),
            influence_per_class={classes[y]: float(v) for y, v in sorted(infl_per_class.items())},
            attribute=classes[attr],
            per_class=[
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
            regions=regions,
            medoid=med,
            size=int(sizes[cid]),
        ))

    return Findings(
        model=model,
        dataset=dataset,
        classes=classes,
        k=int(clustering.k),
        silhouette=finite_or_none(clustering.silhouette),
        features=features,
        n_images=int(n),
        n_regions=int(m),
        sampled=bool(clustering.sampled),
        n_sample=int(clustering.n_sample),
        k_sweep=clustering.sweep_rows(),
        seed=int(clustering.seed),
        influence_threshold=float(influence_threshold),
        medoids=[int(x) for x in medoids],
        clusters=summaries,
        medoid_embeddings=[[float(v) for v in region_emb[int(x)]] for x in medoids],
    )
