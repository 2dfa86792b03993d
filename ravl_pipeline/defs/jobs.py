"""Jobs: the audited model alone, a validation set's whole audit, and its
Stage-1 re-audit."""
import dagster as dg

from .discovery import DISCOVERY_ASSETS
from .mitigation import PARTITIONED_ASSETS
from .model import audited_model

AUDIT_JOB = "audit_validation_set"
REAUDIT_JOB = "reaudit_validation_set"
MODEL_JOB = "build_audited_model"

# The audited model is shared by every validation set, so it lives in its own
# (unpartitioned) job; the partitioned jobs read what it recorded.
model_job = dg.define_asset_job(MODEL_JOB, selection=dg.AssetSelection.assets(audited_model),
                                description="Build or register the audited model.")
audit_job = dg.define_asset_job(
    AUDIT_JOB, selection=dg.AssetSelection.assets(*PARTITIONED_ASSETS),
    description="Discovery, mitigation, re-audit and report for one validation set.")
reaudit_job = dg.define_asset_job(
    REAUDIT_JOB, selection=dg.AssetSelection.assets(*DISCOVERY_ASSETS),
    description="Stage-1 discovery of the audited model on one validation set.")
