"""Materializing the graph in process against a Dagster instance (what
``ravl materialize`` and ``ravl demo`` do).

A run here is recorded exactly like a run launched from the UI, so
``make ui`` shows it, provided both use the same ``DAGSTER_HOME``.
"""
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import dagster as dg

from ..defs.jobs import AUDIT_JOB, MODEL_JOB
from ..config import first_line
from ..defs.partitions import INPUT_ERROR, validation_sets
from ..defs.resources import RavlProject, project_root
from ..io.files import copy_dir_atomic, process_alive
from ..io.hashing import dataset_fingerprint

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
        out += [f"  check {name}: {'passed' if ok else 'FAILED'} ({sev})" for name, ok, sev in self.checks]
        out += [f"  step {step} failed: {message}" for step, message, _ in self.failures]
        return out

    @property
    def input_error(self) -> bool:
        """Failed, and only because of bad input (one-line failures of the assets)."""
        return not self.success and bool(self.failures) and all(bad for _, _, bad in self.failures)


def _project(defs: dg.Definitions) -> RavlProject:
    return defs.resources["ravl"]


def source_assets(defs: dg.Definitions) -> list:
    graph = defs.resolve_asset_graph()
    return [graph.assets_def_for_key(k) for k in graph.observable_asset_keys]


def observe_sources(defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
    """Record fresh data versions of params.yaml's sections and of every
    registered validation set, so staleness reflects the files as they are."""
    sources = source_assets(defs)
    # one run for the unpartitioned params sections, one for the partitioned
    # validation sets (a run cannot mix them); each resolved source already
    # carries the `ravl` resource
    for group in ([a for a in sources if not a.partitions_def], [a for a in sources if a.partitions_def]):
        if not group:
            continue
        job = dg.define_asset_job("observe_sources", selection=dg.AssetSelection.all(include_sources=True))
        dg.Definitions(assets=group, jobs=[job]).resolve_job_def("observe_sources").execute_in_process(
            instance=instance, run_config=_run_config("WARNING"))


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


def _summary(result, partition: str | None) -> RunSummary:
    mats = [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()]
    checks = [(f"{ev.asset_key.to_user_string()}:{ev.check_name}", bool(ev.passed), ev.severity.value)
              for ev in result.get_asset_check_evaluations()]
    failures = []
    for event in result.get_step_failure_events():
        data = event.step_failure_data
        user = data.user_failure_data
        if user is not None and user.metadata.get(INPUT_ERROR) is not None:
            failures.append((event.step_key, user.description, True))
        else:
            error = data.error
            what = f"{error.cls_name}: {first_line(error.message)}" if error is not None else "unknown"
            failures.append((event.step_key, f"internal error: {what} (re-run with -v for the traceback)", False))
    return RunSummary(result.run_id, partition, result.success, mats, checks, failures)


def _run_config(log_level: str) -> dict:
    return {"loggers": {"console": {"config": {"log_level": log_level}}}}


# Runs launched here carry the launching process, so that a later `ravl`
# can tell a run whose process was killed from one still running.
RUNNER_PID_TAG = "ravl/pid"
RUNNER_HOST_TAG = "ravl/host"


def _runner_tags() -> dict[str, str]:
    return {RUNNER_PID_TAG: str(os.getpid()), RUNNER_HOST_TAG: socket.gethostname()}


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


def materialize(defs: dg.Definitions, instance: dg.DagsterInstance, partitions: Sequence[str] | None = None,
                select: Sequence[str] | None = None, raise_on_error: bool = False,
                log_level: str = "WARNING") -> list[RunSummary]:
    """Observe the sources, then materialize the selection: the audited model
    (unpartitioned) first, then the per-set assets for each partition
    (default: every set under ``validation_sets/``, registered if new)."""
    _project(defs).params()  # a bad params.yaml fails here, naming the file and key
    release_dead_runs(instance)
    observe_sources(defs, instance)
    graph = defs.resolve_asset_graph()
    keys = _selected_keys(defs, select)
    unpartitioned = {k for k in keys if not graph.get(k).is_partitioned}
    partitioned = keys - unpartitioned
    runs = []
    if unpartitioned:
        job = defs.resolve_job_def(MODEL_JOB)
        result = job.execute_in_process(instance=instance, asset_selection=sorted(unpartitioned),
                                        raise_on_error=raise_on_error, run_config=_run_config(log_level),
                                        tags=_runner_tags())
        runs.append(_summary(result, None))
        if not result.success:
            return runs
    if partitioned:
        if partitions is None:
            # every set on disk, as the sensor would register them
            partitions = _project(defs).validation_set_names()
        if register_validation_sets(defs, instance, partitions):
            observe_sources(defs, instance)
        job = defs.resolve_job_def(AUDIT_JOB)
        for name in partitions:
            result = job.execute_in_process(instance=instance, partition_key=name, run_config=_run_config(log_level),
                                            asset_selection=sorted(partitioned), raise_on_error=raise_on_error,
                                            tags=_runner_tags())
            runs.append(_summary(result, name))
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


def run_demo(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[RunSummary]:
    """The whole graph on the built-in synthetic default (``ravl demo``)."""
    runs = materialize(defs, instance, select=["audited_model"])
    if not all(r.success for r in runs):
        return runs
    register_default_setting(defs)
    graph = defs.resolve_asset_graph()
    partitioned = [k.to_user_string() for k in graph.materializable_asset_keys if graph.get(k).is_partitioned]
    return runs + materialize(defs, instance, partitions=[DEMO_SET], select=partitioned)
