"""Stage 2 against its baselines, with statistical power (SPEC §3.4–3.7,
§4.2): ``ravl bench mitigation``.

For every seed of a setting: build the audited model (the setting's recipe
with that seed), run Stage 1 on ``val`` with evidence, then train each
*run* of the chosen plans from the recipe's pre-trained initialisation on
the audited model's fine-tuning data with its fine-tuning configuration
(same seed, data order, epochs and learning rate; a run changes one thing),
and evaluate it on ``test``. Nothing is chosen by looking at ``test``.

Plans (:data:`PLANS`):

* ``main`` — Standard FT, Upsampled FT, VL-ERM, VL-GDRO, Spurious-Aware,
  RaVL (the default ``correlated`` form of the region loss), and RaVL with
  SPEC §3.3's form (``loss=spec``);
* ``ablation`` — only ``main``'s Upsampled FT and RaVL (both forms): the
  comparison SPEC §3.5 asks for, cheap enough to run on many seeds;
* ``lambda`` — RaVL at λ 0.5, 0.7, 0.9 (0.8 is ``main``'s RaVL, 1.0 is
  Upsampled FT, the same training without the region terms);
* ``batch`` — Upsampled FT and RaVL at batch 32 and 256 (128 in ``main``);
* ``steps`` — Upsampled FT and RaVL with 16 epochs, four times the recipes' 4:
  about batch 32's number of steps at ``main``'s batch size, which tells the
  batch size's effect from the step count's; on the built-in settings' 2,000
  fine-tuning images these are the 256 steps of the pipeline's Stage 2 floor
  (``mitigation.min_steps``), batch for batch;
* ``steps-main`` — every method of ``main`` (RaVL in its default form) with
  those 16 epochs: the baselines at RaVL's larger budget;
* ``floor`` — Upsampled FT and RaVL with the pipeline's Stage 2 step floor
  (``mitigation.min_steps``) on top of the recipe's epochs: the pipeline's
  default budget on any setting (the ``steps`` runs, batch for batch, on
  2,000 fine-tuning images; 32 epochs on ``default-1k``'s 1,000, 64 on
  ``default-500``'s 500, 128 on ``default-250``'s 250);
* ``features`` — Upsampled FT and RaVL mitigating the top-ranked kept
  cluster (``rank1``, the reference code), every kept cluster (``all``,
  SPEC §3.1) and every called one (``significant``); ``main`` uses the
  default selection;
* ``oracle`` — Upsampled FT and RaVL (both forms) given the ground-truth
  spurious regions of the fine-tuning set instead of Stage 1's: Stage 2
  alone, free of discovery errors (a diagnostic; it never sees ``test``);
* ``order`` — Upsampled FT and RaVL with five other training seeds (data
  order and sampling; same setting, audited model and findings): how much
  of the spread over seeds comes from training alone;
* ``sampler`` — Upsampled FT and RaVL with group-balanced sampling as SPEC
  §3.6 has it and capped at 8 draws of one image per pass (``max_repeat``),
  each with the default selection and with the oracle's.

One JSON line per finished (seed, run) is appended to ``results.jsonl`` in
the setting's folder, so a stopped run resumes where it was; the trained
checkpoints are deleted once evaluated unless ``keep_models``.
``summary.md`` / ``summary.json`` are rewritten after every line: mean ±
sd over seeds and, for every run, the paired difference RaVL − run per seed
with its bootstrap 95% interval (seeds resampled). On the seeds of
``trace_seeds`` the RaVL runs also record the diagnostics of
:mod:`.diagnostics` (assignment precision/recall, the loss terms, their
gradients and their effect on the correlated class's images).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..config import (DEFAULT_FEATURE_SELECTION, DiscoveryConfig, InputError, MitigationConfig, RegionsConfig,
                      TrainConfig)
from ..core.embed import preprocess_images
from ..core.evidence.stats import paired_difference_ci
from ..core.findings import Feature, Findings, read_findings, write_findings
from ..core.regions import propose_dataset, region_labels_for
from ..io.dataset import induced_pairs, load_dataset
from ..io.files import write_json_atomic, write_text_atomic
from ..mitigate.assign import RegionAssignment, cached_assignment, select_features
from ..mitigate.data import MitigationError
from ..models import load_model
from ..pipeline import stages
from .bench import _append_row, _read_rows
from .diagnostics import LossTrace, assignment_quality, summarise_trace
from .recipe import DEFAULT_RECIPE, SCENES_RECIPE, Recipe, build_audited_model
from .scenes import ScenesConfig

__all__ = ["Run", "PLANS", "SETTINGS", "register_setting", "run_mitigation_bench", "select_runs", "summarise",
           "summary_markdown"]

METRICS = ("image_overall", "image_worst_group", "region_overall", "region_worst_group")
NAMES = {"audited": "Audited model", "standard": "Standard FT", "upsampled": "Upsampled FT", "vl-erm": "VL-ERM",
         "vl-gdro": "VL-GDRO", "spurious-aware": "Spurious-Aware", "ravl": "RaVL"}
REFERENCE = "ravl"  # the paired differences are REFERENCE − run
TRACED = ("ravl", "upsampled")  # methods whose loss terms are traced on the trace seeds


@dataclass(frozen=True)
class Run:
    """One training configuration: a method and what it changes from the
    setting's fine-tuning configuration (``None``: unchanged)."""

    method: str
    lam: float | None = None
    batch_size: int | None = None
    features: str | None = None
    region_loss: str | None = None
    max_repeat: int | None = None
    order_seed: int | None = None  # the training seed (data order, sampling) instead of the setting's
    epochs: float | None = None
    min_steps: int | None = None  # a floor on the steps, as the pipeline's Stage 2 has (mitigation.min_steps)

    @property
    def key(self) -> str:
        changes = [f"{label}={getattr(self, attr)}" for attr, label, _, _ in RUN_FIELDS
                   if getattr(self, attr) is not None]
        return self.method + (f"[{','.join(changes)}]" if changes else "")

    @classmethod
    def from_key(cls, key: str) -> "Run":
        method, _, rest = key.partition("[")
        fields = dict(kv.split("=", 1) for kv in rest.rstrip("]").split(",") if kv)
        return cls(method, **{attr: parse(fields[label]) for attr, label, _, parse in RUN_FIELDS if label in fields})

    def train_overrides(self) -> dict:
        """The fine-tuning configuration fields this run changes."""
        return {train: getattr(self, attr) for attr, _, train, _ in RUN_FIELDS
                if train is not None and getattr(self, attr) is not None}

    def train_config(self, finetune: TrainConfig, seed: int) -> TrainConfig:
        """The run's training configuration: the setting's fine-tuning
        ``finetune`` (its budget; the pipeline's Stage 2 floor only where the
        run sets ``min_steps``) with this run's method, seed and changes."""
        return replace(finetune, **({"method": self.method, "seed": seed} | self.train_overrides()))

    @property
    def ablation(self) -> "Run | None":
        """RaVL's own ablation (SPEC §3.5): Upsampled FT, i.e. λ = 1, with
        everything else of this run (batch size, feature selection, sampling,
        order, epochs); ``None`` for other methods."""
        if self.method != REFERENCE:
            return None
        return replace(self, method="upsampled", lam=None, region_loss=None)

    @property
    def counterpart(self) -> "Run | None":
        """RaVL (default form and λ) with everything else of this run: the
        RaVL run a baseline trained at another batch size, budget or selection
        is compared with; ``None`` for RaVL runs and for runs that change
        nothing (those are compared with ``main``'s RaVL already)."""
        if self.method == REFERENCE or self == Run(self.method):
            return None
        return replace(self, method=REFERENCE)


# What a run can change: its attribute, its label in the run key, the
# TrainConfig field it sets (None: not a training field), and its parser.
RUN_FIELDS = (("lam", "lam", "lam", float), ("batch_size", "batch", "batch_size", int),
              ("features", "features", None, str), ("region_loss", "loss", "region_loss", str),
              ("max_repeat", "repeat", "max_repeat", int), ("order_seed", "order", "seed", int),
              ("epochs", "epochs", "epochs", float), ("min_steps", "min_steps", "min_steps", int))


METHODS = ("standard", "upsampled", "vl-erm", "vl-gdro", "spurious-aware", "ravl")  # SPEC §3.6's baselines and RaVL
STEPS_EPOCHS = 16.0  # four times the recipes' 4 epochs: about batch 32's number of steps at batch 128

PLANS: dict[str, list[Run]] = {
    "main": [Run(m) for m in METHODS] + [Run("ravl", region_loss="spec")],
    "lambda": [Run("ravl", lam=x) for x in (0.5, 0.7, 0.9)],
    "batch": [Run(m, batch_size=b) for b in (32, 256) for m in ("upsampled", "ravl")],
    "steps": [Run(m, epochs=STEPS_EPOCHS) for m in ("upsampled", "ravl")],
    "steps-main": [Run(m, epochs=STEPS_EPOCHS) for m in METHODS],
    "floor": [Run(m, min_steps=MitigationConfig.min_steps) for m in ("upsampled", "ravl")],
    "features": [Run(m, features=f) for f in ("rank1", "all", "significant") for m in ("upsampled", "ravl")],
    "oracle": [Run("upsampled", features="oracle"), Run("ravl", features="oracle"),
               Run("ravl", features="oracle", region_loss="spec")],
    "ablation": [Run("upsampled"), Run("ravl"), Run("ravl", region_loss="spec")],
    "pair": [Run("upsampled"), Run("ravl")],  # the closed loop's control and mitigated model, at the recipe's budget
    "order": [Run(m, order_seed=k) for k in (101, 102, 103, 104, 105) for m in ("upsampled", "ravl")],
    "sampler": [Run(m, max_repeat=k, features=f) for k in (None, 8) for f in (None, "oracle")
                for m in ("upsampled", "ravl")],
}
ORACLE = "oracle"


# --------------------------------------------------------------------------- settings

@dataclass
class BuiltSetting:
    """What one seed of a setting provides to the benchmark."""

    pretrained: str  # model spec Stage 2 starts from
    audited: str  # model spec Stage 1 audits
    finetune_dir: Path  # the audited model's fine-tuning data
    eval_dir: Path  # val (discovery) and test (metrics) splits
    finetune: TrainConfig  # the audited model's fine-tuning configuration
    features: list[tuple[str, str]]  # ground-truth (feature, correlated class) pairs, [] when unknown
    proposer: str = RegionsConfig.proposer  # the regions Stage 1 and Stage 2 work on


def recipe_setting(recipe: Recipe) -> Callable[[Path, int], BuiltSetting]:
    """A setting from a synthetic recipe: build (or reuse) its audited model."""
    def build(root: Path, seed: int) -> BuiltSetting:
        r = recipe.with_seed(seed)
        paths = build_audited_model(root, r)
        eval_dir = paths["setting"] / "eval"
        return BuiltSetting(f"local-dir:{paths['pretrained']}", f"local-dir:{paths['audited']}",
                            paths["setting"] / "finetune", eval_dir, r.finetune, induced_pairs(eval_dir),
                            proposer="boxes" if isinstance(r.synth, ScenesConfig) else RegionsConfig.proposer)
    return build


def _with_finetune_images(recipe: Recipe, n: int) -> Recipe:
    return replace(recipe, synth=replace(recipe.synth, n_finetune=n))


# the default setting with the second model family (open_clip's default normalisation)
_CLIP_RECIPE = replace(DEFAULT_RECIPE, base_model="ravl-tiny-rn-clip")

SETTINGS: dict[str, Callable[[Path, int], BuiltSetting]] = {
    "default": recipe_setting(DEFAULT_RECIPE),
    "default-clip": recipe_setting(_CLIP_RECIPE),
    # the default setting with fewer fine-tuning images: where the step floor means more epochs
    # (32 on 1,000 images, 64 on 500, 128 on 250), on both model families
    "default-1k": recipe_setting(_with_finetune_images(DEFAULT_RECIPE, 1000)),
    "default-1k-clip": recipe_setting(_with_finetune_images(_CLIP_RECIPE, 1000)),
    "default-500": recipe_setting(_with_finetune_images(DEFAULT_RECIPE, 500)),
    "default-500-clip": recipe_setting(_with_finetune_images(_CLIP_RECIPE, 500)),
    "default-250": recipe_setting(_with_finetune_images(DEFAULT_RECIPE, 250)),
    "default-250-clip": recipe_setting(_with_finetune_images(_CLIP_RECIPE, 250)),
    # the COCO-style scenes setting (SPEC §4.3): non-square photos, COCO boxes, the red square tied to "nine"
    "scenes": recipe_setting(SCENES_RECIPE),
}


def register_setting(name: str, build: Callable[[Path, int], BuiltSetting]) -> None:
    """Make a setting available to the benchmark, e.g.
    ``register_setting("scenes-clip", recipe_setting(replace(SCENES_RECIPE, base_model="ravl-tiny-rn-clip")))``."""
    SETTINGS[name] = build


# --------------------------------------------------------------------------- one seed

def discover(built: BuiltSetting, seed: int, root: Path, mode: str = RegionsConfig.mode) -> Findings:
    """Stage 1 on ``val`` with evidence, as ``ravl discover`` runs it (cached in ``root``)."""
    path = root / "findings.json"
    if path.is_file():
        return read_findings(path)
    ds = load_dataset(built.eval_dir, split="val", require_labels=True)
    classes = ds.classes()
    findings = stages.stage1(load_model(built.audited), ds, classes, templates=stages.templates_for(built.eval_dir),
                             regions=RegionsConfig(proposer=built.proposer, mode=mode),
                             discovery=DiscoveryConfig(seed=seed)).findings
    write_findings(findings, path)
    return findings


def probes(built: BuiltSetting, lm, classes: Sequence[str], per_group: int = 64) -> dict:
    """Probe images from ``val`` for the loss trace: each correlated class
    and the other classes, with and without the feature."""
    ds = load_dataset(built.eval_dir, split="val", require_labels=True)
    labels = np.asarray([classes.index(y) for y in ds.labels])
    out = {}
    for feature, cls in built.features:
        present = np.array([feature in labs for labs in ds.region_labels])
        is_cls = labels == classes.index(cls)
        for name, mask in ((f"{cls} with", is_cls & present), (f"{cls} without", is_cls & ~present),
                           ("others with", ~is_cls & present), ("others without", ~is_cls & ~present)):
            rows = np.flatnonzero(mask)[:per_group]
            if len(rows):
                out[name] = (preprocess_images(lm, ds, rows), torch.as_tensor(labels[rows]))
    return out


def discovered_test_groups(built: BuiltSetting, findings: Findings, root: Path):
    """The test split's groups from the findings, as the closed loop forms
    them on data without an annotation of the feature (None: nothing to
    mitigate); with each group column's agreement with the planted feature."""
    ds = load_dataset(built.eval_dir, split="test", require_labels=True)
    try:
        groups = stages.discovered_groups(load_model(built.audited), ds, findings, cache_dir=root / "cache")
    except MitigationError:
        return None
    planted = stages.groups_for(ds, built.eval_dir)
    groups.notes.append(json.dumps({f["feature"]: float((groups.presence[f["feature"]] == planted.presence).mean())
                                    for f in groups.features}))
    return groups


def _discovered(model: str, built: BuiltSetting, groups) -> dict | None:
    """A model's metrics on the discovered groups (``groups_from: findings``)."""
    if groups is None:
        return None
    metrics = stages.evaluate(model, built.eval_dir, split="test", groups=groups)
    return {"metrics": {k: metrics[k] for k in METRICS}, "agreement": json.loads(groups.notes[-1]),
            "features": [f["feature"] for f in groups.features]}


def train_and_measure(built: BuiltSetting, findings: Findings, run: Run, seed: int, root: Path, *,
                      trace: bool = False, keep_models: bool = False, progress: bool = False,
                      discovered=None) -> dict:
    """Train one run, evaluate it on ``test`` (and, given ``discovered``
    groups, on those too); the result row."""
    cfg = run.train_config(built.finetune, seed)
    selection = run.features or DEFAULT_FEATURE_SELECTION
    row = {"run": run.key, "method": run.method, "seed": seed, "config": cfg.to_dict(), "selection": selection}
    assignment = None
    if selection == ORACLE:
        findings, assignment = oracle(built, findings)
        selection = "all"
    target = root / "models" / run.key
    hook = None
    if trace:
        lm = load_model(built.pretrained)
        hook = LossTrace(probes(built, lm, findings.classes),
                         lm.tokenizer([cfg.caption_template.format(c) for c in findings.classes]))
    t0 = time.perf_counter()
    try:
        hist = stages.train(built.pretrained, built.finetune_dir, target, cfg, findings=findings,
                            audited_model=built.audited, features=selection, cache_dir=root / "cache",
                            attribute_text=[f for f, _ in built.features] or None, assignment=assignment,
                            inspect=hook, progress=progress)
    except MitigationError as exc:
        return row | {"skipped": str(exc)}
    meta = json.loads((target / "ravl_model.json").read_text())
    metrics = stages.evaluate(f"local-dir:{target}", built.eval_dir, split="test")
    row.update({"metrics": {k: metrics[k] for k in METRICS}, "groups": metrics["groups"],
                "warnings": metrics["warnings"], "steps": hist["steps"], "seconds": time.perf_counter() - t0,
                "seconds_per_step": hist["seconds_per_step"],
                "features_used": (meta.get("findings") or {}).get("features_used"),
                "spurious_regions": meta.get("spurious_regions"), "attribute_text": meta.get("attribute_text"),
                "discovered": _discovered(f"local-dir:{target}", built, discovered)})
    if hook is not None:
        write_json_atomic(root / f"trace-{run.key}.json", hook.rows)
        row["trace"] = summarise_trace(hook.rows)
    if not keep_models:
        shutil.rmtree(target, ignore_errors=True)
    return row


def oracle(built: BuiltSetting, findings: Findings) -> tuple[Findings, RegionAssignment]:
    """The ground truth as Stage 1's output: one feature per planted
    (feature, class) pair, and as spurious regions of the fine-tuning set
    exactly those its region labels name as a planted feature."""
    if not built.features:
        raise MitigationError("the oracle needs a setting with planted features (setting.json)")
    proposer = findings.proposer or RegionsConfig.proposer
    ds = load_dataset(built.finetune_dir)
    labels = region_labels_for(ds, proposer)
    if labels is None:
        raise MitigationError(f"{ds.manifest_file}: no region labels for proposer {proposer!r}: no oracle")
    boxes = propose_dataset(ds, proposer)
    index = {name: k for k, (name, _) in enumerate(built.features)}
    region_image = np.concatenate([np.full(len(b), i) for i, b in enumerate(boxes)]).astype(np.int64)
    region_index = np.concatenate([np.arange(len(b)) for b in boxes]).astype(np.int64)
    cluster = np.array([index.get(lab, -1) for labs in labels for lab in labs], dtype=np.int64)
    assignment = RegionAssignment(list(ds.image_ids), region_image, region_index,
                                  np.concatenate(boxes).astype(np.float32), cluster, cluster >= 0)
    feats = [Feature(rank=k + 1, cluster_id=k, score=0.0, influence=None, attribute=cls, called=True,
                     extra={"oracle": name}) for k, (name, cls) in enumerate(built.features)]
    return replace(findings, features=feats), assignment


def audited_row(built: BuiltSetting, seed: int, discovered=None) -> dict:
    metrics = stages.evaluate(built.audited, built.eval_dir, split="test")
    return {"run": "audited", "method": "audited", "seed": seed, "metrics": {k: metrics[k] for k in METRICS},
            "groups": metrics["groups"], "warnings": metrics["warnings"],
            "discovered": _discovered(built.audited, built, discovered)}


def validity_row(findings: Findings, seed: int) -> dict:
    """Whether this seed's audited model learned the planted correlation, on
    ``val`` (SPEC §4.1), as Stage 1 recorded it in the findings' ground
    truth: a seed whose model did not has nothing to mitigate."""
    return {"run": "validity", "method": "validity", "seed": seed,
            "validity": {f: {k: gt["validity"][k] for k in ("valid", "correlated_class", "correlated_gap",
                                                             "other_mean_gap")}
                         for f, gt in findings.ground_truth.items()}}


def assignment_rows(built: BuiltSetting, findings: Findings, seed: int, root: Path,
                    selections: Sequence[str]) -> list[dict]:
    """Precision/recall of the spurious-region assignment of every selection."""
    ds = load_dataset(built.finetune_dir)
    audited = load_model(built.audited)
    names = [f for f, _ in built.features]
    rows = []
    for sel in selections:
        row = {"run": f"assignment[{sel}]", "method": "assignment", "seed": seed, "selection": sel}
        try:
            chosen = select_features(findings, sel)
        except MitigationError as exc:
            rows.append(row | {"skipped": str(exc)})
            continue
        a = cached_assignment(audited, ds, findings, root / "cache", sel)
        rows.append(row | {"features_used": [{"rank": f.rank, "attribute": f.attribute} for f in chosen],
                           "quality": assignment_quality(a, ds, names, findings.proposer or RegionsConfig.proposer,
                                                         [c for _, c in built.features])})
    return rows


# --------------------------------------------------------------------------- the benchmark

def select_runs(plans: Sequence[str], methods: Sequence[str] | None = None) -> list[Run]:
    """The runs of ``plans`` in plan order, each once; only those of
    ``methods`` when given (e.g. RaVL and the one baseline a test is about)."""
    unknown = [p for p in plans if p not in PLANS]
    if unknown:
        raise ValueError(f"unknown plan(s) {unknown}; expected any of {', '.join(PLANS)}")
    unknown = [m for m in methods or () if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; expected any of {', '.join(METHODS)}")
    runs = list(dict.fromkeys(r for p in plans for r in PLANS[p] if methods is None or r.method in methods))
    if not runs:
        raise InputError(f"--plans {' '.join(plans)} has no run of --methods {' '.join(methods or ())}")
    return runs


def run_mitigation_bench(setting: str = "default", seeds: Sequence[int] = (0, 1, 2, 3, 4),
                         plans: Sequence[str] = ("main",), out_dir: str | Path = "runs/bench-mitigation", *,
                         trace_seeds: Sequence[int] = (), mode: str = RegionsConfig.mode, keep_models: bool = False,
                         methods: Sequence[str] | None = None, progress: bool = True,
                         discovered_groups: bool = False) -> dict:
    """Run (or resume) the benchmark on one setting; returns the summary.
    ``methods``, when given, keeps only those methods' runs of the plans;
    ``discovered_groups`` also scores every model on the test groups the
    findings form (``groups_from: findings``) beside the annotated ones."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; expected one of {', '.join(SETTINGS)}")
    runs = select_runs(plans, methods)
    out = Path(out_dir) / setting
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = _read_rows(results)
    selections = sorted({r.features or DEFAULT_FEATURE_SELECTION for r in runs} - {ORACLE})

    def done(seed: int, key: str) -> bool:
        return any(r["seed"] == seed and r["run"] == key for r in rows)

    def add(row: dict) -> None:
        row["setting"] = setting
        _append_row(results, row)
        rows.append(row)
        write_summary(out, setting, rows)
        if progress:
            m = row.get("metrics") or {}
            what = row.get("skipped") or " ".join(f"{k}={m[k]:.3f}" for k in METRICS if m.get(k) is not None)
            what += " ".join(f"{f} {'valid' if v['valid'] else 'NOT valid'}"
                             for f, v in (row.get("validity") or {}).items())
            print(f"[{setting} seed {row['seed']}] {row['run']}: {what}", flush=True)

    prepared: dict[int, tuple[BuiltSetting, Findings]] = {}
    groups: dict[int, object] = {}

    def prepare(seed: int) -> tuple[BuiltSetting, Findings]:
        if seed not in prepared:
            root = out / f"seed{seed}"
            built = SETTINGS[setting](root, seed)
            findings = discover(built, seed, root, mode)
            groups[seed] = discovered_test_groups(built, findings, root) if discovered_groups else None
            if not done(seed, "audited"):
                add(audited_row(built, seed, groups[seed]))
            if findings.ground_truth and not done(seed, "validity"):
                add(validity_row(findings, seed))
            for row in assignment_rows(built, findings, seed, root, selections):
                if not done(seed, row["run"]):
                    add(row)
            prepared[seed] = built, findings
        return prepared[seed]

    # every seed's validity first (a resumed run records it too), then plan
    # by plan, each over every seed, so that a run stopped early has complete
    # tables for the first plans
    for seed in seeds:
        if not done(seed, "validity"):
            prepare(seed)
    for run in runs:
        for seed in seeds:
            if not done(seed, run.key):
                built, findings = prepare(seed)
                add(train_and_measure(built, findings, run, seed, out / f"seed{seed}", keep_models=keep_models,
                                      trace=seed in trace_seeds and run.method in TRACED, discovered=groups[seed]))
    return write_summary(out, setting, rows)


# --------------------------------------------------------------------------- tables

def summarise(rows: Sequence[dict]) -> dict:
    """Mean ± sd per run and metric over seeds; the paired difference
    ``RaVL − run`` per metric with its bootstrap interval over the seeds
    both have; for every RaVL run the paired difference to its own
    ablation (:attr:`Run.ablation`, ``run − ablation``); and for every
    baseline run that changes the training, the difference from RaVL with the
    same change (:attr:`Run.counterpart`, ``counterpart − run``)."""
    trained = [r for r in rows if "metrics" in r]
    by_run: dict[str, dict[int, dict]] = {}
    for r in trained:
        by_run.setdefault(r["run"], {})[r["seed"]] = r["metrics"]
    ref = by_run.get(REFERENCE, {})
    out = {"runs": {}, "seeds": sorted({r["seed"] for r in trained})}
    for key, per_seed in by_run.items():
        entry = {"n": len(per_seed), "seeds": sorted(per_seed)}
        for m in METRICS:
            vals = [v[m] for v in per_seed.values() if v.get(m) is not None]
            entry[m] = {"mean": float(np.mean(vals)) if vals else None,
                        "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else (0.0 if vals else None)}
        if key != REFERENCE and set(ref) & set(per_seed):
            _add_paired(entry, "ravl_minus", ref, per_seed)
        run = Run.from_key(key)
        if run.ablation is not None and run.ablation.key in by_run:
            entry["ablation"] = run.ablation.key
            _add_paired(entry, "minus_ablation", per_seed, by_run[run.ablation.key])
        if run.counterpart is not None and run.counterpart.key in by_run:
            entry["counterpart"] = run.counterpart.key
            _add_paired(entry, "counterpart_minus", by_run[run.counterpart.key], per_seed)
        out["runs"][key] = entry
    out["skipped"] = [{"run": r["run"], "seed": r["seed"], "why": r["skipped"]} for r in rows if "skipped" in r]
    out["assignment"] = sorted(({"seed": r["seed"], "selection": r["selection"], **_pr(r["quality"])}
                                for r in rows if r.get("method") == "assignment" and "quality" in r),
                               key=lambda a: (a["seed"], a["selection"]))
    out["group_sizes"] = sorted({g["n"] for r in trained for g in r.get("groups", []) if g.get("n")})
    out["validity"] = {r["seed"]: r["validity"] for r in rows if r.get("method") == "validity"}
    out["reliance"] = reliance(rows)
    return out


def _add_paired(entry: dict, field: str, first: dict[int, dict], second: dict[int, dict]) -> None:
    """``entry[m][field]``: ``first − second`` per metric, paired over the seeds both have."""
    common = sorted(set(first) & set(second))
    for m in METRICS:
        entry[m][field] = paired_difference_ci([first[s][m] for s in common], [second[s][m] for s in common])


def feature_gaps(groups: Sequence[dict], correlated_class: str) -> dict | None:
    """How much a model's image accuracy still depends on the feature, from
    its (class, feature present) groups: the correlated class's accuracy with
    − without it, and the mean of that difference over the other classes
    (the quantities of SPEC §4.1's validity; 0 and 0 when the feature no
    longer matters). ``None`` when a needed group is missing."""
    acc = {(g["label"], bool(g["feature_present"])): g["image_acc"] for g in groups}
    labels = sorted({label for label, _ in acc})
    gaps = {y: acc[(y, True)] - acc[(y, False)] for y in labels
            if acc.get((y, True)) is not None and acc.get((y, False)) is not None}
    others = [v for y, v in gaps.items() if y != correlated_class]
    if correlated_class not in gaps or not others:
        return None
    return {"correlated_gap": gaps[correlated_class], "other_mean_gap": float(np.mean(others))}


def reliance(rows: Sequence[dict]) -> dict:
    """Per run, the mean over seeds of :func:`feature_gaps` on ``test``
    (single-feature settings whose validity rows name the class)."""
    cls = {r["seed"]: next(iter(r["validity"].values()))["correlated_class"] for r in rows
           if r.get("method") == "validity" and len(r["validity"]) == 1}
    per_run: dict[str, list[dict]] = {}
    for r in rows:
        if "groups" in r and r["seed"] in cls:
            gaps = feature_gaps(r["groups"], cls[r["seed"]])
            if gaps is not None:
                per_run.setdefault(r["run"], []).append(gaps)
    return {run: {k: float(np.mean([g[k] for g in gs])) for k in ("correlated_gap", "other_mean_gap")}
            | {"n": len(gs)} for run, gs in per_run.items()}


def valid_seeds(rows: Sequence[dict]) -> list[int] | None:
    """The seeds whose audited model learned every planted correlation;
    ``None`` when no seed's validity is recorded."""
    checked = {r["seed"]: all(v["valid"] for v in r["validity"].values()) for r in rows
               if r.get("method") == "validity"}
    return sorted(s for s, ok in checked.items() if ok) if checked else None


def _pr(q: dict) -> dict:
    if not q.get("available"):
        return {}
    return {"region_precision": q["regions"]["precision"], "region_recall": q["regions"]["recall"],
            "image_precision": q["images"]["precision"], "image_recall": q["images"]["recall"],
            "flagged_labels": q["flagged_labels"],
            "own_object_flagged": {c: v["own_object_flagged"] for c, v in q["correlated_class_objects"].items()}}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _diff(d: dict | None) -> str:
    if not d or d.get("mean") is None:
        return "—"
    lo, hi = d["ci"]
    return f"{100 * d['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def summary_markdown(summary: dict, setting: str) -> str:
    runs = summary["runs"]
    order = ["audited"] + [r.key for p in PLANS.values() for r in p]
    keys = [k for k in dict.fromkeys(order) if k in runs] + [k for k in runs if k not in order]
    lines = [f"Mitigation benchmark, setting `{setting}`: seeds {summary['seeds']}; test group sizes "
             f"{summary['group_sizes']}", "",
             "| run | n | image overall | image worst-group | region overall | region worst-group |",
             "|---|---|---|---|---|---|"]
    for k in keys:
        e = runs[k]
        lines.append(f"| {k} | {e['n']} | " + " | ".join(
            f"{_pct(e[m]['mean'])} ± {_pct(e[m]['sd'])}" for m in METRICS) + " |")
    lines += ["", f"Paired difference {REFERENCE} − run, percentage points, mean [bootstrap 95% CI over seeds]:", "",
              "| run | n | image overall | image worst-group | region overall | region worst-group |",
              "|---|---|---|---|---|---|"]
    for k in keys:
        e = runs[k]
        if k == REFERENCE or "ravl_minus" not in e[METRICS[0]]:
            continue
        n = e[METRICS[0]]["ravl_minus"]["n"]
        lines.append(f"| {k} | {n} | " + " | ".join(_diff(e[m].get("ravl_minus")) for m in METRICS) + " |")
    lines += _pair_table(runs, keys, "ablation", "minus_ablation",
                         "RaVL runs against their ablation (Upsampled FT, λ = 1, same batch and selection), run − "
                         "ablation, percentage points, mean [bootstrap 95% CI]:")
    lines += _pair_table(runs, keys, "counterpart", "counterpart_minus",
                         "Baselines trained with a change against RaVL with the same change (batch size, epochs, "
                         "selection), RaVL − run, percentage points, mean [bootstrap 95% CI]:", partner="RaVL run")
    if summary["assignment"]:
        lines += ["", "Spurious-region assignment on the fine-tuning set vs ground truth:", "",
                  "| seed | selection | region precision | region recall | image precision | image recall | "
                  "flagged labels (most common) |", "|---|---|---|---|---|---|---|"]
        for a in summary["assignment"]:
            lines.append(f"| {a['seed']} | {a['selection']} | " + " | ".join(
                _pct(a.get(k)) for k in ("region_precision", "region_recall", "image_precision", "image_recall"))
                + " | " + ", ".join(f"{k} {v}" for k, v in list((a.get("flagged_labels") or {}).items())[:4]) + " |")
    if summary.get("reliance"):
        lines += ["", "Reliance on the feature on `test`, mean over seeds: image accuracy with − without it, "
                  "correlated class / mean of the other classes (0 / 0: the feature no longer matters):", "",
                  "| run | n | correlated class | other classes |", "|---|---|---|---|"]
        for k in [k for k in keys if k in summary["reliance"]]:
            g = summary["reliance"][k]
            lines.append(f"| {k} | {g['n']} | {_signed(g['correlated_gap'])} | {_signed(g['other_mean_gap'])} |")
    if summary.get("validity"):
        lines += ["", "Validity of each seed's audited model on `val` (SPEC §4.1: accuracy with − without the "
                  "feature, correlated class / mean of the others):", ""]
        for seed, per in sorted(summary["validity"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"- seed {seed}: " + "; ".join(
                f"{f} ↔ {v['correlated_class']} {'valid' if v['valid'] else '**not valid**'} "
                f"({_signed(v['correlated_gap'])} / {_signed(v['other_mean_gap'])})" for f, v in per.items()))
    for s in summary["skipped"]:
        lines.append(f"- skipped: {s['run']} on seed {s['seed']}: {s['why']}")
    return "\n".join(lines) + "\n"


def _pair_table(runs: dict, keys: Sequence[str], name: str, field: str, title: str,
                partner: str | None = None) -> list[str]:
    """Markdown lines of the runs paired with ``runs[k][name]`` (the
    differences in ``field``); none when no run has such a partner."""
    paired = [k for k in keys if name in runs[k]]
    if not paired:
        return []
    lines = ["", title, "", f"| run | {partner or name} | n | image overall | image worst-group | region overall | "
             "region worst-group |", "|---|---|---|---|---|---|---|"]
    for k in paired:
        e = runs[k]
        lines.append(f"| {k} | {e[name]} | {e[METRICS[0]][field]['n']} | "
                     + " | ".join(_diff(e[m].get(field)) for m in METRICS) + " |")
    return lines


def _signed(x) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def write_summary(out: Path, setting: str, rows: Sequence[dict]) -> dict:
    """``summary.json`` / ``summary.md``; when some seed's audited model is
    not valid, the same tables over the valid seeds only follow."""
    summary = summarise(rows)
    text = summary_markdown(summary, setting)
    valid = valid_seeds(rows)
    if valid is not None and set(valid) != set(summary["seeds"]):
        summary["valid_seeds_only"] = summarise([r for r in rows if r["seed"] in valid])
        text += "\n## Valid seeds only\n\n" + summary_markdown(summary["valid_seeds_only"], setting)
    write_json_atomic(out / "summary.json", {"setting": setting, **summary})
    write_text_atomic(out / "summary.md", text)
    return summary
