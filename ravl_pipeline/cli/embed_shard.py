"""``ravl embed-shard``: one shard of a validation set's region embeddings,
so one large set's embedding spreads over processes, GPUs and machines
that see the same ``data/`` folder (SPEC §1.2).

* ``--shard I/N``: rows I of N (contiguous), anywhere (a batch array job,
  another machine);
* under ``torchrun --nproc-per-node G``: process ``RANK`` embeds shard
  ``RANK`` of ``WORLD_SIZE`` on its own GPU (``LOCAL_RANK``);
* ``--merge N``: join the N shards into the set's embeddings.

Models run where ``params.yaml``'s ``compute`` section says. ``ravl
materialize`` with ``compute.shards: N`` reuses shards already made from
the same data, model and parameters, so its record in Dagster costs no
second pass."""
from __future__ import annotations

import argparse

from ..compute import Compute
from ..config import InputError
from ..defs.resources import RavlProject
from ..mitigate.distributed import process_device, world_from_env


def register(sub) -> None:
    p = sub.add_parser("embed-shard", help="one shard of a validation set's embeddings (several processes or "
                                           "machines share one set)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--partition", required=True, help="the validation set (a folder under data/validation_sets/)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--shard", type=shard_flag, default=None, metavar="I/N", help="embed shard I of N (0-based)")
    group.add_argument("--merge", type=int, default=None, metavar="N", help="join the set's N shards")
    p.set_defaults(func=run)


def shard_flag(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return int(index), int(count)


def run(args) -> int:
    audit = RavlProject.from_env().audit(args.partition)
    if args.merge is not None:
        if args.merge < 1:
            raise InputError(f"--merge {args.merge}: the number of shards must be at least 1")
        emb, _ = audit.merge_shards(args.merge)
        print(f"merged {args.merge} shards: {len(emb.image_ids)} images, {emb.n_regions} regions -> "
              f"{audit.paths.embeddings}")
        return 0
    world = world_from_env()
    if args.shard is not None:
        index, count = args.shard
    elif world.world_size > 1:
        index, count = world.rank, world.world_size
        compute = audit.compute
        audit.compute = Compute(process_device(world, compute.device), compute.precision, compute.workers)
    else:
        raise InputError("name the shard (--shard I/N) or run under torchrun, which gives one shard per process")
    emb, seconds = audit.embed_shard(index, count)
    done = "reused" if seconds == 0 else f"embedded in {seconds:.1f}s on {audit.compute.device}"
    print(f"shard {index}/{count} of {args.partition}: {len(emb.image_ids)} images, {emb.n_regions} regions, "
          f"{done} -> {audit.paths.embedding_shard(index, count)}")
    if index == count - 1 or world.world_size > 1:
        print(f"when every shard is done: `ravl embed-shard --partition {args.partition} --merge {count}`, or "
              f"`ravl materialize --partition {args.partition}` with compute.shards: {count} (it reuses them)")
    return 0
