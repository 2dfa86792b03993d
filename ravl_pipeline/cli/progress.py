"""Live progress of the runs ``ravl materialize`` and ``ravl demo`` launch:
each step printed as it starts and as it ends, with its duration.

It follows the instance's event log from a thread rather than hooking the
executor, so the same lines appear whichever executor runs the steps (in
process, in child processes, on Celery workers). Lines go through
``tqdm.write`` so that they never overwrite a live progress bar. When the
output is not a terminal (a log file, CI), where the live bars do not show,
every running step is named again at least every ``HEARTBEAT_S`` seconds."""
from __future__ import annotations

import sys
import threading
import time
import uuid

import dagster as dg
from tqdm.auto import tqdm

INVOCATION_TAG = "ravl/invocation"
HEARTBEAT_S = 30.0  # a long step says it is still running this often when the output is not a terminal
STEP_EVENTS = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS,
               dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.STEP_SKIPPED}


def step_line(partition: str | None, step: str, kind: str, seconds: float | None) -> str:
    where = f"[{partition}] " if partition else ""
    if kind == "STEP_START":
        return f"  {where}{step} ..."
    if kind == "STEP_RUNNING":
        return f"  {where}{step} still running ({seconds:.0f}s)"
    verb = {"STEP_SUCCESS": "done", "STEP_FAILURE": "FAILED", "STEP_SKIPPED": "skipped"}[kind]
    return f"  {where}{step} {verb}" + (f" in {seconds:.1f}s" if seconds is not None else "")


class StepProgress:
    """Prints the steps of every run tagged with this invocation (or of the
    runs named in :meth:`follow`) while they execute. Use as a context
    manager; leaving it prints what is left."""

    def __init__(self, instance: dg.DagsterInstance, out=None, interval: float = 0.5,
                 heartbeat: float | None = None):
        self.instance, self.out, self.interval = instance, out, interval
        stream = out or sys.stdout
        # None: every HEARTBEAT_S when the output is not a terminal, never on one (the bars show progress)
        self.heartbeat = heartbeat if heartbeat is not None else (
            None if getattr(stream, "isatty", lambda: False)() else HEARTBEAT_S)
        self._partitions: dict[str, str | None] = {}
        self.invocation = uuid.uuid4().hex
        self.tags = {INVOCATION_TAG: self.invocation}
        self._cursors: dict[str, str | None] = {}
        self._started: dict[tuple[str, str], float] = {}
        self._extra: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ravl-progress", daemon=True)

    def follow(self, run_id: str) -> None:
        """Also print the steps of a run launched elsewhere (the sensor's)."""
        self._extra.add(run_id)

    def __enter__(self) -> "StepProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _loop(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            self.poll()
            if self.heartbeat and time.monotonic() - last >= self.heartbeat:
                last = time.monotonic()
                self.beat()

    def beat(self) -> None:
        """Name every step still running, with how long it has run."""
        now = time.time()
        for (run_id, step), started in sorted(self._started.items(), key=lambda kv: kv[1]):
            tqdm.write(step_line(self._partitions.get(run_id), step, "STEP_RUNNING", now - started),
                       file=self.out or sys.stdout)

    def poll(self) -> None:
        runs = self.instance.get_runs(filters=dg.RunsFilter(tags=self.tags))
        runs += [r for r in (self.instance.get_run_by_id(i) for i in self._extra) if r is not None]
        for run in runs:
            conn = self.instance.get_records_for_run(run.run_id, cursor=self._cursors.get(run.run_id),
                                                     of_type=STEP_EVENTS)
            self._cursors[run.run_id] = conn.cursor
            for record in conn.records:
                self._print(run, record.event_log_entry)

    def _print(self, run: dg.DagsterRun, entry) -> None:
        event = entry.dagster_event
        key = (run.run_id, event.step_key)
        seconds = None
        self._partitions[run.run_id] = run.tags.get("dagster/partition")
        if event.event_type_value == "STEP_START":
            self._started[key] = entry.timestamp
        elif key in self._started:
            seconds = entry.timestamp - self._started.pop(key)
        line = step_line(run.tags.get("dagster/partition"), event.step_key, event.event_type_value, seconds)
        tqdm.write(line, file=self.out or sys.stdout)
