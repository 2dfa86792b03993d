"""Discovery benchmark over a grid of synthetic settings (SPEC §4.1–4.2).

Every setting trains its own tiny audited model through
:func:`recipe.build_audited_model` (a :class:`Recipe` derived from the
default one: only the induced features, their classes, the strength, the
seed and — for speed — the data sizes change), then runs discovery with
evidence and the image-level baselines on the same ``val`` embeddings.

Settings come in three kinds:

* ``single`` — one induced feature at Cramér's V ``strength``;
* ``null``   — the same feature at V = 0 (any called finding is false);
* ``two``    — two features induced at once, each with its own class.

The ``small``, ``full`` and ``extra`` grids use the 2×2-quadrant images
(SPEC §4.1, regions = quadrants); the ``scenes`` grid uses COCO-style scenes
(SPEC §4.3: non-square photos with several objects, imported through the
COCO importer; regions = the COCO boxes) built by
:data:`recipe.SCENES_RECIPE`.

One JSON line per finished setting is appended to ``results.jsonl`` (so a
long grid can be stopped and resumed); ``summary.json`` and ``summary.md``
are rewritten atomically after every setting.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..config import DiscoveryConfig, InputError, RegionsConfig
from ..core.evidence import stats
from ..core.evidence.causal import VERDICTS
from ..core.findings import Feature, Findings
from ..core.metrics import PRECISION_K as K
from ..core.metrics import feature_presence, precision_at_k, region_label_map, validity
from ..core.regions import region_labels_for
from ..core.scores import label_indices
from ..io.dataset import load_dataset
from ..io.files import write_json_atomic, write_text_atomic
from ..models import load_model
from ..pipeline import stages
from . import baselines
from .recipe import BASE_MODEL, DEFAULT_RECIPE, SCENES_RECIPE, Recipe, build_audited_model
from .synth import FeatureSpec, SynthConfig

TRUE_FINDING_PRECISION = 0.5  # a finding "is" a feature when most of its top-10 regions show it
FEATURES = {
    "red square": FeatureSpec("red square", (255, 0, 0), "square"),
    "blue circle": FeatureSpec("blue circle", (0, 0, 255), "circle"),
    "green triangle": FeatureSpec("green triangle", (0, 255, 0), "triangle"),
    "yellow cross": FeatureSpec("yellow cross", (255, 255, 0), "cross"),
}
GRIDS = ("small", "full", "extra", "evidence", "scenes")
# SPEC §4.2: in a null setting the planted feature appears in pre-training and
# fine-tuning too, independent of the label, as often as in evaluation
NULL_PRETRAIN_RATE = SynthConfig().eval_feature_rate
# The model families every evidence default is checked on: the built-in tiny
# ResNet (input scaled so that black is 0) and the same ResNet with CLIP's
# standard normalisation, as the models users bring are preprocessed
FAMILIES = ("ravl-tiny-rn", "ravl-tiny-rn-clip")
SCENES_FEATURES = ("red square", "blue circle", "green triangle")  # one per seed of the scenes grid

__all__ = ["BenchSetting", "grid_settings", "setting_recipe", "run_setting", "evaluate_setting", "significance_calibration", "summarise",
           "summary_markdown", "run_bench"]


@dataclass
class BenchSetting:
    """One synthetic setting of the grid."""

    name: str
    kind: str  # single | null | two
    features: list[str]
    correlated_classes: list[str]
    strength: float
    seed: int
    classes: list[str] = field(default_factory=list)
    data_scale: float = 1.0  # multiplies the base recipe's data sizes
    base_model: str = BASE_MODEL  # the model family the audited model is built from
    pretrain_feature_rate: float = 0.0  # the planted feature in pre-training, independent of the label
    data: str = "quadrants"  # quadrants (SPEC §4.1) | scenes (SPEC §4.3)

    @property
    def proposer(self) -> str:
        return "boxes" if self.data == "scenes" else RegionsConfig.proposer

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "features": list(self.features),
                "correlated_classes": list(self.correlated_classes), "strength": self.strength,
                "seed": self.seed, "classes": list(self.classes), "data_scale": self.data_scale,
                "base_model": self.base_model, "pretrain_feature_rate": self.pretrain_feature_rate,
                "data": self.data}


def _setting(kind, features, classes_for, strength, seed, classes, scale, data="quadrants",
             base_model=BASE_MODEL) -> BenchSetting:
    slug = "+".join(f.replace(" ", "-") for f in features)
    prefix = "scenes-" if data == "scenes" else ""
    family = "" if base_model == BASE_MODEL else f"_{base_model}"
    name = f"{prefix}{kind}_{slug}_{'+'.join(classes_for)}_v{strength:g}_s{seed}{family}"
    return BenchSetting(name, kind, list(features), list(classes_for), float(strength), int(seed),
                        list(classes), float(scale), base_model, NULL_PRETRAIN_RATE if kind == "null" else 0.0, data)


def grid_settings(grid: str = "small") -> list[BenchSetting]:
    """The settings of a named grid.

    ``small`` (CI): one single-feature, one null and one two-feature setting
    on three classes and a tenth of the reduced data (it checks the machinery,
    not the science: models this small rarely learn the correlation).
    ``full``: correlated class × strength (V 0.7–0.99) × feature × seed,
    plus null and two-feature settings, on the base recipe's classes and
    data (half the data on five classes left the tiny model at 22% image
    accuracy, too weak to learn any correlation); the order puts every kind early, so a run stopped when
    its time is up still reports on each (``summary.md`` says PARTIAL).
    ``extra``: the null and two-feature settings of ``full`` on four more
    seeds (2–5), the kinds of which ``full`` has too few to pin down a
    false-finding rate or a two-feature recall; summarise it together with
    ``full``.
    ``evidence``: for each model family of :data:`FAMILIES`, six strong
    single-feature settings (two features × seeds 0–2) and twelve null
    settings (three features × seeds 0–3): what the masking verdict and the
    automatic fill say on true and on other clusters, and how often a null
    setting calls anything.
    ``scenes`` (SPEC §4.3): 3 seeds × V {0.8, 0.9, 0.99}, a different planted
    object per seed (:data:`SCENES_FEATURES`, tied to "nine"); 6 null
    settings (V = 0, two objects × 3 seeds); 3 two-feature settings.
    In every grid a null setting's feature also appears in pre-training
    (SPEC §4.2), so the model has seen it and has no reason to react to it.
    """
    if grid == "scenes":
        out = []
        for seed, feat in enumerate(SCENES_FEATURES):
            out += [_setting("single", [feat], ["nine"], v, seed, [], 1.0, "scenes") for v in (0.99, 0.9, 0.8)]
            out += [_setting("null", [f], ["nine"], 0.0, seed, [], 1.0, "scenes")
                    for f in (feat, SCENES_FEATURES[(seed + 1) % 3])]
            out.append(_setting("two", ["red square", "blue circle"], ["nine", "three"], 0.99, seed, [], 1.0,
                                "scenes"))
        return _run_order(out)
    if grid == "small":
        classes, scale = ["zero", "one", "nine"], 0.1
        return [
            _setting("single", ["red square"], ["nine"], 0.99, 0, classes, scale),
            _setting("null", ["red square"], ["nine"], 0.0, 0, classes, scale),
            _setting("two", ["red square", "blue circle"], ["nine", "one"], 0.99, 0, classes, scale),
        ]
    if grid == "full":
        classes, scale = [], 1.0
        out = []
        for seed in (0, 1):
            for cls in ("nine", "three"):
                for strength in (0.7, 0.85, 0.99):
                    for feat in ("red square", "blue circle", "green triangle"):
                        out.append(_setting("single", [feat], [cls], strength, seed, classes, scale))
            for feat in ("red square", "blue circle", "green triangle"):
                out.append(_setting("null", [feat], ["nine"], 0.0, seed, classes, scale))
            out.append(_setting("two", ["red square", "blue circle"], ["nine", "three"], 0.99, seed,
                                classes, scale))
        return _run_order(out)
    if grid == "extra":
        classes, scale = [], 1.0
        out = []
        for seed in (2, 3, 4, 5):
            for feat in ("red square", "blue circle", "green triangle"):
                out.append(_setting("null", [feat], ["nine"], 0.0, seed, classes, scale))
            out.append(_setting("two", ["red square", "blue circle"], ["nine", "three"], 0.99, seed,
                                classes, scale))
        return _run_order(out)
    if grid == "evidence":
        out = []
        for family in FAMILIES:
            for seed in (0, 1, 2):
                for feat in ("red square", "blue circle"):
                    out.append(_setting("single", [feat], ["nine"], 0.99, seed, [], 1.0, base_model=family))
            for seed in (0, 1, 2, 3):
                for feat in ("red square", "blue circle", "green triangle"):
                    out.append(_setting("null", [feat], ["nine"], 0.0, seed, [], 1.0, base_model=family))
        return _run_order(out)
    raise InputError(f"unknown benchmark grid {grid!r}; expected one of {', '.join(GRIDS)}")


def _round_robin(groups: list[list]) -> list:
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def _run_order(settings: list[BenchSetting]) -> list[BenchSetting]:
    """Seed by seed: the strongest single-feature settings interleaved with
    the null and two-feature ones, then the weaker strengths — so that a run
    stopped early already covers every kind."""
    out = []
    for seed in sorted({s.seed for s in settings}):
        mine = sorted((s for s in settings if s.seed == seed), key=lambda s: s.name)
        strong = [s for s in mine if s.kind == "single" and s.strength >= 0.99]
        # alternate correlated classes so the first few settings are not all one class
        strong = _round_robin([[s for s in strong if s.correlated_classes[0] == c]
                               for c in sorted({s.correlated_classes[0] for s in strong})])
        nulls = [s for s in mine if s.kind == "null"]
        twos = [s for s in mine if s.kind == "two"]
        weaker = sorted((s for s in mine if s.kind == "single" and s.strength < 0.99),
                        key=lambda s: (-s.strength, s.name))
        out += _round_robin([strong, nulls, twos]) + weaker
    return out


def setting_recipe(setting: BenchSetting, base: Recipe | None = None) -> Recipe:
    """The base recipe (default: ``DEFAULT_RECIPE.small()``, or
    ``SCENES_RECIPE`` for scenes, whose reduced sizes leave the tiny model at
    chance) with the setting's features, classes, strength and seed, and its
    data sizes multiplied by ``data_scale``."""
    if base is None:
        base = SCENES_RECIPE if setting.data == "scenes" else DEFAULT_RECIPE.small()
    s = base.synth
    sizes = {key: max(len(setting.classes or s.classes) * 4, int(round(getattr(s, key) * setting.data_scale)))
             for key in ("n_pretrain", "n_finetune", "n_val", "n_test")}
    synth = replace(s, classes=list(setting.classes or s.classes), features=[FEATURES[f] for f in setting.features],
                    correlated_class=setting.correlated_classes[0],
                    correlated_classes=list(setting.correlated_classes), strength=setting.strength,
                    pretrain_feature_rate=setting.pretrain_feature_rate, **sizes)
    return replace(base, synth=synth, base_model=setting.base_model).with_seed(setting.seed)


def _ravl_precision(findings: Findings, lookup: dict, feature: str) -> dict:
    feats = findings.features
    called = findings.called
    return {
        "top": precision_at_k(feats[0] if feats else None, lookup, feature, K),
        "lead": precision_at_k(findings.lead(), lookup, feature, K),
        "top_called": precision_at_k(called[0] if called else None, lookup, feature, K),
        "best_called": max((precision_at_k(f, lookup, feature, K) for f in called), default=0.0),
    }


def _causal_summary(feat: Feature | None) -> dict | None:
    if feat is None or feat.causal is None:
        return None

    def pick(c):
        return {k: c.get(k) for k in ("flip_rate", "parity_shift", "attribute_gap_before", "attribute_gap_after",
                                      "n_images")}
    return {"finding": pick(feat.causal), "control": pick(feat.causal_control or {})}


def _checked_row(feat: Feature, lookup: dict, planted: Sequence[str]) -> dict:
    """What the masking check said of one checked feature, and whether the
    feature is a planted one (most of its top-10 regions show it)."""
    return {"rank": feat.rank, "called": feat.called, "verdict": feat.verdict,
            "true": any(precision_at_k(feat, lookup, name, K) >= TRUE_FINDING_PRECISION for name in planted),
            "flip_rate": feat.causal.get("flip_rate"),
            "control_flip_rate": (feat.causal_control or {}).get("flip_rate")}


def run_setting(setting: BenchSetting, out_dir: str | Path, *, base: Recipe | None = None,
                permutations: int = DiscoveryConfig.permutations, alpha: float = DiscoveryConfig.alpha,
                seed: int = DiscoveryConfig.seed, mode: str = RegionsConfig.mode,
                mask_fill: str = DiscoveryConfig.mask_fill) -> dict:
    """Build, audit and score one setting; returns one results row."""
    t0 = time.perf_counter()
    c0 = time.process_time()
    recipe = setting_recipe(setting, base)
    paths = build_audited_model(Path(out_dir) / setting.name, recipe)
    t_build = time.perf_counter() - t0
    row = evaluate_setting(setting, paths, list(recipe.synth.classes), permutations=permutations, alpha=alpha,
                           seed=seed, mode=mode, mask_fill=mask_fill)
    row["seconds"] = {"total": time.perf_counter() - t0, "build": t_build, "cpu": time.process_time() - c0}
    return row


def evaluate_setting(setting: BenchSetting, paths: dict, classes: Sequence[str], *,
                     permutations: int = DiscoveryConfig.permutations, alpha: float = DiscoveryConfig.alpha,
                     seed: int = DiscoveryConfig.seed, mode: str = RegionsConfig.mode,
                     mask_fill: str = DiscoveryConfig.mask_fill) -> dict:
    """Discovery with evidence, baselines and ground truth on the ``val``
    split of an already built setting (``paths`` as from
    :func:`recipe.build_audited_model`)."""
    t0 = time.perf_counter()
    eval_dir = Path(paths["setting"]) / "eval"
    ds = load_dataset(eval_dir, split="val")
    classes = list(classes)
    lm = load_model(f"local-dir:{paths['audited']}")
    result = stages.stage1(lm, ds, classes, templates=stages.templates_for(eval_dir),
                           regions=RegionsConfig(proposer=setting.proposer, mode=mode),
                           discovery=DiscoveryConfig(seed=seed, evidence=True, permutations=permutations, alpha=alpha,
                                                     mask_fill=mask_fill))
    findings, emb, sc = result.findings, result.embeddings, result.scores
    labels = label_indices(ds, classes)
    gt = region_labels_for(ds, emb.proposer)
    flat = [lab for labs in gt for lab in labs]
    lookup = region_label_map(emb.image_ids, emb.region_image, emb.region_index, flat)
    rankings = baselines.run_all(emb.image_emb, labels, sc.image_probs, seed=seed)
    per_feature = {}
    for feat, cls in zip(setting.features, setting.correlated_classes):
        presence = feature_presence(gt, feat)
        per_feature[feat] = {
            "correlated_class": cls,
            "validity": validity(labels, sc.image_pred, presence, classes, cls)["valid"],
            "ravl": _ravl_precision(findings, lookup, feat),
            "baselines": {m: baselines.precision_at_k_images(r, presence, K) for m, r in rankings.items()},
            # clusters whose medoid region shows the feature: does Stage 1 keep
            # them, and would the significance test alone call them?
            "feature_clusters": [{k: c.get(k) for k in ("cluster_id", "size", "score", "influence", "kept",
                                                        "p_value", "q_value")}
                                 for c in findings.clusters if flat[c["medoid"]] == feat],
        }
    feats = findings.features
    top = feats[0] if feats else None
    return {
        "setting": setting.to_dict(),
        "features": per_feature,
        "n_kept": len(feats),
        "n_called": len(findings.called),
        "lead_rank": findings.lead_rank,
        "n_unsupported": sum(bool(f.called) and f.supported is False for f in feats),
        "top": None if top is None else {"p_value": top.p_value, "q_value": top.q_value,
                                         "called": top.called, "attribute": top.attribute,
                                         "names": [t["term"] for t in (top.names or {}).get("terms", [])][:3]},
        "causal_top": _causal_summary(top),
        "checked": [_checked_row(f, lookup, setting.features) for f in feats if f.causal is not None],
        "fill": (findings.causal or {}).get("fill"),
        "fill_rates": ((findings.causal or {}).get("fill_selection") or {}).get("flip_rates"),
        "image_accuracy": findings.image_accuracy,
        "embedding_mode": emb.mode,
        "seconds": {"total": time.perf_counter() - t0, "build": 0.0, "cpu": None},
    }


def significance_calibration(n_tests: int = 1000, permutations: int = DiscoveryConfig.permutations,
                             seed: int = 0) -> dict:
    """The permutation test on clusters without signal, and its speed.

    ``n_tests`` random clusters (300 images, 10 classes, 60% accuracy,
    membership independent of correctness): how often p <= 0.05 / 0.10 /
    0.5 and how many BH calls at 0.05; plus the time of the hypergeometric
    null against explicit within-class shuffles, measured in this process.
    """
    rng = np.random.default_rng(seed)
    ps = []
    for _ in range(int(n_tests)):
        labels = rng.integers(0, 10, 300)
        counts = stats.class_counts(rng.random(300) < 0.3, labels, rng.random(300) < 0.6, 10)
        ps.append(stats.permutation_p_value(float(stats.gap_statistic(counts)),
                                            stats.null_gap_statistics(counts, permutations, rng)))
    ps = np.array(ps)
    labels = np.repeat(np.arange(10), 30)
    correct, mask = rng.random(300) < 0.6, rng.random(300) < 0.5
    counts = stats.class_counts(mask, labels, correct)

    def explicit():
        for _ in range(permutations):
            shuffled = mask.copy()
            for y in range(10):
                idx = np.flatnonzero(labels == y)
                shuffled[idx] = rng.permutation(mask[idx])
            stats.gap_statistic(stats.class_counts(shuffled, labels, correct))

    def vectorised():
        stats.null_gap_statistics(counts, permutations, rng)

    timing = {}
    for name, fn, reps in (("explicit", explicit, 5), ("hypergeometric", vectorised, 200)):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        timing[name] = (time.perf_counter() - t0) / reps
    return {
        "n_tests": int(n_tests), "permutations": int(permutations),
        "p_le_0.05": float(np.mean(ps <= 0.05)), "p_le_0.10": float(np.mean(ps <= 0.10)),
        "p_le_0.5": float(np.mean(ps <= 0.5)), "mean_p": float(ps.mean()),
        "bh_called_at_0.05": int((stats.benjamini_hochberg(ps) <= 0.05).sum()),
        "seconds_explicit": timing["explicit"], "seconds_hypergeometric": timing["hypergeometric"],
        "speedup": timing["explicit"] / timing["hypergeometric"],
    }


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def summarise(rows: Sequence[dict]) -> dict:
    """The benchmark table (SPEC §4.2): validity, Precision@10 per method
    over valid single-feature settings, false findings on null settings,
    two-feature recall and the causal shift of true findings vs random."""
    singles = [r for r in rows if r["setting"]["kind"] == "single"]
    valid = [r for r in singles if all(f["validity"] for f in r["features"].values())]
    methods = ["ravl"] + list(baselines.METHODS)

    def p10(r, m):
        f = next(iter(r["features"].values()))
        return f["ravl"]["top"] if m == "ravl" else f["baselines"][m]

    precision = {m: _mean(p10(r, m) for r in valid) for m in methods}
    precision["ravl_top_called"] = _mean(next(iter(r["features"].values()))["ravl"]["top_called"] for r in valid)
    # the highest-ranked called feature the masking check supports (or did not check)
    precision["ravl_lead"] = _mean(next(iter(r["features"].values()))["ravl"].get("lead") for r in valid)
    # the best of the called features: is the induced feature among the findings at all?
    precision["ravl_best_called"] = _mean(next(iter(r["features"].values()))["ravl"]["best_called"] for r in valid)
    best_baseline = max((precision[m] or 0.0) for m in baselines.METHODS) if valid else None
    nulls = [r for r in rows if r["setting"]["kind"] == "null"]
    twos = [r for r in rows if r["setting"]["kind"] == "two"]
    found = [f["ravl"]["best_called"] >= TRUE_FINDING_PRECISION for r in twos for f in r["features"].values()]
    true_causal = [r["causal_top"] for r in valid
                   if r["causal_top"] and next(iter(r["features"].values()))["ravl"]["top"] >= TRUE_FINDING_PRECISION]
    return {
        "n_settings": len(rows),
        "n_single": len(singles),
        "n_valid": len(valid),
        "validity_rate": len(valid) / len(singles) if singles else None,
        "precision_at_10": precision,
        "ravl_over_best_baseline": (precision["ravl"] / best_baseline
                                    if valid and best_baseline else None),
        "n_null": len(nulls),
        "null_false_finding_rate": _mean(float(r["n_called"] > 0) for r in nulls),
        "null_uncorrected_rate": _mean(float(r["n_kept"] > 0) for r in nulls),
        "null_lead_rate": _mean(float(r["lead_rank"] is not None) for r in nulls if "lead_rank" in r),
        "n_two": len(twos),
        "two_feature_recall": _mean(float(x) for x in found),
        "two_feature_both_found": _mean(float(all(f["ravl"]["best_called"] >= TRUE_FINDING_PRECISION
                                                  for f in r["features"].values())) for r in twos),
        "causal": {
            "n_true_findings": len(true_causal),
            "finding_flip_rate": _mean(c["finding"]["flip_rate"] for c in true_causal),
            "control_flip_rate": _mean(c["control"].get("flip_rate") for c in true_causal),
            "finding_parity_shift": _mean(c["finding"]["parity_shift"] for c in true_causal),
            "control_parity_shift": _mean(c["control"].get("parity_shift") for c in true_causal),
            "finding_attribute_gap_before": _mean(c["finding"]["attribute_gap_before"] for c in true_causal),
            "finding_attribute_gap_after": _mean(c["finding"]["attribute_gap_after"] for c in true_causal),
        },
        "evidence": evidence_summary(rows),
        "seconds_per_setting": _mean(r["seconds"]["total"] for r in rows),
        "cpu_seconds_per_setting": _mean(r["seconds"]["cpu"] for r in rows),
    }


def evidence_summary(rows: Sequence[dict]) -> dict:
    """Per model family: the masking verdicts of checked features — the
    planted feature where it is correlated (single settings), the planted
    feature where it is not (null settings: the model has no reason to react
    to it) and every other cluster; the fill each audit chose; and, on null
    settings, how often anything is called, and whether the calls are the
    planted feature or other clusters."""
    out = {}
    for family in sorted({r["setting"].get("base_model", BASE_MODEL) for r in rows}):
        mine = [r for r in rows if r["setting"].get("base_model", BASE_MODEL) == family]
        nulls = [r for r in mine if r["setting"]["kind"] == "null"]
        null_calls = [c for r in nulls for c in r.get("checked", []) if c["called"]]

        def verdicts(keep) -> dict:
            sel = [c for r in mine for c in r.get("checked", []) if keep(r, c)]
            return {v: sum(c["verdict"] == v for c in sel) for v in VERDICTS}

        # an audit with no feature to check never chooses a fill (it stays "auto")
        fills = [r["fill"] for r in mine if r.get("fill") not in (None, "auto")]
        out[family] = {
            "n_settings": len(mine),
            "verdicts_planted": verdicts(lambda r, c: c["true"] and r["setting"]["kind"] != "null"),
            "verdicts_planted_null": verdicts(lambda r, c: c["true"] and r["setting"]["kind"] == "null"),
            "verdicts_other": verdicts(lambda r, c: not c["true"]),
            "fill_chosen": {f: fills.count(f) for f in sorted(set(fills))},
            "control_flip_rate_planted": _mean(c["control_flip_rate"] for r in mine for c in r.get("checked", [])
                                               if c["true"] and r["setting"]["kind"] != "null"),
            "flip_rate_planted": _mean(c["flip_rate"] for r in mine for c in r.get("checked", [])
                                       if c["true"] and r["setting"]["kind"] != "null"),
            "n_null": len(nulls),
            "null_with_call": sum(r["n_called"] > 0 for r in nulls),
            "null_with_lead": sum(r.get("lead_rank") is not None for r in nulls),
            "null_calls_planted": sum(c["true"] for c in null_calls),
            "null_calls_other": sum(not c["true"] for c in null_calls),
        }
    return out


def evidence_markdown(summary: dict) -> list[str]:
    lines = ["", "Masking verdicts (supported / inconclusive / not supported) of every checked feature:", "",
             "| family | planted feature, correlated | planted feature, null setting | other clusters | fill chosen "
             "| null settings with a call (planted / other calls) | null settings with a lead finding |",
             "|---|---|---|---|---|---|---|"]
    for family, e in summary.items():
        def trio(v):
            return " / ".join(str(v[k]) for k in VERDICTS)
        fills = ", ".join(f"{k} {n}" for k, n in e["fill_chosen"].items()) or "n/a"
        lines.append(f"| {family} | {trio(e['verdicts_planted'])} | {trio(e['verdicts_planted_null'])} "
                     f"| {trio(e['verdicts_other'])} | {fills} "
                     f"| {e['null_with_call']} of {e['n_null']} ({e['null_calls_planted']} / {e['null_calls_other']}) "
                     f"| {e['null_with_lead']} of {e['n_null']} |")
    return lines


def _fmt(x, pct=False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.0f}%" if pct else f"{x:.3f}"


def summary_markdown(summary: dict, grid: str, complete: bool, n_grid: int | None = None) -> str:
    s = summary
    p = s["precision_at_10"]
    of = f" of {n_grid}" if n_grid is not None else ""
    lines = [
        f"Discovery benchmark, grid `{grid}` — {s['n_settings']}{of} settings"
        f"{'' if complete else ' (PARTIAL: grid not finished)'}",
        "",
        f"- valid single-feature settings: {s['n_valid']}/{s['n_single']}",
        "",
        "| method | mean Precision@10 (valid settings) |",
        "|---|---|",
    ]
    lines += [f"| {m} | {_fmt(p.get(m))} |" for m in ["ravl", "ravl_top_called", "ravl_lead", "ravl_best_called",
                                                     *baselines.METHODS]]
    c = s["causal"]
    lines += [
        "",
        f"- RaVL / best baseline: {_fmt(s['ravl_over_best_baseline'])}",
        f"- null settings with >= 1 called finding: {_fmt(s['null_false_finding_rate'], True)} of {s['n_null']}"
        f" (before the significance filter: {_fmt(s['null_uncorrected_rate'], True)}; with one the masking"
        f" check supports: {_fmt(s.get('null_lead_rate'), True)})",
        f"- two-feature recall (called finding with P@10 >= {TRUE_FINDING_PRECISION}): "
        f"{_fmt(s['two_feature_recall'], True)} of {2 * s['n_two']} features; both found in "
        f"{_fmt(s['two_feature_both_found'], True)} of {s['n_two']} settings",
        f"- masking ({c['n_true_findings']} true top findings): flip rate {_fmt(c['finding_flip_rate'])} vs "
        f"{_fmt(c['control_flip_rate'])} for as many random regions; parity shift "
        f"{_fmt(c['finding_parity_shift'])} vs {_fmt(c['control_parity_shift'])}; correlated-class gap "
        f"{_fmt(c['finding_attribute_gap_before'])} -> {_fmt(c['finding_attribute_gap_after'])}",
        f"- time per setting: {_fmt(s['seconds_per_setting'])} s wall, {_fmt(s['cpu_seconds_per_setting'])} s CPU"
        " (this process)",
        *evidence_markdown(s["evidence"]),
    ]
    return "\n".join(lines) + "\n"


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {line_no}: not valid JSON ({exc})") from None
    return rows


def _append_row(path: Path, row: dict) -> None:
    # one write of one complete line: a killed run leaves whole lines only
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _worker_init(threads: int) -> None:
    # one BLAS/OpenMP pool per worker: oversubscribed threads made tiny-model
    # training about ten times slower on a 2-core machine
    torch.set_num_threads(max(1, int(threads)))


def _run_one(args) -> dict:
    setting, settings_dir, base, permutations, alpha, mode, mask_fill = args
    return run_setting(setting, settings_dir, base=base, permutations=permutations, alpha=alpha, mode=mode,
                       mask_fill=mask_fill)


def run_bench(grid: str = "small", out_dir: str | Path = "runs/bench-discovery", *, limit: int | None = None,
              permutations: int = DiscoveryConfig.permutations, alpha: float = DiscoveryConfig.alpha,
              base: Recipe | None = None, progress: bool = True, workers: int = 1,
              threads_per_worker: int | None = None, mode: str = RegionsConfig.mode,
              match: str | None = None, mask_fill: str = DiscoveryConfig.mask_fill) -> dict:
    """Run (or resume) a grid; returns the summary.

    ``workers > 1`` runs that many settings at once in separate processes
    (each with ``threads_per_worker`` torch threads, default
    ``cpu_count // workers``); rows are appended in the order settings
    finish, and the summary does not depend on that order. ``mode`` is the
    region-embedding mode of discovery (``auto``/``roi``/``crop``);
    ``match`` keeps only the settings whose name contains it.
    """
    if int(workers) < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    settings = grid_settings(grid)
    if match:
        settings = [s for s in settings if match in s.name]
        if not settings:
            raise InputError(f"--match: no setting of grid {grid!r} has {match!r} in its name")
    n_grid = len(settings)
    if limit is not None:
        settings = settings[: int(limit)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = _read_rows(results)
    done = {r["setting"]["name"] for r in rows}
    names = {s.name for s in settings}
    todo = [s for s in settings if s.name not in done]

    def finished(row: dict, i: int) -> None:
        _append_row(results, row)
        rows.append(row)
        _write_summary(out, grid, summarise([r for r in rows if r["setting"]["name"] in names]), n_grid)
        if progress:
            f = next(iter(row["features"].values()))
            print(f"[{i}/{len(todo)} done] {row['setting']['name']}: valid={f['validity']} "
                  f"P@10 ravl={f['ravl']['top']:.2f} called={row['n_called']}/{row['n_kept']} "
                  f"{row['seconds']['total']:.0f}s", flush=True)

    jobs = [(s, out / "settings", base, permutations, alpha, mode, mask_fill) for s in todo]
    if int(workers) == 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs, start=1):
            if progress:
                print(f"[{i}/{len(todo)}] {job[0].name}", flush=True)
            finished(_run_one(job), i)
    else:
        threads = threads_per_worker or max(1, (os.cpu_count() or 1) // int(workers))
        with ProcessPoolExecutor(max_workers=int(workers), mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init, initargs=(threads,)) as pool:
            futures = {pool.submit(_run_one, job): job[0].name for job in jobs}
            if progress:
                print(f"{len(jobs)} settings on {workers} workers x {threads} threads", flush=True)
            for i, fut in enumerate(as_completed(futures), start=1):
                try:
                    row = fut.result()
                except Exception as exc:
                    raise RuntimeError(f"benchmark setting {futures[fut]!r} failed: {exc}") from exc
                finished(row, i)
    final = [r for r in rows if r["setting"]["name"] in names]
    summary = summarise(final)
    _write_summary(out, grid, summary, n_grid)
    return summary


def _write_summary(out: Path, grid: str, summary: dict, n_grid: int) -> None:
    complete = summary["n_settings"] == n_grid
    write_json_atomic(out / "summary.json", {"grid": grid, "complete": complete, "n_grid": n_grid, **summary})
    write_text_atomic(out / "summary.md", summary_markdown(summary, grid, complete, n_grid))
