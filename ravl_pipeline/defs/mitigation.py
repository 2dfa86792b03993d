"""Stage 2 and the closed loop of one validation set: mitigated_model and
control_model (the same-budget control) → mitigation_metrics, and
mitigated_findings (the mitigated model audited again) → evaluation_report
(SPEC §3–4)."""

import dagster as dg

from ..config import VERSIONED_SECTIONS, section_values
from ..io.hashing import json_sha256
from . import metadata as meta
from .discovery import DISCOVERY_ASSETS, spurious_features
from .model import audited_model
from .partitions import MITIGATION_GROUP, MODEL_POOL, audit_asset, set_data_version
from .resources import RavlProject
from .sources import (params_control, params_discovery, params_evaluation, params_labels, params_mitigation,
                      params_regions, params_scores, validation_set)


@audit_asset(deps=[spurious_features, audited_model, params_mitigation], kinds={"pytorch", "open_clip"},
             code_version="3", pool=MODEL_POOL, group_name=MITIGATION_GROUP,
             description="A model trained from the audited model's initialisation with the region-aware "
                         "loss on its fine-tuning data (SPEC §3).")
def mitigated_model(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    audit = ravl.audit(context.partition_key)
    record, history = audit.mitigate()
    return dg.MaterializeResult(metadata=meta.mitigated_model(audit, record, history))


@audit_asset(deps=[spurious_features, audited_model, params_mitigation, params_control],
             kinds={"pytorch", "open_clip"}, code_version="1", pool=MODEL_POOL, group_name=MITIGATION_GROUP,
             description="The same-budget control: Upsampled FT (RaVL's λ = 1 ablation) from the same "
                         "initialisation, data order, sampler and steps as mitigated_model "
                         "(mitigation.control in params.yaml).")
def control_model(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    audit = ravl.audit(context.partition_key)
    record, history = audit.train_control()
    return dg.MaterializeResult(metadata=meta.mitigated_model(audit, record, history, audit.paths.control_model))


@audit_asset(deps=[mitigated_model, control_model, audited_model, params_evaluation], kinds={"json"},
             code_version="2", pool=MODEL_POOL, group_name=MITIGATION_GROUP,
             description="Image/region overall and worst-group accuracy of the audited, control and mitigated "
                         "models on the set's test rows (SPEC §4.2), on annotated or discovered groups, with "
                         "paired bootstrap intervals and each model's steps.")
def mitigation_metrics(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    audit = ravl.audit(context.partition_key)
    measured = audit.measure()
    return dg.MaterializeResult(metadata=meta.metrics(audit, measured, audit.drift()))


@audit_asset(deps=[mitigated_model, validation_set, params_regions, params_scores, params_labels,
                   params_discovery], kinds={"json"}, code_version="3", pool=MODEL_POOL,
             group_name=MITIGATION_GROUP,
             description="Stage 1 run again on the mitigated model: the findings after mitigation.")
def mitigated_findings(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    audit = ravl.audit(context.partition_key)
    found = audit.reaudit()
    if found is None:
        return dg.MaterializeResult(metadata={"reaudited": False,
                                              "reason": "nothing was mitigated: the audited model's findings stand"})
    versioned = {k: section_values(audit.params, k) for k in VERSIONED_SECTIONS}
    version = set_data_version(audit.dataset_dir, json_sha256(versioned), audit.mitigated.model)
    return dg.MaterializeResult(data_version=version,
                                metadata=meta.findings(audit, found, audit.paths.findings_mitigated, compared=False))


@audit_asset(deps=[spurious_features, mitigated_findings, mitigation_metrics], kinds={"html", "json"},
             code_version="3", group_name=MITIGATION_GROUP,
             description="Findings before and after mitigation with the metrics: summary.json and report.html.")
def evaluation_report(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    audit = ravl.audit(context.partition_key)
    return dg.MaterializeResult(metadata=meta.report(audit, audit.report(run_id=context.run.run_id)))


PARTITIONED_ASSETS = [*DISCOVERY_ASSETS, mitigated_model, control_model, mitigation_metrics, mitigated_findings,
                      evaluation_report]
