"""Stage 2 of RaVL: mitigation and its baselines (SPEC §3).

Four methods register themselves into the shared fine-tuning loop of
:mod:`ravl_pipeline.ml.train` (same data order, seed, steps and batch size as
Standard FT):

* ``upsampled`` — CLIP loss; groups (label × discovered-feature presence)
  upsampled to balance. It is RaVL with ``λ = 1`` (SPEC §3.5).
* ``ravl`` — the same sampler, loss ``λ·L_CLIP + (1 − λ)·(L_R + L_A)``
  (SPEC §3.3) over region embeddings of the model being trained.
* ``vl-erm`` — cross-entropy of image-vs-class-prompt logits.
* ``vl-gdro`` — online group DRO over the same groups on that cross-entropy
  (uniform sampling; the group weights do the reweighting).

Spurious regions of the training images (SPEC §3.1) come from the frozen
audited model: every region is embedded with it and assigned to its nearest
Stage-1 medoid. ``findings.json`` carries the medoid vectors
(``medoid_embeddings``, written by :func:`audit.run_discovery`), so no
discovery embeddings need to be kept around; older findings without them can
be completed from the saved discovery embeddings (:func:`medoid_embeddings`).
The assignment is cached as Parquet, keyed by the content of everything it
depends on, because it does not change during training and is shared by
every method trained on the same data.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from . import train
from .data import atomic_write, load_dataset
from .discover import assign_to_medoids
from .embed import Embeddings, embed_dataset, encode_image_and_regions, input_boxes
from .models import (RAVL_META_NAME, WEIGHTS_NAME, LoadedModel, check_same_architecture, load_model, save_model,
                     visual_architecture)
from .train import TrainConfig, TrainData, TrainError, build_train_data, clip_loss

# Methods that need Stage-1 findings (groups or spurious regions).
FINDINGS_METHODS = ("ravl", "upsampled", "vl-gdro")
# Methods that need class labels and class-prompt tokens.
LABEL_METHODS = ("ravl", "upsampled", "vl-erm", "vl-gdro")
# Step size of the online group-DRO weights (Sagawa et al. use 0.01 over
# thousands of steps; the synthetic budget is tens of steps, so the weights
# must move faster to matter at all).
GDRO_STEP_SIZE = 0.1


class MitigationError(ValueError):
    """Findings, models or data that Stage 2 cannot use."""


# --------------------------------------------------------------------------- findings

def select_features(findings: dict, which: str | int = "called") -> list[dict]:
    """The discovered features whose clusters count as spurious (SPEC §3.1).

    ``called`` (default): the features Stage 1 calls spurious — those with
    ``called: true`` where the findings carry significance (else every kept
    feature), less those the masking check does not support (hiding their
    regions undoes none of the errors they go with: they do not cause them,
    so there is nothing in them to unlearn);
    ``significant``: every called feature, supported or not; ``top1`` / an integer ``k``: the first /
    first ``k`` of the ``called`` ones; ``all``: every kept cluster.
    """
    from .causal import is_supported

    feats = sorted(findings.get("features") or [], key=lambda f: f["rank"])
    where = f"findings for dataset {findings.get('dataset')!r}"
    if not feats:
        raise MitigationError(f"{where} name no spurious feature (empty 'features'): nothing to mitigate; "
                              "train with --method standard or vl-erm")
    if which == "all":
        return feats
    if any("called" in f for f in feats):
        feats = [f for f in feats if f.get("called")]
        if not feats:
            raise MitigationError(f"{where} name no spurious feature that is called significant: nothing to "
                                  "mitigate (use --features all to suppress every kept cluster anyway)")
    if which == "significant":
        return feats
    refuted = [f["rank"] for f in feats if is_supported(f) is False]
    feats = [f for f in feats if is_supported(f) is not False]
    if not feats:
        raise MitigationError(f"{where}: the masking check supports no called feature (ranks "
                              f"{', '.join(map(str, refuted))}: hiding their regions fixes none of the errors "
                              "they go with), so nothing is to be mitigated (use --features significant to "
                              "suppress them anyway)")
    if which == "called":
        return feats
    if which == "top1":
        return feats[:1]
    try:
        k = int(which)
    except (TypeError, ValueError):
        raise MitigationError(f"feature selection must be 'called', 'significant', 'all', 'top1' or a count, "
                              f"got {which!r}") from None
    if k < 1:
        raise MitigationError(f"feature selection count must be at least 1, got {k}")
    return feats[:k]


def medoid_embeddings(findings: dict, embeddings: Embeddings | None = None) -> np.ndarray:
    """Medoid vectors ``[K, D]`` of the Stage-1 clustering: from the findings'
    ``medoid_embeddings`` when present, else rows ``medoids`` of the
    discovery ``embeddings``."""
    if findings.get("medoid_embeddings"):
        med = np.asarray(findings["medoid_embeddings"], dtype=np.float32)
        if med.ndim != 2 or len(med) != len(findings.get("medoids", med)):
            raise MitigationError(f"findings 'medoid_embeddings' has shape {med.shape}, "
                                  f"expected one row per medoid ({len(findings.get('medoids', []))})")
        return med
    if embeddings is None:
        raise MitigationError("findings have no 'medoid_embeddings'; re-run discovery (it records them) "
                              "or pass the discovery embeddings")
    rows = np.asarray(findings["medoids"], dtype=np.int64)
    if rows.size == 0 or rows.max() >= embeddings.n_regions:
        raise MitigationError(f"findings medoid rows {rows.tolist()} do not index the given discovery "
                              f"embeddings ({embeddings.n_regions} regions)")
    return embeddings.region_emb[rows]


def findings_sha256(findings: dict) -> str:
    return hashlib.sha256(json.dumps(findings, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- spurious regions

@dataclass
class RegionAssignment:
    """Per region of the training images: its nearest Stage-1 cluster and
    whether that cluster is a chosen spurious feature (SPEC §3.1)."""

    image_ids: list[str]
    region_image: np.ndarray  # [M] image row
    region_index: np.ndarray  # [M] index within the image
    boxes: np.ndarray  # [M, 4] original pixels
    cluster: np.ndarray  # [M] nearest medoid
    spurious: np.ndarray  # [M] bool

    def image_has_feature(self) -> np.ndarray:
        """Per image: is at least one of its regions spurious?"""
        out = np.zeros(len(self.image_ids), dtype=bool)
        out[self.region_image[self.spurious]] = True
        return out

    def per_image(self, values: np.ndarray) -> list[np.ndarray]:
        counts = np.bincount(self.region_image, minlength=len(self.image_ids))
        return np.split(np.asarray(values), np.cumsum(counts)[:-1])

    def save(self, path: Path) -> Path:
        table = pa.table({
            "image_id": [self.image_ids[i] for i in self.region_image],
            "image_row": pa.array(self.region_image, pa.int64()),
            "region_index": pa.array(self.region_index, pa.int64()),
            "box": pa.FixedSizeListArray.from_arrays(pa.array(self.boxes.astype(np.float32).reshape(-1)), 4),
            "cluster": pa.array(self.cluster, pa.int64()),
            "spurious": pa.array(self.spurious, pa.bool_()),
        }).replace_schema_metadata({b"image_ids": json.dumps(self.image_ids).encode()})
        return atomic_write(path, lambda fh: pq.write_table(table, fh))

    @classmethod
    def load(cls, path: Path) -> "RegionAssignment":
        table = pq.read_table(path)
        boxes = table.column("box").combine_chunks()
        return cls(
            image_ids=json.loads(table.schema.metadata[b"image_ids"]),
            region_image=table.column("image_row").to_numpy().astype(np.int64),
            region_index=table.column("region_index").to_numpy().astype(np.int64),
            boxes=np.asarray(boxes.flatten().to_numpy(), dtype=np.float32).reshape(-1, 4),
            cluster=table.column("cluster").to_numpy().astype(np.int64),
            spurious=table.column("spurious").to_numpy(zero_copy_only=False).astype(bool),
        )


def assign_spurious_regions(audited: LoadedModel, ds, findings: dict, features: str | int = "called",
                            embeddings: Embeddings | None = None, batch_size: int = 64,
                            progress: bool = False) -> RegionAssignment:
    """Embed every region of ``ds`` with the frozen audited model and mark
    those nearest to a chosen feature's medoid as spurious (SPEC §3.1)."""
    chosen = {int(f["cluster_id"]) for f in select_features(findings, features)}
    medoids = medoid_embeddings(findings, embeddings)
    emb = embed_dataset(audited, ds, proposer=findings.get("proposer", "quadrants"),
                        mode=findings.get("embedding_mode", "auto"), batch_size=batch_size, progress=progress)
    if emb.region_emb.shape[1] != medoids.shape[1]:
        raise MitigationError(f"audited model {audited.name!r} embeds in {emb.region_emb.shape[1]} dimensions "
                              f"but the findings' medoids have {medoids.shape[1]}: findings from another model?")
    cluster = assign_to_medoids(emb.region_emb, medoids) if emb.n_regions else np.zeros(0, np.int64)
    return RegionAssignment(list(ds.image_ids), emb.region_image, emb.region_index, emb.boxes,
                            np.asarray(cluster, dtype=np.int64), np.isin(cluster, sorted(chosen)))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(spec: str) -> str:
    """Content hash of a local checkpoint's weights; the name for anything else."""
    if spec.startswith("local-dir:"):
        weights = Path(spec[len("local-dir:"):]) / WEIGHTS_NAME
        if weights.is_file():
            return _file_sha256(weights)
    return spec


def cached_assignment(audited: LoadedModel, ds, findings: dict, cache_dir: str | os.PathLike,
                      features: str | int = "called", progress: bool = False) -> RegionAssignment:
    """:func:`assign_spurious_regions`, read from ``cache_dir`` when the same
    model weights, manifest rows and findings were assigned before."""
    key = hashlib.sha256(json.dumps({
        "model": model_fingerprint(audited.name),
        "manifest": _file_sha256(ds.manifest_file),
        "image_ids": hashlib.sha256("\n".join(ds.image_ids).encode()).hexdigest(),
        "findings": findings_sha256(findings),
        "features": str(features),
    }, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"spurious-regions-{key}.parquet"
    if path.is_file():
        return RegionAssignment.load(path)
    assignment = assign_spurious_regions(audited, ds, findings, features, progress=progress)
    assignment.save(path)
    return assignment


# --------------------------------------------------------------------------- groups and sampling

def group_ids(labels: np.ndarray | torch.Tensor, presence: np.ndarray) -> torch.Tensor:
    """Group of each image: ``2·label + feature present`` (SPEC §3.6)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return labels * 2 + torch.as_tensor(np.asarray(presence, dtype=bool), dtype=torch.long)


def upsampled_order(groups: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One pass in which every non-empty group is upsampled to the size of
    the largest: each member repeated ``⌊max/size⌋`` times, plus a random
    remainder, then everything shuffled. The loop's step budget is fixed by
    the data size, so upsampling changes what is seen, not how long."""
    members = [torch.nonzero(groups == g).flatten() for g in torch.unique(groups)]
    target = max(len(m) for m in members)
    parts = []
    for m in members:
        reps, rest = divmod(target, len(m))
        parts.append(m.repeat(reps))
        parts.append(m[torch.randperm(len(m), generator=gen)[:rest]])
    order = torch.cat(parts)
    return order[torch.randperm(len(order), generator=gen)]


def group_balanced_sampler(n: int, gen: torch.Generator, data: TrainData, cfg: TrainConfig) -> torch.Tensor:
    return upsampled_order(_extra(data, "groups", cfg.method), gen)


# --------------------------------------------------------------------------- losses

def region_aware_loss(region_feats: torch.Tensor, region_image: torch.Tensor, spurious: torch.Tensor,
                      labels: torch.Tensor, text_feats: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """``L_R + L_A`` of SPEC §3.3, averaged over images with a relevant region.

    ``region_feats`` [M, D] (any norm) of the batch's regions, ``region_image``
    [M] their image (0..B-1), ``spurious`` [M] bool, ``labels`` [B] class
    indices into ``text_feats`` [C, D]. Everything stays in log space:
    ``log σ(R, y)`` is a max of ``cos/τ``, and each ``−log(a / Σ)`` is
    ``logsumexp(terms) − log a``.
    """
    f = F.normalize(region_feats, dim=-1)
    g = F.normalize(text_feats, dim=-1)
    batch_labels, lab_pos = torch.unique(labels, return_inverse=True)  # Y_B and y_i's column in it
    logits = f @ g[batch_labels].T / tau  # [M, |Y_B|] = log s(r, y)
    n_images = len(labels)
    neg_inf = torch.finfo(logits.dtype).min  # finite: keeps max/logsumexp gradients NaN-free
    log_sigma = _log_sigma_relevant(logits, region_image, spurious, n_images, neg_inf)  # [B, |Y_B|]
    has_relevant = torch.zeros(n_images, dtype=torch.bool, device=logits.device)
    has_relevant[region_image[~spurious]] = True
    if not has_relevant.any():
        return region_feats.sum() * 0.0
    own = log_sigma.gather(1, lab_pos[:, None]).squeeze(1)  # log σ(R^r_i, y_i)
    spur = logits[spurious]  # [S, |Y_B|]

    # L_R: Σ_y σ(R^r_i, y) + Σ_{r∈R^s_B} max_y s(r, y)
    spur_max = spur.max(dim=1).values if len(spur) else logits.new_zeros(0)
    terms_r = torch.cat([log_sigma, spur_max[None, :].expand(n_images, -1)], dim=1)
    loss_r = torch.logsumexp(terms_r, dim=1) - own

    # L_A: σ(R^r_i, y_i) + Σ_{j: y_j≠y_i} σ(R^r_j, y_i) + Σ_{r∈R^s_B} s(r, y_i)
    others = log_sigma[:, lab_pos].T  # [i, j] = log σ(R^r_j, y_i)
    others = others.masked_fill(labels[None, :] == labels[:, None], neg_inf)
    spur_own = spur[:, lab_pos].T  # [i, r] = log s(r, y_i)
    terms_a = torch.cat([own[:, None], others, spur_own], dim=1)
    loss_a = torch.logsumexp(terms_a, dim=1) - own

    return (loss_r + loss_a)[has_relevant].mean()


def _log_sigma_relevant(logits: torch.Tensor, region_image: torch.Tensor, spurious: torch.Tensor,
                        n_images: int, neg_inf: float) -> torch.Tensor:
    """``log σ(R^r_i, y) = max_{r∈R^r_i} log s(r, y)`` as [B, |Y_B|]; ``neg_inf``
    where image ``i`` has no relevant region (σ of an empty set is 0)."""
    counts = torch.bincount(region_image, minlength=n_images)
    starts = torch.cumsum(counts, 0) - counts
    order = torch.argsort(region_image, stable=True)
    slot = torch.empty_like(region_image)
    slot[order] = torch.arange(len(region_image), device=region_image.device) - starts[region_image[order]]
    width = int(counts.max().item()) if len(counts) else 0
    masked = logits.masked_fill(spurious[:, None], neg_inf)
    dense = logits.new_full((n_images, max(width, 1), logits.shape[1]), neg_inf)
    dense = dense.index_put((region_image, slot), masked)
    return dense.max(dim=1).values


def _extra(data: TrainData, key: str, method: str):
    if key not in data.extras:
        raise TrainError(f"method {method!r} needs {key!r} prepared from Stage-1 findings; "
                         "train it with mitigate.train_mitigated (or `ravl finetune --findings`)")
    return data.extras[key]


def _batch_labels(batch: dict, method: str) -> torch.Tensor:
    if "labels" not in batch:
        raise TrainError(f"method {method!r} needs class labels in the training manifest")
    return batch["labels"]


def _class_text(model, data: TrainData, method: str) -> torch.Tensor:
    return model.encode_text(_extra(data, "class_tokens", method))


def ravl_loss(model, batch: dict, data: TrainData, cfg: TrainConfig, state: dict) -> torch.Tensor:
    """``λ·L_CLIP + (1 − λ)·(L_R + L_A)`` (SPEC §3.3); one backbone pass gives
    both the image and the region features."""
    idx = batch["index"].tolist()
    boxes = [_extra(data, "boxes", cfg.method)[i] for i in idx]
    spurious = torch.cat([data.extras["spurious"][i] for i in idx])
    region_image = torch.repeat_interleave(torch.arange(len(idx)), torch.tensor([len(b) for b in boxes]))
    with region_pass_keeps_batchnorm_stats(model):
        image, regions = encode_image_and_regions(model, batch["pixels"], boxes)
    text = model.encode_text(batch["tokens"])
    l_clip = clip_loss(image, text, model.logit_scale.exp())
    if cfg.lam >= 1.0:
        return l_clip
    l_region = region_aware_loss(regions, region_image, spurious, _batch_labels(batch, cfg.method),
                                 _class_text(model, data, cfg.method), cfg.tau)
    return cfg.lam * l_clip + (1.0 - cfg.lam) * l_region


@contextmanager
def region_pass_keeps_batchnorm_stats(model):
    """Let the RoI pass through ResNet ``layer4`` leave BatchNorm running
    statistics alone.

    :func:`embed.encode_image_and_regions` runs ``layer4`` twice, first on
    the images, then on the RoIs. In training mode both calls would update the
    running statistics, and zoomed-in regions would then set the statistics
    that whole images are normalised with at evaluation time. The RoI call is
    still normalised with its own batch statistics (so gradients are those of
    training mode); only the running averages skip it.
    """
    visual = getattr(model, "visual", None)
    if visual_architecture(model) != "resnet" or not model.training:
        yield
        return
    norms = [m for m in visual.layer4.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in norms]
    calls = [0]

    def before(module, args):
        calls[0] += 1
        if calls[0] >= 2:  # the RoI call
            for m in norms:
                m.momentum = 0.0

    handle = visual.layer4.register_forward_pre_hook(before)
    try:
        yield
    finally:
        handle.remove()
        for m, momentum in saved:
            m.momentum = momentum


def upsampled_loss(model, batch: dict, data: TrainData, cfg: TrainConfig, state: dict) -> torch.Tensor:
    _extra(data, "groups", cfg.method)
    return train.standard_loss(model, batch, data, cfg, state)


def class_prompt_logits(model, pixels: torch.Tensor, class_text: torch.Tensor) -> torch.Tensor:
    image = F.normalize(model.encode_image(pixels), dim=-1)
    return model.logit_scale.exp() * image @ F.normalize(class_text, dim=-1).T


def vl_erm_loss(model, batch: dict, data: TrainData, cfg: TrainConfig, state: dict) -> torch.Tensor:
    logits = class_prompt_logits(model, batch["pixels"], _class_text(model, data, cfg.method))
    return F.cross_entropy(logits, _batch_labels(batch, cfg.method))


def group_dro_step(per_sample: torch.Tensor, groups: torch.Tensor, q: torch.Tensor,
                   step_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Online group DRO (Sagawa et al. 2020): mean loss per group (0 for
    groups absent from the batch), ``q ← q·exp(η·loss_g)`` renormalised, and
    the loss ``Σ_g q_g·loss_g``. Returns (loss, new q)."""
    n_groups = len(q)
    sums = torch.zeros(n_groups, dtype=per_sample.dtype).index_add(0, groups, per_sample)
    counts = torch.bincount(groups, minlength=n_groups).to(per_sample.dtype)
    group_loss = sums / counts.clamp(min=1)
    q = q * torch.exp(step_size * group_loss.detach())
    q = q / q.sum()
    return (q * group_loss).sum(), q


def prepare_group_dro(data: TrainData, cfg: TrainConfig, state: dict) -> None:
    n_groups = 2 * len(data.classes or [])
    state["q"] = torch.full((n_groups,), 1.0 / n_groups)


def vl_gdro_loss(model, batch: dict, data: TrainData, cfg: TrainConfig, state: dict) -> torch.Tensor:
    groups = _extra(data, "groups", cfg.method)[batch["index"]]
    logits = class_prompt_logits(model, batch["pixels"], _class_text(model, data, cfg.method))
    per_sample = F.cross_entropy(logits, _batch_labels(batch, cfg.method), reduction="none")
    loss, state["q"] = group_dro_step(per_sample, groups, state["q"], GDRO_STEP_SIZE)
    return loss


train.METHODS.update({"ravl": ravl_loss, "upsampled": upsampled_loss, "vl-erm": vl_erm_loss,
                      "vl-gdro": vl_gdro_loss})
train.SAMPLERS.update({"ravl": group_balanced_sampler, "upsampled": group_balanced_sampler})
train.PREPARE.update({"vl-gdro": prepare_group_dro})


# --------------------------------------------------------------------------- training

def attach_region_extras(data: TrainData, lm: LoadedModel, ds, assignment: RegionAssignment) -> None:
    """Per-image boxes (input pixels), spurious flags and groups for the loop."""
    if list(assignment.image_ids) != list(ds.image_ids):
        raise MitigationError(f"spurious-region assignment does not match the images of {ds.root}")
    boxes, flags = [], []
    for i, (b, s) in enumerate(zip(assignment.per_image(assignment.boxes), assignment.per_image(assignment.spurious))):
        w, h = ds.image_size(i)
        boxes.append(torch.from_numpy(input_boxes(b, w, h, lm.preprocess_cfg, lm.image_size)))
        flags.append(torch.from_numpy(np.asarray(s, dtype=bool)))
    data.extras["boxes"] = boxes
    data.extras["spurious"] = flags
    data.extras["groups"] = group_ids(data.labels, assignment.image_has_feature())


def attach_class_tokens(data: TrainData, lm: LoadedModel, template: str) -> None:
    data.extras["class_tokens"] = lm.tokenizer([template.format(c) for c in data.classes])


def _check_labels(ds, classes: Sequence[str]) -> None:
    known = set(classes)
    for i, y in enumerate(ds.labels):
        if y not in known:
            raise MitigationError(f"{ds.manifest_file}: row {i} (image_id {ds.image_ids[i]!r}) has label {y!r}, "
                                  f"which is not among the findings' classes {list(classes)}")


def _group_sizes(groups: torch.Tensor, classes: Sequence[str]) -> list[dict]:
    counts = torch.bincount(groups, minlength=2 * len(classes)).tolist()
    return [{"label": c, "feature_present": bool(p), "n": counts[2 * k + p]}
            for k, c in enumerate(classes) for p in (0, 1)]


def train_mitigated(base_model: str, train_dir, findings: dict | None, audited_model: str | None, out_dir,
                    cfg: TrainConfig, progress: bool = False, *, features: str | int = "called",
                    cache_dir: str | os.PathLike | None = None, findings_path: str | os.PathLike | None = None,
                    pretrained: str | None = None, audited_pretrained: str | None = None,
                    split: str | None = None) -> dict:
    """Fine-tune ``base_model`` on ``train_dir`` with ``cfg.method`` and write
    the checkpoint at ``out_dir`` (SPEC §3.2, §3.6). Methods in
    :data:`FINDINGS_METHODS` need ``findings`` and the ``audited_model`` whose
    medoids they hold; the checkpoint records the config and the findings
    used (full content and sha256). Returns the training history."""
    method = cfg.method
    if method not in train.METHODS:
        raise MitigationError(f"unknown method {method!r}; expected one of {', '.join(sorted(train.METHODS))}")
    needs_findings = method in FINDINGS_METHODS
    if needs_findings and findings is None:
        raise MitigationError(f"method {method!r} needs Stage-1 findings (--findings findings.json)")
    chosen = select_features(findings, features) if needs_findings else []
    ds = load_dataset(train_dir, split=split, require_labels=method in LABEL_METHODS)
    classes = list(findings["classes"]) if findings else (ds.classes() or None)
    if ds.labels is not None and classes:
        _check_labels(ds, classes)
    base = load_model(base_model, pretrained, seed=cfg.seed)
    audited = None
    if needs_findings:
        audited_model = audited_model or findings.get("model")
        if not audited_model:
            raise MitigationError("the audited model is needed to find spurious regions; findings name none")
        audited = load_model(audited_model, audited_pretrained)
        check_same_architecture(audited, base)
    data = build_train_data(base, ds, cfg.caption_template, classes=classes, progress=progress)
    if method in LABEL_METHODS:
        attach_class_tokens(data, base, cfg.caption_template)
    spurious_meta = None
    if needs_findings:
        cache = Path(cache_dir) if cache_dir is not None else Path(out_dir).parent / "spurious-regions-cache"
        assignment = cached_assignment(audited, ds, findings, cache, features, progress)
        attach_region_extras(data, base, ds, assignment)
        spurious_meta = {"n_regions": int(len(assignment.spurious)), "n_spurious": int(assignment.spurious.sum()),
                         "groups": _group_sizes(data.extras["groups"], data.classes)}
    history = train.finetune(base, data, cfg, progress=progress)
    meta = {"base_model": base_model, "pretrained": pretrained, "train_data": str(Path(train_dir).resolve()),
            "split": split, "method": method, "train": cfg.to_dict(), "audited_model": audited_model,
            "findings": _findings_record(findings, findings_path, chosen, features) if findings else None,
            "spurious_regions": spurious_meta,
            "history": {k: v for k, v in history.items() if k != "config"}}
    save_model(base, out_dir, meta)
    return history


def _findings_record(findings: dict, path, chosen: list[dict], which) -> dict[str, Any]:
    return {"path": str(Path(path).resolve()) if path else None,
            "file_sha256": _file_sha256(Path(path)) if path and Path(path).is_file() else None,
            "sha256": findings_sha256(findings), "selection": str(which),
            "features_used": [{"rank": f["rank"], "cluster_id": f["cluster_id"], "attribute": f["attribute"]}
                              for f in chosen],
            "content": findings}


def checkpoint_findings(model_dir: str | os.PathLike) -> dict | None:
    """The findings a mitigated checkpoint was trained with (``None`` if none)."""
    meta_file = Path(model_dir) / RAVL_META_NAME
    if not meta_file.is_file():
        return None
    record = json.loads(meta_file.read_text()).get("findings")
    return record.get("content") if record else None
