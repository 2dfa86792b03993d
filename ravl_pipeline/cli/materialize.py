"""``ravl materialize``: materialize the Dagster asset graph in process,
recorded in the instance under ``DAGSTER_HOME`` like a run from the UI."""
from __future__ import annotations

import dagster as dg

from ..definitions import build_definitions
from . import dagster_runs
from .errors import EXIT_INPUT, EXIT_INTERNAL
from .common import print_closed_loop
from .progress import StepProgress


def register(sub) -> None:
    p = sub.add_parser("materialize", help="materialize the Dagster asset graph in process", description=__doc__)
    p.add_argument("--partition", action="append", default=None,
                   help="validation set (repeatable; default: every registered set); registered if new. Only its "
                        "assets run unless --select says otherwise (the audited model only when never built)")
    p.add_argument("--select", action="append", default=None,
                   help="Dagster asset selection, e.g. audited_model or 'key:region_*' (repeatable; default: all)")
    p.set_defaults(func=run)


def dagster_session() -> tuple[dg.DagsterInstance, dg.Definitions]:
    """The persistent instance (``DAGSTER_HOME``, default ``<repo>/dagster_home``)
    and the pipeline's definitions."""
    dagster_runs.ensure_dagster_home()
    return dg.DagsterInstance.get(), build_definitions()


def print_runs(runs) -> bool:
    for run in runs:
        for line in run.lines():
            print(line)
    return all(run.success for run in runs)


def run(args) -> int:
    instance, defs = dagster_session()
    with instance, StepProgress(instance) as progress:
        runs = dagster_runs.materialize(defs, instance, partitions=args.partition or None, select=args.select,
                                        # the summary names every failure in one line; -v: Dagster's full log
                                        log_level="INFO" if args.verbose else "CRITICAL", progress=progress)
    if not runs:
        print("nothing to materialize (no validation set: add a dataset directory under data/validation_sets/)")
    ok = print_runs(runs)
    ravl = defs.resources["ravl"]
    for partition in dict.fromkeys(r.partition for r in runs if r.partition):
        audit = ravl.audit(partition)
        if audit.paths.findings.is_file():
            print(f"[{partition}]")
            print_closed_loop(audit)
            report = audit.paths.report / "report.html"
            if report.is_file():
                print(f"report: {report}")
    if ok:
        return 0
    return EXIT_INPUT if all(run.input_error for run in runs if not run.success) else EXIT_INTERNAL
