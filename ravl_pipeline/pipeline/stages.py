"""The method's steps composed in memory (SPEC §1–4).

* **Stage 1** (SPEC §1–2): :func:`embed` → :func:`score` → :func:`cluster`
  → :func:`find` (ranking, evidence, ground truth); :func:`stage1` runs
  them in order.
* **Stage 2** (SPEC §3): :func:`train` fine-tunes with any registered
  method, in one process or data-parallel under ``torchrun``.
* **Evaluation** (SPEC §4.2): :func:`evaluate` gives ``metrics.json``.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch.distributed as torch_dist

from ..compute import CPU, Compute
from ..config import (DEFAULT_FEATURE_SELECTION, DEFAULT_TEMPLATES, DiscoveryConfig, EvaluationConfig, LabelsConfig,
                     InputError, RegionsConfig, ScoresConfig, TrainConfig, check_bounds)
from ..core.cluster import Clustering, cluster_regions
from ..core.embed import Embeddings, embed_dataset
from ..core.evidence import causal, names, stats
from ..core.findings import Findings
from ..core.metrics import (PRECISION_K, Groups, core_regions, feature_presence, mitigation_metrics,
                           paired_differences, precision_at_k, region_label_map, validity)
from ..core.rank import rank_features
from ..core.regions import region_labels_for
from ..core.scores import Scores, check_classes, check_prompts, check_templates, label_indices
from ..core.scores import score as score_regions
from ..io.dataset import Dataset, dataset_setting, induced_pairs, load_dataset, setting_templates
from ..io.files import write_json_atomic
from ..io.hashing import file_sha256, json_sha256, memo_file_sha256
from ..models import LoadedModel, check_same_architecture, load_model, save_model, untrained
from ..mitigate import distributed
from ..mitigate.assign import (assign_spurious_regions, cached_assignment, check_stage2_findings, model_fingerprint,
                               select_features)
from ..mitigate.data import MitigationError, build_train_data
from ..mitigate.methods import attach_attribute_tokens, attach_class_tokens, attach_region_extras, get_method
from ..mitigate.train import finetune

RESUME_SUFFIX = ".resume.pt"  # beside a Stage 2 checkpoint while its run is unfinished

__all__ = ["Stage1Result", "classes_for", "templates_for", "embed", "score", "cluster", "find", "stage1",
           "ground_truth", "train", "Predictions", "evaluate", "evaluate_models", "predict", "groups_for",
           "discovered_groups", "findings_label"]


# --------------------------------------------------------------------------- Stage 1

@dataclass
class Stage1Result:
    findings: Findings
    embeddings: Embeddings
    scores: Scores
    clustering: Clustering


def classes_for(ds: Dataset, labels: LabelsConfig = LabelsConfig()) -> list[str]:
    """The configured classes, else the labels present in the data (sorted)."""
    return list(labels.classes or ds.classes())


def templates_for(dataset_dir, scores: ScoresConfig = ScoresConfig(),
                  recorded: Mapping[str, Any] | None = None) -> list[str]:
    """An audit's prompt templates, resolved once and used by every step
    that scores text: configured (``scores.templates``, ``--template``),
    else the caption template the audited checkpoint records it was
    fine-tuned with (``recorded``: its ``ravl_model.json`` ``train``), else
    the dataset's ``setting.json`` caption template (synthetic settings),
    else the generic default. Zero-shot accuracy depends on the prompt."""
    caption = (recorded or {}).get("caption_template") if isinstance(recorded, Mapping) else None
    return list(scores.templates or ([caption] if isinstance(caption, str) and caption else None)
                or setting_templates(dataset_dir) or DEFAULT_TEMPLATES)


def embed(lm: LoadedModel, ds: Dataset, regions: RegionsConfig = RegionsConfig(), *, cache=None,
          progress: bool = False) -> Embeddings:
    """Region proposals and their embeddings, one backbone pass per image (SPEC §1.1–1.2)."""
    return embed_dataset(lm, ds, proposer=regions.proposer, mode=regions.mode, batch_size=regions.batch_size,
                         progress=progress, cache=cache)


def score(lm: LoadedModel, emb: Embeddings, classes: Sequence[str], templates: Sequence[str],
          scores: ScoresConfig = ScoresConfig()) -> Scores:
    """Zero-shot class probabilities of every image and region (SPEC §1.3–1.4)."""
    return score_regions(lm, emb, classes, templates, scores.tau)


def cluster(emb: Embeddings, n_classes: int, discovery: DiscoveryConfig = DiscoveryConfig()) -> Clustering:
    """K-medoids over the region embeddings, K by silhouette (SPEC §2.1)."""
    return cluster_regions(emb.region_emb, n_classes, seed=discovery.seed, k_range=discovery.k_range,
                           max_regions=discovery.max_regions, workers=discovery.cluster_workers)


def find(lm: LoadedModel, ds: Dataset, emb: Embeddings, sc: Scores, clustering: Clustering,
         discovery: DiscoveryConfig = DiscoveryConfig(), *, dataset_name: str | None = None,
         vocab: Sequence[str] | None = None, batch_size: int = RegionsConfig.batch_size) -> Findings:
    """Rank the spurious features (SPEC §2.2–2.6), add their evidence when
    ``discovery.evidence``, and, on a synthetic setting, the ground truth."""
    classes = sc.classes
    labels = label_indices(ds, classes)
    gt = region_labels_for(ds, emb.proposer)
    findings = rank_features(
        clustering, emb.region_emb, emb.region_image, emb.region_index, sc.region_probs, labels, sc.image_pred,
        classes, boxes=emb.boxes, image_ids=emb.image_ids,
        region_labels=None if gt is None else [lab for labs in gt for lab in labs],
        influence_threshold=discovery.influence_threshold, top_regions=discovery.top_regions, model=lm.name,
        dataset=dataset_name or str(ds.root))
    findings.embedding_mode, findings.proposer = emb.mode, emb.proposer
    findings.pretrained = lm.pretrained
    findings.templates = list(sc.templates)
    findings.image_accuracy = float((sc.image_pred == labels).mean())
    findings.compute = lm.compute.record()
    if discovery.evidence:
        add_evidence(findings, lm, ds, emb, sc, clustering.labels, discovery, vocab=vocab, batch_size=batch_size)
    return findings


def add_evidence(findings: Findings, lm: LoadedModel, ds: Dataset, emb: Embeddings, sc: Scores,
                 cluster_labels: np.ndarray, discovery: DiscoveryConfig = DiscoveryConfig(), *,
                 vocab: Sequence[str] | None = None, batch_size: int = RegionsConfig.batch_size) -> Findings:
    """Significance (permutation p, BH q, ``called``, per-class intervals),
    the masking check with its verdict and the lead finding, and
    model-derived names, for every feature (SPEC §5 evidence keys)."""
    labels = label_indices(ds, sc.classes)
    sig = stats.significance(findings, cluster_labels, emb.region_image, labels, sc.image_pred,
                             n_permutations=discovery.permutations, alpha=discovery.alpha, seed=discovery.seed)
    for summary in findings.clusters or []:
        cid = int(summary["cluster_id"])
        summary["p_value"], summary["q_value"] = sig.p_values[cid], sig.q_values[cid]
    for feat in findings.features:
        feat.p_value, feat.q_value = sig.p_values[feat.cluster_id], sig.q_values[feat.cluster_id]
        feat.called = sig.called(feat.cluster_id)
        for row, ci in zip(feat.per_class, sig.intervals[feat.cluster_id]):
            row["ci"] = ci
    findings.significance = sig.summary
    check = causal.check_features(findings, lm, ds, cluster_labels, emb.region_image, emb.boxes, labels,
                                  sc.image_pred, sc.classes, sc.templates, sc.tau, fill=discovery.mask_fill,
                                  seed=discovery.seed, alpha=discovery.alpha, batch_size=batch_size,
                                  mask_control=discovery.mask_control)
    for feat in findings.features:
        if feat.cluster_id in check.effects:
            feat.causal = check.effects[feat.cluster_id]
            feat.causal_control = check.controls.get(feat.cluster_id)
    findings.causal = check.summary
    lead = findings.lead()
    findings.lead_rank = None if lead is None else int(lead.rank)
    named = names.name_features(findings.features, lm, emb.region_emb, vocab)
    for feat in findings.features:
        feat.names = named[feat.cluster_id]
    return findings


def ground_truth(findings: Findings, ds: Dataset, emb: Embeddings, sc: Scores,
                 induced: Sequence[tuple[str, str]], k: int = PRECISION_K) -> dict:
    """Precision@k and validity of each induced (feature, class) pair of a
    synthetic setting (SPEC §4.1–4.2); {} without region ground truth."""
    gt = region_labels_for(ds, emb.proposer)
    if gt is None:
        return {}
    lookup = region_label_map(emb.image_ids, emb.region_image, emb.region_index,
                              [lab for labs in gt for lab in labs])
    top = findings.features[0] if findings.features else None
    lead = findings.lead() if findings.causal is not None else None
    labels = label_indices(ds, sc.classes)
    # rows whose region_labels are null: presence unknown, left out of validity (not counted as "absent")
    known = ds.region_labels_known if ds.region_labels_known is not None else np.ones(len(ds), bool)
    out = {}
    for feature, cls in induced:
        presence = feature_presence(gt, feature)
        best = max((precision_at_k(f, lookup, feature, k) for f in findings.features), default=0.0)
        out[feature] = {
            "correlated_class": cls,
            f"precision_at_{k}_top": precision_at_k(top, lookup, feature, k),
            f"precision_at_{k}_best": best,
            **({f"precision_at_{k}_lead": precision_at_k(lead, lookup, feature, k)}
               if findings.causal is not None else {}),
            "top_attribute": top.attribute if top else None,
            "validity": validity(labels[known], sc.image_pred[known], presence[known], sc.classes, cls),
        }
    return out


def stage1(lm: LoadedModel, ds: Dataset, classes: Sequence[str], *, templates: Sequence[str],
           regions: RegionsConfig = RegionsConfig(), scores: ScoresConfig = ScoresConfig(),
           discovery: DiscoveryConfig = DiscoveryConfig(), embeddings: Embeddings | None = None, cache=None,
           dataset_name: str | None = None, vocab: Sequence[str] | None = None,
           progress: bool = False) -> Stage1Result:
    """Stage 1 in memory: embed, score, cluster, find (SPEC §1–2), with the
    ground truth of a synthetic setting. Parameters and templates are
    checked before any work."""
    for section in (regions, scores, discovery):
        check_bounds(section, type(section).__name__)
    templates = check_templates(templates)
    check_classes(classes, f"{ds.manifest_file}: the classes")
    check_prompts(lm, classes, templates)
    emb = embeddings if embeddings is not None else embed(lm, ds, regions, cache=cache, progress=progress)
    sc = score(lm, emb, classes, templates, scores)
    clustering = cluster(emb, len(classes), discovery)
    findings = find(lm, ds, emb, sc, clustering, discovery, dataset_name=dataset_name, vocab=vocab,
                    batch_size=regions.batch_size)
    induced = induced_pairs(ds.root)
    if induced:
        findings.ground_truth = ground_truth(findings, ds, emb, sc, induced)
    return Stage1Result(findings, emb, sc, clustering)


# --------------------------------------------------------------------------- Stage 2

def train(base_model: str, train_dir, out_dir, cfg: TrainConfig, *, pretrained: str | None = None,
          split: str | None = None, findings: Findings | None = None, findings_path=None,
          audited_model: str | None = None, audited_pretrained: str | None = None,
          features: str | int = DEFAULT_FEATURE_SELECTION, attribute_text: Sequence[str] | None = None,
          assignment=None, cache_dir=None, extra_meta: dict | None = None, record_indices: bool = False,
          inspect=None, progress: bool = False, compute: Compute = CPU, checkpoint_every: int | None = None,
          inherited_transform: bool = False) -> dict:
    """Fine-tune ``base_model`` on ``train_dir`` with the registered method
    ``cfg.method`` and write the checkpoint at ``out_dir`` (SPEC §3.2, §3.6).

    Methods that need findings assign the spurious regions of every
    training image with the ``audited_model`` whose medoids the findings
    hold (default: the findings' ``model``; SPEC §3.1); the findings are
    checked first (:func:`check_stage2_findings`, errors naming
    ``findings_path``), and the assignment is cached in ``cache_dir`` when
    one is given. ``assignment`` (a :class:`mitigate.assign.RegionAssignment`
    of ``train_dir``) replaces the assignment by the audited model, e.g. the
    ground truth in a benchmark. Methods that need the spurious attribute in
    words (Spurious-Aware) read ``attribute_text``, else the top
    model-derived name of each chosen finding. Under ``torchrun``
    the loop is data-parallel and rank 0 alone writes (``record_indices``
    keeps which samples each process saw, in the history; ``inspect`` is
    :func:`mitigate.train.finetune`'s diagnostics hook, one process only). The checkpoint's
    ``ravl_model.json`` records the configuration, the findings used
    (content and sha256) and the history. Models run on ``compute`` (under
    torchrun, ``cuda`` is each process's own GPU). With ``checkpoint_every``
    (one process), the run's state is saved to ``<out_dir>.resume.pt`` that
    often, and the same call after an interruption resumes from it; the file
    is removed once the checkpoint is written. ``inherited_transform``: the
    configuration's ``train_transform`` came from the audited model's record,
    not from the user, so a method with a region pass falls back to the
    evaluation transform (saying so) instead of refusing. Returns the history.
    """
    method = get_method(cfg.method)
    world = distributed.world_from_env()
    if cfg.train_transform != "none" and method.region_pass:
        if not inherited_transform:
            raise MitigationError(f"train_transform {cfg.train_transform!r} moves pixels under the boxes that "
                                  f"method {method.name!r} embeds; use train_transform none "
                                  "(mitigation.train_transform, --train-transform) for it")
        print(f"note: method {method.name!r} trains on the evaluation transform: the audited model's recorded "
              f"train_transform {cfg.train_transform!r} would move pixels under the boxes it embeds",
              file=sys.stderr)
        cfg = dataclasses.replace(cfg, train_transform="none")
    if checkpoint_every and world.world_size > 1:
        raise MitigationError("--checkpoint-every: resuming is for one process; under torchrun leave it out")
    if method.needs_findings and findings is None:
        raise MitigationError(f"method {method.name!r} needs Stage-1 findings (--findings findings.json)")
    if world.world_size > 1 and findings is not None:
        raise MitigationError("--findings: Stage-2 methods cannot run under torchrun yet; run one process")
    where = str(findings_path) if findings_path else "findings"
    if findings is not None:
        check_stage2_findings(findings, where)
    chosen = (select_features(findings, features)
              if findings is not None and (method.needs_findings or method.needs_attribute_text) else [])
    attributes = list(attribute_text or [])
    if method.needs_attribute_text and not attributes:
        attributes = _feature_names(chosen)
    if method.needs_attribute_text and not attributes:
        raise MitigationError(f"method {method.name!r} needs the spurious attribute in words: pass attribute_text "
                              "(--attribute-text) or findings whose features carry model-derived names")
    ds = load_dataset(train_dir, split=split, require_labels=method.needs_labels)
    classes = list(findings.classes) if findings is not None else (ds.classes() or None)
    if ds.labels is not None and classes:
        _check_labels(ds, classes, where if findings is not None else None)
    if world.world_size > 1:
        compute = Compute(distributed.process_device(world, compute.device), compute.precision, compute.workers)
    base = load_model(base_model, pretrained, compute=compute, seed=cfg.seed)
    audited = None
    if method.needs_findings and assignment is None:  # the audited model assigns the spurious regions
        if not audited_model:  # the model the findings came from, with the weights it was loaded with
            audited_model, audited_pretrained = findings.model, audited_pretrained or findings.pretrained
        if not audited_model:
            raise MitigationError(f"{where}: names no audited model ('model'); pass --audited-model, the model "
                                  "the findings came from")
        audited = load_model(audited_model, audited_pretrained, compute=compute)
        check_same_architecture(audited, base)
        check_stage2_findings(findings, where, embed_dim=int(audited.model_cfg["embed_dim"]))
    data = build_train_data(base, ds, cfg.caption_template, classes=classes, train_transform=cfg.train_transform,
                            seed=cfg.seed)
    if method.needs_labels:
        attach_class_tokens(data, base, cfg.caption_template)
    if method.needs_attribute_text:
        attach_attribute_tokens(data, base, attributes)
    spurious, warnings = None, []
    if method.needs_findings:
        if audited is not None:
            assignment = (cached_assignment(audited, ds, findings, cache_dir, features, progress)
                          if cache_dir is not None
                          else assign_spurious_regions(audited, ds, findings, features, progress=progress))
        cluster_class = {f.cluster_id: data.classes.index(f.attribute) for f in chosen
                         if data.classes and f.attribute in data.classes}
        unpushed = [f.rank for f in chosen if f.cluster_id not in cluster_class]
        if method.region_pass and cfg.region_loss == "correlated" and unpushed:
            warnings.append(f"{where}: feature rank(s) {', '.join(map(str, unpushed))} name no training class as "
                            "'attribute', so region_loss 'correlated' pushes their regions from no class text (they "
                            "are only kept out of the relevant regions); region_loss 'spec' pushes them from every "
                            "class text")
        attach_region_extras(data, base, ds, assignment, region_pass=method.region_pass, cluster_class=cluster_class)
        spurious = {"n_regions": int(len(assignment.spurious)), "n_spurious": int(assignment.spurious.sum()),
                    "groups": _group_sizes(data.extras["groups"], data.classes)}
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    resume = None
    if checkpoint_every and world.world_size == 1:
        resume = Path(out_dir).with_name(Path(out_dir).name + RESUME_SUFFIX)
    if world.world_size > 1:
        distributed.init_process_group(world, compute.device)
        try:
            history = distributed.finetune_distributed(base, data, cfg, world, progress=progress and world.is_main,
                                                       record_indices=record_indices)
        finally:
            if torch_dist.is_initialized():
                torch_dist.destroy_process_group()
    else:
        fingerprint = json_sha256({"config": cfg.to_dict(), "base_model": model_fingerprint(base_model, pretrained),
                                   "data": memo_file_sha256(ds.manifest_file), "split": split,
                                   "image_ids": ds.image_ids, "findings": _findings_sha(findings),
                                   "features": str(features), "attributes": attributes,
                                   "assignment": _assignment_sha(assignment), "compute": compute.record()})
        history = finetune(base, data, cfg, progress=progress, inspect=inspect, resume=resume,
                           checkpoint_every=checkpoint_every, fingerprint=fingerprint)
    if world.is_main:
        meta = {"base_model": base_model, "pretrained": pretrained, "train_data": str(Path(train_dir).resolve()),
                "split": split, "method": cfg.method, "train": cfg.to_dict(), "world_size": world.world_size,
                "audited_model": audited_model if method.needs_findings else None,
                "findings": _findings_record(findings, findings_path, chosen, features) if findings else None,
                "spurious_regions": spurious,
                "attribute_text": attributes if method.needs_attribute_text else None,
                **({"warnings": warnings} if warnings else {}),
                "history": {k: v for k, v in history.items() if k not in ("config", "rank_indices")},
                **({"compute": compute.record()} if compute.record() else {}),
                **(extra_meta or {})}
        save_model(base, out_dir, meta)
        if resume is not None:
            resume.unlink(missing_ok=True)
    return history


def _findings_sha(findings: Findings | None) -> str | None:
    return None if findings is None else json_sha256(findings.to_dict())


def _assignment_sha(assignment) -> str | None:
    """A content hash of a spurious-region assignment (None when there is none)."""
    if assignment is None:
        return None
    return json_sha256({"image_ids": list(assignment.image_ids), "cluster": assignment.cluster.tolist(),
                        "spurious": assignment.spurious.tolist(), "boxes": assignment.boxes.tolist()})


def _feature_names(chosen) -> list[str]:
    """The top model-derived name of each chosen finding (SPEC §5 ``names``)."""
    terms = [((f.names or {}).get("terms") or [{}])[0].get("term") for f in chosen]
    return list(dict.fromkeys(t for t in terms if t))


def _check_labels(ds: Dataset, classes: Sequence[str], findings_where: str | None = None) -> None:
    known = set(classes)
    source = f"the classes of {findings_where}" if findings_where else "the classes"
    for i, y in enumerate(ds.labels):
        if y not in known:
            raise MitigationError(f"{ds.manifest_file}: row {i} (image_id {ds.image_ids[i]!r}), column 'label': "
                                  f"{y!r} is not among {source} {list(classes)}")


def _group_sizes(groups, classes: Sequence[str]) -> list[dict]:
    counts = np.bincount(np.asarray(groups), minlength=2 * len(classes)).tolist()
    return [{"label": c, "feature_present": bool(p), "n": counts[2 * k + p]}
            for k, c in enumerate(classes) for p in (0, 1)]


def _findings_record(findings: Findings, path, chosen, which) -> dict[str, Any]:
    content = findings.to_dict()
    return {"path": str(Path(path).resolve()) if path else None,
            "file_sha256": file_sha256(path) if path and Path(path).is_file() else None,
            "sha256": json_sha256(content), "selection": str(which),
            "features_used": [{"rank": f.rank, "cluster_id": f.cluster_id, "attribute": f.attribute}
                              for f in chosen],
            "content": content}


# --------------------------------------------------------------------------- evaluation

@dataclass
class Predictions:
    """One model's zero-shot predictions on an evaluation split: every
    image, and every core region where the manifest annotates regions."""

    image_pred: np.ndarray
    core_image: np.ndarray | None
    core_pred: np.ndarray | None
    notes: list[str]


def _load_split(data_dir, split, classes):
    split = None if split in (None, "all") else split
    ds = load_dataset(data_dir, classes=classes, split=split, require_labels=True)
    setting = dataset_setting(data_dir) or {}
    classes = list(classes or setting.get("classes") or ds.classes())
    check_classes(classes, f"{ds.manifest_file}: the classes")
    return split, ds, classes


def evaluate(model: str, data_dir, split: str | None = "test", features: Sequence[str] | None = None,
             templates: Sequence[str] | None = None, *, pretrained: str | None = None,
             classes: Sequence[str] | None = None, min_group_size: int = EvaluationConfig.min_group_size,
             batch_size: int = RegionsConfig.batch_size, progress: bool = False, compute: Compute = CPU,
             discovered: Groups | None = None, groups: Groups | None = None) -> dict:
    """``metrics.json`` of a model on a dataset split (SPEC §4.2, §5).

    Groups (:func:`groups_for`) are (class, any of ``features`` present),
    ``features`` defaulting to the setting's induced features; without an
    annotation of them, the ``discovered`` groups (:func:`discovered_groups`)
    when given, else the classes, with a warning. Region metrics use the
    core regions of the manifest's annotated boxes; without annotations
    they are ``None`` and the result is marked ``partial`` with a warning.
    ``groups`` imposes the groups whatever the data annotates (a benchmark
    comparing discovered with annotated groups).
    """
    return evaluate_models({"model": (model, pretrained)}, data_dir, split, features, templates, classes=classes,
                           min_group_size=min_group_size, batch_size=batch_size, progress=progress, compute=compute,
                           discovered=discovered, groups=groups)["model"]


def evaluate_models(models: dict[str, tuple[str, str | None]], data_dir, split: str | None = "test",
                    features: Sequence[str] | None = None, templates: Sequence[str] | None = None, *,
                    classes: Sequence[str] | None = None, min_group_size: int = EvaluationConfig.min_group_size,
                    batch_size: int = RegionsConfig.batch_size, progress: bool = False, compute: Compute = CPU,
                    discovered: Groups | None = None, pairs: Sequence[tuple[str, str]] = (),
                    groups: Groups | None = None) -> dict:
    """:func:`evaluate` of several models (name → ``(model, pretrained)``) on
    the same split and groups; with ``pairs``, also ``"comparisons"``: the
    paired bootstrap differences of :func:`core.metrics.paired_differences`."""
    split, ds, classes = _load_split(data_dir, split, classes)
    if features:
        check_features(ds, features)
    groups = groups or groups_for(ds, data_dir, features, discovered)
    labels = label_indices(ds, classes)
    out, preds = {}, {}
    for name, (model, pretrained) in models.items():
        lm = load_model(model, pretrained, compute=compute,
                        seed=0 if untrained(model, pretrained) else None)  # the same each run
        # one prompt for every model: given, else resolved from the first model's record
        templates = check_templates(list(templates or templates_for(data_dir, recorded=lm.meta.get("train"))))
        p = preds[name] = predict(lm, ds, classes, templates, batch_size, progress)
        metrics = mitigation_metrics(labels, p.image_pred, classes, groups.presence, p.core_image, p.core_pred,
                                     min_group_size, known=groups.known)
        metrics["warnings"] = p.notes + groups.notes + metrics["warnings"]
        metrics.update({"model": lm.name, "dataset": str(ds.root), "split": split, "classes": classes,
                        "features": [f["feature"] for f in groups.features], "templates": templates,
                        "tau": ScoresConfig.tau, "groups_from": groups.source,
                        "by_feature": groups.effects(labels, p.image_pred, classes)})
        if compute.record() is not None:
            metrics["compute"] = compute.record()
        out[name] = metrics
    if pairs:
        first = next(iter(preds.values()))
        out["comparisons"] = paired_differences(
            labels, {k: v.image_pred for k, v in preds.items()}, classes, pairs, groups.presence,
            first.core_image, {k: v.core_pred for k, v in preds.items()} if first.core_image is not None else None,
            min_group_size, known=groups.known)
    return out


def predict(lm: LoadedModel, ds: Dataset, classes: Sequence[str], templates: Sequence[str],
            batch_size: int = RegionsConfig.batch_size, progress: bool = False) -> Predictions:
    """Image predictions for every row; core-region predictions where the
    manifest annotates regions (``None`` when no row does)."""
    def run(subset, proposer):
        emb = embed_dataset(lm, subset, proposer=proposer, batch_size=batch_size, progress=progress)
        return emb, score_regions(lm, emb, classes, templates)

    annotated = _annotated_rows(ds)
    if len(annotated) == len(ds) and len(ds):
        emb, sc = run(ds, "boxes")
        core_image, core_idx = core_regions(ds.region_labels, ds.labels)
        return Predictions(sc.image_pred, core_image, _region_pred(emb, sc, core_image, core_idx), [])
    image_pred = run(ds, RegionsConfig.proposer)[1].image_pred
    if not annotated:
        return Predictions(image_pred, None, None, [f"{ds.manifest_file}: no region annotations (boxes + "
                                                    "region_labels); region metrics are null"])
    sub = ds.subset(np.asarray(annotated))
    emb, sc = run(sub, "boxes")
    core_sub, core_idx = core_regions(sub.region_labels, sub.labels)
    note = (f"{ds.manifest_file}: {len(ds) - len(annotated)} of {len(ds)} rows have no region annotations; "
            "region metrics use the annotated rows only")
    return Predictions(image_pred, np.asarray(annotated, np.int64)[core_sub],
                       _region_pred(emb, sc, core_sub, core_idx), [note])


def _annotated_rows(ds) -> list[int]:
    if ds.boxes is None or ds.region_labels is None:
        return []
    return [i for i, (b, labs) in enumerate(zip(ds.boxes, ds.region_labels)) if len(b) and len(labs) == len(b)]


def _region_pred(emb, sc, core_image: np.ndarray, core_idx: np.ndarray) -> np.ndarray:
    row_of = {(int(i), int(j)): r for r, (i, j) in enumerate(zip(emb.region_image, emb.region_index))}
    rows = np.asarray([row_of[(int(i), int(j))] for i, j in zip(core_image, core_idx)], dtype=np.int64)
    return sc.region_probs.argmax(axis=1)[rows] if len(rows) else np.zeros(0, np.int64)


def groups_for(ds: Dataset, data_dir, features: Sequence[str] | None = None,
               discovered: Groups | None = None) -> Groups:
    """The evaluation's groups (SPEC §4.2, §5 ``groups_from``): the data's
    annotation of ``features`` (default: the setting's induced features)
    when its rows carry region labels (it wins); else the ``discovered``
    groups when given; else the classes. Every fallback says so."""
    induced = dict(induced_pairs(data_dir))
    names = list(features) if features else list(induced)
    if names and ds.region_labels is not None:
        known = ds.region_labels_known
        each = {name: feature_presence(ds.region_labels, name) for name in names}
        present = np.logical_or.reduce(list(each.values()))
        notes = []
        if not known.all():
            notes.append(f"{ds.manifest_file}: {int((~known).sum())} of {len(ds)} rows have null region_labels: "
                         f"whether {names} is present there is unknown, so they are in no feature group "
                         "(counted in the overall metrics only)")
        return Groups("annotation", present, None if known.all() else known,
                      [{"feature": n, "class": induced.get(n)} for n in names], notes, each=each)
    if names:
        why = f"{ds.manifest_file}: no region_labels to tell whether {names} is present"
    else:
        why = "no feature named (--feature) and no setting.json with induced features"
    if discovered is not None:
        return dataclasses.replace(discovered, notes=[*discovered.notes, f"{why}: groups from the findings"])
    return Groups("class", features=[{"feature": n, "class": induced.get(n)} for n in names],
                  notes=[f"{why}: groups are classes only"])


def discovered_groups(audited: LoadedModel, ds: Dataset, findings: Findings,
                      selection: str | int = DEFAULT_FEATURE_SELECTION, *, cache_dir=None,
                      progress: bool = False) -> Groups:
    """Groups of ``ds`` from the findings (SPEC §5 ``groups_from:
    findings``): an image has a mitigated finding's feature when one of its
    regions is nearest that finding's medoid under the ``audited`` model,
    the way Stage 2 assigns spurious regions (SPEC §3.1). The findings
    ``selection`` chooses (MitigationError when none) that are tied to the
    same class form one presence column, as Stage 2's groups join them: one
    feature often spans several clusters (BENCHMARKS.md §Mitigation)."""
    chosen = select_features(findings, selection)
    assignment = (cached_assignment(audited, ds, findings, cache_dir, selection, progress) if cache_dir is not None
                  else assign_spurious_regions(audited, ds, findings, selection, progress=progress))
    by_class: dict[str | None, list] = {}
    for f in chosen:
        by_class.setdefault(f.attribute, []).append(f)
    presence, features = {}, []
    for cls, feats in by_class.items():
        col = np.zeros(len(ds), dtype=bool)
        col[assignment.region_image[np.isin(assignment.cluster, [f.cluster_id for f in feats])]] = True
        label = findings_label(feats)
        presence[label] = col
        features.append({"feature": label, "class": cls, "ranks": [int(f.rank) for f in feats],
                         "cluster_ids": [int(f.cluster_id) for f in feats]})
    return Groups("findings", presence, None, features)


def findings_label(feats: Sequence) -> str:
    """How findings that form one group are named in metrics and reports:
    their ranks and, where the findings carry them, their top model-derived
    names (``finding 2 (red square)``, ``findings 2, 4``)."""
    ranks = ", ".join(str(f.rank) for f in feats)
    names = _feature_names(feats)
    return f"finding{'s' if len(feats) > 1 else ''} {ranks}" + (f" ({' / '.join(names)})" if names else "")


def check_features(ds: Dataset, features: Sequence[str]) -> None:
    """Every feature named for the groups labels some region of ``ds``; one
    :class:`InputError` naming those that label none, before any work."""
    if ds.region_labels is None:
        return  # said as a warning: groups are classes only
    present = {label for labels in ds.region_labels for label in labels}
    missing = [name for name in features if name not in present]
    if missing:
        listed = ", ".join(map(repr, sorted(present)[:12])) + (", …" if len(present) > 12 else "")
        raise InputError(f"--feature {', '.join(map(repr, missing))}: no region of {ds.manifest_file} is labelled "
                         f"so (column 'region_labels'); the labels present: {listed or 'none'}")


def write_metrics(metrics: dict, path) -> Path:
    """Write ``metrics.json`` atomically."""
    return write_json_atomic(path, metrics)
