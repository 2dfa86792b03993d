"""Stage-2 mitigation against its baselines on the default synthetic setting
(SPEC §3.5–3.6, §4.2).

For every seed: build the audited model of ``DEFAULT_RECIPE.with_seed(s)``
(setting, pre-trained initialisation, audited fine-tune), run Stage 1 on
``val``, then train Standard FT, Upsampled FT, VL-ERM, VL-GDRO and RaVL from
the pre-trained initialisation on the audited model's fine-tuning data with
the audited model's fine-tuning configuration (same seed, steps, batch size,
learning rate), and evaluate all of them and the audited model on ``test``.
λ and τ stay at SPEC values; nothing is chosen by looking at ``test``.

Prints a markdown table of mean ± standard deviation over seeds, the
per-seed worst-group numbers, and the training-step time of RaVL relative to
Standard FT measured in the same process.

    .venv/bin/python benchmarks/mitigation.py --out runs/bench_mitigation
    .venv/bin/python benchmarks/mitigation.py --small --seeds 0   # quick check

``--resume`` reuses findings and checkpoints already trained with the same
configuration (a run split over processes); ``--oracle`` is a diagnostic
that replaces the discovered features by the ground-truth one (found on
``val``) to separate Stage-2 quality from Stage-1 errors; ``--step-timing N``
times Standard FT against RaVL alternately in one process; ``--from-json``
prints the tables of earlier ``--json`` files together. On a shared machine
run with ``OMP_NUM_THREADS=1``: oversubscribed OpenMP threads made a step
about ten times slower here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ravl_pipeline.config import DiscoveryConfig, RegionsConfig
from ravl_pipeline.core.embed import embed_dataset
from ravl_pipeline.core.findings import Feature, read_findings, write_findings
from ravl_pipeline.experiments.recipe import DEFAULT_RECIPE, build_audited_model
from ravl_pipeline.io.dataset import dataset_setting, load_dataset
from ravl_pipeline.mitigate.assign import cached_assignment, select_features
from ravl_pipeline.mitigate.data import MitigationError, build_train_data
from ravl_pipeline.mitigate.methods import attach_class_tokens, attach_region_extras, get_method
from ravl_pipeline.mitigate.train import finetune
from ravl_pipeline.models import load_model
from ravl_pipeline.pipeline import stages

METHODS = ("standard", "upsampled", "vl-erm", "vl-gdro", "ravl")
NAMES = {"audited": "Audited model", "standard": "Standard FT", "upsampled": "Upsampled FT",
         "vl-erm": "VL-ERM", "vl-gdro": "VL-GDRO", "ravl": "RaVL"}
METRICS = ("image_overall", "image_worst_group", "region_overall", "region_worst_group")


def discover_on_val(audited: Path, setting: Path, seed: int, mode: str = "auto"):
    eval_dir = setting / "eval"
    info = dataset_setting(eval_dir)
    classes = info["classes"]
    ds = load_dataset(eval_dir, classes=classes, split="val", require_labels=True)
    lm = load_model(f"local-dir:{audited}")
    # with evidence, as `ravl discover` and the pipeline run it: Stage 2 then
    # mitigates the called findings (significant at BH q <= 0.05)
    return stages.stage1(lm, ds, classes, templates=stages.templates_for(eval_dir), regions=RegionsConfig(mode=mode),
                         discovery=DiscoveryConfig(seed=seed)).findings


def _trained(target: Path, cfg) -> dict | None:
    """The history of a checkpoint already trained with exactly ``cfg``."""
    meta_file = target / "ravl_model.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    return meta["history"] if meta.get("train") == cfg.to_dict() else None


def oracle_findings(findings, audited: Path, setting: Path):
    """The discovered findings with one extra cluster, the ground-truth
    induced feature, as the only spurious feature: its medoid is the val
    region labelled with the feature that is most similar on average to the
    other such regions. Isolates Stage 2 from Stage-1 errors (a diagnostic;
    it uses val ground truth, never test)."""
    eval_dir = setting / "eval"
    info = dataset_setting(eval_dir)
    feature, cls = info["config"]["features"][0]["name"], info["correlated_classes"][0]
    ds = load_dataset(eval_dir, split="val")
    emb = embed_dataset(load_model(f"local-dir:{audited}"), ds, progress=False)
    flat = np.array([lab for labs in ds.region_labels for lab in labs])
    rows = np.flatnonzero(flat == feature)
    sims = emb.region_emb[rows] @ emb.region_emb[rows].T
    medoid = int(rows[np.argmax(sims.mean(axis=1))])
    k = len(findings.medoids)
    return replace(findings, medoids=findings.medoids + [medoid],
                   medoid_embeddings=findings.medoid_embeddings + [emb.region_emb[medoid].tolist()],
                   features=[Feature(rank=1, cluster_id=k, score=0.0, influence=1.0, attribute=cls,
                                     extra={"oracle": feature})])


def run_seed(seed: int, out: Path, small: bool, resume: bool = False, methods=METHODS,
             oracle: bool = False, mode: str = "auto") -> dict:
    recipe = (DEFAULT_RECIPE.small() if small else DEFAULT_RECIPE).with_seed(seed)
    root = out / f"seed{seed}"
    t0 = time.perf_counter()
    paths = build_audited_model(root, recipe)
    t_build = time.perf_counter() - t0
    if resume and (root / "findings.json").is_file():
        findings = read_findings(root / "findings.json")
    else:
        findings = discover_on_val(paths["audited"], paths["setting"], seed, mode)
        write_findings(findings, root / "findings.json")
    prefix = ""
    if oracle:
        findings, prefix = oracle_findings(findings, paths["audited"], paths["setting"]), "oracle-"
        write_findings(findings, root / "findings_oracle.json")
    result = {"seed": seed, "recipe": recipe.to_dict(), "mode": findings.embedding_mode, "seconds_build": t_build,
              "n_features": len(findings.features), "n_called": len(findings.called),
              "ground_truth": findings.ground_truth, "metrics": {}, "seconds_per_step": {}}
    models = {} if oracle else {"audited": f"local-dir:{paths['audited']}"}
    for method in methods:
        if get_method(method).needs_findings:
            try:
                select_features(findings)
            except MitigationError as exc:
                print(f"seed {seed}: {method} skipped: {exc}", file=sys.stderr)
                continue
        cfg = replace(recipe.finetune, method=method)
        target = root / "models" / f"{prefix}{method}"
        hist = _trained(target, cfg) if resume else None
        if hist is None:
            hist = stages.train(f"local-dir:{paths['pretrained']}", paths["setting"] / "finetune", target, cfg,
                                findings=findings, audited_model=f"local-dir:{paths['audited']}",
                                cache_dir=root / "cache", findings_path=root / "findings.json")
        result["seconds_per_step"][f"{prefix}{method}"] = hist["seconds_per_step"]
        models[f"{prefix}{method}"] = f"local-dir:{target}"
        print(f"seed {seed}: trained {method} ({hist['steps']} steps, {hist['seconds_per_step']:.3f}s/step)",
              file=sys.stderr, flush=True)
    for name, spec in models.items():
        metrics = stages.evaluate(spec, paths["setting"] / "eval", split="test")
        stages.write_metrics(metrics, root / "metrics" / f"{name}.json")
        result["metrics"][name] = {k: metrics[k] for k in METRICS} | {"warnings": metrics["warnings"]}
    return result


def step_timing(seed: int, out: Path, small: bool, steps: int, rounds: int = 2) -> dict:
    """Seconds per training step of Standard FT and RaVL in this process, on
    the seed's fine-tuning data and batch size, alternating the methods for
    ``rounds`` rounds of ``steps`` steps (median per method)."""
    recipe = (DEFAULT_RECIPE.small() if small else DEFAULT_RECIPE).with_seed(seed)
    root = out / f"seed{seed}"
    paths = build_audited_model(root, recipe)
    findings = read_findings(root / "findings.json")
    ds = load_dataset(paths["setting"] / "finetune")
    init = f"local-dir:{paths['pretrained']}"
    lm = load_model(init)
    data = build_train_data(lm, ds, recipe.finetune.caption_template, classes=findings.classes)
    attach_class_tokens(data, lm, recipe.finetune.caption_template)
    assignment = cached_assignment(load_model(f"local-dir:{paths['audited']}"), ds, findings, root / "cache")
    attach_region_extras(data, lm, ds, assignment)
    times: dict[str, list[float]] = {"standard": [], "ravl": []}
    for _ in range(rounds):
        for method in times:
            cfg = replace(recipe.finetune, method=method, max_steps=steps)
            times[method].append(finetune(load_model(init, seed=seed), data, cfg, progress=False)["seconds_per_step"])
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"seed": seed, "steps": steps, "rounds": rounds, "seconds_per_step": med,
            "ratio": med["ravl"] / med["standard"]}


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = 100 * statistics.fmean(values)
    sd = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}"


def table(results: list[dict]) -> str:
    header = "| Method | Image overall | Image worst-group | Region overall | Region worst-group |"
    lines = [header, "|---|---|---|---|---|"]
    names = list(dict.fromkeys(name for r in results for name in r["metrics"]))
    for name in names:
        rows = [r["metrics"][name] for r in results if name in r["metrics"]]
        cells = [_mean_sd([row[k] for row in rows]) for k in METRICS]
        label = NAMES.get(name) or "Oracle " + NAMES[name.removeprefix("oracle-")]
        lines.append(f"| {label} (n={len(rows)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed(results: list[dict]) -> str:
    methods = list(dict.fromkeys(m for r in results for m in r["metrics"] if m != "audited"))
    lines = ["| Seed | valid | features (called) | P@10 top | " + " | ".join(
        f"{m} img-wg / reg-wg" for m in methods) + " |", "|---" * (4 + len(methods)) + "|"]
    for r in results:
        gt = next(iter((r.get("ground_truth") or {}).values()), {})
        valid = gt.get("validity", {}).get("valid")
        p10 = gt.get("precision_at_10_top")
        cells = []
        for m in methods:
            x = r["metrics"].get(m)
            cells.append("skipped" if x is None else
                         f"{100 * x['image_worst_group']:.1f} / {100 * x['region_worst_group']:.1f}")
        lines.append(f"| {r['seed']} | {valid} | {r['n_features']} ({r.get('n_called', 'n/a')}) | "
                     f"{'n/a' if p10 is None else f'{p10:.2f}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_ratio(results: list[dict]) -> str:
    ratios = [r["seconds_per_step"]["ravl"] / r["seconds_per_step"]["standard"]
              for r in results if {"ravl", "standard"} <= set(r["seconds_per_step"])]
    if not ratios:
        return "RaVL / Standard FT step time: n/a"
    per = ", ".join(f"{x:.2f}" for x in ratios)
    return f"RaVL / Standard FT training-step time: {statistics.fmean(ratios):.2f}x (per seed: {per})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_mitigation"))
    parser.add_argument("--small", action="store_true", help="the reduced recipe (a quick check, not a result)")
    parser.add_argument("--json", type=Path, default=None, help="also write all results here")
    parser.add_argument("--resume", action="store_true",
                        help="reuse findings.json and checkpoints already trained with the same configuration")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--mode", default="auto", choices=["auto", "roi", "roi-half", "crop"],
                        help="region-embedding mode of Stage 1 (Stage 2 assigns regions the same way)")
    parser.add_argument("--oracle", action="store_true",
                        help="diagnostic: use the ground-truth feature (from val) as the only spurious cluster")
    parser.add_argument("--step-timing", type=int, default=0, metavar="STEPS",
                        help="only time STEPS training steps of Standard FT vs RaVL, alternating, in this "
                             "process, on the first seed's (already built) setting")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="only print the tables of results written earlier with --json (runs split by seed)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.from_json:
        results = [r for path in args.from_json for r in json.loads(path.read_text())]
        print(table(results) + "\n")
        print(per_seed(results) + "\n")
        print(step_ratio(results))
        return 0
    if args.step_timing:
        t = step_timing(args.seeds[0], args.out, args.small, args.step_timing)
        print(json.dumps(t, indent=2))
        print(f"RaVL / Standard FT training-step time (same process): {t['ratio']:.2f}x")
        return 0
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, args.out, args.small, args.resume, args.methods, args.oracle, args.mode))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
    print(f"## Mitigation ({'reduced' if args.small else 'default'} recipe, seeds {args.seeds}; "
          f"{time.perf_counter() - t0:.0f}s)\n")
    print(table(results) + "\n")
    print(per_seed(results) + "\n")
    print(step_ratio(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
