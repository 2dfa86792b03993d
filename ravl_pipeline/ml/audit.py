"""One audit, end to end: embed → score → discover (SPEC §1–2).

The library steps composed in the order every entry point uses them (the
command line, the Dagster assets, the benchmarks), so they cannot drift.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import discover as disc
from .causal import lead_finding
from .embed import DEFAULT_TEMPLATES, Embeddings, class_text_embeddings, embed_dataset, model_tau, zero_shot_probs
from .evaluate import feature_presence, validity
from .models import LoadedModel
from .regions import region_labels_for


@dataclass
class Scores:
    classes: list[str]
    image_probs: np.ndarray  # [N, C]
    region_probs: np.ndarray  # [M, C]

    @property
    def image_pred(self) -> np.ndarray:
        return self.image_probs.argmax(axis=1)


def dataset_templates(root: str | Path) -> list[str]:
    """Prompt templates configured for a dataset: ``setting.json``'s
    ``caption_template`` beside or above it (synthetic settings), else the
    generic default."""
    root = Path(root)
    for candidate in (root / "setting.json", root.parent / "setting.json"):
        if candidate.is_file():
            template = json.loads(candidate.read_text()).get("caption_template")
            if template:
                return [template]
    return list(DEFAULT_TEMPLATES)


def dataset_setting(root: str | Path) -> dict | None:
    root = Path(root)
    for candidate in (root / "setting.json", root.parent / "setting.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def score(lm: LoadedModel, emb: Embeddings, classes: Sequence[str], templates: Sequence[str],
          tau: float | None = None) -> Scores:
    text = class_text_embeddings(lm, classes, templates).cpu().numpy()
    tau = model_tau(lm) if tau is None else tau
    return Scores(list(classes), zero_shot_probs(emb.image_emb, text, tau),
                  zero_shot_probs(emb.region_emb, text, tau))


def label_indices(ds, classes: Sequence[str]) -> np.ndarray:
    index = {c: k for k, c in enumerate(classes)}
    return np.array([index[y] for y in ds.labels], dtype=np.int64)


def run_discovery(lm: LoadedModel, ds, classes: Sequence[str], *, templates: Sequence[str],
                  proposer: str = "quadrants", mode: str = "auto", tau: float | None = None,
                  seed: int = 0, batch_size: int = 64, progress: bool = True,
                  embeddings: Embeddings | None = None, top_regions: int | None = 50,
                  max_regions: int = 20000, dataset_name: str | None = None,
                  evidence: bool = False, permutations: int = 2000, alpha: float = 0.05,
                  mask_fill: str = "mean", vocab: Sequence[str] | None = None,
                  influence_threshold: float = 0.25, k_range=None,
                  cluster_workers: int = 1) -> tuple[dict, Embeddings, Scores]:
    """Embed, score and discover (SPEC §1–2).  With ``evidence``, every
    feature also gets permutation/BH significance (``p_value``, ``q_value``,
    ``called``, per-class ``ci``), a masking check (``causal``) and
    model-derived ``names``; see :func:`add_evidence`."""
    emb = embeddings if embeddings is not None else embed_dataset(
        lm, ds, proposer=proposer, mode=mode, batch_size=batch_size, progress=progress)
    sc = score(lm, emb, classes, templates, tau)
    labels = label_indices(ds, classes)
    gt = region_labels_for(ds, proposer)
    flat_gt = [lab for labs in gt for lab in labs] if gt is not None else None
    # clustered here (not inside discover) because the evidence needs every
    # region's cluster, which the findings list only in part
    clustering = disc.cluster_regions(emb.region_emb, len(classes), seed=seed, k_range=k_range,
                                      max_regions=max_regions, workers=cluster_workers)
    findings = disc.discover(
        emb.region_emb, emb.region_image, emb.region_index, sc.region_probs, labels, sc.image_pred,
        list(classes), boxes=emb.boxes, image_ids=emb.image_ids, region_labels=flat_gt, seed=seed,
        influence_threshold=influence_threshold, k_range=k_range,
        top_regions=top_regions, max_regions=max_regions, model=lm.name,
        dataset=dataset_name or str(ds.root), clustering=clustering)
    findings["embedding_mode"] = emb.mode
    findings["proposer"] = emb.proposer
    findings["templates"] = list(templates)
    findings["image_accuracy"] = float((sc.image_pred == labels).mean())
    # Stage 2 assigns training regions to these medoids (SPEC §3.1); storing
    # the vectors keeps findings.json self-contained, since `medoids` are only
    # row numbers into embeddings that are not kept.
    findings["medoid_embeddings"] = [[float(v) for v in emb.region_emb[m]] for m in findings["medoids"]]
    if evidence:
        add_evidence(findings, lm, ds, emb, sc, labels, clustering.labels, templates=templates,
                     tau=model_tau(lm) if tau is None else tau, seed=seed, permutations=permutations,
                     alpha=alpha, mask_fill=mask_fill, vocab=vocab, batch_size=batch_size)
    return findings, emb, sc


def add_evidence(findings: dict, lm: LoadedModel, ds, emb: Embeddings, sc: Scores, labels: np.ndarray,
                 cluster_labels: np.ndarray, *, templates: Sequence[str], tau: float, seed: int = 0,
                 permutations: int = 2000, alpha: float = 0.05, mask_fill: str = "mean",
                 vocab: Sequence[str] | None = None, batch_size: int = 64) -> dict:
    """Significance, causal masking check and names for every feature, in place."""
    from . import causal, names, stats

    stats.annotate_significance(findings, cluster_labels, emb.region_image, labels, sc.image_pred,
                                n_permutations=permutations, alpha=alpha, seed=seed)
    causal.annotate_causal(findings, lm, ds, cluster_labels, emb.region_image, emb.boxes, labels,
                           sc.image_pred, sc.classes, templates, tau, fill=mask_fill, seed=seed,
                           alpha=alpha, batch_size=batch_size)
    names.annotate_names(findings, lm, emb.region_emb, vocab)
    return findings


def ground_truth_summary(findings: dict, ds, emb: Embeddings, scores: Scores, classes: Sequence[str],
                         induced: Sequence[tuple[str, str]], k: int = 10) -> dict:
    """Precision@k and validity for each induced (feature label, class) pair
    of a synthetic setting (SPEC §4.1–4.2)."""
    gt = region_labels_for(ds, emb.proposer)
    if gt is None:
        return {}
    lookup = disc.region_label_map(emb.image_ids, emb.region_image, emb.region_index,
                                   [lab for labs in gt for lab in labs])
    top = findings["features"][0] if findings["features"] else None
    lead = lead_finding(findings) if "lead_rank" in findings else None
    labels = label_indices(ds, classes)
    out = {}
    for feature, cls in induced:
        presence = feature_presence(gt, feature)
        best = max((disc.precision_at_k(f, lookup, feature, k) for f in findings["features"]), default=0.0)
        out[feature] = {
            "correlated_class": cls,
            f"precision_at_{k}_top": disc.precision_at_k(top, lookup, feature, k),
            f"precision_at_{k}_best": best,
            **({f"precision_at_{k}_lead": disc.precision_at_k(lead, lookup, feature, k)}
               if "lead_rank" in findings else {}),
            "top_attribute": top["attribute"] if top else None,
            "validity": validity(labels, scores.image_pred, presence, classes, cls),
        }
    return out
