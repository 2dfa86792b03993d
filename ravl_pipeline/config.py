"""Every parameter that changes a result, defined once.

Each section of ``params.yaml`` is a frozen dataclass here. Its field
defaults are *the* defaults: the library functions take them from these
classes, the command line builds its flags from them (:func:`option`), and
``params.yaml`` overlays them (:func:`load_params`). Every section is
versioned on its own (:func:`section_version`), so an orchestrator can make
exactly the steps that read a section depend on it: changing
``discovery.seed`` re-runs clustering, not the region embeddings. Unknown
sections or keys are refused with the file and key named, since a misspelt
key would otherwise silently fall back to its default.

This module imports nothing of the package: it is the bottom of the layers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

PARAMS_NAME = "params.yaml"

DEFAULT_TAU = 0.07  # SPEC §1.4 and §3.3: zero-shot scores and the region-aware loss
DEFAULT_TEMPLATE = "a photo of a {}."  # prompts, captions and names when nothing else is configured
DEFAULT_TEMPLATES = (DEFAULT_TEMPLATE,)
EMBEDDING_MODES = ("auto", "roi", "roi-half", "crop")
MASK_FILLS = ("mean", "black", "blur")
MODEL_SOURCES = ("synthetic-default", "checkpoint")
RECIPES = ("default", "small")
FEATURE_SELECTIONS = ("called", "significant", "all", "top1", "rank1")  # or a count
DEFAULT_FEATURE_SELECTION = "called"  # what Stage 2 mitigates unless told (BENCHMARKS.md §Mitigation)
REGION_LOSS_FORMS = ("spec", "correlated")  # SPEC §3.3 as written; spurious regions vs their own class only


def _f(default: Any, help: str) -> Any:
    """A field with its default and the help text its command-line flag shows."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class AuditedModelConfig:
    source: str = _f("synthetic-default", "synthetic-default (built by the recipe) | checkpoint")
    recipe: str = _f("default", "default | small (synthetic-default only)")
    checkpoint: str | None = _f(None, "local-dir:PATH, an open_clip name, or a built-in (source: checkpoint)")
    pretrained: str | None = _f(None, "open_clip pretrained tag or weights file of the checkpoint")
    init_model: str | None = _f(None, "the model the checkpoint was fine-tuned from (Stage 2 starts there)")
    train_data: str | None = _f(None, "the fine-tuning dataset directory (Stage 2 trains on it)")


@dataclass(frozen=True)
class RegionsConfig:
    proposer: str = _f("quadrants", "region proposer: quadrants | grid:N | boxes")
    mode: str = _f("auto", "region embedding mode (auto: RoI for ResNet/ViT, crop otherwise; roi-half: ResNet "
                           "RoI at half the layer3 size, ~1/4 the per-region cost, not SPEC's exact identity)")
    batch_size: int = _f(64, "images per forward pass")


@dataclass(frozen=True)
class LabelsConfig:
    classes: list[str] | None = _f(None, "class names (default: the labels present in the data)")


@dataclass(frozen=True)
class ScoresConfig:
    tau: float = _f(DEFAULT_TAU, "softmax temperature of the zero-shot scores")
    templates: list[str] | None = _f(None, "prompt templates with {} for the class (default: the dataset's "
                                           "setting.json caption template, else 'a photo of a {}.')")


@dataclass(frozen=True)
class DiscoveryConfig:
    seed: int = _f(0, "seed of the clustering and the permutation draws")
    influence_threshold: float = _f(0.25, "H_c threshold of the spurious criterion (SPEC §2.4)")
    k_range: list[int] | None = _f(None, "[lo, hi) of K (default [2|Y|, 5|Y|))")
    max_regions: int = _f(20000, "regions clustered at most; more are sampled and the rest assigned")
    top_regions: int = _f(50, "regions listed per feature")
    cluster_workers: int = _f(1, "fit the K values of the sweep in this many processes (same result)")
    evidence: bool = _f(True, "significance, the masking check and names for every feature")
    permutations: int = _f(2000, "permutations for each cluster's p-value (smallest p = 1/(permutations+1))")
    alpha: float = _f(0.05, "Benjamini-Hochberg level deciding which features are 'called'")
    mask_fill: str = _f("mean", "how the masking check hides a feature's regions: mean | black | blur")


@dataclass(frozen=True)
class MitigationConfig:
    """Stage 2 (SPEC §3). ``None``: as in the audited model's own fine-tuning."""

    method: str = _f("ravl", "ravl | upsampled | vl-erm | vl-gdro | spurious-aware | standard")
    lam: float | None = _f(0.8, "λ of the region-aware loss (SPEC §3.3)")
    region_loss: str | None = _f("spec", "form of the region-aware loss: spec (SPEC §3.3: spurious regions pushed "
                                         "from every class text) | correlated (from their feature's class only)")
    epochs: float | None = _f(None, "epochs (default: the audited model's fine-tuning)")
    lr: float | None = _f(None, "learning rate (default: the audited model's fine-tuning)")
    batch_size: int | None = _f(None, "batch size (default: the audited model's fine-tuning)")
    seed: int | None = _f(None, "seed (default: the audited model's fine-tuning)")
    max_steps: int | None = _f(None, "stop after this many steps")


@dataclass(frozen=True)
class EvaluationConfig:
    max_accuracy_drop: float = _f(0.05, "image accuracy the mitigated model may lose (blocking check)")
    min_group_size: int = _f(10, "groups smaller than this are reported but left out of worst-group")


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run (SPEC §3.2–3.6): every method shares the loop and these."""

    method: str = _f("standard", "training method (one of the registered methods)")
    epochs: float = _f(4.0, "epochs (fractions allowed)")
    batch_size: int = _f(128, "batch size (global under torchrun); SPEC §3.4 compares methods at 128")
    lr: float = _f(5e-4, "learning rate")
    weight_decay: float = _f(0.1, "AdamW weight decay (not on biases and norms)")
    warmup_steps: int = _f(0, "linear warm-up steps before the cosine schedule")
    seed: int = _f(0, "seed of initialisation, data order and sampling")
    lock_text: bool = _f(False, "freeze the text tower")
    caption_template: str = _f(DEFAULT_TEMPLATE, "caption for rows without one, {} = label")
    lam: float = _f(MitigationConfig.lam, "λ of the region-aware loss (SPEC §3.3)")
    tau: float = _f(DEFAULT_TAU, "temperature of the region-aware loss")
    region_loss: str = _f(MitigationConfig.region_loss, "form of the region-aware loss: spec | correlated")
    max_steps: int | None = _f(None, "stop after this many steps")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTION_TYPES = {"audited_model": AuditedModelConfig, "regions": RegionsConfig, "labels": LabelsConfig,
                 "scores": ScoresConfig, "discovery": DiscoveryConfig, "mitigation": MitigationConfig,
                 "evaluation": EvaluationConfig}
SECTIONS = tuple(SECTION_TYPES)


@dataclass(frozen=True)
class Params:
    """The whole ``params.yaml``, one typed section per key."""

    audited_model: AuditedModelConfig = field(default_factory=AuditedModelConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    scores: ScoresConfig = field(default_factory=ScoresConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    mitigation: MitigationConfig = field(default_factory=MitigationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the file and key."""


def option(section: type, name: str) -> dict[str, Any]:
    """``argparse`` keyword arguments of one parameter: its default and help
    text from the section's definition (so a flag cannot drift from it)."""
    spec = {f.name: f for f in fields(section)}[name]
    default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
    return {"default": default, "help": f"{spec.metadata.get('help', '')} (default: {default})"}


def load_params(path: str | os.PathLike | None) -> Params:
    """Defaults overlaid with the file's values (a missing file gives the defaults)."""
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if path is not None and Path(path).is_file():
        values = _read_sections(Path(path))
    where = path if path is not None else PARAMS_NAME
    params = Params(**{name: SECTION_TYPES[name](**values[name]) for name in SECTIONS})
    check_params(params, where)
    return params


def _read_sections(path: Path) -> dict[str, dict[str, Any]]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, items in raw.items():
        if section not in SECTION_TYPES:
            raise ParamsError(f"{path}: unknown section {section!r}; expected one of {', '.join(SECTIONS)}")
        if items is None:
            continue
        if not isinstance(items, dict):
            raise ParamsError(f"{path}: section {section!r} must be a mapping")
        known = [f.name for f in fields(SECTION_TYPES[section])]
        for key, value in items.items():
            if key not in known:
                raise ParamsError(f"{path}: unknown key {section}.{key}; expected one of {', '.join(known)}")
            values[section][key] = value
    return values


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_params(params: Params, where: str | os.PathLike = PARAMS_NAME) -> None:
    """Refuse values no step could use, naming the file and the key."""
    def need(ok: bool, key: str, what: str, value: Any) -> None:
        if not ok:
            raise ParamsError(f"{where}: {key} must be {what}, got {value!r}")

    model, disc = params.audited_model, params.discovery
    need(model.source in MODEL_SOURCES, "audited_model.source", f"one of {', '.join(MODEL_SOURCES)}", model.source)
    if model.source == "checkpoint" and not model.checkpoint:
        raise ParamsError(f"{where}: audited_model.checkpoint is required when source is 'checkpoint'")
    need(model.recipe in RECIPES, "audited_model.recipe", "'default' or 'small'", model.recipe)
    need(params.regions.mode in EMBEDDING_MODES, "regions.mode", f"one of {', '.join(EMBEDDING_MODES)}",
         params.regions.mode)
    need(_is_int(params.regions.batch_size) and params.regions.batch_size >= 1, "regions.batch_size",
         "a positive integer", params.regions.batch_size)
    need(_is_number(disc.influence_threshold) and 0 <= disc.influence_threshold <= 1,
         "discovery.influence_threshold", "a number in [0, 1]", disc.influence_threshold)
    need(isinstance(disc.evidence, bool), "discovery.evidence", "true or false", disc.evidence)
    need(_is_int(disc.cluster_workers) and disc.cluster_workers >= 1, "discovery.cluster_workers",
         "a positive integer", disc.cluster_workers)
    need(_is_int(disc.permutations) and disc.permutations >= 1, "discovery.permutations", "a positive integer",
         disc.permutations)
    need(_is_number(disc.alpha) and 0 < disc.alpha < 1, "discovery.alpha", "a number in (0, 1)", disc.alpha)
    need(disc.mask_fill in MASK_FILLS, "discovery.mask_fill", f"one of {', '.join(MASK_FILLS)}", disc.mask_fill)
    need(_is_number(params.scores.tau) and params.scores.tau > 0, "scores.tau", "a positive number",
         params.scores.tau)
    lam = params.mitigation.lam
    need(lam is None or (_is_number(lam) and 0 <= lam <= 1), "mitigation.lam", "a number in [0, 1]", lam)
    need(params.mitigation.region_loss in (None, *REGION_LOSS_FORMS), "mitigation.region_loss",
         f"one of {', '.join(REGION_LOSS_FORMS)}", params.mitigation.region_loss)
    # a negative drop is allowed: it demands a gain of at least that much
    need(_is_number(params.evaluation.max_accuracy_drop), "evaluation.max_accuracy_drop", "a number",
         params.evaluation.max_accuracy_drop)
    need(_is_int(params.evaluation.min_group_size) and params.evaluation.min_group_size >= 1,
         "evaluation.min_group_size", "a positive integer", params.evaluation.min_group_size)


def section_version(params: Params | Mapping[str, Any], section: str) -> str:
    """A short content hash of one section (stable key order)."""
    values = params.as_dict()[section] if isinstance(params, Params) else params[section]
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(f"{section}:{text}".encode()).hexdigest()[:16]


def train_config(base: Mapping[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a recorded one (keys it does not know are
    ignored) with the non-``None`` ``overrides`` on top."""
    known = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in (base or {}).items() if k in known}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)
