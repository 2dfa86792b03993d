"""Evaluation: validity of a synthetic setting (SPEC §4.1) and the
mitigation metrics (SPEC §4.2)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

VALIDITY_MARGIN = 0.10


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
