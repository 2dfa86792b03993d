"""Materializing the graph in process against a Dagster instance (what
``ravl materialize`` and ``ravl demo`` do).

A run here is recorded exactly like a run launched from the UI, so
``make ui`` shows it, provided both use the same ``DAGSTER_HOME``.
"""
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import dagster as dg
from dagster._core.definitions.data_version import DATA_VERSION_TAG, extract_data_version_from_entry

from ..config import PARAMS_SOURCE_NAMES, first_line
from ..definitions import EXECUTOR_ENV, executor_name
from ..defs.jobs import AUDIT_JOB, MODEL_JOB
from ..defs.partitions import INPUT_ERROR, SET_VERSION_TAG, validation_sets
from ..defs.resources import RavlProject, project_root
from ..defs.sensors import SENSOR_TAG
from ..defs.sources import params_observation, set_versions
from ..io.files import copy_dir_atomic, process_alive
from ..io.hashing import dataset_fingerprint
from .progress import StepProgress

DAGSTER_YAML = """\
# The pipeline's Dagster instance: run history, event log and schedules are
# kept in embedded SQLite files under this folder (Dagster's default storage).
telemetry:
  enabled: false
# Model-heavy steps (embedding, scoring, training, evaluation) are in the
# `ravl_model` pool: one at a time, whatever the executor's process count.
concurrency:
  pools:
    default_limit: 1
"""


def ensure_dagster_home() -> Path:
    """Use ``<repo>/dagster_home`` unless ``DAGSTER_HOME`` is set (an unset one
    would silently give a throwaway instance), with a ``dagster.yaml``."""
    home = Path(os.environ.get("DAGSTER_HOME") or project_root() / "dagster_home").resolve()
    os.environ["DAGSTER_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    return home


def check_word(passed: bool, severity: str) -> str:
    """How a check's outcome reads: passed, a warning, or a failure that
    blocks what follows (an ERROR check is blocking in this graph)."""
    if passed:
        return "passed"
    return "failed (blocks the steps after it)" if severity == "ERROR" else "warning"


@dataclass
class RunSummary:
    """What one in-process run did."""

    run_id: str
    partition: str | None
    success: bool
    materialized: list[str] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (name, passed, severity)
    failures: list[tuple[str, str, bool]] = field(default_factory=list)  # (step, one line, caused by bad input)

    def lines(self) -> list[str]:
        where = f" [{self.partition}]" if self.partition else ""
        out = [f"run {self.run_id[:8]}{where}: {'success' if self.success else 'FAILED'}"]
        out += [f"  materialized {name}" for name in self.materialized]
        out += [f"  check {name}: {check_word(ok, sev)}" for name, ok, sev in self.checks]
        out += [f"  step {step} failed: {message}" for step, message, _ in self.failures]
        return out

    @property
    def input_error(self) -> bool:
        """Failed, and only because of bad input (one-line failures of the assets)."""
        return not self.success and bool(self.failures) and all(bad for _, _, bad in self.failures)


def _project(defs: dg.Definitions) -> RavlProject:
    return defs.resources["ravl"]


def _report_version(instance: dg.DagsterInstance, key: dg.AssetKey, version: str, partition: str | None = None,
                    metadata: dict | None = None) -> bool:
    """Record an observation of ``key`` with data ``version`` outside any run,
    unless it is already the latest one recorded. Returns whether it recorded."""
    latest = instance.get_latest_data_version_record(key, is_source=True, partition_key=partition)
    if latest is not None and extract_data_version_from_entry(latest.event_log_entry) == dg.DataVersion(version):
        return False
    instance.report_runless_asset_event(dg.AssetObservation(
        asset_key=key, partition=partition, tags={DATA_VERSION_TAG: version}, metadata=metadata or {}))
    return True


def observe_sources(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[str]:
    """Record fresh data versions of params.yaml's sections and of every
    registered validation set, so staleness reflects the files as they are.

    They are recorded as observations outside any run, and only when a
    version changed: an observation run per ``ravl`` call would bury the
    audits in the runs list. (The UI's "Observe sources" runs the source
    assets themselves, with the same versions.) Returns what changed."""
    project = _project(defs)
    changed = []
    for section in PARAMS_SOURCE_NAMES:
        version, metadata = params_observation(project, section)
        if _report_version(instance, dg.AssetKey(f"params_{section}"), version, metadata=metadata):
            changed.append(f"params_{section}")
    known = set(instance.get_dynamic_partitions(validation_sets.name))
    for name, version in set_versions(project, known).items():
        if _report_version(instance, dg.AssetKey("validation_set"), version, partition=name):
            changed.append(f"validation_set[{name}]")
    return changed


def register_validation_sets(defs: dg.Definitions, instance: dg.DagsterInstance,
                             names: Iterable[str] | None = None) -> list[str]:
    """Add a partition for each named set (default: every set on disk); return the new ones."""
    project = _project(defs)
    on_disk = project.validation_set_names()
    names = on_disk if names is None else list(names)
    for name in names:
        project.validation_set_dir(name)  # a clear error for a set that is not there
    known = set(instance.get_dynamic_partitions(validation_sets.name))
    new = [n for n in names if n not in known]
    if new:
        instance.add_dynamic_partitions(validation_sets.name, new)
    return new


def _selected_keys(defs: dg.Definitions, select: Sequence[str] | None) -> set[dg.AssetKey]:
    graph = defs.resolve_asset_graph()
    if not select:
        return set(graph.materializable_asset_keys)
    selection = None
    for text in select:
        # a bare asset name, or Dagster's selection syntax (`key:region_*`, `group:audit+` …)
        one = (dg.AssetSelection.assets(text) if re.fullmatch(r"[A-Za-z0-9_]+", text.strip())
               else dg.AssetSelection.from_string(text))
        selection = one if selection is None else selection | one
    return set(selection.resolve(graph)) & set(graph.materializable_asset_keys)


def _failure(event) -> tuple[str, str, bool]:
    """A failed step in one line: the asset's own message for bad input, else the error's first line."""
    data = event.step_failure_data
    user = data.user_failure_data
    if user is not None and user.metadata.get(INPUT_ERROR) is not None:
        return event.step_key, user.description, True
    error = data.error
    what = f"{error.cls_name}: {first_line(error.message)}" if error is not None else "unknown"
    return event.step_key, f"internal error: {what} (re-run with -v for the traceback)", False


def summarize_run(instance: dg.DagsterInstance, run_id: str) -> RunSummary:
    """What a finished run materialized, checked and failed, read from the event
    log (the same for every executor, and for runs this process did not launch)."""
    run = instance.get_run_by_id(run_id)
    records = instance.get_records_for_run(run_id, of_type={dg.DagsterEventType.ASSET_MATERIALIZATION,
                                                            dg.DagsterEventType.ASSET_CHECK_EVALUATION,
                                                            dg.DagsterEventType.STEP_FAILURE}).records
    mats, checks, failures = [], [], []
    for record in records:
        event = record.event_log_entry.dagster_event
        if event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
            mats.append(event.asset_key.to_user_string())
        elif event.event_type == dg.DagsterEventType.STEP_FAILURE:
            failures.append(_failure(event))
        else:
            ev = event.event_specific_data
            checks.append((f"{ev.asset_key.to_user_string()}:{ev.check_name}", bool(ev.passed), ev.severity.value))
    return RunSummary(run_id, run.tags.get("dagster/partition"), run.status == dg.DagsterRunStatus.SUCCESS,
                      mats, checks, failures)


def _run_config(log_level: str) -> dict:
    return {"loggers": {"console": {"config": {"log_level": log_level}}}}


# Runs launched here carry the launching process, so that a later `ravl`
# can tell a run whose process was killed from one still running.
RUNNER_PID_TAG = "ravl/pid"
RUNNER_HOST_TAG = "ravl/host"


# A run launched by a DVC stage under `dvc exp run` carries the experiment's name.
EXPERIMENT_TAG = "dvc/experiment"


def _runner_tags() -> dict[str, str]:
    tags = {RUNNER_PID_TAG: str(os.getpid()), RUNNER_HOST_TAG: socket.gethostname()}
    if os.environ.get("DVC_EXP_NAME"):
        tags[EXPERIMENT_TAG] = os.environ["DVC_EXP_NAME"]
    return tags


def release_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed the runs launched on this host by a ``ravl`` process that no
    longer exists (killed mid-step, e.g. SIGKILL), and free their
    concurrency-pool slots: without a daemon nobody else does, and the next
    run would wait for the ``ravl_model`` slot forever. Returns their ids."""
    active = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
    released = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=active,
                                                       tags={RUNNER_HOST_TAG: socket.gethostname()})):
        pid = int(run.tags.get(RUNNER_PID_TAG, "0") or 0)
        if pid and pid != os.getpid() and not process_alive(pid):
            instance.report_run_failed(run, message=f"the process that ran it (pid {pid}) is gone")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            released.append(run.run_id)
    return released


IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED]


def sensor_audit_of(instance: dg.DagsterInstance, partition: str, version: str) -> dg.DagsterRun | None:
    """The run the ``new_validation_sets`` sensor launched for this content of
    the set, unless it failed: the CLI reports it instead of auditing the same
    new folder a second time."""
    runs = instance.get_runs(filters=dg.RunsFilter(
        job_name=AUDIT_JOB, statuses=[*IN_FLIGHT, dg.DagsterRunStatus.SUCCESS],
        tags={"dagster/partition": partition, SET_VERSION_TAG: version, SENSOR_TAG: "new_validation_sets"}), limit=1)
    return runs[0] if runs else None


def wait_for_run(instance: dg.DagsterInstance, run_id: str, poll: float = 1.0) -> dg.DagsterRun:
    while (run := instance.get_run_by_id(run_id)).status in IN_FLIGHT:
        time.sleep(poll)
    return run


def cli_executor() -> str:
    """``ravl`` runs steps in its own process unless ``RAVL_EXECUTOR`` says otherwise."""
    return executor_name() if os.environ.get(EXECUTOR_ENV) else "in_process"


def execute(defs: dg.Definitions, instance: dg.DagsterInstance, job_name: str, keys: Sequence[dg.AssetKey],
            partition: str | None, tags: dict, raise_on_error: bool, log_level: str) -> RunSummary:
    """One run of ``job_name`` over ``keys``: in this process by default, else
    with the executor ``RAVL_EXECUTOR`` names (multiprocess, Celery), the job
    rebuilt from the environment by the processes that run its steps."""
    if cli_executor() == "in_process":
        result = defs.resolve_job_def(job_name).execute_in_process(
            instance=instance, partition_key=partition, asset_selection=sorted(keys), tags=tags,
            raise_on_error=raise_on_error, run_config=_run_config(log_level))
    else:
        tags = {**tags, **({"dagster/partition": partition} if partition else {})}
        job = dg.build_reconstructable_job("ravl_pipeline.definitions", "job_named",
                                           reconstructable_args=(job_name,))
        result = dg.execute_job(job, instance=instance, run_config=_run_config(log_level), tags=tags,
                                asset_selection=sorted(keys), raise_on_error=raise_on_error)
    return summarize_run(instance, result.run_id)


def plan_keys(defs: dg.Definitions, partitions: Sequence[str] | None,
              select: Sequence[str] | None) -> tuple[set[dg.AssetKey], set[dg.AssetKey]]:
    """The unpartitioned and the per-set assets to run. Naming sets without a
    selection means those sets' assets: the audited model only when it was
    never built."""
    graph = defs.resolve_asset_graph()
    keys = _selected_keys(defs, select)
    unpartitioned = {k for k in keys if not graph.get(k).is_partitioned}
    if partitions is not None and select is None and _project(defs).audited_record_path.is_file():
        unpartitioned = set()
    return unpartitioned, keys - unpartitioned


def materialize(defs: dg.Definitions, instance: dg.DagsterInstance, partitions: Sequence[str] | None = None,
                select: Sequence[str] | None = None, raise_on_error: bool = False,
                log_level: str = "WARNING", progress: StepProgress | None = None) -> list[RunSummary]:
    """Observe the sources, then materialize the selection: the audited model
    (unpartitioned) first, then the per-set assets for each partition
    (default: every set under ``validation_sets/``, registered if new).

    With ``partitions`` and no ``select``, only those sets' assets run (the
    audited model too only when it was never built). A new set the sensor is
    already auditing, or has audited with the same content, is not audited
    again: its run is followed and reported. Each step is printed as it
    starts and ends when ``progress`` is given."""
    project = _project(defs)
    project.params()  # a bad params.yaml fails here, naming the file and key
    release_dead_runs(instance)
    observe_sources(defs, instance)
    unpartitioned, partitioned = plan_keys(defs, partitions, select)
    tags = {**_runner_tags(), **(progress.tags if progress else {})}
    runs = []
    if unpartitioned:
        runs.append(execute(defs, instance, MODEL_JOB, sorted(unpartitioned), None, tags, raise_on_error, log_level))
        if not runs[-1].success:
            return runs
    if partitioned:
        if partitions is None:
            # every set on disk, as the sensor would register them
            partitions = project.validation_set_names()
        if register_validation_sets(defs, instance, partitions):
            observe_sources(defs, instance)
        for name in partitions:
            version = dataset_fingerprint(project.validation_set_dir(name))
            earlier = sensor_audit_of(instance, name, version) if select is None else None
            if earlier is not None:
                print(f"[{name}] audited by the new_validation_sets sensor (run {earlier.run_id[:8]}): "
                      "following that run instead of starting another")
                if progress:
                    progress.follow(earlier.run_id)
                runs.append(summarize_run(instance, wait_for_run(instance, earlier.run_id).run_id))
                continue
            runs.append(execute(defs, instance, AUDIT_JOB, sorted(partitioned), name,
                                {**tags, SET_VERSION_TAG: version}, raise_on_error, log_level))
    return runs


DEMO_SET = "synthetic-default"


def register_default_setting(defs: dg.Definitions) -> Path:
    """Copy the built-in setting's ``eval`` set (``val`` for discovery,
    ``test`` for metrics, with its ``setting.json``) to
    ``validation_sets/synthetic-default``; an identical copy is left alone
    so that its downstream stays fresh."""
    project = _project(defs)
    record = json.loads(project.audited_record_path.read_text())
    if record.get("source") != "synthetic-default":
        raise ValueError(f"{project.params_path}: the demo needs audited_model.source: synthetic-default, "
                         f"got {record.get('source')!r}")
    setting = Path(record["setting"])
    src, target = setting / "eval", project.validation_root / DEMO_SET
    same = (target.is_dir() and (target / "setting.json").is_file()
            and (target / "setting.json").read_bytes() == (setting / "setting.json").read_bytes()
            and dataset_fingerprint(target) == dataset_fingerprint(src))
    if not same:
        copy_dir_atomic(src, target, extra_files=(setting / "setting.json",))
    return target


def run_demo(defs: dg.Definitions, instance: dg.DagsterInstance,
             progress: StepProgress | None = None) -> list[RunSummary]:
    """The whole graph on the built-in synthetic default (``ravl demo``)."""
    runs = materialize(defs, instance, select=["audited_model"], progress=progress)
    if not all(r.success for r in runs):
        return runs
    register_default_setting(defs)
    graph = defs.resolve_asset_graph()
    partitioned = [k.to_user_string() for k in graph.materializable_asset_keys if graph.get(k).is_partitioned]
    return runs + materialize(defs, instance, partitions=[DEMO_SET], select=partitioned, progress=progress)
