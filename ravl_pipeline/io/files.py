"""Writing files so that a reader never sees half of one.

Every single-file output of the project goes through :func:`atomic_write`
(a temporary file beside the target, then one ``os.replace``); every folder
output through :func:`atomic_dir` or :func:`replace_dir`, which swap the
new folder in with one ``renameat2(RENAME_EXCHANGE)`` on Linux, so a process
killed at any point leaves the previous version or the new one, never
neither and never a mixture.

The same path applies the output rule (:func:`output_problem`): an output
is never a symbolic link (the link is not replaced and not written
through: the message names its target), never a device, named pipe or
socket, never a folder where a file is asked for (``out/``, with its
trailing slash, names a folder), and never one of the inputs of the same
command, whatever path names it. The command line checks it before any
work, on the paths the user names. The write functions check it again at
the moment of writing, but for one case: a file output that is a link
(as DVC's symlink or hardlink cache makes the pipeline's outputs) is
replaced by the new file, never written through, so the file it pointed to
is left as it was.

A temporary is named ``.<target>.ravl-tmp-<host>-<pid>-<random>`` (a hash
of the host name and the id of the process writing it), so that it is
recognisably this tool's and says who owns it. A process killed with
SIGKILL cannot remove its temporaries; the next write into the same folder
does (:func:`remove_stale_temporaries`): those of this host whose process is
gone, and nothing else.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from ..config import InputError

__all__ = ["OutputPathError", "output_problem", "check_output", "input_problem", "check_input_file",
           "atomic_write", "write_files_atomic", "write_bytes_atomic", "write_json_atomic", "write_text_atomic",
           "json_bytes",
           "read_json", "replace_dir", "atomic_dir", "copy_dir_atomic", "temporary_path", "remove_stale_temporaries",
           "process_alive"]

HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMPORARY = re.compile(
    r"^\.(?P<target>.+)\.ravl-(?P<kind>tmp|old|unit)-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]+$")


class OutputPathError(InputError):
    """An output path the output rule refuses; the message names the path and says what to do instead."""


def _kind_of(path: Path) -> str | None:
    """What ``path`` is, when it is not a plain file or folder: ``None`` for
    a regular file, a folder or nothing."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(path))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def output_problem(path: str | os.PathLike, *, folder: bool = False,
                   inputs: Iterable[tuple[str, str | os.PathLike]] = (),
                   outputs: Iterable[tuple[str, str | os.PathLike, bool]] = ()) -> str | None:
    """Why ``path`` may not be written by a command (see the module's
    output rule), or ``None``. ``folder``: the output is a folder (replaced
    as a whole) rather than a file. ``inputs``: ``(name, path)`` of every
    file or folder the command reads, ``name`` the flag that named it; a
    file output may not be one of them, a folder output may not be or hold
    one of them (replacing it would lose them). ``outputs``: ``(name, path,
    is_folder)`` of the command's other outputs, which this one may neither
    be nor lie in."""
    text = os.fspath(path)
    path = Path(path)
    kind = _kind_of(path)
    if kind == "symbolic link":
        return (f"is a symbolic link (to {os.readlink(path)}); outputs are not written through links nor "
                "replace them: name the link's target itself, or remove the link")
    if kind is not None:
        noun = "folder" if folder else "file"
        return f"is a {kind}, not a regular {noun}: name a {noun} to write"
    if not folder and text.endswith((os.sep, "/")):
        return "ends in '/', so it names a folder: name the file to write (e.g. add its file name)"
    if not folder and path.is_dir():
        return "is a directory; name the file to write"
    if folder and os.path.lexists(path) and not path.is_dir():
        return "exists and is not a directory"
    real = _real(path)
    for name, source in inputs:
        source_real = _real(source)
        if source_real == real:
            return (f"is also what {name} reads ({source}); writing it would replace this command's own "
                    "input: name another path")
        if folder and _within(source_real, real):
            return (f"holds what {name} reads ({source}); replacing the folder would lose it: "
                    "name another folder")
    for name, other, other_folder in outputs:
        other_real = _real(other)
        if other_real == real or (other_folder and _within(real, other_real)):
            return f"is also written by {name} {other} of this command: name another path"
    return None


def check_output(path: str | os.PathLike, flag: str = "--out", *, folder: bool = False,
                 inputs: Iterable[tuple[str, str | os.PathLike]] = (),
                 outputs: Iterable[tuple[str, str | os.PathLike, bool]] = ()) -> Path:
    """``path`` when :func:`output_problem` finds nothing; otherwise
    :class:`OutputPathError` naming ``flag`` and the path."""
    problem = output_problem(path, folder=folder, inputs=inputs, outputs=outputs)
    if problem:
        raise OutputPathError(f"{flag} {os.fspath(path)}: {problem}")
    return Path(path)



def input_problem(path: str | os.PathLike, folder: bool = False) -> str | None:
    """Why ``path`` cannot be read as an input file (``folder``: an input
    folder), or ``None``: it does not exist, is a folder where a file is
    expected (or the reverse), or is a named pipe, device or socket (reading
    one could wait forever)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except NotADirectoryError:
        return "does not exist (a part of the path is a file)"
    except PermissionError:
        return "cannot be read (permission denied)"
    if stat.S_ISDIR(mode):
        return None if folder else "is a folder, expected a file"
    if stat.S_ISREG(mode):
        return "is a file, expected a folder" if folder else None
    kind = _kind_of(Path(os.path.realpath(path))) or "special file"
    return f"is a {kind}, expected a {'folder' if folder else 'regular file'}"


def check_input_file(path: str | os.PathLike, what: str = "", error: type = InputError) -> Path:
    """``path`` when it is a regular file (links followed); otherwise
    ``error`` naming ``what`` (a flag or a key) and the path."""
    problem = input_problem(path)
    if problem:
        raise error(f"{what + ' ' if what else ''}{os.fspath(path)}: {problem}")
    return Path(path)


def _refuse_unwritable_target(target: Path, folder: bool) -> None:
    """The output rule at the moment of writing: never replace a special
    file, or a folder with a file (or a file with a folder), nor a link
    with a folder; a link where a file goes is replaced, not written through."""
    if not folder and _kind_of(target) == "symbolic link":
        return
    problem = output_problem(target, folder=folder)
    if problem:
        raise OutputPathError(f"{target}: {problem}")


def temporary_path(target: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh name beside ``target`` for a temporary of this process
    (``kind`` ``tmp``: being written; ``old``: a previous version moved aside;
    ``unit``: the list of files written as one unit, see :func:`write_files_atomic`)."""
    target = Path(target)
    return target.with_name(f".{target.name}.ravl-{kind}-{HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries in ``folder`` left by a process of this host
    that no longer exists (killed mid-write); returns what was removed.

    A previous version moved aside (``old``, on platforms without an atomic
    exchange) is put back when its target is missing, since the process
    died between the two renames; otherwise it is removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return removed
    for entry in entries:  # first, units whose writer died between their renames: finished
        match = _TEMPORARY.match(entry.name)
        if match and match["kind"] == "unit" and match["host"] == HOST_TAG and not _alive_or_self(int(match["pid"])):
            _finish_unit(folder, Path(entry.path))
            removed.append(Path(entry.path))
    entries = [entry for entry in entries if os.path.lexists(entry.path)]
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or match["host"] != HOST_TAG:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or process_alive(pid):
            continue
        path = Path(entry.path)
        target = folder / match["target"]
        if match["kind"] == "old" and not os.path.lexists(target):
            with contextlib.suppress(OSError):
                os.replace(path, target)
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed


def _alive_or_self(pid: int) -> bool:
    return pid == os.getpid() or process_alive(pid)


def _finish_unit(folder: Path, journal: Path) -> None:
    """Complete the renames a unit's journal lists (each temporary was
    written in full before the journal was), then remove the journal."""
    try:
        pairs = json.loads(journal.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pairs = []
    for tmp, target in pairs if isinstance(pairs, list) else []:
        names = isinstance(tmp, str) and isinstance(target, str) and "/" not in tmp + target
        if names and os.path.lexists(folder / tmp):
            with contextlib.suppress(OSError):
                os.replace(folder / tmp, folder / target)
    journal.unlink(missing_ok=True)


def _new_temporary(target: Path, create: Callable[[Path], Any]) -> tuple[Path, Any]:
    """``create(path)`` on a fresh temporary name beside ``target`` (after
    removing stale ones there); returns the path and what ``create`` returned."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    while True:
        tmp = temporary_path(target)
        try:
            return tmp, create(tmp)
        except FileExistsError:  # a random name taken: draw another
            continue


def atomic_write(target: str | os.PathLike, write: Callable) -> Path:
    """Call ``write(fileobj)`` on a temporary file next to ``target``, then
    move it into place; the temporary file never outlives a failure (nor,
    after the next write into the folder, a killed process)."""
    target = Path(target)
    _refuse_unwritable_target(target, folder=False)
    tmp, fd = _new_temporary(target, lambda p: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    try:
        os.fchmod(fd, 0o644)  # outputs are for reading, whatever the umask
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(target)) from exc  # a full disk: say where
        raise
    return target


def _write_temporary(target: Path, data: bytes) -> Path:
    """``data`` in full in a fresh temporary beside ``target`` (synced)."""
    tmp, fd = _new_temporary(target, lambda p: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    try:
        os.fchmod(fd, 0o644)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(target)) from exc
        raise
    return tmp


def write_files_atomic(contents: Mapping[str | os.PathLike, bytes]) -> list[Path]:
    """Write several files of one folder as one unit (a report and its
    twin): every file is written in full to its temporary first, so a
    failure (a full disk) leaves all the previous versions; then a journal
    listing the renames is created in one rename (the commit point), the
    files are renamed into place and the journal removed. A process killed
    between the renames leaves the journal, and the next write into the
    folder (:func:`remove_stale_temporaries`) completes them: the files are
    all old or all new once anything else is written there."""
    targets = [Path(t) for t in contents]
    if len({t.parent.resolve() for t in targets}) > 1:
        raise ValueError("write_files_atomic writes the files of one folder")
    for target in targets:
        _refuse_unwritable_target(target, folder=False)
    temps: list[Path] = []
    try:
        for target, data in zip(targets, contents.values()):
            temps.append(_write_temporary(target, data))
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    journal = temporary_path(targets[0], "unit")
    try:
        journal_tmp = _write_temporary(journal, json_bytes([[t.name, p.name] for t, p in zip(temps, targets)]))
        os.replace(journal_tmp, journal)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, target in zip(temps, targets):  # committed: an interruption here is finished by the next write
        os.replace(tmp, target)
    journal.unlink()
    return targets


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


def read_json(path: str | os.PathLike, error: type = InputError, expect: type | None = dict) -> Any:
    """The content of JSON file ``path``; ``error`` naming the file when it
    is not valid JSON or (with ``expect``) not of that type. A missing file
    raises ``FileNotFoundError``; a folder, named pipe or device ``error``
    (never waited on)."""
    problem = input_problem(path)
    if problem and problem != "does not exist":
        raise error(f"{path}: {problem}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc
    except RecursionError:
        raise error(f"{path}: nested too deeply to be read (lists or objects within each other "
                    f"{sys.getrecursionlimit():,} levels or more)") from None
    if expect is not None and not isinstance(data, expect):
        noun = {dict: "a JSON object", list: "a JSON list"}.get(expect, expect.__name__)
        raise error(f"{path}: expected {noun}, got {type(data).__name__}")
    return data


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
    _refuse_unwritable_target(target, folder=True)
    if target.exists():
        if _exchange_paths(new, target):
            shutil.rmtree(new, ignore_errors=True)  # now holds the previous content
            return
        old = temporary_path(target, "old")
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
    _refuse_unwritable_target(Path(target), folder=True)
    tmp, _ = _new_temporary(Path(target), Path.mkdir)
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
