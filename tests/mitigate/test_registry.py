"""The method registry (``mitigate.methods.METHODS``, SPEC §3).

Every registered method trains one step through the fine-tuning loop on the
same small batch, with exactly the extras its facts ask for (built as
``pipeline.stages.train`` builds them): the loss is finite, the parameters
move, and exactly the trainable parameters get gradients. The loop, the
data-parallel loop, the pipeline and the command line all read the
registry's facts, so a method is added in one place.
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ravl_pipeline.cli import build_parser
from ravl_pipeline.cli import main as ravl
from ravl_pipeline.config import TrainConfig
from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.io.manifest import write_manifest
from ravl_pipeline.mitigate.assign import RegionAssignment, group_ids
from ravl_pipeline.mitigate.data import MitigationError, TrainData, TrainError, build_train_data
from ravl_pipeline.mitigate.distributed import WorldInfo, finetune_distributed
from ravl_pipeline.mitigate.methods import (METHODS, Method, attach_attribute_tokens, attach_class_tokens,
                                            attach_region_extras,
                                            get_method, register_method)
from ravl_pipeline.mitigate.train import finetune
from ravl_pipeline.models import load_model
from ravl_pipeline.pipeline import stages
from tests.mitigate.test_methods import load_unzeroed

CLASSES = ["one", "two"]
TEMPLATE = "a photo of a {}."
SIDE = 56
QUADRANTS = np.array([[0, 0, 28, 28], [28, 0, 56, 28], [0, 28, 28, 56], [28, 28, 56, 56]], dtype=np.float32)
N_IMAGES = 8
# image i: label i % 2, a red square in its top-right quadrant when (i // 2) is
# even. Every (label, present) group has two images, so the group-balanced
# sampler draws each image once and every method's one batch is all 8 images.
LABELS = np.array([i % 2 for i in range(N_IMAGES)])
PRESENT = np.array([(i // 2) % 2 == 0 for i in range(N_IMAGES)])
SPURIOUS_QUADRANT = 1


def _image(i: int, rng: np.random.Generator) -> Image.Image:
    arr = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    if PRESENT[i]:
        x1, y1, x2, y2 = QUADRANTS[SPURIOUS_QUADRANT].astype(int)
        arr[y1:y2, x1:x2] = (255, 0, 0)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry") / "ds"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        _image(i, rng).save(root / "images" / f"{i}.png")
        rows.append({"image_id": f"im{i}", "path": f"images/{i}.png", "label": CLASSES[LABELS[i]]})
    write_manifest(root, rows)
    return root


def hand_assignment(ds) -> RegionAssignment:
    """Four quadrant regions per image; the top-right one is spurious where the red square is."""
    n = len(ds)
    region_image = np.repeat(np.arange(n), len(QUADRANTS))
    region_index = np.tile(np.arange(len(QUADRANTS)), n)
    spurious = (region_index == SPURIOUS_QUADRANT) & PRESENT[region_image]
    return RegionAssignment(list(ds.image_ids), region_image, region_index, np.tile(QUADRANTS, (n, 1)),
                            np.where(spurious, 0, 1).astype(np.int64), spurious)


def train_data_for(method: Method, lm, ds) -> TrainData:
    """The training data with the extras the method's facts ask for, as
    ``pipeline.stages.train`` builds them."""
    data = build_train_data(lm, ds, TEMPLATE, classes=CLASSES)
    if method.needs_labels:
        attach_class_tokens(data, lm, TEMPLATE)
    if method.needs_findings:  # the spurious cluster (0) tied to the second class
        attach_region_extras(data, lm, ds, hand_assignment(ds), cluster_class={0: 1})
    if method.needs_attribute_text:
        attach_attribute_tokens(data, lm, ["red square"])
    return data


def is_text_tower(name: str) -> bool:
    return not name.startswith("visual.") and name != "logit_scale"


def test_the_hand_made_groups_are_balanced(tiny_dataset):
    groups = group_ids(LABELS, PRESENT)
    assert torch.bincount(groups, minlength=4).tolist() == [2, 2, 2, 2]
    lm = load_model("ravl-tiny-rn", seed=0)
    ds = load_dataset(tiny_dataset)
    data = build_train_data(lm, ds, TEMPLATE, classes=CLASSES)
    attach_region_extras(data, lm, ds, hand_assignment(ds))
    assert data.extras["groups"].tolist() == groups.tolist()
    assert [b.shape for b in data.extras["region_boxes"]] == [(4, 4)] * N_IMAGES  # placed per batch by the loader
    assert [s.tolist() for s in data.extras["spurious"]] == [[False, bool(p), False, False] for p in PRESENT]


@pytest.mark.parametrize("arch", ["ravl-tiny-rn", "ravl-tiny-vit"])
@pytest.mark.parametrize("lock_text", [False, True], ids=["full", "lock-text"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_one_step(name, lock_text, arch, tiny_dataset, monkeypatch):
    method = METHODS[name]
    lm = load_unzeroed(arch)
    ds = load_dataset(tiny_dataset)
    data = train_data_for(method, lm, ds)
    seen: list[list[int]] = []

    def recording(model, batch, data_, cfg, state):
        seen.append(sorted(batch["index"].tolist()))
        return method.loss(model, batch, data_, cfg, state)

    monkeypatch.setitem(METHODS, name, dataclasses.replace(method, loss=recording))
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    cfg = TrainConfig(method=name, max_steps=1, batch_size=N_IMAGES, lock_text=lock_text,
                      caption_template=TEMPLATE)
    history = finetune(lm, data, cfg, progress=False)

    assert history["steps"] == 1 and len(history["losses"]) == 1
    assert math.isfinite(history["losses"][0])
    assert seen == [list(range(N_IMAGES))]  # one step, on the same batch for every method
    params = dict(lm.model.named_parameters())
    text = [n for n in params if is_text_tower(n)]
    image = [n for n in params if n.startswith("visual.")]
    assert text and image and "logit_scale" in params
    for n, p in params.items():
        if lock_text and is_text_tower(n):
            assert p.grad is None, f"{name}: frozen {n} got a gradient"
            assert torch.equal(p.detach(), before[n]), f"{name}: frozen {n} changed"
        else:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, f"{name}: {n} got no gradient"
            assert not torch.equal(p.detach(), before[n]), f"{name}: {n} did not change"


# --------------------------------------------------------------------------- the facts are what is read

def _probe_loss(model, batch, data, cfg, state):
    return (model.logit_scale - 1.0).pow(2)


def _method_choices(parser: argparse.ArgumentParser, command: str):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next(a for a in sub.choices[command]._actions if a.dest == "method").choices


def test_cli_method_choices_are_the_registry(monkeypatch, tmp_path, capsys):
    for command in ("finetune", "train"):
        assert list(_method_choices(build_parser(), command)) == sorted(METHODS)
    monkeypatch.setitem(METHODS, "probe", Method("probe", _probe_loss))
    for command in ("finetune", "train"):
        assert list(_method_choices(build_parser(), command)) == sorted(METHODS)
        assert "probe" in _method_choices(build_parser(), command)
    assert ravl(["finetune", "--model", "ravl-tiny-rn", "--data", str(tmp_path), "--out", str(tmp_path / "m"),
                 "--method", "no-such-method"]) == 2
    assert "invalid choice: 'no-such-method'" in capsys.readouterr().err


def test_get_method_names_every_registered_method():
    for name, method in METHODS.items():
        assert get_method(name) is method and method.name == name
    with pytest.raises(MitigationError, match="unknown method 'nope'; expected one of " + ", ".join(sorted(METHODS))):
        get_method("nope")


def test_loop_uses_the_registered_loss_sampler_and_preparation(monkeypatch):
    """A method registered with ``register_method`` is trained by the loop
    with its own preparation, sampler (instead of uniform shuffling) and loss."""
    calls = []

    def prepare(data, cfg, state):
        calls.append("prepare")
        state["prepared"] = True

    def sampler(n, gen, data, cfg):
        calls.append("sampler")
        return torch.arange(n - 1, -1, -1)  # reversed: unlike any shuffle of the seed

    def loss(model, batch, data, cfg, state):
        assert state["prepared"]
        calls.append(batch["index"].tolist())
        return _probe_loss(model, batch, data, cfg, state)

    monkeypatch.setitem(METHODS, "probe", None)  # removed again after the test
    assert register_method("probe", sampler=sampler, prepare=prepare)(loss) is loss
    assert METHODS["probe"] == Method("probe", loss, sampler=sampler, prepare=prepare)
    lm = load_model("ravl-tiny-rn", seed=0)
    data = TrainData(torch.zeros(6, 3, lm.image_size, lm.image_size), lm.tokenizer(["a"] * 6), None, None)
    history = finetune(lm, data, TrainConfig(method="probe", batch_size=3, max_steps=3), progress=False)
    assert history["steps"] == 3
    assert calls == ["prepare", "sampler", [5, 4, 3], [2, 1, 0], "sampler", [5, 4, 3]]


def test_data_parallel_loop_refuses_methods_not_marked_distributed(monkeypatch):
    data = TrainData(torch.zeros(4, 3, 8, 8), torch.zeros(4, 4, dtype=torch.long), None, None)
    runnable = sorted(name for name, m in METHODS.items() if m.distributed)
    refused = sorted(name for name, m in METHODS.items() if not m.distributed)
    assert runnable and refused
    for name in refused:
        with pytest.raises(TrainError, match=f"method '{name}' cannot run distributed yet; use one of "
                                             f"{', '.join(runnable)} or a single process"):
            finetune_distributed(None, data, TrainConfig(method=name, batch_size=4), WorldInfo(0, 2))
    # a method marked distributed passes the method check (and stops at the next one)
    monkeypatch.setitem(METHODS, "probe", Method("probe", _probe_loss, distributed=True))
    for name in runnable + ["probe"]:
        with pytest.raises(TrainError, match="batch size 1 is smaller than the world size 2"):
            finetune_distributed(None, data, TrainConfig(method=name, batch_size=1), WorldInfo(0, 2))
    monkeypatch.setitem(METHODS, "probe", Method("probe", _probe_loss, distributed=False))
    with pytest.raises(TrainError, match="method 'probe' cannot run distributed"):
        finetune_distributed(None, data, TrainConfig(method="probe", batch_size=4), WorldInfo(0, 2))


def test_pipeline_refuses_findings_methods_without_findings(tmp_path):
    needing = sorted(name for name, m in METHODS.items() if m.needs_findings)
    assert needing
    for name in needing:
        with pytest.raises(MitigationError, match=f"method '{name}' needs Stage-1 findings"):
            stages.train("ravl-tiny-rn", tmp_path / "no-data", tmp_path / "out", TrainConfig(method=name))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("needs_labels", [False, True])
def test_pipeline_attaches_what_the_facts_ask_for(needs_labels, tiny_dataset, tmp_path, monkeypatch):
    """``pipeline.stages.train`` gives a method class tokens exactly when it
    is marked ``needs_labels`` (region extras need findings: see test_methods)."""
    extras = []

    def loss(model, batch, data, cfg, state):
        extras.append(sorted(data.extras))
        return _probe_loss(model, batch, data, cfg, state)

    monkeypatch.setitem(METHODS, "probe", Method("probe", loss, needs_labels=needs_labels))
    cfg = TrainConfig(method="probe", max_steps=1, batch_size=4, caption_template=TEMPLATE)
    history = stages.train("ravl-tiny-rn", tiny_dataset, tmp_path / "model", cfg)
    assert history["steps"] == 1
    assert extras == [["class_tokens"] if needs_labels else []]
    assert (tmp_path / "model").is_dir()
