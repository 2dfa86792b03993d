"""Causal check of a finding: hide its regions and watch the predictions
(SPEC §1.4, §2.2).

A spurious feature is one the model *uses*.  If a discovered cluster is
such a feature, removing its regions from the validation images should
change zero-shot predictions and move the per-class accuracies of the
images that showed it toward those of the images that did not (the
correlated class loses its advantage, the others their penalty).  The same
number of regions drawn at random serves as a control.

The verdict (``causal.support``) asks whether hiding the regions undoes
errors they cause: in the classes that do worse with the regions, do more
images turn from wrong to right than from right to wrong (a one-sided sign
test)?  A cluster can be significant under the permutation test without
causing errors through its regions: in RoI embeddings an empty quadrant
carries its neighbours, so "empty, next to no red square" correlates with
the model's errors while masking it changes nothing; and masking a
cluster of class objects breaks its own class's predictions without
repairing any other.

The verdict is judged against its control: when hiding as many random
regions with the same fill changes predictions about as much as hiding the
feature, the fill itself is what the model reacts to, and the verdict is
``inconclusive`` — never ``not supported``.  Which fill to use is measured
per audit (:func:`choose_fill`): the candidate whose random-region control
changes predictions least.  The fills themselves are in :mod:`.fills`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import binomtest, fisher_exact

from ...config import MASK_CONTROLS, DiscoveryConfig, RegionsConfig
from ..findings import Feature, Findings
from ..loader import stream
from ..scores import class_text_embeddings, zero_shot_probs
from .fills import FILLS, fill_colour, mask_regions

# Hiding a feature that changes fewer than this share of its images'
# predictions is inert: its "not supported" rests on the feature, whatever the
# fill does elsewhere.
INERT_FLIP_RATE = 0.05
# Random regions masked to measure each candidate fill (one draw per audit).
FILL_SAMPLE_REGIONS = 200
# The fills the automatic choice considers, preferred in this order on ties.
# Blur is not among them: it keeps a region's colours, so a blurred solid
# square is still a square of that colour and "disturbs least" by hiding
# nothing (on the CLIP-normalised tiny ResNet, hiding the planted red square
# with blur flipped 0% of its images' predictions, with black 85%).
FILL_CANDIDATES = ("border", "black", "local", "mean")
PER_IMAGE = "_per_image"  # the per-image outcomes a paired control reads; never written
VERDICTS = ("supported", "inconclusive", "not supported")

__all__ = [
    "FILLS",
    "VERDICTS",
    "predict_images",
    "predict_dataset",
    "causal_effect",
    "random_control_rows",
    "masking_support",
    "choose_fill",
    "FILL_CANDIDATES",
    "MaskingCheck",
    "check_features",
]


def _predict(lm, pixels: torch.Tensor, text_emb: np.ndarray, tau: float) -> np.ndarray:
    """Zero-shot class predictions of a batch of preprocessed images (SPEC §1.4)."""
    with lm.compute.autocast():
        emb = F.normalize(lm.model.encode_image(lm.compute.to(pixels)).float(), dim=-1).cpu().numpy()
    return zero_shot_probs(emb, text_emb, tau).argmax(axis=1)


def predict_images(lm, images: Sequence[np.ndarray], text_emb: np.ndarray, tau: float,
                   batch_size: int = RegionsConfig.batch_size) -> np.ndarray:
    """Zero-shot class prediction of RGB arrays through the model's own
    evaluation transform and image tower (SPEC §1.4)."""
    lm.model.eval()
    preds = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            preds.append(_predict(lm, torch.stack([lm.preprocess(Image.fromarray(a)) for a in chunk]), text_emb, tau))
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class RgbItem:
    """Loader item: image ``i`` as the masking check sees it unmasked (RGB
    pixels through the model's own transform)."""

    transform: Callable

    def __call__(self, ds, i: int) -> torch.Tensor:
        return self.transform(Image.fromarray(np.asarray(ds.load_image(i).convert("RGB"))))


@dataclass(frozen=True)
class MaskedItem:
    """Loader item of the masking check: image ``i`` with the regions
    ``boxes[i]`` hidden by ``fill`` (and, with ``original``, unmasked too),
    through the model's own transform."""

    transform: Callable
    boxes: dict
    fill: str
    colour: np.ndarray
    original: bool = True

    def __call__(self, ds, i: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        image = np.asarray(ds.load_image(i).convert("RGB"))
        masked = self.transform(Image.fromarray(mask_regions(image, self.boxes.get(i, ()), self.fill, self.colour)))
        return (self.transform(Image.fromarray(image)) if self.original else None), masked


def _predict_stream(lm, ds, item, indices, text_emb, tau, batch_size) -> list[np.ndarray]:
    """Predictions of each tensor an item gives, per position (None stays None)."""
    lm.model.eval()
    out: list[list[np.ndarray]] = []
    with torch.inference_mode():
        for batch in stream(ds, item, indices=indices, batch_size=batch_size, compute=lm.compute):
            parts = list(zip(*batch)) if isinstance(batch[0], tuple) else [batch]
            out.append([None if part[0] is None else _predict(lm, torch.stack(part), text_emb, tau)
                        for part in parts])
    return [np.concatenate(col) if col and col[0] is not None else None for col in zip(*out)] if out else []


def predict_dataset(lm, ds, text_emb: np.ndarray, tau: float,
                    batch_size: int = RegionsConfig.batch_size) -> np.ndarray:
    """:func:`predict_images` of every image of ``ds``, streamed (:mod:`..loader`)
    so memory does not grow with the dataset."""
    preds = _predict_stream(lm, ds, RgbItem(lm.preprocess), None, text_emb, tau, batch_size) if len(ds) else []
    return preds[0] if preds else np.zeros(0, dtype=np.int64)


def _accuracy(correct: np.ndarray) -> float | None:
    return float(correct.mean()) if correct.size else None


def _gap(a_in, a_out) -> float | None:
    return None if a_in is None or a_out is None else a_in - a_out


def _per_class_shift(labels_in, before_ok, after_ok, absent_labels, absent_ok, classes):
    """Rows of accuracy with the regions (before/after masking) vs without."""
    rows = []
    for k, name in enumerate(classes):
        sel, out = labels_in == k, absent_labels == k
        if not sel.any():
            continue
        a_out = _accuracy(absent_ok[out])
        a_before, a_after = _accuracy(before_ok[sel]), _accuracy(after_ok[sel])
        rows.append({"label": name, "n_present": int(sel.sum()), "acc_present_before": a_before,
                     "acc_present_after": a_after, "n_absent": int(out.sum()), "acc_absent": a_out,
                     "gap_before": _gap(a_before, a_out), "gap_after": _gap(a_after, a_out)})
    return rows


def causal_effect(lm, ds, rows: np.ndarray, region_image: np.ndarray, boxes: np.ndarray,
                  image_labels: np.ndarray, image_pred: np.ndarray, classes: Sequence[str],
                  text_emb: np.ndarray, tau: float, *, fill: str,
                  attribute: str | None = None, batch_size: int = RegionsConfig.batch_size,
                  before_pred: np.ndarray | None = None, class_sign: np.ndarray | None = None) -> dict:
    """Mask the regions ``rows`` (region rows) in their images and compare
    zero-shot predictions before and after.

    ``before`` is recomputed through the same transform as ``after`` so that
    a flip is caused by the mask alone (``before_pred``, the predictions of
    every unmasked image through that path, saves the pass when several
    region sets are checked); images without masked regions keep
    their discovery prediction ``image_pred`` and give ``acc_absent``.
    ``parity_shift`` = mean over classes of ``|gap_before| - |gap_after|``
    (positive: masking moved classes toward parity).  ``n_toward_parity`` /
    ``n_away_from_parity`` count the images whose correctness the mask
    changed in the direction that shrinks / grows their class's gap, and
    ``n_errors_fixed`` / ``n_errors_made`` those of the negative-gap classes
    that turned right / wrong. ``class_sign`` (per class, the sign of its
    gap) replaces the gaps measured here, so that a control on the same
    images counts errors in the same classes. The record also carries, under
    :data:`PER_IMAGE`, each masked image's row and outcome (+1 an error
    undone, −1 one made, 0 neither or not in a hurt class) and the class
    signs, for a paired control; :func:`check_features` drops it before the
    record is written.
    """
    rows = np.asarray(rows, dtype=np.int64)
    region_image = np.asarray(region_image, dtype=np.int64)
    image_labels = np.asarray(image_labels, dtype=np.int64)
    image_pred = np.asarray(image_pred, dtype=np.int64)
    images = np.unique(region_image[rows])
    hidden = {int(i): boxes[rows[region_image[rows] == i]] for i in images}
    item = MaskedItem(lm.preprocess, hidden, fill, fill_colour(lm.preprocess_cfg), original=before_pred is None)
    predicted = _predict_stream(lm, ds, item, images.tolist(), text_emb, tau, batch_size) if images.size else []
    empty = np.zeros(0, dtype=np.int64)
    before = (np.asarray(before_pred, dtype=np.int64)[images] if before_pred is not None
              else predicted[0] if predicted else empty)
    after = predicted[1] if predicted else empty
    labels_in = image_labels[images]
    absent = np.setdiff1d(np.arange(len(image_labels)), images)
    before_ok, after_ok = before == labels_in, after == labels_in
    per_class = _per_class_shift(labels_in, before_ok, after_ok,
                                 image_labels[absent], image_pred[absent] == image_labels[absent], classes)
    if class_sign is None:
        gap_of = {r["label"]: r["gap_before"] for r in per_class}
        class_sign = np.array([np.sign(gap_of.get(name) or 0.0) for name in classes])
    image_sign = class_sign[labels_in] if images.size else np.zeros(0)
    lost, gained = before_ok & ~after_ok, ~before_ok & after_ok
    toward = int(np.sum(((image_sign > 0) & lost) | ((image_sign < 0) & gained)))
    away = int(np.sum(((image_sign > 0) & gained) | ((image_sign < 0) & lost)))
    # in the classes the regions hurt: errors the mask undoes vs errors it makes
    fixed = int(np.sum((image_sign < 0) & gained))
    caused = int(np.sum((image_sign < 0) & lost))
    shifts = [abs(r["gap_before"]) - abs(r["gap_after"]) for r in per_class if r["gap_before"] is not None]
    out = {
        "fill": fill,
        "n_regions": int(rows.size),
        "n_images": int(images.size),
        "n_flipped": int(np.sum(before != after)),
        "n_toward_parity": toward,
        "n_away_from_parity": away,
        "n_errors_fixed": fixed,
        "n_errors_made": caused,
        "flip_rate": float(np.mean(before != after)) if images.size else None,
        "acc_before": _accuracy(before == labels_in),
        "acc_after": _accuracy(after == labels_in),
        "parity_shift": float(np.mean(shifts)) if shifts else None,
        "per_class": per_class,
        PER_IMAGE: {"images": images, "class_sign": class_sign,
                    "outcome": np.where(image_sign < 0, gained.astype(int) - lost.astype(int), 0)},
    }
    if attribute is not None:
        row = next((r for r in per_class if r["label"] == attribute), None)
        out["attribute"] = attribute
        out["attribute_gap_before"] = row["gap_before"] if row else None
        out["attribute_gap_after"] = row["gap_after"] if row else None
    return out


def random_control_rows(n_rows: int, n_total: int, seed: int, stream: int = 7919) -> np.ndarray:
    """``n_rows`` region rows drawn uniformly without replacement (seeded;
    ``stream`` keeps draws made for different purposes apart)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(stream)]))
    return np.sort(rng.choice(int(n_total), size=min(int(n_rows), int(n_total)), replace=False))


def same_image_control_rows(rows: np.ndarray, region_image: np.ndarray, boxes: np.ndarray, seed: int,
                            stream: int = 15485863) -> np.ndarray:
    """For each of a feature's regions ``rows``, another region of the same
    image, outside the feature and not overlapping it, of the closest area
    (ties drawn, seeded; each used once): random masks of the same size on
    the same images (an image with no such region has no control region)."""
    rows = np.asarray(rows, dtype=np.int64)
    region_image = np.asarray(region_image, dtype=np.int64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(stream)]))
    taken = set(rows.tolist())
    images = np.unique(region_image[rows])
    order = np.argsort(region_image, kind="stable")
    starts = np.searchsorted(region_image[order], images)
    ends = np.searchsorted(region_image[order], images, side="right")
    of_image = {int(i): order[a:b] for i, a, b in zip(images, starts, ends)}
    feature_boxes = {int(i): boxes[rows[region_image[rows] == i]] for i in images}
    out = []
    for r in rows:
        cands = np.array([c for c in of_image[int(region_image[r])] if int(c) not in taken], dtype=np.int64)
        # a region that overlaps the feature would hide some of it: not a control
        cands = cands[[not _overlaps(boxes[c], feature_boxes[int(region_image[r])]) for c in cands]]
        if cands.size == 0:
            continue
        dist = np.abs(areas[cands] - areas[r])
        pick = int(rng.choice(cands[dist == dist.min()]))
        taken.add(pick)
        out.append(pick)
    return np.sort(np.asarray(out, dtype=np.int64))


def _overlaps(box: np.ndarray, others: np.ndarray, share: float = 0.1) -> bool:
    """Whether ``box`` covers more than ``share`` of any of ``others`` (or they of it)."""
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    areas = np.minimum((box[2] - box[0]) * (box[3] - box[1]), (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1]))
    return bool(np.any(inter > share * np.maximum(areas, 1e-9)))


def paired_control(effect: dict, control: dict, alpha: float) -> dict:
    """The feature's masks against the same-images control, image by image:
    on the images both masked, does hiding the feature end better (an error
    undone where the control's mask did not, or no error made where it made
    one) more often than worse? One-sided sign test over the images where
    the two outcomes differ."""
    f, c = effect[PER_IMAGE], control[PER_IMAGE]
    common, fi, ci = np.intersect1d(f["images"], c["images"], return_indices=True)
    of, oc = f["outcome"][fi], c["outcome"][ci]
    better, worse = int(np.sum(of > oc)), int(np.sum(of < oc))
    p = float(binomtest(better, better + worse, 0.5, alternative="greater").pvalue) if better + worse else 1.0
    return {"test": "paired sign test over the images both masks hid: does hiding the feature end better "
                    "(more errors undone, fewer made) than hiding a region of the same size on the same image?",
            "n_images": int(common.size), "better": better, "worse": worse, "p_value": p,
            "feature_errors_fixed": int(np.sum(of > 0)), "feature_errors_made": int(np.sum(of < 0)),
            "control_errors_fixed": int(np.sum(oc > 0)), "control_errors_made": int(np.sum(oc < 0)),
            "feature_flip_rate": effect.get("flip_rate"), "control_flip_rate": control.get("flip_rate"),
            "passed": p <= alpha}


def masking_support(effect: dict, alpha: float = DiscoveryConfig.alpha, control: dict | None = None,
                    paired: bool = False) -> dict | None:
    """Does hiding the finding's regions undo errors they cause — more than
    hiding random regions does?

    RaVL's spurious features are those that cause zero-shot errors: images
    of the classes that do worse with the regions (negative gap) should get
    some predictions right once the regions are hidden.  Of those images
    whose correctness the mask changes, ``fixed`` went from wrong to right
    and ``made`` from right to wrong; under "the mask acts at random" each
    goes either way with probability 1/2, so the one-sided sign test
    P(X >= fixed), X ~ Binomial(fixed + made, 1/2), is the p-value.  A mask
    that fixes nothing (p = 1) does not support the finding: an empty
    quadrant that only marks the feature's absence, or the class object
    itself (hiding a digit breaks its own class's predictions but repairs
    none).

    The ``control`` (as many random regions, same fill) says what the fill
    does by itself.  When hiding the feature flips about as many of its
    images' predictions as hiding random regions flips of theirs — neither
    more nor fewer by a one-sided Fisher exact test at ``alpha`` — and the
    feature's mask is not inert (it flips at least :data:`INERT_FLIP_RATE`
    of its images), the fill, not the feature, may explain what happened:
    the verdict is ``inconclusive``, whatever the sign test says.  When it
    flips significantly fewer, the feature's regions matter less to the
    model than random ones: ``not supported`` when the sign test fails too,
    and ``inconclusive`` when it passes (the errors it undoes cannot be told
    apart from what a fill that disturbs random regions more does in the
    classes the regions hurt, where most predictions are wrong to begin
    with).  Otherwise the verdict is ``supported`` when the sign test's
    p-value is at most ``alpha`` and ``not supported`` when not.
    ``supported`` is true for the first verdict only.  ``None`` for checks
    made before the counts were recorded.

    With ``paired`` the ``control`` is a region of the same size on each of
    the feature's images (:func:`same_image_control_rows`) and is compared
    like for like (:func:`paired_control`): ``supported`` when hiding the
    feature undoes more errors than it makes and ends better than the
    control image by image (both at ``alpha``); ``inconclusive`` when it
    undoes errors (the sign test passes) but no more than the control's
    masks do on the same images; ``not supported`` otherwise. Flip rates,
    which mix helpful and harmful flips, are reported beside it, not
    judged."""
    if "n_errors_fixed" not in effect:
        return None
    fixed, made = int(effect["n_errors_fixed"]), int(effect["n_errors_made"])
    p = float(binomtest(fixed, fixed + made, 0.5, alternative="greater").pvalue) if fixed + made else 1.0
    verdict = "supported" if p <= alpha else "not supported"
    out = {"test": "one-sided sign test: errors fixed vs errors made by the mask, in the classes the "
                   "regions hurt",
           "errors_fixed": fixed, "errors_made": made,
           "toward_parity": int(effect.get("n_toward_parity", 0)),
           "away_from_parity": int(effect.get("n_away_from_parity", 0)),
           "p_value": p, "alpha": float(alpha)}
    if paired and control is not None and PER_IMAGE in control and PER_IMAGE in effect:
        out["control"] = like = paired_control(effect, control, alpha)
        if p <= alpha and like["passed"]:
            verdict = "supported"
        elif p <= alpha:
            verdict = "inconclusive"
            out["reason"] = (f"hiding the feature undoes {fixed} errors and makes {made}, but hiding a region of "
                             f"the same size on the same images does as well (better on {like['better']} "
                             f"images, worse on {like['worse']})")
        else:
            verdict = "not supported"
    elif control is not None and control.get("n_images"):
        n_f, k_f = int(effect["n_images"]), int(effect["n_flipped"])
        n_c, k_c = int(control["n_images"]), int(control["n_flipped"])
        table = [[k_f, n_f - k_f], [k_c, n_c - k_c]]
        p_more = float(fisher_exact(table, alternative="greater").pvalue)
        p_fewer = float(fisher_exact(table, alternative="less").pvalue)
        out["control"] = {"test": "one-sided Fisher exact tests: does the feature's mask flip more (p_more) or "
                                  "fewer (p_fewer) predictions than as many random regions' mask?",
                          "feature_flip_rate": k_f / max(n_f, 1), "control_flip_rate": k_c / max(n_c, 1),
                          "p_more": p_more, "p_fewer": p_fewer}
        if p_fewer <= alpha:
            # the feature's regions matter less than random ones: refuted, unless hiding them undid errors
            if p <= alpha:
                verdict = "inconclusive"
                out["reason"] = (f"hiding the feature undoes errors but flips fewer predictions "
                                 f"({k_f / max(n_f, 1):.0%}) than hiding as many random regions "
                                 f"({k_c / max(n_c, 1):.0%}): the fill's own effect cannot be told apart")
            else:
                verdict = "not supported"
        elif p_more > alpha and k_f >= INERT_FLIP_RATE * n_f:
            verdict = "inconclusive"
            out["reason"] = (f"the fill changes predictions by itself: hiding as many random regions flips "
                             f"{k_c / max(n_c, 1):.0%} of their images, hiding the feature {k_f / max(n_f, 1):.0%}")
    out["verdict"] = verdict
    out["supported"] = verdict == "supported"
    return out


def choose_fill(lm, ds, region_image: np.ndarray, boxes: np.ndarray, image_labels: np.ndarray,
                image_pred: np.ndarray, classes: Sequence[str], text_emb: np.ndarray, tau: float, *,
                before_pred: np.ndarray, candidates: Sequence[str] = FILL_CANDIDATES,
                n_regions: int = FILL_SAMPLE_REGIONS,
                seed: int = DiscoveryConfig.seed, batch_size: int = RegionsConfig.batch_size) -> dict:
    """The fill that disturbs the model least: the same random regions
    (``n_regions`` of them, seeded) are hidden with each candidate, and the
    one whose mask flips the fewest predictions is chosen (the first of
    ``candidates`` on ties). Random regions include class objects, so no
    fill flips nothing; what differs between fills is what they add — a
    grey box on a black background is a new object to a model that maps
    black to a large negative input. Returns the choice and every
    candidate's flip rate."""
    rows = random_control_rows(n_regions, len(region_image), seed, stream=104729)
    args = (region_image, boxes, image_labels, image_pred, classes, text_emb, tau)
    rates = {fill: causal_effect(lm, ds, rows, *args, fill=fill, batch_size=batch_size,
                                 before_pred=before_pred)["flip_rate"] for fill in candidates}
    chosen = min(candidates, key=lambda f: rates[f])
    return {"chosen": chosen, "flip_rates": rates, "n_regions": int(rows.size),
            "n_images": int(np.unique(np.asarray(region_image)[rows]).size),
            "rule": "the candidate whose mask of the same random regions flips the fewest predictions"}


@dataclass
class MaskingCheck:
    """The masking check of the features of one audit: per checked cluster its
    ``causal`` record (with the verdict ``support``) and ``causal_control``."""

    effects: dict[int, dict]  # cluster id -> causal (with "support")
    controls: dict[int, dict]  # cluster id -> causal_control
    summary: dict  # recorded as ``findings.causal``


def features_to_check(findings: Findings, max_features: int | None) -> list[Feature]:
    """The first ``max_features`` features and every called one."""
    return [f for i, f in enumerate(findings.features) if max_features is None or i < max_features or f.called]


def check_features(findings: Findings, lm, ds, cluster_labels, region_image, boxes,
                   image_labels, image_pred, classes: Sequence[str], templates: Sequence[str], tau: float, *,
                   fill: str = DiscoveryConfig.mask_fill, control: bool = True, seed: int = DiscoveryConfig.seed,
                   max_features: int | None = 5, alpha: float = DiscoveryConfig.alpha,
                   batch_size: int = RegionsConfig.batch_size,
                   mask_control: str = DiscoveryConfig.mask_control) -> MaskingCheck:
    """Mask the regions of the first ``max_features`` features and of every
    called one, and, with ``control``, as many random regions; the verdict of
    each is :func:`masking_support`. ``fill="auto"`` chooses the fill first
    (:func:`choose_fill`) and records how. ``mask_control``: ``anywhere``
    (as many random regions of any images) or ``same-images`` (a region of
    the same size on each of the feature's images, compared image by
    image)."""
    if mask_control not in MASK_CONTROLS:
        raise ValueError(f"unknown mask control {mask_control!r}; expected one of {', '.join(MASK_CONTROLS)}")
    if fill not in ("auto", *FILLS):
        raise ValueError(f"unknown mask fill {fill!r}; expected one of auto, {', '.join(FILLS)}")
    text = class_text_embeddings(lm, classes, templates).cpu().numpy()
    cluster_labels = np.asarray(cluster_labels, dtype=np.int64)
    boxes = np.asarray(boxes, dtype=np.float64)
    feats = features_to_check(findings, max_features)
    summary = {"fill": fill, "control": ("same number of regions drawn at random" if mask_control == "anywhere"
                                         else "a region of the same size on each of the feature's images"),
               "mask_control": mask_control,
               "features_checked": len(feats), "alpha": float(alpha),
               "checked": "the top features and every called one"}
    if not feats:
        return MaskingCheck({}, {}, summary)
    before = predict_dataset(lm, ds, text, tau, batch_size)
    args = (region_image, boxes, image_labels, image_pred, classes, text, tau)
    if fill == "auto":
        summary["fill_selection"] = choose_fill(lm, ds, *args, before_pred=before, seed=seed, batch_size=batch_size)
        fill = summary["fill"] = summary["fill_selection"]["chosen"]
    effects, controls = {}, {}
    for feat in feats:
        rows = np.flatnonzero(cluster_labels == int(feat.cluster_id))
        effect = causal_effect(lm, ds, rows, *args, fill=fill, attribute=feat.attribute,
                               batch_size=batch_size, before_pred=before)
        paired = mask_control == "same-images"
        if control:
            ctrl = (same_image_control_rows(rows, region_image, boxes, seed + int(feat.cluster_id)) if paired
                    else random_control_rows(rows.size, len(cluster_labels), seed + int(feat.cluster_id)))
            controls[feat.cluster_id] = causal_effect(
                lm, ds, ctrl, *args, fill=fill, attribute=feat.attribute, batch_size=batch_size, before_pred=before,
                class_sign=effect[PER_IMAGE]["class_sign"] if paired else None)
        effect["support"] = masking_support(effect, alpha, controls.get(feat.cluster_id), paired=paired)
        for record in (effect, controls.get(feat.cluster_id) or {}):
            record.pop(PER_IMAGE, None)
        effects[feat.cluster_id] = effect
    return MaskingCheck(effects, controls, summary)
