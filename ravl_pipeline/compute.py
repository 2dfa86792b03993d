"""Where and how a model runs: the device, the numeric precision and the
image-loading worker processes (``params.yaml``'s ``compute`` section and the
``--device``/``--precision``/``--workers`` flags).

``auto`` picks CUDA when present, else Apple MPS when present, else the CPU.
On an accelerator ``auto`` precision is mixed: autocast in bf16 where the
device supports it, else fp16 (with a gradient scaler in training); on the
CPU it is fp32, and nothing differs from a run that never named a device:
the same operations in the same order, so findings, metrics and checkpoints
are byte-identical. A run that is not CPU fp32 records what it ran on
(:meth:`Compute.record`) in its findings, metrics and checkpoint record.

The default :class:`Compute` is CPU, fp32, no worker processes: what every
library function uses when it is given a model loaded without one.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from .config import PRECISIONS, ComputeConfig, InputError, device_problem


class DeviceError(InputError):
    """A device or precision this machine cannot run."""


@dataclass(frozen=True)
class Compute:
    """A resolved device, precision (``fp32``, ``bf16`` or ``fp16``) and
    number of image-loading worker processes."""

    device: str = "cpu"
    precision: str = "fp32"
    workers: int = 0

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def kind(self) -> str:
        """``cpu``, ``cuda`` or ``mps``."""
        return self.torch_device.type

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def pin_memory(self) -> bool:
        """Page-locked host batches, so copies to a CUDA device overlap compute."""
        return self.kind == "cuda"

    @property
    def is_reference(self) -> bool:
        """CPU in fp32: the results every figure and test was made with."""
        return self.kind == "cpu" and self.precision == "fp32"

    def autocast(self):
        """Mixed precision for the forward passes (a no-op context in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.kind, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 training (disabled, a pass-through, otherwise)."""
        return torch.amp.GradScaler(self.kind, enabled=self.precision == "fp16")

    def to(self, x: Any) -> Any:
        """A tensor (or ``None``) moved to the device, without blocking on pinned memory."""
        if x is None or not torch.is_tensor(x):
            return x
        return x.to(self.torch_device, non_blocking=self.pin_memory)

    def record(self) -> dict[str, str] | None:
        """What a result records of where it ran: ``None`` for CPU fp32 (the
        reference, so its outputs stay byte-identical), else device and precision."""
        if self.is_reference:
            return None
        return {"device": self.device, "precision": self.precision}


CPU = Compute()


def cuda_available() -> bool:
    return torch.cuda.is_available()


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def cuda_bf16(device: str) -> bool:
    """Whether CUDA ``device`` computes in bf16 (compute capability 8.0 on),
    read from its properties: no context is opened on any GPU."""
    index = torch.device(device).index
    return torch.cuda.get_device_properties(index if index is not None else 0).major >= 8


def use_device(compute: Compute) -> None:
    """Make ``compute``'s GPU the current one (pinned buffers and kernels go
    there, not to GPU 0)."""
    if compute.kind == "cuda" and compute.torch_device.index is not None:
        torch.cuda.set_device(compute.torch_device)


def resolve_device(name: str, where: str = "--device") -> str:
    """``auto`` → ``cuda``, else ``mps``, else ``cpu``; a named device is
    checked, and one this machine lacks is a :class:`DeviceError` naming ``where``."""
    problem = device_problem(name)
    if problem:
        raise DeviceError(f"{where}: {problem}")
    name = str(name).strip().lower()
    kind, _, index = name.partition(":")
    if kind == "auto":
        return "cuda" if cuda_available() else "mps" if mps_available() else "cpu"
    if kind == "cuda":
        if not cuda_available():
            raise DeviceError(f"{where}: {name!r} is not available on this machine (torch {torch.__version__} "
                              f"sees no CUDA device); use auto or cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise DeviceError(f"{where}: {name!r} does not exist; this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s) (cuda:0..)")
    if kind == "mps" and not mps_available():
        raise DeviceError(f"{where}: 'mps' is not available on this machine (no Apple Metal device); "
                          "use auto or cpu")
    return name


def resolve_precision(name: str, device: str, where: str = "--precision") -> str:
    """``auto`` → ``fp32`` on the CPU, ``bf16`` on a device that supports it,
    else ``fp16``; a named precision the device cannot autocast to is a
    :class:`DeviceError` naming ``where``."""
    if name not in PRECISIONS:
        raise DeviceError(f"{where}: unknown precision {name!r}; expected one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if name == "auto":
        if kind == "cpu":
            return "fp32"
        return "bf16" if kind == "cuda" and cuda_bf16(device) else "fp16"
    if kind == "cpu" and name == "fp16":
        raise DeviceError(f"{where}: fp16 autocast is for accelerators; on the CPU use fp32 (or bf16)")
    return name


def resolve_compute(cfg: ComputeConfig | None = None, *, device: str | None = None, precision: str | None = None,
                    workers: int | None = None, where: str = "") -> Compute:
    """:class:`Compute` from a ``compute`` section with flags (non-``None``)
    on top; ``where`` prefixes the error (``params.yaml: compute.``), flags
    are named as flags."""
    cfg = cfg or ComputeConfig()
    dev_where = "--device" if device is not None else f"{where}device" if where else "--device"
    prec_where = "--precision" if precision is not None else f"{where}precision" if where else "--precision"
    resolved = resolve_device(device if device is not None else cfg.device, dev_where)
    return Compute(resolved, resolve_precision(precision if precision is not None else cfg.precision, resolved,
                                               prec_where),
                   int(workers if workers is not None else cfg.workers))


def shard_compute(compute: Compute, index: int) -> Compute:
    """The compute of shard (or process) ``index`` of a split job: ``cuda``
    without an index spreads shards over the machine's GPUs round robin;
    anything else is unchanged."""
    if compute.device != "cuda" or torch.cuda.device_count() < 2:
        return compute
    return Compute(f"cuda:{index % torch.cuda.device_count()}", compute.precision, compute.workers)


_THREADS_SET: list[int] = []  # the count this process chose


def free_cores(samples: int = 5, interval: float = 0.01) -> int:
    """The cores this process may use that no other process keeps busy:
    its CPU affinity less the other runnable tasks (``procs_running`` of
    ``/proc/stat``, the median of a few samples; this process counts one).
    Where that cannot be read, every core of the affinity."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    counts = []
    for i in range(samples):
        try:
            with open("/proc/stat") as fh:
                counts += [int(line.split()[1]) for line in fh if line.startswith("procs_running")]
        except (OSError, ValueError, IndexError):
            return cores
        if i + 1 < samples:
            time.sleep(interval)
    if not counts:
        return cores
    return max(1, min(cores, cores - (int(statistics.median(counts)) - 1)))


def use_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads once per process: ``threads`` when
    given, else nothing when ``OMP_NUM_THREADS`` is set (the user's, or a
    test runner's, choice), else :func:`free_cores` — so a process started
    next to busy ones does not oversubscribe the machine (BENCHMARKS.md
    §Threads). Returns the count in use."""
    if _THREADS_SET and threads is None:
        return _THREADS_SET[0]
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        n = torch.get_num_threads()
    else:
        n = int(threads) if threads is not None else free_cores()
        torch.set_num_threads(n)
    _THREADS_SET[:] = [n]
    return n
