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

Numeric parameters carry their valid range (:class:`Bound`): the flag built
by :func:`option` refuses a value outside it, naming the flag, and so do
:func:`check_params` for ``params.yaml`` and :class:`TrainConfig` for a
recorded training configuration.

It also defines :class:`InputError`, the base of every error a user can
cause (each layer's own error type subclasses it), and
:func:`user_error_message`, which tells such errors from internal ones for
the command line's and the assets' error boundary.

This module imports nothing of the package: it is the bottom of the layers.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import math
import os
import string
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

PARAMS_NAME = "params.yaml"

DEFAULT_TAU = 0.07  # SPEC §1.4 and §3.3: zero-shot scores and the region-aware loss
DEFAULT_TEMPLATE = "a photo of a {}."  # prompts, captions and names when nothing else is configured
DEFAULT_TEMPLATES = (DEFAULT_TEMPLATE,)
EMBEDDING_MODES = ("auto", "roi", "roi-half", "crop")
MASK_FILLS = ("mean", "black", "blur", "border", "local")  # how the masking check hides a region
MASK_FILL_CHOICES = ("auto",) + MASK_FILLS  # auto: the fill that disturbs a random-region control least
# the masking verdict's control (SPEC §5 masking control): as many random regions of any images, compared in
# flip rates (anywhere), or random regions of the same size on the same images, compared image by image in
# errors undone and made (same-images)
MASK_CONTROLS = ("anywhere", "same-images")
MODEL_SOURCES = ("synthetic-default", "checkpoint")
RECIPES = ("default", "small")
FEATURE_SELECTIONS = ("called", "significant", "all", "top1", "rank1")  # or a count
DEFAULT_FEATURE_SELECTION = "called"  # what Stage 2 mitigates unless told (BENCHMARKS.md §Mitigation)
# the closed loop's same-budget control: RaVL's λ = 1 ablation (SPEC §3.5), the same initialisation, data order,
# sampler and steps without the region-aware loss, so the report says what that loss itself bought
CONTROL_METHOD = "upsampled"
REGION_LOSS_FORMS = ("spec", "correlated")  # SPEC §3.3 as written; spurious regions vs their own class only
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")  # and cuda:N
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: fp32 on the CPU, bf16 (else fp16) autocast on accelerators
TRAIN_TRANSFORMS = ("none", "open_clip")  # none: the evaluation transform; open_clip: the model's training one


# --------------------------------------------------------------------------- user errors

class InputError(ValueError):
    """Something the user gave — a file, a row, a flag, a parameter — that
    cannot be used. The message names it and says what would be valid. Every
    layer's own error type for bad input subclasses this one."""


# Operating-system errors that are about a path the user named.
USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# ... and those the user can act on, whatever their Python type: a full disk or quota, a name too long, a
# permission, a read-only file system; each with what to do
USER_OS_ERRNOS = {errno.ENOSPC: "free some space, or write elsewhere",
                  errno.EDQUOT: "free some space, or write elsewhere",
                  errno.ENAMETOOLONG: "use a shorter name",
                  errno.EACCES: "check its permissions, or write elsewhere",
                  errno.EPERM: "check its permissions, or write elsewhere",
                  errno.EROFS: "write to a writable file system",
                  errno.ELOOP: "the path's symbolic links form a loop"}
MESSAGE_LINE_LIMIT = 1000  # characters of one line of a message (a path or a value may be huge)


def first_line(text: str, limit: int = 400) -> str:
    """The first line of ``text``, at most ``limit`` characters."""
    line = (str(text).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def capped(text: str, limit: int = MESSAGE_LINE_LIMIT) -> str:
    """``text`` with each line cut to ``limit`` characters, saying how many were left out."""
    lines = []
    for line in str(text).strip().splitlines():
        if len(line) > limit:
            line = f"{line[:limit]}… ({len(line) - limit:,} more characters)"
        lines.append(line)
    return "\n".join(lines)


def user_error_message(exc: BaseException) -> str | None:
    """The message of an error the user caused (an :class:`InputError`, or
    an OS error about a path or one the user can act on: a full disk, a
    name too long, a permission, a read-only file system), ``None`` for
    anything else (an internal error). Long lines are cut."""
    if isinstance(exc, InputError):
        return capped(exc)
    if isinstance(exc, OSError) and (isinstance(exc, USER_OS_ERRORS) or exc.errno in USER_OS_ERRNOS):
        hint = USER_OS_ERRNOS.get(exc.errno)
        if exc.filename is not None and exc.strerror:
            text = f"{exc.filename}: {exc.strerror}" + (f" ({hint})" if hint else "")
        else:
            text = first_line(str(exc)) + (f" ({hint})" if hint and exc.strerror else "")
        return capped(text)
    return None


# --------------------------------------------------------------------------- valid values

@dataclass(frozen=True)
class Bound:
    """The values a numeric parameter takes: its kind (``int`` or ``float``)
    and an interval (``None``: unbounded on that side)."""

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        lo, hi = (None if v is None else str(v) if isinstance(v, int) else f"{v:g}" for v in (self.low, self.high))
        if lo is not None and hi is not None:
            return f"{noun} in {'(' if self.open_low else '['}{lo}, {hi}{')' if self.open_high else ']'}"
        if lo is not None:
            return f"{noun} {'>' if self.open_low else '≥'} {lo}"
        if hi is not None:
            return f"{noun} {'<' if self.open_high else '≤'} {hi}"
        return noun

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    def parse(self, text: str) -> int | float:
        """A flag's value: ``argparse`` reports the message with the flag."""
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if not self.accepts(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return value


INTEGER = Bound(int)
COUNT = Bound(int, 1)  # at least one
NON_NEGATIVE_INT = Bound(int, 0)
POSITIVE = Bound(float, 0, open_low=True)
NON_NEGATIVE = Bound(float, 0)
UNIT = Bound(float, 0, 1)  # a fraction in [0, 1]
OPEN_UNIT = Bound(float, 0, 1, open_low=True, open_high=True)
NUMBER = Bound(float)
SEED = Bound(int, 0, 2**32 - 1)  # what numpy, torch and scikit-learn all accept
# a temperature below this makes similarities / τ overflow to infinities (NaN probabilities) or one-hot scores
TEMPERATURE = Bound(float, 1e-4)


def template_problem(template: Any) -> str | None:
    """Why ``template`` cannot be filled with a class name, or ``None``:
    it needs the placeholder ``{}`` and no other (``{kind}`` would fail at
    the first class, after the model was loaded)."""
    if not isinstance(template, str):
        return f"is a {type(template).__name__}, not text"
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        return f"is not a valid template ({exc}; write a literal brace as '{{{{' or '}}}}')"
    if not names:
        return "has no '{}' placeholder for the class name"
    other = [name for name in names if name not in ("", "0")]
    if other:
        return f"has the placeholder {{{other[0]}}}; the only placeholder allowed is '{{}}' (the class name)"
    try:
        template.format("class")
    except (ValueError, IndexError, KeyError) as exc:
        return f"cannot be filled with a class name ({exc})"
    return None


def device_problem(name: Any) -> str | None:
    """Why ``name`` is not a device name (``auto``, ``cpu``, ``cuda``,
    ``cuda:N``, ``mps``), or ``None``; whether this machine has it is
    :mod:`ravl_pipeline.compute`'s question."""
    kind, _, index = str(name).strip().lower().partition(":")
    if kind not in DEVICE_CHOICES or (index and (kind != "cuda" or not index.isdigit())):
        return f"unknown device {str(name)!r}; expected one of {', '.join(DEVICE_CHOICES)} (or cuda:N)"
    return None


def check_template(template: Any, where: str) -> str:
    """``template`` when it can be filled with a class name; :class:`InputError` naming ``where`` otherwise."""
    problem = template_problem(template)
    if problem:
        raise InputError(f"{where} {template!r} {problem}")
    return template


def _f(default: Any, help: str, bound: Bound | None = None) -> Any:
    """A field with its default, the help text its command-line flag shows
    and, for a number, the values it takes."""
    metadata = {"help": help, **({"bound": bound} if bound is not None else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_bounds(record: Any, where: str, error: type = InputError, none_ok: bool = False,
                 prefix: str = "") -> None:
    """Every bounded field of a config dataclass in its range; ``error``
    naming ``where`` and the field (after ``prefix``) otherwise (``None``
    passes for fields whose default is ``None``, or for all with ``none_ok``)."""
    for spec in fields(record):
        bound = spec.metadata.get("bound")
        value = getattr(record, spec.name)
        if bound is None or (value is None and (none_ok or spec.default is None)):
            continue
        if not bound.accepts(value):
            raise error(f"{where}: {prefix}{spec.name} must be {bound.describe()}, got {value!r}")


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
    batch_size: int = _f(64, "images per forward pass", COUNT)


@dataclass(frozen=True)
class LabelsConfig:
    classes: list[str] | None = _f(None, "class names (default: the labels present in the data)")


@dataclass(frozen=True)
class ScoresConfig:
    tau: float = _f(DEFAULT_TAU, "softmax temperature of the zero-shot scores", TEMPERATURE)
    templates: list[str] | None = _f(None, "prompt templates with {} for the class (default: the dataset's "
                                           "setting.json caption template, else 'a photo of a {}.')")


@dataclass(frozen=True)
class DiscoveryConfig:
    seed: int = _f(0, "seed of the clustering and the permutation draws", SEED)
    influence_threshold: float = _f(0.25, "H_c threshold of the spurious criterion (SPEC §2.4)", UNIT)
    k_range: list[int] | None = _f(None, "[lo, hi) of K (default [2|Y|, 5|Y|))")
    max_regions: int = _f(20000, "regions clustered at most; more are sampled and the rest assigned", Bound(int, 2))
    top_regions: int = _f(50, "regions listed per feature", COUNT)
    cluster_workers: int = _f(1, "fit the K values of the sweep in this many processes (same result)", COUNT)
    evidence: bool = _f(True, "significance, the masking check and names for every feature")
    permutations: int = _f(2000, "permutations for each cluster's p-value (smallest p = 1/(permutations+1))",
                           COUNT)
    alpha: float = _f(0.05, "Benjamini-Hochberg level deciding which features are 'called'", OPEN_UNIT)
    mask_fill: str = _f("auto", "how the masking check hides a feature's regions: auto (of border, black, "
                                "local and mean, the fill whose random-region control changes predictions "
                                "least, chosen per audit) | mean | black | blur | border | local")
    mask_control: str = _f("anywhere", "the masking verdict's control: anywhere (as many random regions of any "
                                       "images; flip rates compared) | same-images (a region of the same size on "
                                       "each of the feature's images; errors undone and made compared image by "
                                       "image)")


@dataclass(frozen=True)
class MitigationConfig:
    """Stage 2 (SPEC §3). ``None``: as in the audited model's own fine-tuning."""

    method: str = _f("ravl", "ravl | upsampled | vl-erm | vl-gdro | spurious-aware | standard")
    lam: float | None = _f(0.8, "λ of the region-aware loss (SPEC §3.3)", UNIT)
    # correlated is ahead of SPEC's form on image worst-group and image overall on both model families and the
    # scenes setting, with the interval above 0 on at least one metric of each (BENCHMARKS.md §Mitigation)
    region_loss: str | None = _f("correlated", "form of the region-aware loss: correlated (spurious regions pushed "
                                               "from their feature's class text only) | spec (SPEC §3.3 as written: "
                                               "from every class text)")
    epochs: float | None = _f(None, "epochs (default: the audited model's fine-tuning)", POSITIVE)
    lr: float | None = _f(None, "learning rate (default: the audited model's fine-tuning)", POSITIVE)
    batch_size: int | None = _f(None, "batch size (default: the audited model's fine-tuning)", COUNT)
    seed: int | None = _f(None, "seed (default: the audited model's fine-tuning)", SEED)
    max_steps: int | None = _f(None, "stop after this many steps", COUNT)
    # 256 steps: 16 epochs of the built-in settings' 2,000 fine-tuning images at batch 128. Over the audited model's
    # 64 steps RaVL gains on image overall, region overall and region worst-group (intervals above 0) on both model
    # families, and leads its ablation on image worst-group (+5.5 [+2.6, +8.8], 23 seeds); on 1,000 images
    # (32 epochs) on all four metrics, both families; on 500 (64 epochs) and 250 (128) on image overall and both
    # region metrics, both families, at the price of more reliance on the feature (BENCHMARKS.md §The Stage 2 step
    # floor)
    min_steps: int | None = _f(256, "train at least this many steps, whatever the epochs give (null: as the "
                                    "audited model's fine-tuning, usually no floor)", COUNT)
    max_repeat: int | None = _f(None, "group-balanced sampling draws one image at most this many times per pass "
                                      "(default: no limit, full balance, SPEC §3.6)", COUNT)
    micro_batch_size: int | None = _f(None, "images per forward pass when a batch does not fit the device: gradients "
                                            "accumulated to the whole batch's (default: the audited model's "
                                            "fine-tuning; none: the whole batch at once)", COUNT)
    train_transform: str | None = _f(None, "images in training: none (the evaluation transform) | open_clip (the "
                                           "model's open_clip training transform; not with a region pass) "
                                           "(default: the audited model's fine-tuning)")
    control: bool = _f(True, f"the closed loop also trains {CONTROL_METHOD} (RaVL's λ = 1 ablation) at the same "
                             "budget and reports audited → control → mitigated, so the gain of the region-aware "
                             "loss itself is seen apart from that of the extra training")


@dataclass(frozen=True)
class EvaluationConfig:
    max_accuracy_drop: float = _f(0.05, "image accuracy the mitigated model may lose (blocking check)", NUMBER)
    min_group_size: int = _f(10, "groups smaller than this are reported but left out of worst-group", COUNT)


@dataclass(frozen=True)
class ComputeConfig:
    """Where models run and how images are loaded: changes speed, not what is
    computed (on the CPU, results are byte-identical whatever is set here; an
    accelerator's mixed precision rounds differently and is recorded in each
    output). Not a versioned source: changing it makes nothing stale."""

    device: str = _f("auto", "auto (CUDA when present, else Apple MPS, else the CPU) | cpu | cuda | cuda:N | mps")
    precision: str = _f("auto", "auto (fp32 on the CPU; bf16 autocast on accelerators that support it, else fp16 "
                                "with a gradient scaler in training) | fp32 | bf16 | fp16")
    workers: int = _f(0, "image decoding/preprocessing worker processes per loader (0: in the main process)",
                      NON_NEGATIVE_INT)
    shards: int = _f(1, "split the embedding of one validation set into this many parallel steps (same result)",
                     COUNT)
    checkpoint_every: int | None = _f(50, "save Stage 2's state this often (steps) so an interrupted run resumes "
                                          "(null: never)", COUNT)
    # BENCHMARKS.md §Threads: on 2 cores, 32 Stage 2 steps took 12.5 s with 2 threads and 18.4 s with 1 when
    # idle, but 35.9 s with 2 and 19.1 s with 1 next to one busy process
    threads: int | None = _f(None, "torch threads per process (null: the cores free when the process starts, "
                                   "all of them on an idle machine, fewer next to busy processes; "
                                   "OMP_NUM_THREADS, when set, wins)", COUNT)


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run (SPEC §3.2–3.6): every method shares the loop and these."""

    method: str = _f("standard", "training method (one of the registered methods)")
    epochs: float = _f(4.0, "epochs (fractions allowed)", POSITIVE)
    batch_size: int = _f(128, "batch size (global under torchrun); SPEC §3.4 compares methods at 128", COUNT)
    lr: float = _f(5e-4, "learning rate", POSITIVE)
    weight_decay: float = _f(0.1, "AdamW weight decay (not on biases and norms)", NON_NEGATIVE)
    warmup_steps: int = _f(0, "linear warm-up steps before the cosine schedule", NON_NEGATIVE_INT)
    seed: int = _f(0, "seed of initialisation, data order and sampling", SEED)
    lock_text: bool = _f(False, "freeze the text tower")
    caption_template: str = _f(DEFAULT_TEMPLATE, "caption for rows without one, {} = label")
    lam: float = _f(MitigationConfig.lam, "λ of the region-aware loss (SPEC §3.3)", UNIT)
    tau: float = _f(DEFAULT_TAU, "temperature of the region-aware loss", TEMPERATURE)
    region_loss: str = _f(MitigationConfig.region_loss, "form of the region-aware loss: correlated | spec")
    max_steps: int | None = _f(None, "stop after this many steps", COUNT)
    min_steps: int | None = _f(None, "train at least this many steps, whatever the epochs give (none: the epochs "
                                     "alone; max_steps, when set, wins)", COUNT)
    max_repeat: int | None = _f(MitigationConfig.max_repeat, "group-balanced sampling: the most times one image "
                                "is drawn per pass (none: no limit, every group as large as the largest)", COUNT)
    micro_batch_size: int | None = _f(None, "images per forward pass: a batch larger than this runs in micro-batches "
                                            "whose gradients add up to the whole batch's contrastive loss (exact "
                                            "but for BatchNorm statistics; none: the whole batch at once)", COUNT)
    train_transform: str = _f("none", "images in training: none (the evaluation transform, as discovery sees them) "
                                      "| open_clip (the model's own open_clip training transform, a random resized "
                                      "crop seeded per image and step; not for methods with a region pass)")

    def __post_init__(self) -> None:
        # a recorded configuration (ravl_model.json) enters here too
        check_bounds(self, "training configuration", ParamsError)
        check_template(self.caption_template, "training configuration: caption_template")
        if self.train_transform not in TRAIN_TRANSFORMS:
            raise ParamsError(f"training configuration: train_transform must be one of {', '.join(TRAIN_TRANSFORMS)}, "
                              f"got {self.train_transform!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTION_TYPES = {"audited_model": AuditedModelConfig, "regions": RegionsConfig, "labels": LabelsConfig,
                 "scores": ScoresConfig, "discovery": DiscoveryConfig, "mitigation": MitigationConfig,
                 "evaluation": EvaluationConfig, "compute": ComputeConfig}
SECTIONS = tuple(SECTION_TYPES)
# the sections that change results, each observed as a source asset; `compute` says where and how fast
VERSIONED_SECTIONS = tuple(name for name in SECTIONS if name != "compute")
# keys observed apart from their section, so that changing one makes only what reads it stale: the control is
# trained beside the mitigated model, and switching it must not retrain that model
SPLIT_KEYS = {"control": ("mitigation", "control")}
PARAMS_SOURCE_NAMES = VERSIONED_SECTIONS + tuple(SPLIT_KEYS)


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
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


class ParamsError(InputError):
    """A params file that cannot be used; the message names the file and key."""


def option(section: type, name: str) -> dict[str, Any]:
    """``argparse`` keyword arguments of one parameter: its default and help
    text from the section's definition (so a flag cannot drift from it)."""
    spec = {f.name: f for f in fields(section)}[name]
    default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
    out = {"default": default, "help": f"{spec.metadata.get('help', '')} (default: {default})"}
    bound = spec.metadata.get("bound")
    if bound is not None:
        out["type"] = flag_type(bound)
    return out


def flag_type(bound: Bound) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return bound.parse(text)

    parse.__name__ = bound.kind.__name__  # what argparse calls the type in its messages
    return parse


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
    for name in SECTIONS:  # every number in its range (a negative max_accuracy_drop demands a gain)
        check_bounds(getattr(params, name), str(where), ParamsError, none_ok=name == "mitigation", prefix=f"{name}.")
    need(isinstance(disc.evidence, bool), "discovery.evidence", "true or false", disc.evidence)
    need(isinstance(params.mitigation.control, bool), "mitigation.control", "true or false",
         params.mitigation.control)
    k_range = disc.k_range
    need(k_range is None or (isinstance(k_range, list) and len(k_range) == 2
                             and all(isinstance(k, int) and not isinstance(k, bool) for k in k_range)
                             and 2 <= k_range[0] < k_range[1]),
         "discovery.k_range", "[lo, hi), two integers with 2 ≤ lo < hi (or null for the default)", k_range)
    need(disc.mask_fill in MASK_FILL_CHOICES, "discovery.mask_fill", f"one of {', '.join(MASK_FILL_CHOICES)}",
         disc.mask_fill)
    need(disc.mask_control in MASK_CONTROLS, "discovery.mask_control", f"one of {', '.join(MASK_CONTROLS)}",
         disc.mask_control)
    need(params.mitigation.train_transform in (None, *TRAIN_TRANSFORMS), "mitigation.train_transform",
         f"one of {', '.join(TRAIN_TRANSFORMS)}", params.mitigation.train_transform)
    need(params.mitigation.region_loss in (None, *REGION_LOSS_FORMS), "mitigation.region_loss",
         f"one of {', '.join(REGION_LOSS_FORMS)}", params.mitigation.region_loss)
    need(device_problem(params.compute.device) is None, "compute.device",
         f"one of {', '.join(DEVICE_CHOICES)} or cuda:N", params.compute.device)
    need(params.compute.precision in PRECISIONS, "compute.precision", f"one of {', '.join(PRECISIONS)}",
         params.compute.precision)
    templates, classes = params.scores.templates, params.labels.classes
    need(templates is None or (isinstance(templates, list) and templates), "scores.templates",
         "a list of templates (or null)", templates)
    need(classes is None or (isinstance(classes, list) and len(classes) >= 2
                             and all(isinstance(c, str) and c.strip() for c in classes)
                             and len(set(classes)) == len(classes)),
         "labels.classes", "a list of at least two distinct class names (or null)", classes)
    for i, template in enumerate(params.scores.templates or []):
        problem = template_problem(template)
        need(problem is None, f"scores.templates[{i}]", f"a template with one '{{}}' ({problem})", template)


def section_values(params: Params | Mapping[str, Any], name: str) -> Any:
    """What one observed parameter source holds: a section less the keys
    observed apart (:data:`SPLIT_KEYS`), or one such key's value."""
    values = params.as_dict() if isinstance(params, Params) else params
    if name in SPLIT_KEYS:
        section, key = SPLIT_KEYS[name]
        return values[section][key]
    split = {key for section, key in SPLIT_KEYS.values() if section == name}
    return {k: v for k, v in values[name].items() if k not in split}


def section_version(params: Params | Mapping[str, Any], section: str) -> str:
    """A short content hash of one observed parameter source (stable key order)."""
    text = json.dumps(section_values(params, section), sort_keys=True, default=str)
    return hashlib.sha256(f"{section}:{text}".encode()).hexdigest()[:16]


def train_config(base: Mapping[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a recorded one (keys it does not know are
    ignored) with the non-``None`` ``overrides`` on top."""
    known = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in (base or {}).items() if k in known}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def stage2_config(recorded: Mapping[str, Any] | None, mitigation: MitigationConfig | None = None,
                  **overrides: Any) -> TrainConfig:
    """Stage 2's training configuration (SPEC §3.4): the audited model's own
    fine-tuning as ``recorded`` in its checkpoint (``None``: not recorded,
    :class:`TrainConfig`'s defaults), the non-``None`` values of
    ``mitigation`` (``params.yaml``'s section, e.g. the step floor) on top,
    and the non-``None`` ``overrides`` (flags) over both. The pipeline's
    Stage 2 and ``ravl finetune --findings`` both resolve it here."""
    section = dataclasses.asdict(mitigation if mitigation is not None else MitigationConfig())
    section.pop("control")  # what the closed loop trains besides, not how
    return train_config(recorded, **{**section, **{k: v for k, v in overrides.items() if v is not None}})
