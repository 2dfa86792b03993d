"""The compute setting and streamed images (ravl_pipeline.compute, core.loader):

* ``auto`` resolves to what this machine has; a device it lacks, named
  explicitly, is a one-line error naming the flag (exit 2);
* embeddings and the masking check's predictions are the same with 0 and 2
  loader workers, and the same as the in-memory path;
* bad input met in a worker process is raised as the same one-line error;
* a set embedded in shards and merged equals the set embedded at once.
"""
from __future__ import annotations

import os
import numpy as np
import pytest
import torch
from PIL import Image

from ravl_pipeline.cli import main as ravl
from ravl_pipeline.compute import CPU, Compute, DeviceError, cuda_available, mps_available, resolve_compute
from ravl_pipeline.config import ComputeConfig
from ravl_pipeline.core.cache import EmbeddingCache
from ravl_pipeline.core.embed import embed_dataset, merge_embeddings, preprocess_images, shard_rows
from ravl_pipeline.core.evidence import causal
from ravl_pipeline.core.scores import class_text_embeddings
from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.io.manifest import ManifestError, write_manifest
from ravl_pipeline.models import load_model

CLASSES = ["one", "two"]


def write_photos(root, n: int = 10, bad: int | None = None):
    """``n`` photos, every other one landscape (a region view of its own),
    with two boxes each; image ``bad`` is not an image at all."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        w, h = (72, 56) if i % 2 else (56, 56)
        path = root / "images" / f"{i}.png"
        if i == bad:
            path.write_bytes(b"not a png")
        else:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        rows.append({"image_id": f"im{i}", "path": f"images/{i}.png", "label": CLASSES[i % 2],
                     "boxes": [[0.0, 0.0, w / 2, h / 2], [w / 3, h / 3, float(w), float(h)]]})
    write_manifest(root, rows)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return load_dataset(write_photos(tmp_path_factory.mktemp("photos") / "ds"))


def with_workers(lm, workers: int):
    lm.compute = Compute("cpu", "fp32", workers)
    return lm


# --------------------------------------------------------------------------- device resolution

def test_auto_resolves_to_what_this_machine_has():
    expected = "cuda" if cuda_available() else "mps" if mps_available() else "cpu"
    compute = resolve_compute(ComputeConfig())
    assert compute.device == expected
    if expected == "cpu":
        assert compute == CPU and compute.is_reference and compute.record() is None
        assert compute.amp_dtype is None and not compute.pin_memory


@pytest.mark.skipif(cuda_available(), reason="this machine has a CUDA device")
def test_an_unavailable_device_is_one_line_naming_the_flag(tmp_path, capsys):
    with pytest.raises(DeviceError, match="--device: 'cuda' is not available"):
        resolve_compute(device="cuda")
    with pytest.raises(DeviceError, match="params.yaml: compute.device: 'cuda:1'"):
        resolve_compute(ComputeConfig(device="cuda:1"), where="params.yaml: compute.")
    code = ravl(["evaluate", "--model", "ravl-tiny-rn", "--data", str(tmp_path), "--out", str(tmp_path / "m.json"),
                 "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--device" in err and "Traceback" not in err
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("device,precision,message", [
    ("gpu", "auto", "unknown device 'gpu'"), ("cuda:x", "auto", "unknown device"),
    ("cpu", "fp8", "unknown precision 'fp8'"), ("cpu", "fp16", "fp16 autocast is for accelerators")])
def test_bad_device_or_precision_names_the_flag(device, precision, message):
    with pytest.raises(DeviceError, match=message):
        resolve_compute(device=device, precision=precision)


def test_mixed_precision_is_recorded_and_fp32_is_not():
    assert resolve_compute(device="cpu", precision="auto").record() is None
    bf16 = resolve_compute(device="cpu", precision="bf16")
    assert bf16.record() == {"device": "cpu", "precision": "bf16"} and bf16.amp_dtype == torch.bfloat16
    assert not bf16.grad_scaler().is_enabled()  # loss scaling is for fp16 alone


# --------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("mode", ["roi", "crop"])
def test_embeddings_are_the_same_with_0_and_2_workers(photos, mode):
    lm = load_model("ravl-tiny-rn", seed=0)
    runs = [embed_dataset(with_workers(lm, w), photos, proposer="boxes", mode=mode, batch_size=3, progress=False)
            for w in (0, 2)]
    a, b = runs
    assert a.image_ids == b.image_ids == photos.image_ids
    assert np.array_equal(a.image_emb, b.image_emb) and np.array_equal(a.region_emb, b.region_emb)
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.region_image, b.region_image)


def test_streamed_image_embeddings_equal_the_in_memory_pass(photos):
    lm = with_workers(load_model("ravl-tiny-vit", seed=0), 2)
    emb = embed_dataset(lm, photos, proposer="boxes", batch_size=4, progress=False)
    with torch.inference_mode():
        whole = torch.nn.functional.normalize(lm.model.encode_image(preprocess_images(lm, photos)), dim=-1)
    np.testing.assert_allclose(emb.image_emb, whole.numpy(), atol=1e-5)


def test_masking_predictions_are_the_same_with_0_and_2_workers(photos):
    lm = load_model("ravl-tiny-rn", seed=0)
    text = class_text_embeddings(lm, CLASSES).numpy()
    boxes = np.concatenate(photos.boxes)
    region_image = np.repeat(np.arange(len(photos)), 2)
    labels, pred = np.arange(len(photos)) % 2, np.zeros(len(photos), np.int64)
    out = []
    for w in (0, 2):
        with_workers(lm, w)
        before = causal.predict_dataset(lm, photos, text, 0.07, batch_size=3)
        effect = causal.causal_effect(lm, photos, np.arange(0, len(boxes), 2), region_image, boxes, labels, pred,
                                      CLASSES, text, 0.07, fill="black", batch_size=3)
        per_image = effect.pop(causal.PER_IMAGE)
        out.append((before, effect, per_image["outcome"]))
    assert np.array_equal(out[0][0], out[1][0]) and out[0][1] == out[1][1]
    assert np.array_equal(out[0][2], out[1][2])
    arrays = [np.asarray(photos.load_image(i).convert("RGB")) for i in range(len(photos))]
    assert np.array_equal(out[0][0], causal.predict_images(lm, arrays, text, 0.07, batch_size=3))


def test_a_bad_image_read_in_a_worker_is_the_same_one_line_error(tmp_path):
    ds = load_dataset(write_photos(tmp_path / "ds", n=6, bad=3), check_images=False)
    lm = with_workers(load_model("ravl-tiny-rn", seed=0), 2)
    with pytest.raises(ManifestError) as err:
        embed_dataset(lm, ds, proposer="boxes", batch_size=2, progress=False)
    message = str(err.value)
    assert "row 3 (image_id 'im3')" in message and "unreadable" in message
    assert "\n" not in message and "Traceback" not in message and "worker" not in message.lower()


def test_streaming_leaves_the_global_random_state_alone(photos):
    lm = with_workers(load_model("ravl-tiny-rn", seed=0), 2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    embed_dataset(lm, photos, proposer="boxes", batch_size=4, progress=False)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- shards

@pytest.mark.parametrize("n,shards", [(10, 1), (10, 3), (7, 7), (2, 3)])
def test_shards_cover_every_row_once_in_order(n, shards):
    rows = [r for i in range(shards) for r in shard_rows(n, shards, i)]
    assert rows == list(range(n))
    sizes = [len(shard_rows(n, shards, i)) for i in range(shards)]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("shards", [2, 3])
def test_a_set_embedded_in_shards_equals_the_set_embedded_at_once(photos, tmp_path, shards):
    lm = load_model("ravl-tiny-rn", seed=0)
    whole = embed_dataset(lm, photos, proposer="boxes", batch_size=4, progress=False)
    parts = [embed_dataset(lm, photos.subset(list(shard_rows(len(photos), shards, i))), proposer="boxes",
                           batch_size=4, progress=False) for i in range(shards)]
    merged = merge_embeddings(parts)
    assert merged.image_ids == whole.image_ids
    assert np.array_equal(merged.region_image, whole.region_image)
    assert np.array_equal(merged.region_index, whole.region_index) and np.array_equal(merged.boxes, whole.boxes)
    np.testing.assert_allclose(merged.image_emb, whole.image_emb, atol=1e-5)
    np.testing.assert_allclose(merged.region_emb, whole.region_emb, atol=1e-5)
    # through the embedding cache, shard by shard: the second pass reads every image back
    cache = EmbeddingCache(tmp_path / "cache")
    for i in range(shards):
        embed_dataset(lm, photos.subset(list(shard_rows(len(photos), shards, i))), proposer="boxes",
                      progress=False, cache=cache)
    again = embed_dataset(lm, photos, proposer="boxes", progress=False, cache=cache)
    assert cache.stats.hits == len(photos) and cache.stats.misses == len(photos)
    np.testing.assert_allclose(again.region_emb, whole.region_emb, atol=1e-5)


def test_threads_follow_the_free_cores_unless_named(monkeypatch):
    import torch

    from ravl_pipeline import compute

    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        assert 1 <= compute.free_cores() <= cores
        compute._THREADS_SET.clear()
        assert compute.use_threads(1) == 1 == torch.get_num_threads()
        # OMP_NUM_THREADS (a user's or a test runner's choice) wins over the automatic count
        compute._THREADS_SET.clear()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert compute.use_threads() == torch.get_num_threads() == 1
        # without it, the free cores: next to a busy process, one fewer
        compute._THREADS_SET.clear()
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(compute, "free_cores", lambda: 1)
        assert compute.use_threads() == 1
        assert compute.use_threads() == 1  # once per process
    finally:
        compute._THREADS_SET.clear()
        torch.set_num_threads(before)
