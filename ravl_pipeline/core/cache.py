"""Content-addressed cache of image and region embeddings (SPEC §1.2).

Region embeddings are the costly step of an audit, and validation sets grow
by small increments; re-embedding the whole set after every change wastes
almost all of that work. An entry is keyed by

* the **model version**: a digest of the checkpoint's weights file and its
  configuration for ``local-dir:`` checkpoints, otherwise a digest of the
  weights held in memory (so a random-init built-in model is keyed by what its
  seed produced, never by its name alone);
* the **image content**: sha256 of the image file's bytes (renaming or
  moving an image keeps its entry; editing it does not);
* the **proposer boxes** (their float32 bytes), the **embedding mode** and,
  for the RoI modes, the **region view** of non-square images.

Layout: ``<root>/<model_key>/shard-*.parquet`` plus ``model.json`` naming
what the key was computed from. Shards are append-only and each is written to
a temporary name and renamed into place, so two processes may fill the same
cache at once (at worst they store the same entry twice; readers keep the
first) and a killed process leaves complete shards only.
"""
from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ..config import InputError, RegionsConfig
from ..io.files import atomic_write, write_json_atomic
from ..io.hashing import json_sha256, memo_file_sha256
from ..models import WEIGHTS_NAME, LoadedModel
from .embed import Embeddings, assemble, embed_dataset, resolve_mode
from .views import DEFAULT_REGION_VIEW
from .regions import propose_dataset

# Bumped whenever the way embeddings are computed changes, so entries written
# by older code are never mistaken for current ones.
EMBED_VERSION = 1
SHARD_GLOB = "shard-*.parquet"
DEFAULT_FLUSH_EVERY = 512


class CacheError(InputError):
    """A cache directory or model that cannot be used for caching."""


# --------------------------------------------------------------------------- keys

def state_dict_sha256(model) -> str:
    """sha256 over every tensor of ``model.state_dict()`` (names, dtypes,
    shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_version(lm: LoadedModel) -> dict:
    """What identifies the weights and preprocessing of ``lm``.

    ``local-dir:`` checkpoints are identified by the digest of their weights
    file, which assumes the model was not changed in memory since it was
    loaded; any other model by the digest of its in-memory weights.
    """
    config = {"model_cfg": lm.model_cfg, "preprocess_cfg": lm.preprocess_cfg}
    if lm.name.startswith("local-dir:"):
        path = Path(lm.name[len("local-dir:"):])
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise CacheError(f"checkpoint {path}: missing {WEIGHTS_NAME}; cannot key cached embeddings")
        source, digest = f"file:{weights.resolve()}", memo_file_sha256(weights)
    else:
        source, digest = "memory", state_dict_sha256(lm.model)
    return {"name": lm.name, "weights_source": source, "weights_sha256": digest,
            "config": config, "embed_version": EMBED_VERSION}


def model_key(lm: LoadedModel) -> str:
    """Directory name of ``lm``'s entries: a digest of :func:`model_version`
    without the name or file location (a copied checkpoint shares entries)."""
    v = model_version(lm)
    ident = {k: v[k] for k in ("weights_sha256", "config", "embed_version")}
    if lm.compute.record() is not None:  # mixed precision rounds differently: its own entries
        ident["compute"] = lm.compute.precision
    return json_sha256(ident)[:32]


def boxes_digest(boxes: np.ndarray) -> str:
    arr = np.ascontiguousarray(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    return hashlib.sha256(arr.tobytes()).hexdigest()[:32]


def entry_key(image_sha256: str, mode: str, boxes: np.ndarray) -> str:
    """Key of one image's embeddings under one model: content + boxes + mode."""
    text = f"{image_sha256}|{mode}|{boxes_digest(boxes)}"
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- storage

@dataclass
class CacheStats:
    """Images found in / added to the cache, cumulative over calls."""

    hits: int = 0
    misses: int = 0
    shards_written: int = 0

    @property
    def images(self) -> int:
        return self.hits + self.misses

    def to_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "shards_written": self.shards_written}


@dataclass
class EmbeddingCache:
    """Append-only Parquet shards of embeddings under ``root`` (module docstring).

    ``flush_every`` images are embedded between shard writes, so an
    interrupted run keeps what it finished.
    """

    root: Path
    flush_every: int = DEFAULT_FLUSH_EVERY
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.flush_every < 1:
            raise CacheError(f"flush_every must be at least 1, got {self.flush_every}")
        if self.root.exists() and not self.root.is_dir():
            raise CacheError(f"embedding cache {self.root} exists and is not a directory")

    def model_dir(self, key: str) -> Path:
        return self.root / key

    def shards(self, key: str) -> list[Path]:
        # Temporary files start with '.', so a shard being written is never read.
        return sorted(self.model_dir(key).glob(SHARD_GLOB))

    def lookup(self, key: str, wanted: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Entries among ``wanted`` present in the cache:
        ``entry key → (image embedding [D], region embeddings [R, D])``."""
        found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        want = pa.array(sorted(set(wanted)), pa.string())
        for shard in self.shards(key):
            if len(found) == len(want):
                break
            table = _read_shard(shard)
            if table is None:
                continue
            table = table.filter(pc.is_in(table.column("entry_key"), value_set=want))
            for row in _rows(table):
                found.setdefault(row[0], (row[1], row[2]))
        return found

    def store(self, lm: LoadedModel, key: str, entries: dict[str, tuple[np.ndarray, np.ndarray]],
              image_sha: dict[str, str], mode: str) -> Path | None:
        """Append ``entries`` as one new shard; returns its path (None when empty)."""
        if not entries:
            return None
        directory = self.model_dir(key)
        directory.mkdir(parents=True, exist_ok=True)
        describe = directory / "model.json"
        if not describe.exists():
            version = model_version(lm)
            write_json_atomic(describe, {"model_key": key, **version})
        table = _shard_table(entries, image_sha, mode)
        shard = directory / f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        atomic_write(shard, lambda f: pq.write_table(table, f))
        self.stats.shards_written += 1
        return shard

    def compact(self, key: str) -> Path | None:
        """Merge a model's shards into one (first entry of each key wins).

        The merged shard is in place before the old ones are removed, so a
        concurrent reader sees every entry at least once.
        """
        shards = self.shards(key)
        if len(shards) < 2:
            return shards[0] if shards else None
        tables = [t for t in (_read_shard(s) for s in shards) if t is not None]
        merged = pa.concat_tables(tables, promote_options="default")
        keep = _first_occurrences(merged.column("entry_key").to_pylist())
        merged = merged.take(pa.array(keep, pa.int64()))
        # Named before every existing shard, so the merged one is read first.
        out = self.model_dir(key) / f"shard-{0:020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        atomic_write(out, lambda f: pq.write_table(merged, f))
        for s in shards:
            s.unlink(missing_ok=True)
        return out

    # ------------------------------------------------------------------ embedding

    def embed(self, lm: LoadedModel, ds, proposer: str = "quadrants", mode: str = "auto",
              batch_size: int = RegionsConfig.batch_size, progress: bool = True, view: str = DEFAULT_REGION_VIEW) -> Embeddings:
        """:func:`~ravl_pipeline.core.embed.embed_dataset` through the cache:
        every image is looked up, only misses are embedded, and they are
        stored before the result is returned."""
        mode = resolve_mode(lm.model, mode)
        proposals = propose_dataset(ds, proposer)
        key = model_key(lm)
        shas = [memo_file_sha256(ds.image_path(i)) for i in range(len(ds))]
        # the region view decides what a non-square image's RoI regions see
        keys = [entry_key(s, mode if mode == "crop" else f"{mode}+{view}", b) for s, b in zip(shas, proposals)]
        found = self.lookup(key, keys)
        misses = [i for i, k in enumerate(keys) if k not in found]
        # One image may occur twice in a dataset; embed each content once.
        todo = list({keys[i]: i for i in reversed(misses)}.values())
        todo.sort()
        self.stats.hits += len(keys) - len(misses)
        self.stats.misses += len(todo)
        for start in range(0, len(todo), self.flush_every):
            chunk = todo[start:start + self.flush_every]
            fresh = embed_dataset(lm, ds.subset(chunk), proposer=proposer, mode=mode,
                                  batch_size=batch_size, progress=progress, view=view)
            new = _split_by_image(fresh)
            entries = {keys[i]: new[j] for j, i in enumerate(chunk)}
            self.store(lm, key, entries, {keys[i]: shas[i] for i in chunk}, mode)
            found.update(entries)
        per_image = [found[k] for k in keys]
        return assemble(ds.image_ids, [e[0][None] for e in per_image], [e[1] for e in per_image], proposals,
                        mode, proposer, int(lm.model_cfg["embed_dim"]))


# --------------------------------------------------------------------------- helpers

def _shard_table(entries: dict[str, tuple[np.ndarray, np.ndarray]], image_sha: dict[str, str],
                 mode: str) -> pa.Table:
    keys = list(entries)
    dim = int(np.asarray(entries[keys[0]][0]).shape[-1])
    image = np.stack([np.asarray(entries[k][0], np.float32) for k in keys])
    regions = [np.asarray(entries[k][1], np.float32).reshape(-1) for k in keys]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in regions])]).astype(np.int32)
    flat = np.concatenate(regions) if regions else np.zeros(0, np.float32)
    return pa.table({
        "entry_key": pa.array(keys, pa.string()),
        "image_sha256": pa.array([image_sha[k] for k in keys], pa.string()),
        "mode": pa.array([mode] * len(keys), pa.string()),
        "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(image.reshape(-1)), dim),
        "region_embeddings": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
    })


def _read_shard(path: Path) -> pa.Table | None:
    """A shard's table; None when it vanished (merged by a concurrent compact)."""
    try:
        return pq.read_table(path, columns=["entry_key", "image_embedding", "region_embeddings"])
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowInvalid) as exc:
        raise CacheError(f"embedding cache shard {path} is unreadable ({exc}); delete it to rebuild") from exc


def _rows(table: pa.Table):
    if table.num_rows == 0:
        return
    keys = table.column("entry_key").to_pylist()
    image = table.column("image_embedding").combine_chunks()
    dim = image.type.list_size
    image = np.asarray(image.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)
    regions = table.column("region_embeddings").to_pylist()
    for k, img, reg in zip(keys, image, regions):
        yield k, img, np.asarray(reg, np.float32).reshape(-1, dim)


def _first_occurrences(keys: list[str]) -> list[int]:
    seen: set[str] = set()
    out = []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            out.append(i)
    return out


def _split_by_image(emb: Embeddings) -> list[tuple[np.ndarray, np.ndarray]]:
    counts = np.bincount(emb.region_image, minlength=len(emb.image_ids))
    regions = np.split(emb.region_emb, np.cumsum(counts)[:-1])
    return list(zip(emb.image_emb, regions))
