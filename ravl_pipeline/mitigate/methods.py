"""The training methods of Stage 2 and its baselines, in one registry (SPEC §3).

A method is a loss over a batch plus what it needs: Stage-1 findings
(groups or spurious regions), class labels, a sampler that replaces uniform
shuffling, a preparation step. :func:`register_method` records all of it
in :data:`METHODS`, which the training loop, the data-parallel loop, the
command line's choices and the pipeline all read. Every method sees the same
data order, seed, steps and batch size (SPEC §3.4, §3.6):

* ``standard`` — the CLIP loss (Standard FT);
* ``upsampled`` — CLIP loss; groups (label × discovered-feature presence)
  upsampled to balance. It is RaVL with ``λ = 1`` (SPEC §3.5);
* ``ravl`` — the same sampler, loss ``λ·L_CLIP + (1 − λ)·(L_R + L_A)``
  (SPEC §3.3) over region embeddings of the model being trained;
* ``vl-erm`` — cross-entropy of image-vs-class-prompt logits;
* ``vl-gdro`` — online group DRO over the same groups on that cross-entropy
  (uniform sampling; the group weights do the reweighting);
* ``spurious-aware`` — Yang et al. (ICML 2023): the CLIP loss plus in-modal
  and cross-modal terms that pull images to their class text and push images
  and class texts away from the text of the spurious attribute
  (:func:`losses.spurious_aware_terms`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..core.embed import encode_image_and_regions, region_inputs
from ..models import LoadedModel, visual_architecture
from .assign import RegionAssignment, group_ids
from .data import MitigationError, TrainData, TrainError
from .losses import class_prompt_logits, clip_loss, group_dro_step, region_aware_loss, spurious_aware_terms

__all__ = ["Method", "METHODS", "register_method", "get_method", "attach_region_extras", "attach_class_tokens",
           "attach_attribute_tokens"]

# Step size of the online group-DRO weights (Sagawa et al. use 0.01 over
# thousands of steps; the synthetic budget is tens of steps, so the weights
# must move faster to matter at all).
GDRO_STEP_SIZE = 0.1

LossFn = Callable[[torch.nn.Module, dict, TrainData, TrainConfig, dict], torch.Tensor]
Sampler = Callable[[int, torch.Generator, TrainData, TrainConfig], torch.Tensor]
Prepare = Callable[[TrainData, TrainConfig, dict], None]


@dataclass(frozen=True)
class Method:
    """One training method and what it needs."""

    name: str
    loss: LossFn
    needs_findings: bool = False  # groups or spurious regions from Stage-1 findings
    needs_labels: bool = False  # class labels and class-prompt tokens
    sampler: Sampler | None = None  # replaces uniform shuffling
    prepare: Prepare | None = None  # prepare(data, cfg, state) before the first step
    distributed: bool = False  # its loss is defined over gathered features under torchrun
    region_pass: bool = False  # its loss embeds the regions of the model being trained
    needs_attribute_text: bool = False  # the spurious attributes named in text (prompt tokens)


METHODS: dict[str, Method] = {}


def register_method(name: str, **facts) -> Callable[[LossFn], LossFn]:
    """Decorator: register a loss function as method ``name`` with its facts."""
    def register(loss: LossFn) -> LossFn:
        METHODS[name] = Method(name, loss, **facts)
        return loss
    return register


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MitigationError(f"unknown method {name!r}; expected one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


# --------------------------------------------------------------------------- shared pieces

def _extra(data: TrainData, key: str, method: str):
    if key not in data.extras:
        raise TrainError(f"method {method!r} needs {key!r} prepared from Stage-1 findings; "
                         "train it through pipeline.stages.train (or `ravl finetune --findings`)")
    return data.extras[key]


def _per_image(batch: dict, data: TrainData, key: str, method: str) -> list:
    """Per image of the batch: ``batch[key]`` as the loop put it there (on the
    model's device), else ``data.extras[key]`` at the batch's indices."""
    if key in batch:
        return batch[key]
    values = _extra(data, key, method)
    return [values[i] for i in batch["index"].tolist()]


def _batch_labels(batch: dict, method: str) -> torch.Tensor:
    if "labels" not in batch:
        raise TrainError(f"method {method!r} needs class labels in the training manifest")
    return batch["labels"]


def _class_text(model, data: TrainData, method: str) -> torch.Tensor:
    return model.encode_text(_on_model(model, _extra(data, "class_tokens", method)))


def _on_model(model, tokens: torch.Tensor) -> torch.Tensor:
    return tokens.to(model.logit_scale.device)


def upsampled_order(groups: torch.Tensor, gen: torch.Generator, max_repeat: int | None = None) -> torch.Tensor:
    """One pass in which every non-empty group is upsampled to the size of
    the largest: each member repeated ``⌊max/size⌋`` times, plus a random
    remainder, then everything shuffled. With ``max_repeat`` a group is
    upsampled to at most ``max_repeat`` times its own size, so a group of a
    handful of images is not drawn as often as one of hundreds. The loop's
    step budget is fixed by the data size, so upsampling changes what is
    seen, not how long."""
    members = [torch.nonzero(groups == g).flatten() for g in torch.unique(groups)]
    largest = max(len(m) for m in members)
    parts = []
    for m in members:
        target = largest if max_repeat is None else min(largest, max_repeat * len(m))
        reps, rest = divmod(target, len(m))
        parts.append(m.repeat(reps))
        parts.append(m[torch.randperm(len(m), generator=gen)[:rest]])
    order = torch.cat(parts)
    return order[torch.randperm(len(order), generator=gen)]


def group_balanced_sampler(n: int, gen: torch.Generator, data: TrainData, cfg: TrainConfig) -> torch.Tensor:
    return upsampled_order(_extra(data, "groups", cfg.method), gen, cfg.max_repeat)


@contextmanager
def region_pass_keeps_batchnorm_stats(model):
    """Let the region passes leave BatchNorm running statistics alone.

    :func:`embed.encode_image_and_regions` runs ResNet ``layer4`` twice,
    first on the images, then on the RoIs, and for a non-square image also
    the trunk (stem..layer3) on its region view. In training mode every call
    would update the running statistics, and zoomed-in regions or whole-image
    views would then set the statistics that the model's own inputs are
    normalised with at evaluation time. Each BatchNorm layer's first call
    (the image pass) updates them as usual; later calls are still normalised
    with their own batch statistics (so gradients are those of training
    mode), but leave the running averages unchanged.
    """
    visual = getattr(model, "visual", None)
    if visual_architecture(model) != "resnet" or not model.training:
        yield
        return
    norms = [m for m in visual.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in norms]
    calls = {id(m): 0 for m in norms}

    def before(module, args):
        calls[id(module)] += 1
        if calls[id(module)] >= 2:  # a region pass
            module.momentum = 0.0

    handles = [m.register_forward_pre_hook(before) for m in norms]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for m, momentum in saved:
            m.momentum = momentum


def prepare_group_dro(data: TrainData, cfg: TrainConfig, state: dict) -> None:
    n_groups = 2 * len(data.classes or [])
    state["q"] = torch.full((n_groups,), 1.0 / n_groups)


# --------------------------------------------------------------------------- the methods

@register_method("standard", distributed=True)
def standard_loss(model, batch: dict[str, torch.Tensor], data: TrainData, cfg: TrainConfig,
                  state: dict) -> torch.Tensor:
    image = model.encode_image(batch["pixels"])
    text = model.encode_text(batch["tokens"])
    return clip_loss(image, text, model.logit_scale.exp())


@register_method("ravl", needs_findings=True, needs_labels=True, sampler=group_balanced_sampler, region_pass=True)
def ravl_loss(model, batch: dict, data: TrainData, cfg: TrainConfig, state: dict) -> torch.Tensor:
    """``λ·L_CLIP + (1 − λ)·(L_R + L_A)`` (SPEC §3.3; ``cfg.region_loss``
    picks the form, see :func:`losses.region_aware_loss`); one backbone pass
    gives both the image and the region features. The weighted terms are
    left in ``state["terms"]`` (with their graphs) for diagnostics."""
    boxes = _per_image(batch, data, "boxes", cfg.method)
    views = batch["views"] if "views" in batch else (_per_image(batch, data, "views", cfg.method)
                                                     if "views" in data.extras else None)
    spurious = torch.cat(_per_image(batch, data, "spurious", cfg.method))
    device = batch["pixels"].device
    region_image = torch.repeat_interleave(torch.arange(len(boxes), device=device),
                                           torch.tensor([len(b) for b in boxes], device=device))
    cached = getattr(model, "cached_image_and_regions", None)  # an accumulated step (mitigate.accumulate)
    if cached is not None:
        image, regions = cached()
    else:
        with region_pass_keeps_batchnorm_stats(model):
            image, regions = encode_image_and_regions(model, batch["pixels"], boxes, views=views)
    text = model.encode_text(batch["tokens"])
    l_clip = clip_loss(image, text, model.logit_scale.exp())
    state["terms"] = {"clip": cfg.lam * l_clip}
    if cfg.lam >= 1.0:
        return l_clip
    spurious_class = None
    if cfg.region_loss == "correlated":
        spurious_class = torch.cat(_per_image(batch, data, "spurious_class", cfg.method))
    l_r, l_a = region_aware_loss(regions, region_image, spurious, _batch_labels(batch, cfg.method),
                                 _class_text(model, data, cfg.method), cfg.tau, form=cfg.region_loss,
                                 spurious_class=spurious_class, parts=True)
    state["terms"].update({"L_R": (1.0 - cfg.lam) * l_r, "L_A": (1.0 - cfg.lam) * l_a})
    return cfg.lam * l_clip + (1.0 - cfg.lam) * (l_r + l_a)


@register_method("upsampled", needs_findings=True, needs_labels=True, sampler=group_balanced_sampler)
def upsampled_loss(model, batch: dict, data: TrainData, cfg: TrainConfig, state: dict) -> torch.Tensor:
    _extra(data, "groups", cfg.method)
    return standard_loss(model, batch, data, cfg, state)


@register_method("vl-erm", needs_labels=True)
def vl_erm_loss(model, batch: dict, data: TrainData, cfg: TrainConfig, state: dict) -> torch.Tensor:
    logits = class_prompt_logits(model, batch["pixels"], _class_text(model, data, cfg.method))
    return F.cross_entropy(logits, _batch_labels(batch, cfg.method))


@register_method("vl-gdro", needs_findings=True, needs_labels=True, prepare=prepare_group_dro)
def vl_gdro_loss(model, batch: dict, data: TrainData, cfg: TrainConfig, state: dict) -> torch.Tensor:
    groups = batch["groups"] if "groups" in batch else _extra(data, "groups", cfg.method)[batch["index"]]
    logits = class_prompt_logits(model, batch["pixels"], _class_text(model, data, cfg.method))
    per_sample = F.cross_entropy(logits, _batch_labels(batch, cfg.method), reduction="none")
    loss, state["q"] = group_dro_step(per_sample, groups, state["q"], GDRO_STEP_SIZE)
    return loss


@register_method("spurious-aware", needs_labels=True, needs_attribute_text=True)
def spurious_aware_loss(model, batch: dict, data: TrainData, cfg: TrainConfig, state: dict) -> torch.Tensor:
    """Yang et al. (ICML 2023), "Mitigating Spurious Correlations in
    Multi-modal Models during Fine-tuning", as implemented here:

    ``L = L_CLIP + w·(L_img + L_txt + L_cls + L_spu,img + L_spu,txt)`` with
    ``L_CLIP`` the contrastive loss of images and their captions (class
    prompts); in-modal ``L_img`` (cosine of same-class images pulled up,
    other-class images pushed down) and ``L_txt`` (class texts pushed apart);
    cross-modal ``L_cls`` (an image's own class text pulled, the others
    pushed); and the spurious-aware terms ``L_spu,img = mean |cos(image,
    attribute text)|`` and ``L_spu,txt = mean |cos(class text, attribute
    text)|``, which set the spurious attributes, named in language, apart
    from the images and from the classes. ``w = 1`` for every term, uniform
    sampling (the paper's method needs no group labels; the attribute
    needs a name, ``data.extras["attribute_tokens"]``). The terms are left
    in ``state["terms"]``."""
    labels = _batch_labels(batch, cfg.method)
    image = model.encode_image(batch["pixels"])
    l_clip = clip_loss(image, model.encode_text(batch["tokens"]), model.logit_scale.exp())
    terms = spurious_aware_terms(image, labels, _class_text(model, data, cfg.method),
                                 model.encode_text(_on_model(model, _extra(data, "attribute_tokens", cfg.method))))
    state["terms"] = {"clip": l_clip, **terms}
    return l_clip + sum(terms.values())


# --------------------------------------------------------------------------- preparing the data

def attach_region_extras(data: TrainData, lm: LoadedModel, ds, assignment: RegionAssignment,
                         region_pass: bool = True, cluster_class: dict[int, int] | None = None) -> None:
    """Spurious flags and groups for the loop; with ``region_pass`` (a
    method that embeds regions), each image's boxes (``region_boxes``, in
    original pixels), which the loop's loader places in the image's region
    view per batch, as discovery reads them (:func:`embed.region_inputs`).
    Data held in memory gets its views and mapped boxes here (``views``,
    ``boxes``; images whose own input shows them whole have no view). With
    ``cluster_class`` (spurious cluster id → its feature's correlated class
    index) also the correlated class of every spurious region (−1
    elsewhere), which the ``correlated`` form of the region loss reads."""
    if list(assignment.image_ids) != list(ds.image_ids):
        raise MitigationError(f"spurious-region assignment does not match the images of {ds.root}")
    if region_pass:
        data.extras["region_boxes"] = assignment.per_image(assignment.boxes)
    if region_pass and not data.streamed:
        inputs = [region_inputs(lm, ds, i, b) for i, b in enumerate(data.extras["region_boxes"])]
        if any(view is not None for view, _ in inputs):
            data.extras["views"] = [view for view, _ in inputs]
        data.extras["boxes"] = [boxes for _, boxes in inputs]
    data.extras["spurious"] = [torch.from_numpy(np.asarray(s, dtype=bool))
                               for s in assignment.per_image(assignment.spurious)]
    data.extras["groups"] = group_ids(data.labels, assignment.image_has_feature())
    if cluster_class is not None:
        cls = np.array([cluster_class.get(int(c), -1) if s else -1
                        for c, s in zip(assignment.cluster, assignment.spurious)], dtype=np.int64)
        data.extras["spurious_class"] = [torch.from_numpy(c) for c in assignment.per_image(cls)]


def attach_class_tokens(data: TrainData, lm: LoadedModel, template: str) -> None:
    data.extras["class_tokens"] = lm.tokenizer([template.format(c) for c in data.classes])


def attach_attribute_tokens(data: TrainData, lm: LoadedModel, attributes: list[str]) -> None:
    """The spurious attributes' texts (Spurious-Aware), tokenised as given."""
    if not attributes:
        raise MitigationError("no text names the spurious attribute: pass --attribute-text")
    data.extras["attribute_tokens"] = lm.tokenizer(list(attributes))
