"""What the evaluation protocol measures (SPEC §4): validity of a setting,
Precision@k of a discovered feature, and the four mitigation metrics.

Pure numpy over predictions and ground-truth labels; running a model to get
the predictions is :mod:`ravl_pipeline.pipeline`'s job."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..config import EvaluationConfig
from .findings import Feature

PRECISION_K = 10  # SPEC §4.2: Precision@10

VALIDITY_MARGIN = 0.10
# SPEC §4.2: the four mitigation metrics of metrics.json
METRIC_KEYS = ("image_overall", "image_worst_group", "region_overall", "region_worst_group")


def feature_presence(region_labels: Sequence[Sequence[str]], feature: str) -> np.ndarray:
    """Per image: does any of its ground-truth region labels name ``feature``?"""
    return np.array([feature in labs for labs in region_labels], dtype=bool)


def _acc(correct: np.ndarray, mask: np.ndarray) -> float | None:
    return float(correct[mask].mean()) if mask.any() else None


def validity(labels: np.ndarray, pred: np.ndarray, presence: np.ndarray, classes: Sequence[str],
             correlated_class: str, margin: float = VALIDITY_MARGIN) -> dict:
    """Did the audited model learn the induced correlation? (SPEC §4.1)

    Valid when the correlated class is at least ``margin`` more accurate with
    the feature than without, and the other classes are on average at least
    ``margin`` less accurate with it.
    """
    labels, pred, presence = np.asarray(labels), np.asarray(pred), np.asarray(presence, bool)
    correct = labels == pred
    c = list(classes).index(correlated_class)
    rows, other_gaps = [], []
    for k, name in enumerate(classes):
        mk = labels == k
        a_in, a_out = _acc(correct, mk & presence), _acc(correct, mk & ~presence)
        gap = None if a_in is None or a_out is None else a_in - a_out
        rows.append({"label": name, "n_present": int((mk & presence).sum()), "acc_present": a_in,
                     "n_absent": int((mk & ~presence).sum()), "acc_absent": a_out, "gap": gap})
        if k != c and gap is not None:
            other_gaps.append(gap)
    corr_gap = rows[c]["gap"]
    other_mean = float(np.mean(other_gaps)) if other_gaps else None
    valid = (corr_gap is not None and other_mean is not None
             and corr_gap >= margin and other_mean <= -margin)
    return {"valid": bool(valid), "correlated_class": correlated_class,
            "correlated_gap": corr_gap, "other_mean_gap": other_mean, "margin": margin,
            "image_accuracy": float(correct.mean()) if len(correct) else None, "per_class": rows}


# --------------------------------------------------------------------------- mitigation metrics (SPEC §4.2)



def core_regions(region_labels: Sequence[Sequence[str]], image_labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(image row, region index)`` of every core region: a region whose
    ground-truth label is its image's class (SPEC §4.2). Each core region is
    one sample of the region metrics; an image may have none or several."""
    rows, idx = [], []
    for i, (labs, y) in enumerate(zip(region_labels, image_labels)):
        for j, lab in enumerate(labs or []):
            if lab == y:
                rows.append(i)
                idx.append(j)
    return np.asarray(rows, dtype=np.int64), np.asarray(idx, dtype=np.int64)


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def _worst(rows: list[dict], key: str, n_key: str, min_group_size: int) -> float | None:
    accs = [r[key] for r in rows if r[key] is not None and r[n_key] >= min_group_size]
    return min(accs) if accs else None


def group_rows(labels: np.ndarray, image_pred: np.ndarray, presence: np.ndarray | None, classes: Sequence[str],
               core_image: np.ndarray | None = None, core_pred: np.ndarray | None = None) -> list[dict]:
    """One row per (class, feature present/absent) group — or per class when
    ``presence`` is ``None`` — with image and core-region accuracy."""
    labels, image_pred = np.asarray(labels), np.asarray(image_pred)
    image_ok = labels == image_pred
    have_regions = core_image is not None and core_pred is not None
    if have_regions:
        core_image = np.asarray(core_image, dtype=np.int64)
        region_ok = np.asarray(core_pred) == labels[core_image]
    flags = [None] if presence is None else [False, True]
    rows = []
    for k, name in enumerate(classes):
        for flag in flags:
            in_group = labels == k if flag is None else (labels == k) & (np.asarray(presence, bool) == flag)
            row = {"label": name, "feature_present": flag, "n": int(in_group.sum()),
                   "image_acc": _mean_or_none(image_ok[in_group]), "n_regions": 0, "region_acc": None}
            if have_regions:
                sel = in_group[core_image]
                row["n_regions"] = int(sel.sum())
                row["region_acc"] = _mean_or_none(region_ok[sel])
            rows.append(row)
    return rows


def mitigation_metrics(labels: np.ndarray, image_pred: np.ndarray, classes: Sequence[str],
                       presence: np.ndarray | None = None, core_image: np.ndarray | None = None,
                       core_pred: np.ndarray | None = None,
                       min_group_size: int = EvaluationConfig.min_group_size) -> dict:
    """Image/region overall and worst-group accuracy (SPEC §4.2).

    ``labels``/``image_pred`` are class indices per image; ``presence`` the
    feature flag per image (``None``: groups are classes only);
    ``core_image``/``core_pred`` the image row and predicted class of every
    core region (``None``: no region annotations, region metrics ``None``).
    Groups with fewer than ``min_group_size`` samples are reported but left
    out of the worst-group minimum, with a warning.
    """
    labels, image_pred = np.asarray(labels), np.asarray(image_pred)
    rows = group_rows(labels, image_pred, presence, classes, core_image, core_pred)
    have_regions = core_image is not None and core_pred is not None
    warnings = _group_warnings(rows, min_group_size, have_regions)
    region_ok = (np.asarray(core_pred) == labels[np.asarray(core_image, dtype=np.int64)]) if have_regions else None
    for row in rows:
        row["counted"] = row["n"] >= min_group_size
    return {
        "image_overall": _mean_or_none(labels == image_pred),
        "image_worst_group": _worst(rows, "image_acc", "n", min_group_size),
        "region_overall": _mean_or_none(region_ok) if have_regions else None,
        "region_worst_group": _worst(rows, "region_acc", "n_regions", min_group_size) if have_regions else None,
        "n_images": int(len(labels)),
        "n_core_regions": int(len(region_ok)) if have_regions else 0,
        "min_group_size": int(min_group_size),
        "partial": not have_regions or presence is None,
        "warnings": warnings,
        "groups": rows,
    }


def _group_warnings(rows: list[dict], min_group_size: int, have_regions: bool) -> list[str]:
    out = []
    for r in rows:
        name = f"group ({r['label']!r}, feature_present={r['feature_present']})"
        if r["n"] == 0:
            out.append(f"{name} is empty; left out of the worst-group metrics")
        elif r["n"] < min_group_size:
            out.append(f"{name} has {r['n']} images (< min_group_size {min_group_size}); "
                       "left out of the worst-group metrics")
        elif have_regions and r["n_regions"] < min_group_size:
            out.append(f"{name} has {r['n_regions']} core regions (< min_group_size {min_group_size}); "
                       "left out of the region worst-group metric")
    return out


# --------------------------------------------------------------------------
# Discovery: Precision@k (SPEC §4.2)
# --------------------------------------------------------------------------


def region_label_map(image_ids, region_image, region_index, region_labels) -> dict[tuple, str]:
    """``{(image_id, region_index): label}`` for :func:`precision_at_k`."""
    return {
        (image_ids[int(i)], int(j)): lab
        for i, j, lab in zip(region_image, region_index, region_labels)
    }


def precision_at_k(
    feature: Feature | None,
    region_label_of: Mapping[tuple, str],
    target_label: str,
    k: int = PRECISION_K,
) -> float:
    """Fraction of the feature's top-``k`` regions labelled ``target_label`` (SPEC §4.2).

    The denominator is ``k``: a feature listing fewer than ``k`` regions
    counts the missing ones as misses, as does a region without a label.
    ``feature=None`` (nothing discovered) scores 0.
    """
    if k <= 0:
        raise ValueError("k must be positive")
    if feature is None:
        return 0.0
    hits = 0
    for row in list(feature.regions)[:k]:
        key = (row["image_id"], int(row["region_index"]))
        if region_label_of.get(key) == target_label:
            hits += 1
    return hits / k
