"""The sensor that audits every new validation-set folder."""
import dagster as dg

from ..io.hashing import dataset_fingerprint
from .jobs import audit_job
from .partitions import SET_VERSION_TAG, validation_sets
from .resources import RavlProject

SENSOR_TAG = "dagster/sensor_name"  # Dagster tags every run a sensor requests with its name


@dg.sensor(job=audit_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Adds a partition for each new dataset directory under data/validation_sets/ "
                       "and requests its audit (unless a run of that set was already launched, "
                       "e.g. by `ravl materialize --partition`).")
def new_validation_sets(context: dg.SensorEvaluationContext, ravl: RavlProject) -> dg.SensorResult:
    known = set(context.instance.get_dynamic_partitions(validation_sets.name))
    new = [name for name in ravl.validation_set_names() if name not in known
           and not context.instance.get_runs_count(dg.RunsFilter(tags={"dagster/partition": name}))]
    if not new:
        return dg.SensorResult(skip_reason="no new validation set")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=name, run_key=f"new-validation-set-{name}",
                                    tags={SET_VERSION_TAG: dataset_fingerprint(ravl.validation_root / name)})
                      for name in new],
        dynamic_partitions_requests=[validation_sets.build_add_request(new)])
