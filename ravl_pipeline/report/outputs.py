"""Where the report goes: the page, its JSON twin named after it, and the
refusal to replace anything that is not an earlier report."""
from __future__ import annotations

import os
from pathlib import Path

from .inputs import ReportError

__all__ = ["GENERATOR", "HTML_MARK", "TWIN_MARK", "twin_path", "check_report_outputs"]

GENERATOR = "ravl_pipeline report"  # marks the files the report writes
HTML_MARK = f'<meta name="generator" content="{GENERATOR}">'
TWIN_MARK = f'"generator": "{GENERATOR}"'


def twin_path(out_path) -> Path:
    """The JSON twin of report page ``out_path``: the same name with ``.json``."""
    out = Path(out_path)
    if out.suffix.lower() == ".json":
        raise ReportError(f"--out {out}: the report page must not end in .json (its JSON twin takes that name)")
    return out.with_suffix(".json")


def _written_by_report(path: Path, mark: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return mark in fh.read(4096)
    except OSError:
        return False


def check_report_outputs(out_path) -> tuple[Path, Path]:
    """The page and twin paths, refused (naming the path) when either
    exists and is not an earlier report: a folder, or a file this module did
    not write. Called before any work."""
    out, twin = Path(out_path), twin_path(out_path)
    marks = {out: HTML_MARK.encode(), twin: TWIN_MARK.encode()}
    for path, mark in marks.items():
        if path.is_dir():
            raise ReportError(f"--out {out}: {path} is a directory; name the report page to write "
                              "(e.g. report/report.html)")
        if os.path.lexists(path) and not _written_by_report(path, mark):
            raise ReportError(f"--out {out}: {path} exists and is not a report this command wrote; refusing to "
                              "replace it (name another --out)")
    return out, twin
