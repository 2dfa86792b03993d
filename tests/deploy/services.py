"""Background services the deployment tests start and stop: a Redis broker
on a free loopback port and processes in their own session, ended as a
group (with anything that left the group) when the test is done."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM to the process group, SIGKILL to whatever is left."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def background(cmd: list[str], env: dict, log: Path, cwd: Path | None = None):
    """``cmd`` in a new session, its output in ``log``; stopped on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            stop(proc)


@contextmanager
def redis_server(tmp: Path):
    """A throwaway Redis (no persistence) on a free loopback port; yields its URL."""
    port = free_port()
    with background([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", str(tmp)], dict(os.environ), tmp / "redis.log"):
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"


def ancestors(pid: int) -> list[int]:
    """Parent, grandparent, … of a live process (from /proc)."""
    out = []
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        out.append(pid)
    return out
