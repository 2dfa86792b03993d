"""Asset checks: properties every materialization must (or should) have."""

import json

import dagster as dg
import numpy as np

from ..ml import discover as disc
from ..ml.embed import Embeddings
from .assets import mitigation_metrics, region_embeddings, spurious_features
from .project import RavlProject
from .sources import params_evaluation

NORM_TOLERANCE = 1e-3


@dg.asset_check(asset=region_embeddings, blocking=True,
                description="Every image and region embedding is finite and has unit L2 norm (SPEC §1.2).")
def embeddings_finite_and_normalised(context: dg.AssetCheckExecutionContext,
                                     ravl: RavlProject) -> dg.AssetCheckResult:
    partition = _partition(context)
    emb = Embeddings.load(ravl.outputs_root / partition / "embeddings")
    problems = {}
    for name, arr in (("image", emb.image_emb), ("region", emb.region_emb)):
        finite = np.isfinite(arr).all(axis=1)
        norms = np.linalg.norm(np.where(np.isfinite(arr), arr, 0.0), axis=1)
        bad = int((~finite).sum() + (finite & (np.abs(norms - 1.0) > NORM_TOLERANCE)).sum())
        if bad:
            problems[name] = bad
    return dg.AssetCheckResult(
        passed=not problems, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"images": len(emb.image_emb), "regions": emb.n_regions,
                  "bad_rows": dg.MetadataValue.json(problems), "tolerance": NORM_TOLERANCE})


def _partition(context) -> str:
    if not context.has_partition_key:
        raise dg.Failure("this check needs a validation-set partition")
    return context.partition_key


def findings_problems(findings: dict) -> list[str]:
    """What is wrong with a findings dict beyond the schema (SPEC §2.5, §5)."""
    problems = []
    feats = findings["features"]
    if [f["rank"] for f in feats] != list(range(1, len(feats) + 1)):
        problems.append("ranks are not 1..n")
    scores = [f["score"] for f in feats]
    if scores != sorted(scores, reverse=True):
        problems.append("features are not sorted by score G_c, descending")
    classes = set(findings["classes"])
    for f in feats:
        where = f"feature rank {f['rank']}"
        if f["attribute"] not in classes:
            problems.append(f"{where}: attribute {f['attribute']!r} is not a class")
        gaps = [row["gap"] for row in f["per_class"]]
        if not (any(g > 0 for g in gaps) and any(g < 0 for g in gaps)):
            problems.append(f"{where}: needs a positive and a negative per-class gap (SPEC §2.4)")
        if abs(sum(abs(g) for g in gaps) - f["score"]) > 1e-6:
            problems.append(f"{where}: score is not the sum of |gap| (SPEC §2.2)")
        sims = [r["similarity"] for r in f["regions"]]
        if sims != sorted(sims, reverse=True):
            problems.append(f"{where}: regions are not sorted by similarity to the medoid")
        if f["influence"] is None or f["influence"] < findings.get("influence_threshold", 0.25) - 1e-12:
            problems.append(f"{where}: influence below the threshold (SPEC §2.4)")
    return problems


@dg.asset_check(asset=spurious_features, blocking=True,
                description="findings.json reads back with the SPEC §5 schema and is consistently ranked.")
def findings_well_formed(context: dg.AssetCheckExecutionContext, ravl: RavlProject) -> dg.AssetCheckResult:
    path = ravl.outputs_root / _partition(context) / "findings.json"
    try:
        findings = disc.read_findings(path)
    except (ValueError, FileNotFoundError) as exc:
        return dg.AssetCheckResult(passed=False, metadata={"error": str(exc)})
    problems = findings_problems(findings)
    return dg.AssetCheckResult(passed=not problems,
                               metadata={"features": len(findings["features"]),
                                         "problems": dg.MetadataValue.json(problems)})


@dg.asset_check(asset=spurious_features,
                description="Did the audited model learn the induced correlation? (validity, SPEC §4.1). "
                            "Reported as a warning; user data without ground truth is not judged.")
def audited_model_validity(context: dg.AssetCheckExecutionContext, ravl: RavlProject) -> dg.AssetCheckResult:
    findings = disc.read_findings(ravl.outputs_root / _partition(context) / "findings.json")
    truth = findings.get("ground_truth") or {}
    if not truth:
        return dg.AssetCheckResult(passed=True, severity=dg.AssetCheckSeverity.WARN,
                                   metadata={"judged": False, "reason": "no ground-truth region labels"})
    rows = ["| feature | class | valid | correlated gap | others' mean gap |", "|---|---|---|---:|---:|"]
    for name, g in truth.items():
        v = g["validity"]
        rows.append(f"| {name} | {g['correlated_class']} | {v['valid']} | {_fmt(v['correlated_gap'])} "
                    f"| {_fmt(v['other_mean_gap'])} |")
    valid = all(g["validity"]["valid"] for g in truth.values())
    return dg.AssetCheckResult(passed=valid, severity=dg.AssetCheckSeverity.WARN,
                               metadata={"judged": True, "validity": dg.MetadataValue.md("\n".join(rows))})


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


@dg.asset_check(asset=mitigation_metrics, blocking=True, additional_deps=[params_evaluation],
                description="The mitigated model loses at most evaluation.max_accuracy_drop of image "
                            "overall accuracy against the audited model.")
def mitigated_accuracy_within_margin(context: dg.AssetCheckExecutionContext,
                                     ravl: RavlProject) -> dg.AssetCheckResult:
    metrics = json.loads((ravl.outputs_root / _partition(context) / "metrics.json").read_text())
    margin = float(ravl.params()["evaluation"]["max_accuracy_drop"])
    before, after = metrics["audited"]["image_overall"], metrics["mitigated"]["image_overall"]
    return dg.AssetCheckResult(
        passed=bool(after >= before - margin), severity=dg.AssetCheckSeverity.ERROR,
        metadata={"audited_image_overall": before, "mitigated_image_overall": after,
                  "change": after - before, "max_accuracy_drop": margin})
