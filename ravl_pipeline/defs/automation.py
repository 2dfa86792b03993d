"""Jobs, the new-validation-set sensor and the weekly re-audit schedule."""

import dagster as dg

from .assets import DISCOVERY_ASSETS, PARTITIONED_ASSETS, audited_model
from .partitions import validation_sets
from .project import RavlProject

AUDIT_JOB = "audit_validation_set"
REAUDIT_JOB = "reaudit_validation_set"
MODEL_JOB = "build_audited_model"
WEEKLY_CRON = "0 6 * * 1"  # Mondays 06:00 UTC

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


@dg.sensor(job=audit_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Adds a partition for each new dataset directory under data/validation_sets/ "
                       "and requests its audit.")
def new_validation_sets(context: dg.SensorEvaluationContext, ravl: RavlProject) -> dg.SensorResult:
    known = set(context.instance.get_dynamic_partitions(validation_sets.name))
    new = [name for name in ravl.validation_set_names() if name not in known]
    if not new:
        return dg.SensorResult(skip_reason="no new validation set")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=name, run_key=f"new-validation-set-{name}") for name in new],
        dynamic_partitions_requests=[validation_sets.build_add_request(new)])


@dg.schedule(job=reaudit_job, cron_schedule=WEEKLY_CRON, execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.RUNNING,
             description="Re-audit every registered validation set once a week, whether or not "
                         "anything upstream changed.")
def weekly_reaudit(context: dg.ScheduleEvaluationContext):
    names = sorted(context.instance.get_dynamic_partitions(validation_sets.name))
    if not names:
        return dg.SkipReason("no validation set registered")
    tick = context.scheduled_execution_time.strftime("%Y-%m-%dT%H:%M")
    return [dg.RunRequest(partition_key=name, run_key=f"weekly-reaudit-{name}-{tick}") for name in names]
