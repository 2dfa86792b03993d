"""``ravl ui``: the Dagster UI and daemon (``dagster dev``) on the pipeline's
instance, plus a read-only server of the audit reports the asset pages link
to; Ctrl-C or SIGTERM stops all of it.

``dagster dev`` stops cleanly only on SIGINT, and a shell starts background
jobs with SIGINT ignored: killed any other way it leaves its webserver,
daemon and code servers behind. :class:`DagsterDev` starts it in a session
of its own with SIGINT restored, and stops it with SIGINT, then SIGTERM and
SIGKILL to whatever is left in that session — what scripts and tests use.
"""
from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..defs.resources import REPORTS_URL_ENV, RavlProject, project_root
from .dagster_runs import ensure_dagster_home

REPORT_PATH = re.compile(r"^/[A-Za-z0-9][A-Za-z0-9._-]*/report/[A-Za-z0-9._-]+$")


def register(sub) -> None:
    p = sub.add_parser("ui", help="Dagster UI + daemon, and the reports server; Ctrl-C stops all",
                       description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000, help="Dagster UI port (default 3000)")
    p.add_argument("--reports-port", type=int, default=3001, help="reports server port (default 3001)")
    p.set_defaults(func=run)


class ReportHandler(SimpleHTTPRequestHandler):
    """Files under ``<set>/report/`` of the outputs folder, nothing else."""

    def send_head(self):
        if not REPORT_PATH.match(self.path.split("?", 1)[0]):
            self.send_error(404, "only <set>/report/<file> is served")
            return None
        return super().send_head()

    def log_message(self, *args) -> None:  # quiet: the UI's own log is enough
        pass


def serve_reports(outputs_root: Path, host: str, port: int) -> ThreadingHTTPServer:
    """Serve the reports from a daemon thread; ``shutdown()`` stops it."""
    handler = functools.partial(ReportHandler, directory=str(outputs_root))
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="ravl-reports", daemon=True).start()
    return server


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


class DagsterDev:
    """``dagster dev`` (webserver + daemon) in its own session; a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 3000, env: dict | None = None,
                 workspace: Path | None = None, log: Path | None = None, cwd: Path | None = None):
        self.cmd = [str(Path(sys.executable).with_name("dagster")), "dev", "-h", host, "-p", str(port),
                    "-w", str(workspace or project_root() / "workspace.yaml")]
        self.env, self.log, self.cwd = env, log, cwd or project_root()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "DagsterDev":
        out = open(self.log, "ab") if self.log else None
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT
                                     if out else None, start_new_session=True, preexec_fn=_sigint_default)
        return self

    def wait(self) -> int:
        return self.proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT (dagster dev shuts its services down), then SIGTERM and
        SIGKILL to anything of its session still alive."""
        if self.proc is None:
            return
        sid = self.proc.pid
        if self.proc.poll() is None:
            os.kill(sid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = session_pids(sid)
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while session_pids(sid) and time.monotonic() < deadline:
                time.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.wait(5)

    def __enter__(self) -> "DagsterDev":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run(args) -> int:
    home = ensure_dagster_home()
    project = RavlProject.from_env()
    reports = serve_reports(project.outputs_root, args.host, args.reports_port)
    env = dict(os.environ, DAGSTER_HOME=str(home),
               **{REPORTS_URL_ENV: os.environ.get(REPORTS_URL_ENV) or f"http://{args.host}:{args.reports_port}"})
    print(f"Dagster UI: http://{args.host}:{args.port}  reports: {env[REPORTS_URL_ENV]}  (Ctrl-C stops both)")
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    dev = DagsterDev(args.host, args.port, env=env).start()
    try:
        while not stopping.wait(0.5):
            if dev.proc.poll() is not None:
                break
    finally:
        dev.stop()
        reports.shutdown()
    return 0 if stopping.is_set() else (dev.proc.returncode or 1)
