"""Embedding cache (SPEC §1.2): only new content is embedded, keys separate
what must differ, shards are append-only and safe with concurrent writers."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ravl_pipeline.core.cache import (
    CacheError,
    EmbeddingCache,
    boxes_digest,
    entry_key,
    model_key,
)
from ravl_pipeline.core.embed import embed_dataset
from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.io.hashing import file_sha256, memo_file_sha256
from ravl_pipeline.io.manifest import write_manifest
from ravl_pipeline.models import load_model, save_model


def _write_images(root: Path, n: int, seed: int, prefix: str = "img") -> list[dict]:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(56, 56, 3), dtype=np.uint8)
        rel = f"images/{prefix}{seed}_{i}.png"
        Image.fromarray(pixels).save(root / rel)
        rows.append({"image_id": f"{prefix}{seed}_{i}", "path": rel, "label": "a" if i % 2 else "b"})
    return rows


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(load_model("ravl-tiny-rn", seed=0), out)
    return out


@pytest.fixture(scope="module")
def lm(checkpoint):
    return load_model(f"local-dir:{checkpoint}")


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "ds"
    write_manifest(root, _write_images(root, 6, seed=1))
    return load_dataset(root)


def _grow(ds, extra: int, seed: int):
    """The same directory with ``extra`` new images appended to the manifest."""
    rows = ds.table.to_pylist() + _write_images(ds.root, extra, seed=seed, prefix="new")
    write_manifest(ds.root, rows)
    return load_dataset(ds.root)


def test_cached_embeddings_equal_uncached_and_second_run_embeds_nothing(lm, dataset, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    plain = embed_dataset(lm, dataset, progress=False)
    first = embed_dataset(lm, dataset, progress=False, cache=cache)
    assert (cache.stats.hits, cache.stats.misses) == (0, 6)
    second = embed_dataset(lm, dataset, progress=False, cache=cache)
    assert (cache.stats.hits, cache.stats.misses) == (6, 6)
    for got in (first, second):
        assert got.image_ids == plain.image_ids
        np.testing.assert_allclose(got.image_emb, plain.image_emb, atol=1e-5)
        np.testing.assert_allclose(got.region_emb, plain.region_emb, atol=1e-5)
        np.testing.assert_array_equal(got.region_image, plain.region_image)
        np.testing.assert_array_equal(got.region_index, plain.region_index)
        np.testing.assert_array_equal(got.boxes, plain.boxes)
        assert (got.mode, got.proposer) == ("roi", "quadrants")
    # 6 images x 4 quadrants, one shard written by the first run only
    assert second.region_emb.shape == (24, 64)
    assert len(cache.shards(model_key(lm))) == 1


def test_grown_dataset_embeds_only_new_images(lm, dataset, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    embed_dataset(lm, dataset, progress=False, cache=cache)
    grown = _grow(dataset, 2, seed=7)
    emb = embed_dataset(lm, grown, progress=False, cache=cache)
    assert (cache.stats.hits, cache.stats.misses) == (6, 6 + 2)
    plain = embed_dataset(lm, grown, progress=False)
    np.testing.assert_allclose(emb.region_emb, plain.region_emb, atol=1e-5)


def test_key_is_image_content_not_id_or_path(lm, dataset, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    embed_dataset(lm, dataset, progress=False, cache=cache)
    moved = tmp_path / "moved"
    shutil.copytree(dataset.root, moved)
    rows = [dict(r, image_id=f"renamed-{r['image_id']}") for r in dataset.table.to_pylist()]
    write_manifest(moved, rows)
    embed_dataset(lm, load_dataset(moved), progress=False, cache=cache)
    assert cache.stats.misses == 6 and cache.stats.hits == 6
    # editing one image's pixels makes exactly that image a miss
    Image.new("RGB", (56, 56), (0, 0, 255)).save(moved / rows[0]["path"])
    embed_dataset(lm, load_dataset(moved), progress=False, cache=cache)
    assert cache.stats.misses == 7 and cache.stats.hits == 11


def test_mode_and_boxes_are_part_of_the_key(lm, dataset, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    embed_dataset(lm, dataset, progress=False, cache=cache)
    crop = embed_dataset(lm, dataset, mode="crop", progress=False, cache=cache)
    assert cache.stats.misses == 12 and crop.mode == "crop"
    grid = embed_dataset(lm, dataset, proposer="grid:3", progress=False, cache=cache)
    assert cache.stats.misses == 18 and grid.region_emb.shape == (6 * 9, 64)
    sha = "0" * 64
    quad = np.array([[0, 0, 28, 28]], np.float32)
    assert entry_key(sha, "roi", quad) != entry_key(sha, "crop", quad)
    assert entry_key(sha, "roi", quad) != entry_key(sha, "roi", quad + 1)
    assert boxes_digest(quad) == boxes_digest(quad.astype(np.float64))


def test_model_key_follows_weights_not_location(checkpoint, lm, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    assert model_key(load_model(f"local-dir:{copy}")) == model_key(lm)
    # random-init built-ins are keyed by the weights their seed produced
    a0, a0b, a1 = (load_model("ravl-tiny-rn", seed=s) for s in (0, 0, 1))
    assert model_key(a0) == model_key(a0b) != model_key(a1)
    other = tmp_path / "other"
    save_model(a1, other)
    assert model_key(load_model(f"local-dir:{other}")) != model_key(lm)


def test_flush_every_writes_one_shard_per_chunk_and_no_temporaries(lm, dataset, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache", flush_every=4)
    embed_dataset(lm, dataset, progress=False, cache=cache)
    directory = cache.model_dir(model_key(lm))
    assert cache.stats.shards_written == 2  # 6 images in chunks of 4 + 2
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) == []
    assert (directory / "model.json").is_file()


def test_concurrent_writers_and_compaction(lm, dataset, tmp_path):
    root = tmp_path / "cache"
    results = {}

    def run(name):
        cache = EmbeddingCache(root)
        results[name] = (embed_dataset(lm, dataset, progress=False, cache=cache), cache.stats.misses)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_allclose(results["a"][0].region_emb, results["b"][0].region_emb, atol=1e-5)
    cache = EmbeddingCache(root)
    key = model_key(lm)
    n_shards = len(cache.shards(key))
    assert 1 <= n_shards <= 2  # two shards when both missed, one when one writer saw the other's
    merged = cache.compact(key)
    assert cache.shards(key) == [merged]
    emb = embed_dataset(lm, dataset, progress=False, cache=cache)
    assert (cache.stats.hits, cache.stats.misses) == (6, 0)
    np.testing.assert_allclose(emb.region_emb, results["a"][0].region_emb, atol=1e-5)


def test_unreadable_shard_is_named(lm, dataset, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    embed_dataset(lm, dataset, progress=False, cache=cache)
    shard = cache.shards(model_key(lm))[0]
    shard.write_bytes(b"not parquet")
    with pytest.raises(CacheError, match=shard.name):
        embed_dataset(lm, dataset, progress=False, cache=cache)


def test_bad_cache_root_and_parameters(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CacheError, match="not a directory"):
        EmbeddingCache(f)
    with pytest.raises(CacheError, match="flush_every"):
        EmbeddingCache(tmp_path / "c", flush_every=0)


def test_file_sha256_matches_hashlib(tmp_path):
    import hashlib

    p = tmp_path / "blob"
    data = bytes(range(256)) * 5000
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()
    assert memo_file_sha256(p) == file_sha256(p)
    p.write_bytes(data + b"!")  # a new version of the file is hashed again
    assert memo_file_sha256(p) == hashlib.sha256(data + b"!").hexdigest()
