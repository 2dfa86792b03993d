"""Data-parallel fine-tuning under ``torchrun`` (DDP: NCCL on CUDA, one GPU
per process by ``LOCAL_RANK``; gloo on the CPU).

The single-process loop of :mod:`~ravl_pipeline.mitigate.train` defines what
training means; this module reproduces it across ``WORLD_SIZE`` processes:

* every rank draws the same global batch from the same seeded generator and
  keeps its contiguous slice of it, so the union of the slices is the global
  batch (nothing duplicated or dropped, same composition as one process);
* image and text features are all-gathered *with gradients*, so every rank
  computes the contrastive loss over the whole global batch — the same value
  a single process computes (SPEC §3.4: contrastive methods depend on the
  batch they see, so splitting the batch must not shrink it);
* BatchNorm statistics are reduced across ranks for the same reason
  (``torch.nn.SyncBatchNorm`` refuses CPU tensors);
* DDP averages gradients; rank 0 alone saves the checkpoint and writes the
  history;
* each process streams only its own slice of every batch from disk.

Gradient scale: every rank computes the same global loss ``L``. The backward
of each cross-rank reduction sums the ranks' gradients, so rank ``r`` holds
``W · ∂L/∂θ`` restricted to the paths through its own slice; DDP's average
over ranks then gives exactly ``∂L/∂θ``.

Run: ``torchrun --nproc-per-node 2 -m ravl_pipeline.cli finetune --model … --data … --out …``
(``ravl finetune`` under torchrun is data-parallel).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..compute import DeviceError
from ..config import TrainConfig
from .data import TrainData, TrainError
from .losses import clip_loss
from .methods import METHODS, get_method
from .train import batches, build_optimizer, configure_trainable, optimizer_step, set_seed, total_steps


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> WorldInfo:
    """Rank and world size as ``torchrun`` sets them (1 process otherwise)."""
    try:
        return WorldInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                         int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as exc:
        raise TrainError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from exc


def process_device(world: WorldInfo, device: str) -> str:
    """This process's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU
    per process, as ``torchrun --nproc-per-node`` starts them); a device that
    every process would share is refused."""
    if world.world_size > 1 and device.startswith("cuda:"):
        raise DeviceError(f"--device {device}: under torchrun every process would use that one GPU; name --device "
                          "cuda (each process takes its LOCAL_RANK GPU) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if world.world_size > 1 and device == "mps":
        raise DeviceError("--device mps: several processes cannot share an Apple GPU; run one process")
    return f"cuda:{world.local_rank}" if device == "cuda" else device


# --------------------------------------------------------------------------- batch split

def shard_bounds(n: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` slices of a batch of ``n``, one per rank;
    the first ``n % world_size`` ranks take one extra sample."""
    base, extra = divmod(n, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def local_slice(idx: torch.Tensor, world: WorldInfo) -> torch.Tensor:
    start, stop = shard_bounds(len(idx), world.world_size)[world.rank]
    return idx[start:stop]


# --------------------------------------------------------------------------- collectives

class _GatherWithGrad(torch.autograd.Function):
    """All-gather of slices of different lengths along dim 0; the backward
    sums the incoming gradients over ranks and returns this rank's part."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: tuple[int, ...], rank: int):
        ctx.sizes, ctx.rank = sizes, rank
        width = max(sizes)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


def gather_with_grad(local: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    return _GatherWithGrad.apply(local, tuple(sizes), rank)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor):
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch.

    Same parameters and buffers as ``BatchNorm2d`` (checkpoints are
    unchanged); evaluation uses the running statistics as usual.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = (0, 2, 3)
        out_dtype, x = x.dtype, x.float()  # statistics in fp32 whatever autocast made the input (fp16 overflows)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        stats = _AllReduceSum.apply(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * unbiased.detach())
        shape = (1, c, 1, 1)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(out_dtype)


def use_global_batchnorm(model: torch.nn.Module) -> int:
    """Switch every ``BatchNorm2d`` of ``model`` to :class:`GlobalBatchNorm2d`
    in place (parameters and buffers kept); returns how many were switched."""
    n = 0
    for module in model.modules():
        if type(module) is torch.nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
            n += 1
    return n


# --------------------------------------------------------------------------- loop

def distributed_clip_loss(ddp_model, pixels: torch.Tensor, tokens: torch.Tensor, sizes: list[int],
                          rank: int) -> torch.Tensor:
    """The CLIP loss of the whole global batch from this rank's slice."""
    out = ddp_model(pixels, tokens)
    image, text, scale = (out["image_features"], out["text_features"], out["logit_scale"]) \
        if isinstance(out, dict) else out[:3]
    image = gather_with_grad(image, sizes, rank)
    text = gather_with_grad(text, sizes, rank)
    return clip_loss(image, text, scale)


def finetune_distributed(lm, data: TrainData, cfg: TrainConfig, world: WorldInfo,
                         progress: bool = False, record_indices: bool = False) -> dict[str, Any]:
    """:func:`~ravl_pipeline.mitigate.train.finetune` over ``world.world_size``
    processes (module docstring); every rank returns the same history."""
    if not get_method(cfg.method).distributed:
        # the loss is defined here over gathered features; the other methods need
        # per-method gathering of their extra inputs and run in one process
        runnable = ", ".join(sorted(m.name for m in METHODS.values() if m.distributed))
        raise TrainError(f"method {cfg.method!r} cannot run distributed yet; use one of {runnable} "
                         "or a single process")
    if len(data) < 2:
        raise TrainError("fine-tuning needs at least two images")
    if cfg.micro_batch_size:
        raise TrainError("micro_batch_size is for one process; under torchrun each process's slice of the batch is "
                         "what it holds (use more processes or leave micro_batch_size unset)")
    if cfg.batch_size < world.world_size:
        raise TrainError(f"batch size {cfg.batch_size} is smaller than the world size {world.world_size}; "
                         "every rank needs at least one sample per step")
    gen = set_seed(cfg.seed)
    model = lm.model
    compute = lm.compute
    params = configure_trainable(model, cfg.lock_text)
    use_global_batchnorm(model)
    on_gpu = compute.kind == "cuda"
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[compute.torch_device.index] if on_gpu else None)
    n_steps = total_steps(len(data), cfg)
    opt, sched = build_optimizer(params, cfg, n_steps)
    scaler = compute.grad_scaler()
    losses: list[float] = []
    seen: list[list[list[int]]] = []
    model.train()
    t0 = time.perf_counter()
    for step, batch in batches(data, cfg, gen, compute, select=lambda idx: local_slice(idx, world)):
        mine = batch["index"]
        sizes = [b - a for a, b in shard_bounds(batch["global_size"], world.world_size)]
        with compute.autocast():
            loss = distributed_clip_loss(ddp, batch["pixels"], batch["tokens"], sizes, world.rank)
        losses.append(optimizer_step(model, opt, sched, loss, f"step {step} (rank {world.rank})", scaler))
        if record_indices:
            per_rank: list = [None] * world.world_size
            dist.all_gather_object(per_rank, mine.tolist())
            seen.append(per_rank)
        if progress and world.is_main:
            print(f"step {step + 1}/{n_steps} loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    model.eval()
    elapsed = time.perf_counter() - t0
    history = {"config": cfg.to_dict(), "steps": len(losses), "losses": losses, "seconds": elapsed,
               "seconds_per_step": elapsed / max(1, len(losses)), "n_images": len(data),
               "world_size": world.world_size}
    if record_indices:
        history["rank_indices"] = seen
    return history


def init_process_group(world: WorldInfo, device: str = "cpu") -> None:
    """NCCL between GPUs, gloo on the CPU."""
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", rank=world.rank,
                                world_size=world.world_size)
