"""Gradient accumulation (mitigate.accumulate): a batch processed in
micro-batches gives the gradient of the whole batch's loss — the
contrastive terms still see every image of the batch — for every method
shape (CLIP loss, region pass, class prompts, group DRO), on a model
normalised per sample (ViT), and a run with micro-batches trains like one
without."""
from __future__ import annotations

import contextlib

import pytest
import torch

from ravl_pipeline.config import TrainConfig
from ravl_pipeline.mitigate.accumulate import accumulated_backward, micro_batches
from ravl_pipeline.mitigate.data import build_train_data
from ravl_pipeline.mitigate.methods import attach_class_tokens, attach_region_extras, get_method, prepare_group_dro
from ravl_pipeline.mitigate.train import batches, configure_trainable, finetune
from ravl_pipeline.models import load_model
from tests.core.test_loader import CLASSES
from tests.mitigate.test_streaming import TEMPLATE, assignment, photos  # noqa: F401 (fixture)

METHODS = ["standard", "ravl", "vl-erm", "vl-gdro"]


def one_batch(ds, method: str):
    lm = load_model("ravl-tiny-vit", seed=0)
    configure_trainable(lm.model, False)
    data = build_train_data(lm, ds, TEMPLATE, classes=CLASSES)
    attach_class_tokens(data, lm, TEMPLATE)
    attach_region_extras(data, lm, ds, assignment(ds), region_pass=get_method(method).region_pass,
                         cluster_class={0: 1})
    cfg = TrainConfig(method=method, max_steps=1, batch_size=6)
    _, batch = next(batches(data, cfg, torch.Generator().manual_seed(0), region_pass=get_method(method).region_pass))
    lm.model.train()
    return lm.model, data, cfg, batch


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", METHODS)
def test_micro_batches_give_the_whole_batch_gradient(photos, method):  # noqa: F811
    spec = get_method(method)
    model, data, cfg, batch = one_batch(photos, method)
    state: dict = {}
    if method == "vl-gdro":
        prepare_group_dro(data, cfg, state)
    whole = spec.loss(model, batch, data, cfg, dict(state))
    whole.backward()
    expected = gradients(model)
    model.zero_grad(set_to_none=True)
    loss = accumulated_backward(model, spec, batch, lambda towers: spec.loss(towers, batch, data, cfg, dict(state)),
                                2, contextlib.nullcontext, lambda x: x)
    got = gradients(model)
    assert torch.allclose(loss, whole, atol=1e-6)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=1e-4), name


def test_micro_batches_cover_the_batch_in_order(photos):  # noqa: F811
    _, _, _, batch = one_batch(photos, "ravl")
    parts = micro_batches(batch, 4)
    assert [len(p["index"]) for p in parts] == [4, 2]
    assert torch.equal(torch.cat([p["index"] for p in parts]), batch["index"])
    boxes = [b for p in parts for b in p["boxes"]]
    assert len(boxes) == len(batch["boxes"]) and all(torch.equal(a, b) for a, b in zip(boxes, batch["boxes"]))


def test_a_run_in_micro_batches_trains_like_one_without(photos):  # noqa: F811
    start = [p.detach().clone() for p in load_model("ravl-tiny-vit", seed=0).model.parameters()]
    runs = []
    for micro in (None, 2):
        lm = load_model("ravl-tiny-vit", seed=0)
        data = build_train_data(lm, photos, TEMPLATE, classes=CLASSES)
        history = finetune(lm, data, TrainConfig(max_steps=3, batch_size=6, micro_batch_size=micro), progress=False)
        runs.append((history["losses"], [p.detach().clone() for p in lm.model.parameters()]))
    (l1, w1), (l2, w2) = runs
    assert l1 == pytest.approx(l2, abs=1e-5)
    # Adam divides by the gradient's running size, so entries whose gradient is ~0 amplify float rounding;
    # on average the two runs differ by a thousandth of what training moved the weights
    differ = torch.cat([(a - b).abs().flatten() for a, b in zip(w1, w2)]).mean()
    moved = torch.cat([(a - b).abs().flatten() for a, b in zip(w1, start)]).mean()
    assert differ < 1e-3 * moved


def test_micro_batches_with_a_frozen_text_tower(photos):  # noqa: F811
    """lock_text: the caption features carry no gradient to pass back; the image tower still trains."""
    lm = load_model("ravl-tiny-vit", seed=0)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    data = build_train_data(lm, photos, TEMPLATE, classes=CLASSES)
    finetune(lm, data, TrainConfig(max_steps=1, batch_size=6, micro_batch_size=2, lock_text=True), progress=False)
    after = dict(lm.model.named_parameters())
    assert torch.equal(after["token_embedding.weight"], before["token_embedding.weight"])
    assert not torch.equal(after["visual.conv1.weight"], before["visual.conv1.weight"])
