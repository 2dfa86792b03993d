"""Stage 2 on streamed data (mitigate.data, mitigate.train):

* a run on pixels streamed from disk ends with the same weights and losses
  as the same run on pixels held in memory, for a method with a region pass
  (RaVL, on photos with region views) and one without;
* the same with 0 and 2 loader workers;
* a run interrupted after a saved state and started again ends with the
  same checkpoint as a run that never stopped; a state saved by another
  run is never resumed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ravl_pipeline.compute import Compute
from ravl_pipeline.config import TrainConfig
from ravl_pipeline.core.embed import preprocess_images
from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.mitigate.assign import RegionAssignment
from ravl_pipeline.mitigate.data import MitigationError, TrainData, build_train_data
from ravl_pipeline.mitigate.methods import attach_class_tokens, attach_region_extras, get_method
from ravl_pipeline.mitigate.train import batches, finetune
from ravl_pipeline.models import load_model
from ravl_pipeline.pipeline import stages
from tests.core.test_loader import CLASSES, write_photos

TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return load_dataset(write_photos(tmp_path_factory.mktemp("train-photos") / "ds", n=12))


def assignment(ds) -> RegionAssignment:
    """Both boxes of every image; the second is spurious in every third image."""
    n = len(ds)
    region_image, region_index = np.repeat(np.arange(n), 2), np.tile(np.arange(2), n)
    spurious = (region_index == 1) & (region_image % 3 == 0)
    return RegionAssignment(list(ds.image_ids), region_image, region_index, np.concatenate(ds.boxes),
                            np.where(spurious, 0, 1).astype(np.int64), spurious)


def run(ds, method: str, *, in_memory: bool = False, workers: int = 0, steps: int = 3, **kwargs):
    lm = load_model("ravl-tiny-rn", seed=0)
    lm.compute = Compute("cpu", "fp32", workers)
    data = build_train_data(lm, ds, TEMPLATE, classes=CLASSES)
    if in_memory:
        data = TrainData(preprocess_images(lm, ds), data.tokens, data.labels, data.classes)
    attach_class_tokens(data, lm, TEMPLATE)
    if get_method(method).needs_findings:
        attach_region_extras(data, lm, ds, assignment(ds), region_pass=get_method(method).region_pass,
                             cluster_class={0: 1})
    cfg = TrainConfig(method=method, max_steps=steps, batch_size=5, seed=3)
    history = finetune(lm, data, cfg, progress=False, **kwargs)
    return history, {k: v.clone() for k, v in lm.model.state_dict().items()}


def same(a, b) -> bool:
    (h1, w1), (h2, w2) = a, b
    return h1["losses"] == h2["losses"] and w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("method", ["ravl", "vl-gdro", "standard"])
def test_streamed_training_equals_training_in_memory(photos, method):
    assert same(run(photos, method), run(photos, method, in_memory=True))


def test_training_is_the_same_with_0_and_2_workers(photos):
    assert same(run(photos, "ravl", workers=0), run(photos, "ravl", workers=2))


def test_the_streamed_data_holds_no_pixels(photos):
    lm = load_model("ravl-tiny-rn", seed=0)
    data = build_train_data(lm, photos, TEMPLATE, classes=CLASSES)
    attach_region_extras(data, lm, photos, assignment(photos), cluster_class={0: 1})
    assert data.streamed and "views" not in data.extras and "boxes" not in data.extras
    tensors = [v for v in data.extras.values() if torch.is_tensor(v)] + [data.tokens]
    held = sum(t.numel() * t.element_size() for t in tensors) + sum(
        np.asarray(b).nbytes for b in data.extras["region_boxes"])
    assert held < 3 * 1024 * len(photos)  # tokens and small arrays: no image-sized tensor per row


class Interrupt(Exception):
    pass


def stop_after(last: int):
    """An ``on_step`` that interrupts the run once step ``last`` is done."""
    def on_step(step, loss):
        if step == last:
            raise Interrupt
    return on_step


@pytest.mark.parametrize("method", ["ravl", "vl-gdro"])
def test_a_resumed_run_ends_with_the_same_weights(photos, tmp_path, method):
    whole = run(photos, method, steps=5)
    state = tmp_path / "run.resume.pt"
    with pytest.raises(Interrupt):
        run(photos, method, steps=5, resume=state, checkpoint_every=2, fingerprint="a", on_step=stop_after(2))
    assert state.is_file()
    resumed = run(photos, method, steps=5, resume=state, checkpoint_every=2, fingerprint="a")
    assert resumed[0]["resumed_at_step"] == 2
    assert same(whole, resumed)


def test_a_state_saved_by_another_run_is_not_resumed(photos, tmp_path, capsys):
    state = tmp_path / "run.resume.pt"
    with pytest.raises(Interrupt):
        run(photos, "standard", steps=4, resume=state, checkpoint_every=2, fingerprint="one", on_step=stop_after(2))
    history, weights = run(photos, "standard", steps=4, resume=state, checkpoint_every=2, fingerprint="two")
    assert "resumed_at_step" not in history and "different run" in capsys.readouterr().err
    assert same((history, weights), run(photos, "standard", steps=4))


def test_the_pipeline_resumes_and_removes_its_state(photos, tmp_path, monkeypatch):
    """stages.train keeps OUT.resume.pt while it trains and removes it with the checkpoint written."""
    out = tmp_path / "model"
    cfg = TrainConfig(method="standard", max_steps=4, batch_size=5)
    real = stages.finetune
    monkeypatch.setattr(stages, "finetune", lambda *args, **kwargs: real(*args, **{**kwargs, "on_step": stop_after(2)}))
    with pytest.raises(Interrupt):
        stages.train("ravl-tiny-rn", photos.root, out, cfg, checkpoint_every=2)
    assert (tmp_path / "model.resume.pt").is_file() and not out.exists()
    monkeypatch.setattr(stages, "finetune", real)
    history = stages.train("ravl-tiny-rn", photos.root, out, cfg, checkpoint_every=2)
    assert history["resumed_at_step"] == 2 and history["steps"] == 4
    assert (out / "open_clip_model.safetensors").is_file() and not (tmp_path / "model.resume.pt").exists()
    fresh = stages.train("ravl-tiny-rn", photos.root, tmp_path / "fresh", cfg)
    assert fresh["losses"] == history["losses"]
    assert (tmp_path / "fresh" / "open_clip_model.safetensors").read_bytes() == \
        (out / "open_clip_model.safetensors").read_bytes()


def test_the_open_clip_training_transform_is_seeded_per_draw(photos):
    """Each draw of an image is a different random crop, the same with 0 and 2 workers."""
    lm = load_model("ravl-tiny-rn", seed=0)
    draws = []
    for workers in (0, 2):
        lm.compute = Compute("cpu", "fp32", workers)
        data = build_train_data(lm, photos, TEMPLATE, classes=CLASSES, train_transform="open_clip", seed=5)
        cfg = TrainConfig(max_steps=6, batch_size=4, seed=5)
        draws.append([(batch["index"].tolist(), batch["pixels"]) for _, batch in
                      batches(data, cfg, torch.Generator().manual_seed(5), lm.compute)])
    assert all(i == j and torch.equal(a, b) for (i, a), (j, b) in zip(*draws))
    first = {}
    for idx, pixels in draws[0]:
        for row, image in zip(idx, pixels):
            first.setdefault(row, []).append(image)
    again = [images for images in first.values() if len(images) > 1]
    # (a draw may fall back to the whole image, so not every pair differs)
    assert again and any(not torch.equal(images[0], images[1]) for images in again)
    plain = preprocess_images(lm, photos, [draws[0][0][0][0]])[0]
    assert not torch.equal(draws[0][0][1][0], plain)


def test_a_training_transform_is_refused_with_a_region_pass(photos, tmp_path):
    cfg = TrainConfig(method="ravl", max_steps=1, batch_size=4, train_transform="open_clip")
    with pytest.raises(MitigationError, match="train_transform 'open_clip' moves pixels"):
        stages.train("ravl-tiny-rn", photos.root, tmp_path / "m", cfg, assignment=assignment(photos),
                     findings=None)
    assert not (tmp_path / "m").exists()


def test_an_empty_slice_of_a_batch_is_an_empty_batch(photos):
    """Under torchrun a process's slice of a short last batch may be empty: it gets no pixels, not an error."""
    lm = load_model("ravl-tiny-rn", seed=0)
    data = build_train_data(lm, photos, TEMPLATE, classes=CLASSES)
    cfg = TrainConfig(max_steps=2, batch_size=4)
    got = list(batches(data, cfg, torch.Generator().manual_seed(0), select=lambda idx: idx[:0]))
    assert [tuple(b["pixels"].shape) for _, b in got] == [(0, 3, lm.image_size, lm.image_size)] * 2
    assert [b["global_size"] for _, b in got] == [4, 4]
