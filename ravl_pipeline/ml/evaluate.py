"""Evaluation: validity of a synthetic setting (SPEC §4.1) and the
mitigation metrics (SPEC §4.2)."""
from __future__ import annotations

from pathlib import Path
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


# --------------------------------------------------------------------------- mitigation metrics (SPEC §4.2)

DEFAULT_MIN_GROUP_SIZE = 10


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
                       min_group_size: int = DEFAULT_MIN_GROUP_SIZE) -> dict:
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


def induced_features(data_dir) -> list[str]:
    """Names of the features a synthetic setting correlates with a class
    (``setting.json`` beside or above ``data_dir``); [] elsewhere."""
    from .audit import dataset_setting

    setting = dataset_setting(data_dir) or {}
    return [f["name"] for f in setting.get("config", {}).get("features", [])]


def evaluate_model(model_spec: str, data_dir, split: str | None = "test", features: list[str] | None = None,
                   templates=None, *, pretrained: str | None = None, classes: Sequence[str] | None = None,
                   min_group_size: int = DEFAULT_MIN_GROUP_SIZE, batch_size: int = 64,
                   progress: bool = False) -> dict:
    """``metrics.json`` of a model on a dataset split (SPEC §4.2, §5).

    Groups are (class, any of ``features`` present), ``features`` defaulting
    to the setting's induced features. Region metrics use the core regions
    of the manifest's annotated boxes; without annotations they are ``None``
    and the result is marked ``partial`` with a warning.
    """
    from .audit import dataset_setting, dataset_templates, label_indices
    from .data import load_dataset
    from .embed import DEFAULT_TAU
    from .models import load_model

    split = None if split in (None, "all") else split
    ds = load_dataset(data_dir, classes=classes, split=split, require_labels=True)
    setting = dataset_setting(data_dir) or {}
    classes = list(classes or setting.get("classes") or ds.classes())
    templates = list(templates or dataset_templates(data_dir))
    features = list(features) if features else induced_features(data_dir)
    lm = load_model(model_spec, pretrained)
    labels = label_indices(ds, classes)
    image_pred, core_image, core_pred, notes = _predictions(lm, ds, classes, templates, batch_size, progress)
    presence, feature_notes = _presence(ds, features)
    metrics = mitigation_metrics(labels, image_pred, classes, presence, core_image, core_pred, min_group_size)
    metrics["warnings"] = notes + feature_notes + metrics["warnings"]
    metrics.update({"model": lm.name, "dataset": str(ds.root), "split": split, "classes": classes,
                    "features": features, "templates": templates, "tau": DEFAULT_TAU})
    return metrics


def _predictions(lm, ds, classes, templates, batch_size, progress):
    """Image predictions for every row; core-region predictions where the
    manifest annotates regions (``None`` when no row does)."""
    from .audit import score
    from .embed import embed_dataset

    annotated = _annotated_rows(ds)
    if len(annotated) == len(ds) and len(ds):
        emb = embed_dataset(lm, ds, proposer="boxes", batch_size=batch_size, progress=progress)
        sc = score(lm, emb, classes, templates)
        core_image, core_idx = core_regions(ds.region_labels, ds.labels)
        return sc.image_pred, core_image, _region_pred(emb, sc, core_image, core_idx), []
    emb = embed_dataset(lm, ds, proposer="quadrants", batch_size=batch_size, progress=progress)
    image_pred = score(lm, emb, classes, templates).image_pred
    if not annotated:
        return image_pred, None, None, [f"{ds.manifest_file}: no region annotations (boxes + region_labels); "
                                        "region metrics are null"]
    sub = ds.subset(np.asarray(annotated))
    emb = embed_dataset(lm, sub, proposer="boxes", batch_size=batch_size, progress=progress)
    sc = score(lm, emb, classes, templates)
    core_sub, core_idx = core_regions(sub.region_labels, sub.labels)
    note = (f"{ds.manifest_file}: {len(ds) - len(annotated)} of {len(ds)} rows have no region annotations; "
            "region metrics use the annotated rows only")
    return image_pred, np.asarray(annotated, np.int64)[core_sub], _region_pred(emb, sc, core_sub, core_idx), [note]


def _annotated_rows(ds) -> list[int]:
    if ds.boxes is None or ds.region_labels is None:
        return []
    return [i for i, (b, labs) in enumerate(zip(ds.boxes, ds.region_labels)) if len(b) and len(labs) == len(b)]


def _region_pred(emb, sc, core_image: np.ndarray, core_idx: np.ndarray) -> np.ndarray:
    row_of = {(int(i), int(j)): r for r, (i, j) in enumerate(zip(emb.region_image, emb.region_index))}
    rows = np.asarray([row_of[(int(i), int(j))] for i, j in zip(core_image, core_idx)], dtype=np.int64)
    return sc.region_probs.argmax(axis=1)[rows] if len(rows) else np.zeros(0, np.int64)


def _presence(ds, features: Sequence[str]) -> tuple[np.ndarray | None, list[str]]:
    if not features:
        return None, ["no feature named (--feature) and no setting.json with induced features: "
                      "groups are classes only"]
    if ds.region_labels is None:
        return None, [f"{ds.manifest_file}: no region_labels to tell whether {list(features)} is present: "
                      "groups are classes only"]
    present = np.zeros(len(ds), dtype=bool)
    for name in features:
        present |= feature_presence(ds.region_labels, name)
    return present, []


def write_metrics(metrics: dict, path) -> Path:
    """Write ``metrics.json`` atomically."""
    from .data import write_json_atomic

    return write_json_atomic(path, metrics)
