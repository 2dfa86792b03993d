"""The Dagster code location of the RaVL pipeline (``workspace.yaml``, ``dg``).

Everything under ``ravl_pipeline/defs/`` is loaded with
``load_from_defs_folder``; this module adds the ``ravl`` resource (where the
data and ``params.yaml`` live) and the executor.

The executor is chosen by ``RAVL_EXECUTOR`` (no code change):

* ``in_process`` (default for runs launched from the UI or the daemon):
  every step of a run in that run's process, which imports torch, open_clip
  and the definitions once — on four small sets 21× faster than
  ``multiprocess`` on an idle 2-core machine (BENCHMARKS.md §Scale);
* ``multiprocess``: each step in its own process, two at a time (isolation,
  light steps overlapping);
* ``celery``: each step a Celery task on a broker (``RAVL_CELERY_BROKER``,
  default a Redis on the loopback), executed by ``ravl worker`` processes on
  any machine that sees the same ``data/`` folder and Dagster instance;

Whatever the executor, the model-heavy steps (embedding, scoring, training,
evaluation) share the ``ravl_model`` pool, which ``dagster_home/dagster.yaml``
limits to one at a time: the executors claim pool slots from the instance
before submitting a step, so light steps of other validation sets overlap
with them but two models never compete for the same cores.
"""
from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from .defs.resources import RavlProject

try:  # an optional deployment: the project runs without it
    from dagster_celery import celery_executor
except ImportError:  # pragma: no cover - dagster-celery is a dev dependency
    celery_executor = None

EXECUTOR_ENV = "RAVL_EXECUTOR"
EXECUTORS = ("multiprocess", "celery", "in_process")
BROKER_ENV, BACKEND_ENV = "RAVL_CELERY_BROKER", "RAVL_CELERY_BACKEND"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def executor_name() -> str:
    name = os.environ.get(EXECUTOR_ENV) or "in_process"
    if name not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV}={name!r}: expected one of {', '.join(EXECUTORS)}")
    return name


def celery_settings() -> dict[str, str]:
    """Broker and result backend of the Celery executor and its workers (one definition for both)."""
    broker = os.environ.get(BROKER_ENV) or DEFAULT_BROKER
    return {"broker": broker, "backend": os.environ.get(BACKEND_ENV) or broker}


def build_executor(name: str | None = None) -> dg.ExecutorDefinition:
    name = name or executor_name()
    if name == "in_process":
        return dg.in_process_executor
    if name == "celery":
        if celery_executor is None:
            raise ValueError(f"{EXECUTOR_ENV}=celery needs the dagster-celery package "
                             "(`pip install -e '.[dev]'`, which installs it)")
        return celery_executor.configured(celery_settings())
    # two processes: one model-heavy step plus light steps, on a 2-core machine
    return dg.multiprocess_executor.configured({"max_concurrent": 2})


def build_definitions(project: RavlProject | None = None, executor: str | None = None) -> dg.Definitions:
    """All definitions, bound to ``project`` (default: the repository's
    ``data/`` and ``params.yaml``, or ``RAVL_DATA_DIR``/``RAVL_PARAMS``) and
    run by ``executor`` (default: ``RAVL_EXECUTOR``)."""
    loaded = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    extra = dg.Definitions(resources={"ravl": project or RavlProject.from_env()}, executor=build_executor(executor))
    return dg.Definitions.merge(loaded, extra)


def job_named(name: str) -> dg.JobDefinition:
    """A job of the environment's definitions, rebuilt by name in any process
    (``dg.build_reconstructable_job``): how out-of-process executors and
    their workers find it."""
    return build_definitions().resolve_job_def(name)


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()
