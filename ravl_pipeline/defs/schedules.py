"""The weekly re-audit of every registered validation set."""
import os

import dagster as dg

from .jobs import reaudit_job
from .partitions import validation_sets

WEEKLY_CRON = "0 6 * * 1"  # Mondays 06:00 UTC
# Another cadence without a code change (e.g. "* * * * *" to watch a tick fire)
CRON_ENV = "RAVL_REAUDIT_CRON"
TICK_TAG = "ravl/reaudit_tick"  # the scheduled time a re-audit run belongs to


@dg.schedule(job=reaudit_job, cron_schedule=os.environ.get(CRON_ENV) or WEEKLY_CRON, execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.RUNNING,
             description="Re-audit every registered validation set once a week, whether or not "
                         "anything upstream changed.")
def weekly_reaudit(context: dg.ScheduleEvaluationContext):
    names = sorted(context.instance.get_dynamic_partitions(validation_sets.name))
    if not names:
        return dg.SkipReason("no validation set registered")
    tick = context.scheduled_execution_time.strftime("%Y-%m-%dT%H:%M")
    return [dg.RunRequest(partition_key=name, run_key=f"weekly-reaudit-{name}-{tick}", tags={TICK_TAG: tick})
            for name in names]
