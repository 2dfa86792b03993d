"""The Dagster code location of the RaVL pipeline (``workspace.yaml``, ``dg``).

Everything under ``ravl_pipeline/defs/`` is loaded with
``load_from_defs_folder``; this module adds the ``ravl`` resource (where the
data and ``params.yaml`` live) and the executor.

Scale-out: runs launched from the UI use the multiprocess executor, each step
in its own process; the model-heavy steps (embedding, scoring, training,
evaluation) share the ``ravl_model`` pool, which ``dagster_home/dagster.yaml``
limits to one at a time, so light steps of other validation sets overlap with
them but two models never compete for the same cores. Beyond one machine, swap
the executor for ``dagster-k8s``/``dagster-celery`` and raise the pool limit.
"""
from __future__ import annotations

from pathlib import Path

import dagster as dg

from .defs.resources import RavlProject

# Two processes: one model-heavy step plus light steps, on a 2-core machine.
EXECUTOR = dg.multiprocess_executor.configured({"max_concurrent": 2})


def build_definitions(project: RavlProject | None = None) -> dg.Definitions:
    """All definitions, bound to ``project`` (default: the repository's
    ``data/`` and ``params.yaml``, or ``RAVL_DATA_DIR``/``RAVL_PARAMS``)."""
    loaded = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    extra = dg.Definitions(resources={"ravl": project or RavlProject.from_env()}, executor=EXECUTOR)
    return dg.Definitions.merge(loaded, extra)


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()
