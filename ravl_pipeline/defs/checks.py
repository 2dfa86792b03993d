"""Asset checks: properties every materialization must (or should) have."""

import json

import dagster as dg
import numpy as np

from ..core.embed import Embeddings
from ..core.findings import FindingsError, read_findings
from .discovery import region_embeddings, spurious_features
from .metadata import drift_markdown
from .mitigation import mitigation_metrics
from .resources import RavlProject
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


@dg.asset_check(asset=spurious_features, blocking=True,
                description="findings.json reads back with the SPEC §5 schema and is consistently ranked.")
def findings_well_formed(context: dg.AssetCheckExecutionContext, ravl: RavlProject) -> dg.AssetCheckResult:
    path = ravl.outputs_root / _partition(context) / "findings.json"
    try:
        findings = read_findings(path)
    except (FindingsError, FileNotFoundError) as exc:
        return dg.AssetCheckResult(passed=False, metadata={"error": str(exc)})
    problems = findings.problems()
    return dg.AssetCheckResult(passed=not problems,
                               metadata={"features": len(findings.features),
                                         "problems": dg.MetadataValue.json(problems)})


@dg.asset_check(asset=spurious_features,
                description="Did the audited model learn the induced correlation? (validity, SPEC §4.1). "
                            "Reported as a warning; user data without ground truth is not judged.")
def audited_model_validity(context: dg.AssetCheckExecutionContext, ravl: RavlProject) -> dg.AssetCheckResult:
    findings = read_findings(ravl.outputs_root / _partition(context) / "findings.json")
    truth = findings.ground_truth or {}
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


@dg.asset_check(asset=spurious_features,
                description="No called finding appeared since the set's previous audit (findings matched by "
                            "medoid similarity); a warning, with the whole drift as metadata.")
def no_new_called_finding(context: dg.AssetCheckExecutionContext, ravl: RavlProject) -> dg.AssetCheckResult:
    drift = ravl.audit(_partition(context)).drift()
    new = drift["new_called"] if drift else []
    return dg.AssetCheckResult(passed=not new, severity=dg.AssetCheckSeverity.WARN,
                               metadata={"new_called_ranks": ", ".join(map(str, new)) or "none",
                                         "first_audit": drift is None,
                                         "changes_since_last_audit": dg.MetadataValue.md(drift_markdown(drift))})


@dg.asset_check(asset=mitigation_metrics, blocking=True, additional_deps=[params_evaluation],
                description="The mitigated model loses at most evaluation.max_accuracy_drop of image "
                            "overall accuracy against the audited model.")
def mitigated_accuracy_within_margin(context: dg.AssetCheckExecutionContext,
                                     ravl: RavlProject) -> dg.AssetCheckResult:
    metrics = json.loads((ravl.outputs_root / _partition(context) / "metrics.json").read_text())
    margin = float(ravl.params().evaluation.max_accuracy_drop)
    if not metrics.get("mitigated"):  # nothing trained: the audited model stands, nothing to lose
        return dg.AssetCheckResult(passed=True, severity=dg.AssetCheckSeverity.ERROR,
                                   metadata={"mitigated": "not trained",
                                             "reason": (metrics.get("not_trained") or {}).get("mitigated") or ""})
    before, after = metrics["audited"]["image_overall"], metrics["mitigated"]["image_overall"]
    return dg.AssetCheckResult(
        passed=bool(after >= before - margin), severity=dg.AssetCheckSeverity.ERROR,
        metadata={"audited_image_overall": before, "mitigated_image_overall": after,
                  "change": after - before, "max_accuracy_drop": margin})
