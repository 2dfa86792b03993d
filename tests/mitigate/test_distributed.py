"""Data-parallel training under torchrun: the same global batches, the same
loss and the same weights as one process (SPEC §3.4: the contrastive batch
must not shrink when it is split)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ravl_pipeline.cli import main as ravl
from ravl_pipeline.config import TrainConfig
from ravl_pipeline.io.manifest import write_manifest
from ravl_pipeline.mitigate.data import TrainData, TrainError
from ravl_pipeline.mitigate.distributed import WorldInfo, finetune_distributed, local_slice, shard_bounds
from ravl_pipeline.mitigate.train import iter_batches, set_seed
from ravl_pipeline.models import WEIGHTS_NAME, load_model

TRAIN_ARGS = ["--model", "ravl-tiny-rn", "--batch-size", "7", "--max-steps", "4", "--lr", "1e-3",
              "--seed", "3", "--caption-template", "a photo of {}", "--quiet"]
N_IMAGES = 18


def test_shard_bounds_hand_computed():
    assert shard_bounds(8, 2) == [(0, 4), (4, 8)]
    assert shard_bounds(7, 2) == [(0, 4), (4, 7)]
    assert shard_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert shard_bounds(2, 2) == [(0, 1), (1, 2)]
    idx = torch.tensor([9, 4, 7, 1, 3])
    parts = [local_slice(idx, WorldInfo(r, 2)).tolist() for r in range(2)]
    assert parts == [[9, 4, 7], [1, 3]]


def test_refuses_what_it_cannot_split():
    data = TrainData(torch.zeros(4, 3, 8, 8), torch.zeros(4, 4, dtype=torch.long), None, None)
    with pytest.raises(TrainError, match="cannot run distributed"):
        finetune_distributed(None, data, TrainConfig(method="upsampled"), WorldInfo(0, 2))
    with pytest.raises(TrainError, match="smaller than the world size 4"):
        finetune_distributed(None, data, TrainConfig(batch_size=2), WorldInfo(0, 4))


@pytest.fixture(scope="module")
def tiny_train_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp") / "ds"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(root / f"images/{i}.png")
        rows.append({"image_id": f"im{i}", "path": f"images/{i}.png", "label": ("one", "two", "three")[i % 3]})
    write_manifest(root, rows)
    return root


def _expected_batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    cfg = TrainConfig(batch_size=batch_size, max_steps=steps, seed=seed)
    return [idx.tolist() for _, idx in iter_batches(n, cfg, set_seed(seed), None)]


def test_torchrun_two_processes_match_one_process(tiny_train_set, tmp_path):
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun sets for each rank; 2 cores are shared
    try:
        rc = ravl(["train", "--data", str(tiny_train_set), "--out", str(one / "model"),
                   "--history", str(one / "history.json"), *TRAIN_ARGS])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "ravl_pipeline.cli", "finetune", "--data", str(tiny_train_set), "--out", str(two / "model"),
         "--history", str(two / "history.json"), "--record-indices", *TRAIN_ARGS],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    h1 = json.loads((one / "history.json").read_text())
    h2 = json.loads((two / "history.json").read_text())
    assert h2["world_size"] == 2 and h2["steps"] == h1["steps"] == 4
    # same loss curve: the loss covers the whole global batch on every rank
    np.testing.assert_allclose(h2["losses"], h1["losses"], rtol=1e-4, atol=1e-5)
    # each step's global batch split without duplicates or drops; 18 images
    # in batches of 7 give 7, 7, 4 then a new epoch
    expected = _expected_batches(N_IMAGES, 7, 4, 3)
    assert [len(b) for b in expected] == [7, 7, 4, 7]
    for step, (ranks, batch) in enumerate(zip(h2["rank_indices"], expected)):
        assert ranks[0] + ranks[1] == batch, f"step {step}"
        assert [len(r) for r in ranks] == [b - a for a, b in shard_bounds(len(batch), 2)]
    # averaged gradients gave the same weights; rank 0 alone wrote the outputs
    w0 = load_model("ravl-tiny-rn", seed=3).model.state_dict()
    w1 = load_file(str(one / "model" / WEIGHTS_NAME))
    w2 = load_file(str(two / "model" / WEIGHTS_NAME))
    assert w1.keys() == w2.keys()
    # Compared as a whole: attention key biases have a gradient that is zero
    # up to rounding (softmax ignores them), and Adam scales that rounding
    # noise up to full-size steps, so they alone differ element-wise.
    diff = sum(float((w2[k] - w1[k]).pow(2).sum()) for k in w1)
    update = sum(float((w1[k] - w0[k]).pow(2).sum()) for k in w1)
    assert update > 0 and (diff / update) ** 0.5 < 1e-2
    meta = json.loads((two / "model" / "ravl_model.json").read_text())
    assert meta["world_size"] == 2
    assert sorted(p.name for p in two.iterdir()) == ["history.json", "model"]
