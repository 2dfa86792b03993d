"""``ravl report``: a static HTML audit report of findings (with metrics
and the re-audit when given) and its JSON twin, named after the page
(``report.html`` → ``report.json``)."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import NON_NEGATIVE_INT, InputError, flag_type
from ..io.dataset import dataset_inputs
from ..io.files import check_input_file, input_problem, read_json
from ..report.html import DEFAULT_TOP_REGIONS, check_report_outputs, twin_path, write_report
from ..report.inputs import load_metrics
from .errors import check_output_file


def register(sub) -> None:
    p = sub.add_parser("report", help="static HTML audit report (+ JSON twin)", description=__doc__)
    p.add_argument("--findings", required=True, help="findings.json of the audited model")
    p.add_argument("--metrics", action="append", default=None,
                   help="[NAME=]metrics.json of one method (repeatable); NAME defaults to the file's "
                        "'method' key, stem, or folder")
    p.add_argument("--reaudit", default=None, help="findings.json of the mitigated model")
    p.add_argument("--data", default=None, help="dataset directory the findings were computed on (images)")
    p.add_argument("--provenance", default=None, help="JSON object of extra provenance (versions, parameters)")
    p.add_argument("--top-regions", type=flag_type(NON_NEGATIVE_INT), default=DEFAULT_TOP_REGIONS,
                   help="regions drawn per feature")
    p.add_argument("--out", required=True, help="report.html to write (its JSON twin: report.json beside it)")
    p.set_defaults(func=run)


def input_files(args) -> list:
    """The files the command reads, as ``(flag, path)``."""
    reads = [("--findings", args.findings)]
    reads += [("--metrics", metrics_arg(item)[1]) for item in args.metrics or []]
    return reads + [(flag, value) for flag, value in (("--reaudit", args.reaudit), ("--provenance", args.provenance))
                    if value]


def run(args) -> int:
    files = input_files(args)
    reads = files + (dataset_inputs(args.data) if args.data else [])
    check_output_file(args.out, inputs=reads)
    check_output_file(twin_path(args.out), "--out (its JSON twin)", inputs=reads)
    check_report_outputs(args.out)
    for flag, path in files:  # a named pipe or a folder is refused, not waited on
        check_input_file(path, flag)
    metrics = {}
    for item in args.metrics or []:
        name, path = metrics_arg(item)
        if name in metrics:
            raise InputError(f"--metrics: method {name!r} given twice")
        metrics[name] = load_metrics(path)
    provenance = read_json(args.provenance) if args.provenance else None
    out = write_report(args.out, args.findings, dataset_root=args.data, metrics=metrics or None,
                       reaudit=args.reaudit, provenance=provenance, top_regions=args.top_regions)
    print(f"wrote {out} and its JSON twin {twin_path(out)} (open the page in any browser)")
    return 0


def metrics_arg(item: str) -> tuple[str, Path]:
    """``NAME=PATH``, or ``PATH`` named by its ``method`` key, its stem, or its folder."""
    if "=" in item:
        name, path = item.split("=", 1)
        return name, Path(path)
    path = Path(item)
    method = None
    if input_problem(path) is None:  # never wait on a named pipe
        try:
            method = json.loads(path.read_text(encoding="utf-8")).get("method")
        except (OSError, ValueError, AttributeError):
            method = None
    if method:
        return str(method), path
    return (path.parent.name or path.stem) if path.stem == "metrics" else path.stem, path
