"""Writing files so that a reader never sees half of one.

Every single-file output of the project goes through :func:`atomic_write`
(a temporary file beside the target, then one ``os.replace``); every folder
output through :func:`atomic_dir` or :func:`replace_dir`, which swap the
new folder in with one ``renameat2(RENAME_EXCHANGE)`` on Linux, so a process
killed at any point leaves the previous version or the new one, never
neither and never a mixture.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["atomic_write", "write_bytes_atomic", "write_json_atomic", "write_text_atomic", "json_bytes",
           "replace_dir", "atomic_dir", "copy_dir_atomic"]


def atomic_write(target: str | os.PathLike, write: Callable) -> Path:
    """Call ``write(fileobj)`` on a temporary file next to ``target``, then
    move it into place; the temporary file never outlives a failure."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # outputs are for reading; mkstemp's 0600 would hide them
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(target, lambda f: f.write(data))


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(target, text.encode("utf-8"))


def json_bytes(obj: Any) -> bytes:
    """``obj`` as indented JSON; non-finite numbers are refused before anything is written."""
    return (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode("utf-8")


def write_json_atomic(target: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``target`` atomically."""
    return write_bytes_atomic(target, json_bytes(obj))


def _exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False when the platform cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move directory ``new`` to ``target``, replacing any previous one.

    An existing ``target`` is swapped with ``new`` in one step where the
    kernel offers it (Linux ``renameat2(RENAME_EXCHANGE)``), so a process
    killed at any point leaves either the old or the new directory at
    ``target``, never neither; elsewhere the old one is renamed aside first.
    If moving ``new`` in fails, the previous ``target`` is put back.
    """
    new, target = Path(new), Path(target)
    if target.exists():
        if _exchange_paths(new, target):
            shutil.rmtree(new, ignore_errors=True)  # now holds the previous content
            return
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; on success it replaces
    ``target`` in one rename, on failure it is removed and ``target`` (the
    previous version) is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_dir_atomic(src: str | os.PathLike, target: str | os.PathLike, extra_files: tuple[Path, ...] = ()) -> Path:
    """Copy folder ``src`` (plus ``extra_files``) to ``target`` atomically."""
    target = Path(target)
    with atomic_dir(target) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        for extra in extra_files:
            shutil.copy2(extra, tmp / Path(extra).name)
    return target
