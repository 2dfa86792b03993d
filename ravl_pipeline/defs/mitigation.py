"""Stage 2 and the closed loop of one validation set: mitigated_model →
mitigation_metrics and mitigated_findings (the mitigated model audited
again) → evaluation_report (SPEC §3–4)."""

import dagster as dg

from ..config import VERSIONED_SECTIONS
from ..io.hashing import json_sha256
from . import metadata as meta
from .discovery import DISCOVERY_ASSETS, spurious_features
from .model import audited_model
from .partitions import MITIGATION_GROUP, MODEL_POOL, audit_asset, set_data_version
from .resources import RavlProject
from .sources import (params_discovery, params_evaluation, params_labels, params_mitigation, params_regions,
                      params_scores, validation_set)


@audit_asset(deps=[spurious_features, audited_model, params_mitigation], kinds={"pytorch", "open_clip"},
             code_version="2", pool=MODEL_POOL, group_name=MITIGATION_GROUP,
             description="A model trained from the audited model's initialisation with the region-aware "
                         "loss on its fine-tuning data (SPEC §3).")
def mitigated_model(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    audit = ravl.audit(context.partition_key)
    record, history = audit.mitigate()
    return dg.MaterializeResult(metadata=meta.mitigated_model(audit, record, history))


@audit_asset(deps=[mitigated_model, audited_model, params_evaluation], kinds={"json"}, code_version="1",
             pool=MODEL_POOL, group_name=MITIGATION_GROUP,
             description="Image/region overall and worst-group accuracy of the audited and the mitigated "
                         "model on the set's test rows (SPEC §4.2).")
def mitigation_metrics(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    audit = ravl.audit(context.partition_key)
    measured = audit.measure()
    return dg.MaterializeResult(metadata=meta.metrics(audit, measured, audit.drift()))


@audit_asset(deps=[mitigated_model, validation_set, params_regions, params_scores, params_labels,
                   params_discovery], kinds={"json"}, code_version="2", pool=MODEL_POOL,
             group_name=MITIGATION_GROUP,
             description="Stage 1 run again on the mitigated model: the findings after mitigation.")
def mitigated_findings(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    audit = ravl.audit(context.partition_key)
    found = audit.reaudit()
    versioned = {k: v for k, v in audit.params.as_dict().items() if k in VERSIONED_SECTIONS}
    version = set_data_version(audit.dataset_dir, json_sha256(versioned), audit.mitigated.model)
    return dg.MaterializeResult(data_version=version,
                                metadata=meta.findings(audit, found, audit.paths.findings_mitigated, compared=False))


@audit_asset(deps=[spurious_features, mitigated_findings, mitigation_metrics], kinds={"html", "json"},
             code_version="2", group_name=MITIGATION_GROUP,
             description="Findings before and after mitigation with the metrics: summary.json and report.html.")
def evaluation_report(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    audit = ravl.audit(context.partition_key)
    return dg.MaterializeResult(metadata=meta.report(audit, audit.report(run_id=context.run.run_id)))


PARTITIONED_ASSETS = [*DISCOVERY_ASSETS, mitigated_model, mitigation_metrics, mitigated_findings, evaluation_report]
