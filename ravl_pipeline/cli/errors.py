"""The command line's error boundary, and the checks of output paths that
run before any work.

Every failure the user can cause (an :class:`~ravl_pipeline.config.InputError`
or an OS error about a path they named) ends as one line,
``ravl <command>: error: <what, naming the file/row/column/flag>``, with exit
status 2; anything else is an internal error: one line saying so, exit
status 1, and the traceback with ``-v``. argparse's own errors (a bad flag
value) are one line with status 2 as well.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..config import InputError, first_line, user_error_message
from ..io.files import check_output, remove_stale_temporaries

__all__ = ["EXIT_INPUT", "EXIT_INTERNAL", "Parser", "run_guarded", "warn", "check_output_file",
           "check_output_dir"]

EXIT_INPUT = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# warnings of the project and of libraries (PIL's decompression bomb, numerical warnings) shown as the
# project's own one-line warnings; deprecations stay the developers' business
SHOWN_WARNINGS = (UserWarning, RuntimeWarning)


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Within: each warning of :data:`SHOWN_WARNINGS` printed once as
    ``ravl <command>: warning: <its first line>`` (no source line, no
    file of the library that raised it)."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, SHOWN_WARNINGS):
            return previous(message, category, filename, lineno, file, line)
        text = first_line(str(message), 600)
        if text not in seen:
            seen.add(text)
            warn(command, text)

    with warnings.catch_warnings():
        previous = warnings.showwarning
        warnings.showwarning = show
        yield


def run_guarded(command: str, func: Callable[[], int | None], verbose: bool = False) -> int:
    """Run one command behind the boundary; returns its exit status."""
    try:
        with one_line_warnings(command):
            return int(func() or 0)
    except KeyboardInterrupt:
        print(f"ravl {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # the boundary: every error ends here as one line
        message = user_error_message(exc)
        if verbose:
            traceback.print_exc()
        if message is not None:
            print(f"ravl {command}: error: {message}", file=sys.stderr)
            return EXIT_INPUT
        print(f"ravl {command}: internal error: {type(exc).__name__}: {first_line(str(exc))}"
              + ("" if verbose else " (re-run with -v for the traceback)"), file=sys.stderr)
        return EXIT_INTERNAL


def warn(command: str, message: str) -> None:
    print(f"ravl {command}: warning: {message}", file=sys.stderr)


def _first_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_writable_parent(path: Path, flag: str) -> None:
    ancestor = _first_existing(path.parent if str(path.parent) else Path("."))
    if not ancestor.is_dir():
        raise InputError(f"{flag} {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot write in {ancestor} (permission denied)")


def check_output_file(path: str | os.PathLike, flag: str = "--out", inputs: Iterable[tuple[str, Any]] = (),
                      outputs: Iterable[tuple[str, Any, bool]] = ()) -> Path:
    """A file the command will write: refused before any work when the
    output rule refuses it (:func:`~ravl_pipeline.io.files.output_problem`:
    a link, a special file, a folder, one of ``inputs``) or it cannot be
    created; stale temporaries of an interrupted run in its folder are
    removed."""
    path = check_output(path, flag, inputs=inputs, outputs=outputs)
    _check_writable_parent(path, flag)
    remove_stale_temporaries(path.parent)
    return path


def check_output_dir(path: str | os.PathLike, flag: str = "--out", *, replaces_if: str | None = None,
                     what: str = "folder", inputs: Iterable[tuple[str, Any]] = ()) -> Path:
    """A folder the command will write. Refused before any work when it is
    an existing file or cannot be created; with ``replaces_if`` (a file
    name), an existing non-empty folder is replaced only when it holds that
    file (it is this command's earlier output), else refused; so is a
    folder that the output rule refuses (a link, a special file, a folder
    that is or holds one of ``inputs``)."""
    path = check_output(path, flag, folder=True, inputs=inputs)
    if replaces_if is not None and path.is_dir() and any(path.iterdir()) and not (path / replaces_if).is_file():
        raise InputError(f"{flag} {path}: an existing folder that is not a {what} (no {replaces_if}); "
                         "refusing to replace it: name a new or empty folder")
    _check_writable_parent(path, flag)
    remove_stale_temporaries(path.parent)
    if path.is_dir():
        remove_stale_temporaries(path)
    return path
