"""Why Stage 2 does what it does: measurements that explain a mitigation
result instead of guessing at it (SPEC §3.1, §3.3, §3.5).

* :func:`assignment_quality` — precision and recall of the spurious-region
  assignment (SPEC §3.1) against the ground-truth region labels of the
  fine-tuning set, per region and per image (the groups the upsampling
  balances), and what the regions flagged by mistake show.
* :class:`LossTrace` — an ``inspect`` hook for :func:`mitigate.train.finetune`:
  every few steps, the value of each weighted loss term the method leaves
  in ``state["terms"]``, the norm of its gradient on the image encoder and
  on the text tower, and its first-order effect on probe images (how much a
  step against that term's gradient raises or lowers the log-probability of
  the true class of, e.g., the correlated class's images with and without
  the feature), per block of the network; plus the probes' accuracy.

The first-order effect of a term ``T`` on a probe's mean log-probability
``m`` is ``−⟨∇m, ∇T⟩``: positive when plain gradient descent on ``T`` alone
would raise ``m``. AdamW rescales coordinates, so it is a direction, not
the size of the actual change; the probes' accuracy over steps shows the
actual change.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DEFAULT_TAU
from ..core.regions import region_labels_for
from ..mitigate.assign import RegionAssignment

__all__ = ["assignment_quality", "parameter_block", "LossTrace", "summarise_trace"]

BLOCKS = ("stem", "layer1", "layer2", "layer3", "layer4", "attnpool", "vit", "text", "logit_scale")


def assignment_quality(assignment: RegionAssignment, ds, features: Sequence[str], proposer: str,
                       correlated_classes: Sequence[str] = ()) -> dict:
    """Precision and recall of the spurious flags against the regions whose
    ground-truth label is one of ``features`` (SPEC §3.1), per region and
    per image; the labels of the flagged regions; and, for each correlated
    class, the share of its images whose own class object was flagged (such
    a region would be pushed *away* from its own class text)."""
    gt = region_labels_for(ds, proposer)
    if gt is None:
        return {"available": False, "note": f"{ds.manifest_file}: no region labels for proposer {proposer!r}"}
    flat = np.array([gt[i][j] for i, j in zip(assignment.region_image, assignment.region_index)], dtype=object)
    truth = np.isin(flat, list(features))
    flagged = np.asarray(assignment.spurious, dtype=bool)
    img_truth = np.zeros(len(assignment.image_ids), bool)
    img_truth[assignment.region_image[truth]] = True
    img_flag = assignment.image_has_feature()
    labels = np.asarray(ds.labels, dtype=object) if ds.labels is not None else None
    object_flagged = {}
    for cls in correlated_classes:
        if labels is None:
            break
        own = flagged & (flat == cls) & (labels[assignment.region_image] == cls)
        n_cls = int((labels == cls).sum())
        object_flagged[cls] = {"n_images": n_cls,
                               "own_object_flagged": float(len(set(assignment.region_image[own])) / max(1, n_cls))}
    return {
        "available": True, "features": list(features),
        "regions": _precision_recall(truth, flagged),
        "images": _precision_recall(img_truth, img_flag),
        "flagged_labels": dict(Counter(str(x) for x in flat[flagged]).most_common()),
        "missed_labels": dict(Counter(str(x) for x in flat[truth & ~flagged]).most_common()),
        "correlated_class_objects": object_flagged,
    }


def _precision_recall(truth: np.ndarray, flagged: np.ndarray) -> dict:
    tp = int((truth & flagged).sum())
    return {"n": int(len(truth)), "true": int(truth.sum()), "flagged": int(flagged.sum()), "true_positive": tp,
            "precision": tp / int(flagged.sum()) if flagged.any() else None,
            "recall": tp / int(truth.sum()) if truth.any() else None}


def parameter_block(name: str) -> str:
    """Which part of a CLIP model a parameter belongs to (for the trace)."""
    if name == "logit_scale":
        return "logit_scale"
    if not name.startswith("visual."):
        return "text"
    part = name.split(".")[1]
    if part in ("layer1", "layer2", "layer3", "layer4", "attnpool"):
        return part
    if part.startswith(("conv", "bn", "avgpool", "act")):
        return "stem"
    return "vit"


class LossTrace:
    """An ``inspect`` hook recording the loss terms and their effects (see
    the module docstring). ``probes`` maps a name to ``(pixels, labels)``
    (preprocessed images and class indices); ``class_tokens`` are the class
    prompts' tokens. Rows land in :attr:`rows`, one per traced step."""

    def __init__(self, probes: dict[str, tuple[torch.Tensor, torch.Tensor]], class_tokens: torch.Tensor,
                 every: int = 4, tau: float = DEFAULT_TAU):
        self.probes, self.class_tokens, self.every, self.tau = probes, class_tokens, int(every), float(tau)
        self.rows: list[dict] = []

    def __call__(self, step: int, model, batch: dict, state: dict, loss: torch.Tensor) -> None:
        if step % self.every:
            return
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        blocks = [parameter_block(n) for n, _ in named]
        terms = state.get("terms") or {"loss": loss}
        row: dict = {"step": int(step), "loss": float(loss.detach()), "terms": {}, "probes": {}}
        term_grads = {}
        for name, term in terms.items():
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            term_grads[name] = grads
            row["terms"][name] = {"value": float(term.detach()), "grad_norm": _block_norms(grads, blocks)}
        row["grad_cosine"] = _pairwise_cosines(term_grads, blocks, "visual")
        was_training = model.training
        model.eval()  # as evaluation sees the model; running statistics stay as they are
        try:
            for pname, (pixels, labels) in self.probes.items():
                objective, acc = self._probe(model, pixels, labels)
                g_probe = torch.autograd.grad(objective, params, allow_unused=True)
                row["probes"][pname] = {
                    "log_prob": float(objective.detach()), "accuracy": acc,
                    "effect": {t: _block_dots(g_probe, g, blocks) for t, g in term_grads.items()},
                    "cosine": {t: _block_cosines(g_probe, g, blocks) for t, g in term_grads.items()}}
        finally:
            model.train(was_training)
        self.rows.append(row)

    def _probe(self, model, pixels, labels) -> tuple[torch.Tensor, float]:
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(self.class_tokens), dim=-1)
        logp = torch.log_softmax(image @ text.T / self.tau, dim=-1)
        acc = float((logp.argmax(1) == labels).float().mean())
        return logp.gather(1, labels[:, None]).mean(), acc


def _block_norms(grads, blocks) -> dict[str, float]:
    sq: dict[str, float] = {}
    for g, b in zip(grads, blocks):
        if g is not None:
            key = "text" if b in ("text", "logit_scale") else "visual"
            sq[key] = sq.get(key, 0.0) + float(g.pow(2).sum())
    return {k: v ** 0.5 for k, v in sq.items()}


def _block_dots(g_probe, g_term, blocks) -> dict[str, float]:
    """``−⟨∇probe, ∇term⟩`` per block and in all (first-order effect of a
    descent step on the term)."""
    out = {b: 0.0 for b in BLOCKS}
    for gp, gt, b in zip(g_probe, g_term, blocks):
        if gp is not None and gt is not None:
            out[b] -= float((gp * gt).sum())
    out = {b: v for b, v in out.items() if v != 0.0}
    out["visual"] = sum(v for b, v in out.items() if b not in ("text", "logit_scale"))
    out["all"] = out["visual"] + out.get("text", 0.0) + out.get("logit_scale", 0.0)
    return out


def _block_cosines(g_probe, g_term, blocks) -> dict[str, float]:
    """Cosine between ``∇probe`` and ``−∇term`` per block and over the image
    encoder: the direction of the effect, free of the gradients' scale (which
    AdamW's per-coordinate scaling discards)."""
    parts: dict[str, list] = {}
    for gp, gt, b in zip(g_probe, g_term, blocks):
        if gp is not None and gt is not None:
            parts.setdefault(b, []).append((gp.flatten(), gt.flatten()))
            if b not in ("text", "logit_scale"):
                parts.setdefault("visual", []).append((gp.flatten(), gt.flatten()))
    out = {}
    for b, pairs in parts.items():
        a, t = torch.cat([p for p, _ in pairs]), torch.cat([q for _, q in pairs])
        out[b] = float(F.cosine_similarity(a, -t, dim=0)) if a.norm() > 0 and t.norm() > 0 else 0.0
    return out


def _pairwise_cosines(term_grads: dict, blocks, part: str) -> dict[str, float]:
    flat = {}
    for name, grads in term_grads.items():
        pieces = [g.flatten() for g, b in zip(grads, blocks)
                  if g is not None and (b not in ("text", "logit_scale")) == (part == "visual")]
        if pieces:
            flat[name] = torch.cat(pieces)
    names = list(flat)
    return {f"{a}~{b}": float(F.cosine_similarity(flat[a], flat[b], dim=0))
            for i, a in enumerate(names) for b in names[i + 1:]}


COSINE_BLOCKS = ("visual", "stem", "layer1", "layer2", "layer3", "layer4", "attnpool", "text")


def summarise_trace(rows: Sequence[dict]) -> dict:
    """Over the traced steps: each term's mean value and mean gradient norm
    on the image encoder and the text tower; per probe, its accuracy at each
    traced step and the median first-order effect and cosine of each term
    (in all, image encoder, text tower; cosines also per block)."""
    if not rows:
        return {}
    terms = list(rows[0]["terms"])
    out: dict = {"steps": len(rows), "terms": {}, "probes": {}}
    for t in terms:
        out["terms"][t] = {
            "value": float(np.mean([r["terms"][t]["value"] for r in rows if t in r["terms"]])),
            "grad_norm_visual": float(np.mean([r["terms"][t]["grad_norm"].get("visual", 0.0)
                                               for r in rows if t in r["terms"]])),
            "grad_norm_text": float(np.mean([r["terms"][t]["grad_norm"].get("text", 0.0)
                                             for r in rows if t in r["terms"]]))}
    for p in rows[0]["probes"]:
        probe = [r["probes"][p] for r in rows]
        out["probes"][p] = {
            "accuracy": [x["accuracy"] for x in probe],
            "effect": {t: {k: float(np.median([x["effect"][t].get(k, 0.0) for x in probe if t in x["effect"]]))
                           for k in ("all", "visual", "text")} for t in terms},
            "cosine": {t: {k: float(np.median([x.get("cosine", {}).get(t, {}).get(k, 0.0) for x in probe]))
                           for k in COSINE_BLOCKS} for t in terms}}
    return out
