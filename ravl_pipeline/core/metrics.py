"""What the evaluation protocol measures (SPEC §4): validity of a setting,
Precision@k of a discovered feature, and the four mitigation metrics.

Pure numpy over predictions and ground-truth labels; running a model to get
the predictions is :mod:`ravl_pipeline.pipeline`'s job."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

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


GROUP_SOURCES = ("annotation", "findings", "class")  # SPEC §5: metrics.json ``groups_from``

Presence = Union[np.ndarray, Mapping[str, np.ndarray], None]


def _columns(presence: Presence) -> list[tuple[str | None, np.ndarray | None]]:
    """``(feature name or None, bool per image)`` of each presence column."""
    if presence is None:
        return [(None, None)]
    if isinstance(presence, Mapping):
        return [(str(name), np.asarray(col, bool)) for name, col in presence.items()]
    return [(None, np.asarray(presence, bool))]


@dataclass
class Groups:
    """What splits each class of an evaluation into (feature present /
    absent) groups, and where that came from (SPEC §5 ``groups_from``):
    ``annotation`` (the data's region labels name the feature), ``findings``
    (a discovered finding's regions, one presence column per mitigated
    finding) or ``class`` (no feature: the groups are the classes)."""

    source: str
    presence: Presence = None
    known: np.ndarray | None = None  # per image: presence known (None: everywhere)
    features: list[dict] = field(default_factory=list)  # per column: feature, class (tied to), finding's facts
    notes: list[str] = field(default_factory=list)
    # per feature, its own presence, where the groups join several (annotation: any of the named features)
    each: Mapping[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.source not in GROUP_SOURCES:
            raise ValueError(f"groups_from must be one of {', '.join(GROUP_SOURCES)}, got {self.source!r}")

    def effects(self, labels: np.ndarray, image_pred: np.ndarray, classes: Sequence[str]) -> list[dict]:
        """:func:`feature_effect` of every feature whose class is known."""
        cols = dict(_columns(self.presence))
        out = []
        for feat in self.features:
            if self.each is not None:
                col = self.each.get(feat["feature"])
            else:
                col = cols.get(feat["feature"]) if isinstance(self.presence, Mapping) else cols.get(None)
            if col is None or feat.get("class") not in classes:
                continue
            out.append({**feat, **feature_effect(labels, image_pred, col, list(classes).index(feat["class"]),
                                                 self.known)})
        return out


def group_masks(labels: np.ndarray, presence: Presence, n_classes: int,
                known: np.ndarray | None = None) -> list[tuple[dict, np.ndarray]]:
    """``(key, image mask)`` of every group: per class, or per (class, feature
    present/absent) for each presence column. ``known`` marks the images
    whose presence is known; the others are in no feature group."""
    labels = np.asarray(labels)
    known = np.ones(len(labels), bool) if known is None else np.asarray(known, bool)
    out = []
    for name, col in _columns(presence):
        for k in range(n_classes):
            for flag in ([None] if col is None else [False, True]):
                mask = labels == k if flag is None else (labels == k) & (col == flag) & known
                key = {"label": k, "feature_present": flag}
                out.append(({"feature": name, **key} if name is not None else key, mask))
    return out


def group_rows(labels: np.ndarray, image_pred: np.ndarray, presence: Presence, classes: Sequence[str],
               core_image: np.ndarray | None = None, core_pred: np.ndarray | None = None,
               known: np.ndarray | None = None) -> list[dict]:
    """One row per (class, feature present/absent) group — or per class when
    ``presence`` is ``None`` — with image and core-region accuracy.
    ``presence`` is one flag per image (a feature, or any of several) or a
    mapping feature name → flags, whose groups are listed feature by
    feature, each row naming its feature; ``known`` as in :func:`group_masks`."""
    labels, image_pred = np.asarray(labels), np.asarray(image_pred)
    image_ok = labels == image_pred
    have_regions = core_image is not None and core_pred is not None
    if have_regions:
        core_image = np.asarray(core_image, dtype=np.int64)
        region_ok = np.asarray(core_pred) == labels[core_image]
    rows = []
    for key, in_group in group_masks(labels, presence, len(classes), known):
        row = {**key, "label": classes[key["label"]], "n": int(in_group.sum()),
               "image_acc": _mean_or_none(image_ok[in_group]), "n_regions": 0, "region_acc": None}
        if have_regions:
            sel = in_group[core_image]
            row["n_regions"] = int(sel.sum())
            row["region_acc"] = _mean_or_none(region_ok[sel])
        rows.append(row)
    return rows


def mitigation_metrics(labels: np.ndarray, image_pred: np.ndarray, classes: Sequence[str],
                       presence: Presence = None, core_image: np.ndarray | None = None,
                       core_pred: np.ndarray | None = None,
                       min_group_size: int = EvaluationConfig.min_group_size,
                       known: np.ndarray | None = None) -> dict:
    """Image/region overall and worst-group accuracy (SPEC §4.2).

    ``labels``/``image_pred`` are class indices per image; ``presence`` the
    feature flag per image, or flags per named feature (``None``: groups
    are classes only); ``known`` the images whose presence is known (the
    rest count in the overall metrics only); ``core_image``/``core_pred``
    the image row and predicted class of every core region (``None``: no
    region annotations, region metrics ``None``). Groups with fewer than
    ``min_group_size`` samples are reported but left out of the
    worst-group minimum, with a warning.
    """
    labels, image_pred = np.asarray(labels), np.asarray(image_pred)
    rows = group_rows(labels, image_pred, presence, classes, core_image, core_pred, known)
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


def feature_effect(labels: np.ndarray, image_pred: np.ndarray, present: np.ndarray, class_index: int,
                   known: np.ndarray | None = None) -> dict:
    """How images with a feature fare against those without, for the class
    the feature is tied to and for the other classes pooled: accuracy with
    and without it and the gap (with − without) that makes it a finding."""
    labels, present = np.asarray(labels), np.asarray(present, bool)
    ok = labels == np.asarray(image_pred)
    known = np.ones(len(labels), bool) if known is None else np.asarray(known, bool)

    def side(mask: np.ndarray) -> dict:
        with_, without = mask & present & known, mask & ~present & known
        a, b = _mean_or_none(ok[with_]), _mean_or_none(ok[without])
        return {"n_present": int(with_.sum()), "acc_present": a, "n_absent": int(without.sum()), "acc_absent": b,
                "gap": None if a is None or b is None else a - b}

    return {"own_class": side(labels == class_index), "other_classes": side(labels != class_index)}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def answer_lines(metrics: Mapping) -> list[str]:
    """The closed loop's answer, one line per feature whose groups the
    metrics were measured on (each mitigated finding, or the annotated
    feature): its class's accuracy on images with it, audited → mitigated
    (control), then without it, then the other classes with it."""
    effects = {m: {e["feature"]: e for e in (metrics.get(m) or {}).get("by_feature") or []}
               for m in ("audited", "mitigated", "control")}
    lines = []
    for feat, audited in effects["audited"].items():
        def cell(side: str, key: str) -> str:
            value = {m: effects[m].get(feat, {}).get(side, {}).get(key) for m in effects}
            text = _pct(value["audited"])
            if metrics.get("mitigated"):
                text += f" → {_pct(value['mitigated'])}"
            return text + (f" (control {_pct(value['control'])})" if metrics.get("control") else "")

        lines.append(f"images with {feat}: class {audited['class']} accuracy {cell('own_class', 'acc_present')}; "
                     f"without it {cell('own_class', 'acc_absent')}; other classes with it "
                     f"{cell('other_classes', 'acc_present')}")
    if lines and metrics.get("mitigated") is None:
        reason = (metrics.get("not_trained") or {}).get("mitigated")
        lines.append("nothing was mitigated" + (f": {reason}" if reason else ""))
    return lines


# --------------------------------------------------------------------------- paired bootstrap (SPEC §4.2)

BOOTSTRAP_DRAWS = 1000


def _weighted_metrics(w: np.ndarray, image_ok: np.ndarray, masks: np.ndarray, core_image: np.ndarray | None,
                      region_ok: np.ndarray | None, counted: np.ndarray,
                      counted_regions: np.ndarray | None) -> dict[str, np.ndarray]:
    """The four metrics under image weights ``w`` [B, N] (bootstrap counts);
    ``masks`` [G, N] 0/1 per group, ``image_ok``/``region_ok`` 0/1. Which
    groups count in the worst-group minimum (``counted``, ``counted_regions``
    [G]) is decided once, on the data as it is, as :func:`mitigation_metrics`
    decides it; a draw takes the minimum over those of them it holds."""
    with np.errstate(invalid="ignore", divide="ignore"):
        n = w.sum(axis=1)
        sizes = w @ masks.T  # [B, G]
        acc = (w @ (masks * image_ok).T) / sizes
        out = {"image_overall": (w @ image_ok) / n,
               "image_worst_group": np.where(counted[None, :] & (sizes > 0), acc, np.inf).min(axis=1)}
        if core_image is not None:
            wr = w[:, core_image]  # a core region weighs what its image does
            rmasks = masks[:, core_image]
            rsizes = wr @ rmasks.T
            racc = (wr @ (rmasks * region_ok).T) / rsizes
            out["region_overall"] = (wr @ region_ok) / wr.sum(axis=1)
            out["region_worst_group"] = np.where(counted_regions[None, :] & (rsizes > 0), racc, np.inf).min(axis=1)
    return {k: np.where(np.isinf(v), np.nan, v) for k, v in out.items()}


def paired_differences(labels: np.ndarray, image_preds: Mapping[str, np.ndarray], classes: Sequence[str],
                       pairs: Sequence[tuple[str, str]], presence: Presence = None,
                       core_image: np.ndarray | None = None, core_preds: Mapping[str, np.ndarray] | None = None,
                       min_group_size: int = EvaluationConfig.min_group_size, known: np.ndarray | None = None,
                       draws: int = BOOTSTRAP_DRAWS, seed: int = 0, level: float = 0.95) -> dict:
    """Differences ``a − b`` of the four metrics between models scored on
    the same images, with paired bootstrap intervals: test images are drawn
    with replacement (``draws`` times, seeded), each with its core regions,
    and every model is scored on the same draw, groups and minimum group
    size as :func:`mitigation_metrics`. Returns ``{"a-b": {metric: {"diff",
    "ci": [lo, hi], "n_valid"}}}``, ``diff`` the difference on the images
    as they are; an interval is ``None`` where fewer than half the draws
    define the metric for both models."""
    labels = np.asarray(labels)
    n = len(labels)
    masks = np.stack([m for _, m in group_masks(labels, presence, len(classes), known)]).astype(np.float64)
    core = None if core_image is None or core_preds is None else np.asarray(core_image, np.int64)
    alpha = (1.0 - level) / 2

    counted = masks.sum(axis=1) >= min_group_size  # the groups mitigation_metrics counts, fixed for every draw
    counted_regions = None if core is None else masks[:, core].sum(axis=1) >= min_group_size

    def scored(name: str, w: np.ndarray) -> dict[str, np.ndarray]:
        image_ok = (labels == np.asarray(image_preds[name])).astype(np.float64)
        region_ok = None if core is None else (np.asarray(core_preds[name]) == labels[core]).astype(np.float64)
        return _weighted_metrics(w, image_ok, masks, core, region_ok, counted, counted_regions)

    models = list(dict.fromkeys(m for pair in pairs for m in pair))
    point = {m: scored(m, np.ones((1, n))) for m in models}
    boot: dict[str, dict[str, list]] = {m: {} for m in models}
    rng = np.random.default_rng(seed)
    chunk = max(1, 2**24 // max(1, n, len(core) if core is not None else 0))  # weights of at most 128 MB
    for start in range(0, int(draws) if n else 0, chunk):
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, int(draws) - start)).astype(np.float64)
        for m in models:
            for key, values in scored(m, w).items():
                boot[m].setdefault(key, []).append(values)
    out = {}
    for a, b in pairs:
        rows = {}
        for key in METRIC_KEYS:
            if not n or key not in point[a]:
                rows[key] = {"diff": None, "ci": None, "n_valid": 0}
                continue
            diff = float(point[a][key][0] - point[b][key][0])
            d = np.concatenate(boot[a][key]) - np.concatenate(boot[b][key])
            d = d[np.isfinite(d)]
            ci = ([float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha))]
                  if len(d) >= draws / 2 else None)
            rows[key] = {"diff": diff if np.isfinite(diff) else None, "ci": ci, "n_valid": int(len(d))}
        out[f"{a}-{b}"] = rows
    return out


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
