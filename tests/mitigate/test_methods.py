"""Stage 2 (SPEC §3): region-aware loss, groups/sampling, group DRO, and the
mitigated training entry point (``pipeline.stages.train``) on a tiny model."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ravl_pipeline.config import ParamsError, TrainConfig
from ravl_pipeline.core.findings import Feature, Findings
from ravl_pipeline.io.hashing import file_sha256, json_sha256
from ravl_pipeline.mitigate import methods
from ravl_pipeline.mitigate.assign import assign_spurious_regions, group_ids, select_features
from ravl_pipeline.mitigate.data import MitigationError, TrainData, TrainError
from ravl_pipeline.mitigate.losses import group_dro_step, region_aware_loss
from ravl_pipeline.mitigate.methods import METHODS, upsampled_order
from ravl_pipeline.mitigate.train import configure_trainable
from ravl_pipeline.models import ModelError, load_model
from ravl_pipeline.pipeline import stages


# --------------------------------------------------------------------------- direct formulas

def direct_loss(f, region_image, spurious, labels, g, tau, spurious_class=None):
    """SPEC §3.3 written out with raw exponentials (safe for the small
    logits used here), loops and no vectorisation. With ``spurious_class``
    (the ``correlated`` form) a spurious region enters L_R through
    ``s(r, c(r))`` and L_A only for images of its class ``c(r)``."""
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    s = lambda r, y: math.exp(float(f[r] @ g[y]) / tau)  # noqa: E731
    B = len(labels)
    Y_B = sorted(set(labels))
    rel = [[r for r in range(len(f)) if region_image[r] == i and not spurious[r]] for i in range(B)]
    spur = [r for r in range(len(f)) if spurious[r]]
    sigma = lambda i, y: max((s(r, y) for r in rel[i]), default=0.0)  # noqa: E731
    total, count = 0.0, 0
    for i in range(B):
        if not rel[i]:
            continue
        yi = labels[i]
        num = sigma(i, yi)
        if spurious_class is None:
            spur_r = sum(max(s(r, y) for y in Y_B) for r in spur)
            spur_a = sum(s(r, yi) for r in spur)
        else:
            spur_r = sum(s(r, spurious_class[r]) for r in spur if spurious_class[r] >= 0)
            spur_a = sum(s(r, yi) for r in spur if spurious_class[r] == yi)
        den_r = sum(sigma(i, y) for y in Y_B) + spur_r
        den_a = num + sum(sigma(j, yi) for j in range(B) if labels[j] != yi) + spur_a
        total += -math.log(num / den_r) - math.log(num / den_a)
        count += 1
    return total / count


def hand_batch():
    """Three images (labels 0, 2, 0; class 1 absent from the batch), 2-D
    embeddings at chosen angles. Image 1 has one spurious region; image 2
    has two; one image has only relevant regions."""
    ang = np.array([0.0, 0.4, 1.2, 2.0, 0.3, 2.5, 1.5])
    f = np.stack([np.cos(ang), np.sin(ang)], 1) * np.array([1, 2, 0.5, 1, 3, 1, 1])[:, None]
    region_image = np.array([0, 0, 1, 1, 1, 2, 2])
    spurious = np.array([False, False, True, False, False, True, False])
    labels = np.array([0, 2, 0])
    g = np.array([[1.0, 0.0], [0.0, 1.0], [-0.5, 0.8]])
    return f, region_image, spurious, labels, g


def as_torch(f, region_image, spurious, labels, g):
    return (torch.tensor(f, dtype=torch.float64), torch.tensor(region_image), torch.tensor(spurious),
            torch.tensor(labels), torch.tensor(g, dtype=torch.float64))


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_region_loss_matches_direct_formulas(tau):
    batch = hand_batch()
    got = region_aware_loss(*as_torch(*batch), tau=tau).item()
    assert got == pytest.approx(direct_loss(*batch, tau), rel=1e-10)


def test_region_loss_every_term_matters():
    """Moving a spurious region towards an image's class raises that image's
    L_A (it joins its denominator), so the loss must go up."""
    f, region_image, spurious, labels, g = hand_batch()
    base = region_aware_loss(*as_torch(f, region_image, spurious, labels, g), tau=0.5).item()
    f2 = f.copy()
    f2[5] = [1.0, 0.0]  # spurious region of image 2 now aligned with class 0's text
    moved = region_aware_loss(*as_torch(f2, region_image, spurious, labels, g), tau=0.5).item()
    assert moved == pytest.approx(direct_loss(f2, region_image, spurious, labels, g, 0.5), rel=1e-10)
    assert moved > base


def test_region_loss_without_spurious_regions_is_finite_and_exact():
    f, region_image, _, labels, g = hand_batch()
    none = np.zeros(len(f), dtype=bool)
    got = region_aware_loss(*as_torch(f, region_image, none, labels, g), tau=0.07)
    assert torch.isfinite(got)
    # τ = 0.07 overflows nothing in log space; compare at a τ the direct form can take
    got1 = region_aware_loss(*as_torch(f, region_image, none, labels, g), tau=1.0).item()
    assert got1 == pytest.approx(direct_loss(f, region_image, none, labels, g, 1.0), rel=1e-10)


def test_region_loss_image_without_relevant_region_is_skipped():
    f, region_image, spurious, labels, g = hand_batch()
    spurious = spurious.copy()
    spurious[[0, 1]] = True  # image 0 now has only spurious regions
    tf = as_torch(f, region_image, spurious, labels, g)
    tf[0].requires_grad_(True)
    loss = region_aware_loss(*tf, tau=0.07)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(tf[0].grad).all()
    assert region_aware_loss(*as_torch(f, region_image, spurious, labels, g), tau=0.5).item() == \
        pytest.approx(direct_loss(f, region_image, spurious, labels, g, 0.5), rel=1e-10)


def test_region_loss_all_spurious_is_zero_with_graph():
    f, region_image, _, labels, g = hand_batch()
    tf = as_torch(f, region_image, np.ones(len(f), bool), labels, g)
    tf[0].requires_grad_(True)
    loss = region_aware_loss(*tf)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(tf[0].grad) == 0


def test_region_loss_is_stable_at_small_tau():
    """Cosines near 1 at τ = 0.001 give exp(1000): raw exponentials overflow,
    the log-sum-exp form does not."""
    f, region_image, spurious, labels, g = hand_batch()
    loss = region_aware_loss(*as_torch(f, region_image, spurious, labels, g), tau=1e-3)
    assert torch.isfinite(loss)
    loss32 = region_aware_loss(*[t.float() if t.is_floating_point() else t
                                 for t in as_torch(f, region_image, spurious, labels, g)], tau=1e-3)
    assert torch.isfinite(loss32)


# --------------------------------------------------------------------------- groups, sampling, DRO

def test_group_ids_and_upsampled_order_balance_groups():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    present = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 1], bool)
    groups = group_ids(labels, present)
    assert groups.tolist() == [1, 1, 1, 1, 1, 0, 2, 2, 2, 3]  # 2·label + present
    order = upsampled_order(groups, torch.Generator().manual_seed(0))
    assert torch.bincount(groups[order], minlength=4).tolist() == [5, 5, 5, 5]  # all at the largest size
    seen = torch.bincount(order, minlength=10).tolist()
    assert seen[:5] == [1, 1, 1, 1, 1]  # the largest group: each member once
    assert seen[5] == 5 and seen[9] == 5  # singleton groups repeated five times
    assert sum(seen[6:9]) == 5 and min(seen[6:9]) >= 1  # 3 members: once each + 2 drawn without replacement
    assert max(seen[6:9]) <= 2


def test_upsampled_order_max_repeat_caps_the_draws_of_small_groups():
    groups = torch.tensor([0] * 10 + [1] + [2] * 4)
    for seed in range(5):
        order = upsampled_order(groups, torch.Generator().manual_seed(seed), max_repeat=3)
        # the singleton drawn 3 times, not 10; the group of 4 reaches the largest size (3·4 ≥ 10)
        assert torch.bincount(groups[order], minlength=3).tolist() == [10, 3, 10]
        seen = torch.bincount(order, minlength=15)
        assert seen[:10].tolist() == [1] * 10 and seen[10] == 3 and seen[11:].max() <= 3
    # a cap above every ratio changes nothing
    uncapped = upsampled_order(groups, torch.Generator().manual_seed(0))
    assert torch.equal(upsampled_order(groups, torch.Generator().manual_seed(0), max_repeat=10), uncapped)
    with pytest.raises(ParamsError, match="max_repeat"):
        TrainConfig(max_repeat=0)


def test_group_dro_step_by_hand():
    per_sample = torch.tensor([1.0, 3.0, 2.0])
    groups = torch.tensor([0, 0, 2])
    q = torch.full((4,), 0.25)
    loss, q_new = group_dro_step(per_sample, groups, q, step_size=0.5)
    w = np.array([math.exp(0.5 * 2.0), 1.0, math.exp(0.5 * 2.0), 1.0])  # group losses 2, 0, 2, 0
    w = w / w.sum()
    assert q_new.numpy() == pytest.approx(w)
    assert loss.item() == pytest.approx(w[0] * 2.0 + w[2] * 2.0)


def _findings(*features: dict, **fields) -> Findings:
    """A findings record of dataset 'd' whose features carry only what is given."""
    feats = [Feature(score=0.0, influence=None, **f) for f in features]
    return Findings(model=None, dataset="d", classes=[], k=len(feats), silhouette=None, features=feats, **fields)


def _ids(features: list[Feature]) -> list[int]:
    return [f.cluster_id for f in features]


def test_select_features():
    findings = _findings({"rank": 2, "cluster_id": 5}, {"rank": 1, "cluster_id": 3})
    assert _ids(select_features(findings)) == [3, 5]
    assert _ids(select_features(findings, "top1")) == [3]
    with pytest.raises(MitigationError, match="name no spurious feature"):
        select_features(_findings())
    assert _ids(select_features(findings, "all")) == [3, 5]
    with pytest.raises(MitigationError, match="one of called, significant, all, top1, rank1 or a count, got 'most'"):
        select_features(findings, "most")
    # with significance, only called features count unless 'all' is asked for
    called = _findings({"rank": 1, "cluster_id": 3, "called": False},
                       {"rank": 2, "cluster_id": 5, "called": True},
                       {"rank": 3, "cluster_id": 7, "called": True})
    assert _ids(select_features(called)) == [5, 7]
    assert _ids(select_features(called, "top1")) == [5]
    assert _ids(select_features(called, 1)) == [5]
    assert _ids(select_features(called, "all")) == [3, 5, 7]
    assert _ids(select_features(called, "rank1")) == [3]  # the reference code's choice: rank 1, called or not
    none_called = _findings({"rank": 1, "cluster_id": 3, "called": False})
    with pytest.raises(MitigationError, match="called significant.*--features all"):
        select_features(none_called)
    assert _ids(select_features(none_called, "all")) == [3]


def _support(ok):
    return {"causal": {"support": {"supported": ok, "p_value": 0.001 if ok else 1.0}}}


def test_select_features_leaves_out_what_masking_refutes():
    findings = _findings(
        {"rank": 1, "cluster_id": 3, "called": True, **_support(False)},   # an "absence" cluster
        {"rank": 2, "cluster_id": 5, "called": True, **_support(True)},
        {"rank": 3, "cluster_id": 7, "called": True},                      # not checked: kept
        {"rank": 4, "cluster_id": 9, "called": False, **_support(True)})
    assert _ids(select_features(findings)) == [5, 7]
    assert _ids(select_features(findings, "top1")) == [5]
    assert _ids(select_features(findings, "significant")) == [3, 5, 7]
    assert _ids(select_features(findings, "all")) == [3, 5, 7, 9]
    refuted = _findings({"rank": 1, "cluster_id": 3, "called": True, **_support(False)},
                        {"rank": 2, "cluster_id": 4, "called": True, **_support(False)})
    with pytest.raises(MitigationError, match=r"supports no called feature \(ranks 1, 2.*--features significant"):
        select_features(refuted)
    assert _ids(select_features(refuted, "significant")) == [3, 4]


def test_select_features_reads_findings_from_json():
    """The selection is the same on a record read back from its JSON form."""
    findings = _findings({"rank": 1, "cluster_id": 3, "called": True, **_support(False)},
                         {"rank": 2, "cluster_id": 5, "called": True, **_support(True)})
    again = Findings.from_dict(findings.to_dict())
    assert _ids(select_features(again)) == _ids(select_features(findings)) == [5]


# --------------------------------------------------------------------------- gradient coverage

def tiny_batch(lm, n=4, classes=("zero", "one", "two")):
    torch.manual_seed(0)
    pixels = torch.randn(n, 3, lm.image_size, lm.image_size)
    s = lm.image_size / 2
    quads = torch.tensor([[0, 0, s, s], [s, 0, 2 * s, s], [0, s, s, 2 * s], [s, s, 2 * s, 2 * s]])
    labels = torch.tensor([k % len(classes) for k in range(n)])
    tokens = lm.tokenizer([f"a {classes[k]}" for k in labels])
    data = TrainData(pixels, tokens, labels, list(classes))
    data.extras["boxes"] = [quads.clone() for _ in range(n)]
    data.extras["spurious"] = [torch.tensor([False, True, False, False]) for _ in range(n)]
    data.extras["spurious_class"] = [torch.tensor([-1, 0, -1, -1]) for _ in range(n)]  # tied to class 0
    data.extras["groups"] = group_ids(labels, np.array([k % 2 == 0 for k in range(n)]))
    data.extras["class_tokens"] = lm.tokenizer([f"a {c}" for c in classes])
    data.extras["attribute_tokens"] = lm.tokenizer(["a red square"])
    batch = {"index": torch.arange(n), "pixels": pixels, "tokens": tokens, "labels": labels}
    return data, batch


def load_unzeroed(arch):
    """A tiny model whose zero-initialised parameters (open_clip's bn3 and
    similar) are made non-zero, since a zero weight zeroes every gradient
    upstream of it and would hide a broken path."""
    lm = load_model(arch, seed=0)
    with torch.no_grad():
        for p in lm.model.parameters():
            if torch.count_nonzero(p) == 0:
                p.fill_(0.5)
    return lm


@pytest.mark.parametrize("arch", ["ravl-tiny-rn", "ravl-tiny-vit"])
@pytest.mark.parametrize("lock_text", [False, True])
def test_gradient_coverage(arch, lock_text):
    """Exactly the trainable parameters get (non-zero) gradients, for every
    registered method's loss; with ``lock_text`` the text tower gets none."""
    lm = load_unzeroed(arch)
    trainable = {id(p) for p in configure_trainable(lm.model, lock_text)}
    text_params = {id(p) for n, p in lm.model.named_parameters()
                   if not n.startswith("visual.") and n != "logit_scale"}
    assert text_params and (not lock_text or not (text_params & trainable))
    assert lock_text or text_params <= trainable
    data, batch = tiny_batch(lm)
    assert {"ravl", "upsampled", "vl-erm", "vl-gdro"} <= set(METHODS)
    for method in sorted(METHODS):
        cfg = TrainConfig(method=method, lock_text=lock_text)
        state = {}
        if METHODS[method].prepare is not None:
            METHODS[method].prepare(data, cfg, state)
        lm.model.zero_grad(set_to_none=True)
        METHODS[method].loss(lm.model, batch, data, cfg, state).backward()
        for name, p in lm.model.named_parameters():
            if id(p) in trainable:
                assert p.grad is not None and torch.count_nonzero(p.grad) > 0, f"{method}: {name} got no gradient"
            else:
                assert p.grad is None, f"{method}: frozen {name} got a gradient"


def test_region_term_reaches_the_backbone_through_regions():
    """With λ = 0 only L_R + L_A remains; it still trains the visual tower
    (through the RoI path) and the text tower (through g(y)), but not the
    logit scale, which only the CLIP term uses."""
    lm = load_unzeroed("ravl-tiny-rn")
    data, batch = tiny_batch(lm)
    loss = methods.ravl_loss(lm.model, batch, data, TrainConfig(method="ravl", lam=0.0), {})
    loss.backward()
    assert torch.count_nonzero(lm.model.visual.layer4[0].conv1.weight.grad) > 0
    assert torch.count_nonzero(lm.model.visual.layer1[0].conv1.weight.grad) > 0
    assert torch.count_nonzero(lm.model.text_projection.grad) > 0
    assert lm.model.logit_scale.grad is None or lm.model.logit_scale.grad.item() == 0.0


@pytest.mark.parametrize("arch", ["ravl-tiny-rn", "ravl-tiny-vit"])
def test_region_term_trains_through_the_region_views(arch):
    """When every image is a non-square photo, the region term reads only
    the region views: with λ = 0 its gradient still reaches the trunk (and
    a ViT's interpolated position embedding), and changing a view changes
    the loss."""
    lm = load_unzeroed(arch)
    data, batch = tiny_batch(lm)
    with_region_views(lm, data, every=1)
    cfg = TrainConfig(method="ravl", lam=0.0)
    loss = methods.ravl_loss(lm.model, batch, data, cfg, {})
    loss.backward()
    visual = lm.model.visual
    first = visual.conv1.weight
    assert torch.count_nonzero(first.grad) > 0
    if arch == "ravl-tiny-vit":
        assert torch.count_nonzero(visual.positional_embedding.grad) > 0
    data.extras["views"][0] = torch.full_like(data.extras["views"][0], 2.0)
    with torch.no_grad():
        assert not torch.isclose(methods.ravl_loss(lm.model, batch, data, cfg, {}), loss.detach())


def test_methods_refuse_train_data_without_their_extras():
    lm = load_model("ravl-tiny-rn", seed=0)
    data, batch = tiny_batch(lm)
    data.extras.clear()
    for name, method in METHODS.items():
        if method.needs_findings or method.needs_labels:
            with pytest.raises(TrainError, match=r"pipeline\.stages\.train"):
                method.loss(lm.model, batch, data, TrainConfig(method=name), {})


# --------------------------------------------------------------------------- end to end on a tiny setting

@pytest.fixture(scope="module")
def tiny_stage2(tmp_path_factory):
    """A two-class setting, an initialisation and a differently seeded
    'audited' model of the same architecture, and findings whose feature
    cluster is the red-square medoid (hand-picked, so the test does not
    depend on clustering)."""
    from ravl_pipeline.core.embed import embed_dataset
    from ravl_pipeline.core.findings import write_findings
    from ravl_pipeline.experiments.synth import SynthConfig, make_setting
    from ravl_pipeline.io.dataset import load_dataset
    from ravl_pipeline.models import save_model

    root = tmp_path_factory.mktemp("stage2")
    make_setting(root / "setting", SynthConfig(classes=["one", "nine"], n_pretrain=4, n_finetune=40, n_val=8,
                                               n_test=8, strength=0.9, seed=5))
    save_model(load_model("ravl-tiny-rn", seed=0), root / "init")
    save_model(load_model("ravl-tiny-rn", seed=1), root / "audited")
    audited = load_model(f"local-dir:{root / 'audited'}")
    val = load_dataset(root / "setting" / "eval", split="val")
    emb = embed_dataset(audited, val, progress=False)
    flat = [lab for labs in val.region_labels for lab in labs]
    digit = next(r for r, (i, lab) in enumerate(zip(emb.region_image, flat)) if lab == val.labels[i])
    medoids = [flat.index("red square"), flat.index("empty"), digit]
    findings = Findings(model=f"local-dir:{root / 'audited'}", dataset=str(val.root), classes=["one", "nine"],
                        k=3, silhouette=0.5, medoids=medoids, proposer="quadrants", embedding_mode=emb.mode,
                        medoid_embeddings=emb.region_emb[medoids].tolist(),
                        features=[Feature(rank=1, cluster_id=0, score=1.0, influence=1.0, attribute="nine",
                                          per_class=[], regions=[])])
    write_findings(findings, root / "findings.json")
    return root, findings


def _cfg(method, **kw):
    from ravl_pipeline.experiments.synth import CAPTION_TEMPLATE
    return TrainConfig(method=method, max_steps=2, batch_size=16, caption_template=CAPTION_TEMPLATE, **kw)


def test_spurious_assignment_finds_the_feature_regions(tiny_stage2):
    from ravl_pipeline.io.dataset import load_dataset

    root, findings = tiny_stage2
    ds = load_dataset(root / "setting" / "finetune")
    a = assign_spurious_regions(load_model(findings.model), ds, findings)
    truth = np.array([lab == "red square" for labs in ds.region_labels for lab in labs])
    assert len(a.spurious) == 4 * len(ds)
    assert (a.spurious == truth).mean() >= 0.95  # identical red squares sit on their medoid
    assert a.image_has_feature().sum() == pytest.approx(truth.reshape(-1, 4).any(1).sum(), abs=2)


def test_train_records_findings_and_caches(tiny_stage2, tmp_path):
    root, findings = tiny_stage2
    base, train_dir = f"local-dir:{root / 'init'}", root / "setting" / "finetune"
    hist = stages.train(base, train_dir, tmp_path / "ravl", _cfg("ravl"), findings=findings,
                        audited_model=findings.model, cache_dir=tmp_path / "cache",
                        findings_path=root / "findings.json")
    assert hist["steps"] == 2 and all(math.isfinite(x) for x in hist["losses"])
    meta = json.loads((tmp_path / "ravl" / "ravl_model.json").read_text())
    assert meta["method"] == "ravl" and meta["train"]["lam"] == 0.8
    assert meta["audited_model"] == findings.model
    assert meta["findings"]["sha256"] == json_sha256(findings.to_dict())
    assert meta["findings"]["content"] == findings.to_dict()
    assert meta["findings"]["file_sha256"] == file_sha256(root / "findings.json")
    assert [f["cluster_id"] for f in meta["findings"]["features_used"]] == [0]
    groups = meta["spurious_regions"]["groups"]
    assert sum(g["n"] for g in groups) == 40 and len(groups) == 4
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".parquet"
    stamp = cached[0].stat().st_mtime_ns
    stages.train(base, train_dir, tmp_path / "up", _cfg("upsampled"), findings=findings,
                 audited_model=findings.model, cache_dir=tmp_path / "cache")
    assert [p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()] == [stamp]  # reused, not rewritten
    assert load_model(f"local-dir:{tmp_path / 'ravl'}").architecture == "resnet"


def test_train_refuses_other_architecture(tiny_stage2, tmp_path):
    root, findings = tiny_stage2
    with pytest.raises(ModelError, match="different architecture"):
        stages.train(f"local-dir:{root / 'init'}", root / "setting" / "finetune", tmp_path / "m", _cfg("ravl"),
                     findings=findings, audited_model="ravl-tiny-vit")
    assert not (tmp_path / "m").exists()


def test_cli_finetune_mitigated_and_its_errors(tiny_stage2, tmp_path, capsys):
    from ravl_pipeline.cli import main

    root, findings = tiny_stage2
    base = ["finetune", "--model", f"local-dir:{root / 'init'}", "--data", str(root / "setting" / "finetune"),
            "--max-steps", "1", "--batch-size", "16", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "a"), "--method", "ravl"]) == 2
    assert "needs Stage-1 findings" in capsys.readouterr().err
    empty = dict(findings.to_dict(), features=[])
    (tmp_path / "empty.json").write_text(json.dumps(empty))
    assert main(base + ["--out", str(tmp_path / "b"), "--method", "upsampled",
                        "--findings", str(tmp_path / "empty.json")]) == 2
    assert "name no spurious feature" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "c"), "--method", "ravl", "--findings", str(root / "findings.json"),
                        "--audited-model", "ravl-tiny-vit"]) == 2
    assert "different architecture" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")
    assert main(base + ["--out", str(tmp_path / "d"), "--method", "vl-gdro", "--findings",
                        str(root / "findings.json"), "--cache-dir", str(tmp_path / "cache")]) == 0
    meta = json.loads((tmp_path / "d" / "ravl_model.json").read_text())
    assert meta["method"] == "vl-gdro" and meta["findings"]["file_sha256"] is not None


def test_cli_stage2_resolves_left_out_flags_as_the_pipeline(tiny_stage2, tmp_path, capsys):
    """``ravl finetune --findings`` takes what its flags leave out from the
    audited model's recorded fine-tuning and Stage 2's defaults (the step
    floor), as the pipeline's Stage 2 does; flags given win; without
    ``--findings`` the definition's defaults stand; a recorded configuration
    out of range is refused naming the checkpoint, nothing written."""
    from ravl_pipeline.cli import main
    from ravl_pipeline.config import MitigationConfig, stage2_config
    from ravl_pipeline.models import save_model

    root, _ = tiny_stage2
    recorded = TrainConfig(epochs=2.5, batch_size=16, lr=1e-4, seed=7, max_steps=1, tau=0.05).to_dict()
    save_model(load_model(f"local-dir:{root / 'audited'}"), tmp_path / "audited", {"train": recorded})
    data = ["--model", f"local-dir:{root / 'init'}", "--data", str(root / "setting" / "finetune")]
    stage2 = ["finetune", *data, "--method", "ravl", "--findings", str(root / "findings.json"),
              "--audited-model", f"local-dir:{tmp_path / 'audited'}"]

    def trained(name):
        return json.loads((tmp_path / name / "ravl_model.json").read_text())

    assert main(stage2 + ["--out", str(tmp_path / "a")]) == 0
    assert "at least 256 steps (flags left out: the audited model's fine-tuning" in capsys.readouterr().out
    train = trained("a")["train"]
    assert (train["epochs"], train["batch_size"], train["lr"], train["seed"], train["tau"]) == (2.5, 16, 1e-4, 7, 0.05)
    assert train["min_steps"] == MitigationConfig.min_steps == 256 and train["method"] == "ravl"
    assert trained("a")["history"]["steps"] == 1  # the recorded max_steps wins over the floor
    assert train == stage2_config(recorded, method="ravl", caption_template=train["caption_template"]).to_dict()

    assert main(stage2 + ["--out", str(tmp_path / "b"), "--lr", "2e-4", "--min-steps", "3", "--seed", "1",
                          "--quiet"]) == 0
    train = trained("b")["train"]
    assert (train["lr"], train["min_steps"], train["seed"], train["epochs"]) == (2e-4, 3, 1, 2.5)

    assert main(["finetune", *data, "--out", str(tmp_path / "c"), "--max-steps", "1", "--quiet"]) == 0
    train = trained("c")["train"]
    assert (train["epochs"], train["min_steps"], train["seed"], train["lr"]) == (4.0, None, 0, 5e-4)

    save_model(load_model(f"local-dir:{root / 'audited'}"), tmp_path / "bad", {"train": dict(recorded, lr=-1)})
    capsys.readouterr()
    assert main(stage2[:-1] + [f"local-dir:{tmp_path / 'bad'}", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad' / 'ravl_model.json'}, key 'train'" in err and "lr" in err and err.count("\n") == 1
    assert not (tmp_path / "d").exists()


def with_region_views(lm, data, every: int = 2):
    """Give every ``every``-th image of ``data`` a landscape region view (a
    non-square photo), its boxes the view's quadrants."""
    s = lm.image_size
    w = s * 3 // 2
    views = []
    for i in range(len(data)):
        if i % every:
            views.append(None)
            continue
        views.append(torch.randn(3, s, w))
        data.extras["boxes"][i] = torch.tensor([[0, 0, w / 2, s / 2], [w / 2, 0, w, s / 2],
                                                [0, s / 2, w / 2, s], [w / 2, s / 2, w, s]])
    data.extras["views"] = views
    return data


@pytest.mark.parametrize("views", [False, True])
def test_region_pass_leaves_batchnorm_running_stats_to_images(views):
    """A RaVL step updates BatchNorm running statistics exactly as a
    Standard FT step on the same images does (the RoI pass, and the trunk
    pass over non-square images' region views, are excluded)."""
    import copy

    lm = load_model("ravl-tiny-rn", seed=0)
    data, batch = tiny_batch(lm)
    if views:
        with_region_views(lm, data)
    initial = {n: t.clone() for n, t in lm.model.named_buffers()}
    a, b = lm.model, copy.deepcopy(lm.model)
    a.train(), b.train()
    methods.ravl_loss(a, batch, data, TrainConfig(method="ravl"), {})
    methods.standard_loss(b, batch, data, TrainConfig(), {})
    stats_a, stats_b = dict(a.named_buffers()), dict(b.named_buffers())
    moved = [n for n in stats_a if "running_mean" in n and not torch.equal(stats_a[n], initial[n])]
    assert moved, "training mode should update some running statistics"
    for name in stats_a:
        if "running" in name:
            assert torch.allclose(stats_a[name], stats_b[name], atol=1e-6), name
    momenta = {m.momentum for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.1}  # restored after the step



# --------------------------------------------------------------------------- the correlated form, Spurious-Aware

@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_correlated_region_loss_matches_direct_formulas(tau):
    f, region_image, spurious, labels, g = hand_batch()
    spurious_class = np.where(spurious, [0, 0, 0, 0, 0, 1, 0], -1)  # region 2 ↔ class 0, region 5 ↔ class 1
    tf = as_torch(f, region_image, spurious, labels, g)
    got = region_aware_loss(*tf, tau=tau, form="correlated", spurious_class=torch.tensor(spurious_class)).item()
    assert got == pytest.approx(direct_loss(f, region_image, spurious, labels, g, tau, spurious_class),
                                rel=1e-10)
    r, a = region_aware_loss(*tf, tau=tau, form="correlated", spurious_class=torch.tensor(spurious_class), parts=True)
    assert (r + a).item() == pytest.approx(got, rel=1e-12)
    # a spurious region of a class no image in the batch has leaves every L_A alone
    other = np.where(spurious, 1, -1)
    correlated_a = region_aware_loss(*tf, tau=tau, form="correlated", spurious_class=torch.tensor(other),
                                     parts=True)[1]
    spec_a = region_aware_loss(*tf, tau=tau, parts=True)[1]
    assert correlated_a.item() < spec_a.item()  # SPEC's form pushes every text from them; this one none here


def test_correlated_region_loss_ignores_a_spurious_region_without_a_class():
    """A spurious region whose feature's class is not among the texts (−1)
    enters neither denominator: not pushed from the last class text by
    negative indexing."""
    f, region_image, spurious, labels, g = hand_batch()
    spurious_class = np.where(spurious, [0, 0, 0, 0, 0, -1, 0], -1)  # region 5: spurious, no class
    got = region_aware_loss(*as_torch(f, region_image, spurious, labels, g), tau=0.5, form="correlated",
                            spurious_class=torch.tensor(spurious_class)).item()
    assert got == pytest.approx(direct_loss(f, region_image, spurious, labels, g, 0.5, spurious_class), rel=1e-10)
    keep = np.arange(len(f)) != 5  # the same batch without region 5 at all
    without = region_aware_loss(*as_torch(f[keep], region_image[keep], spurious[keep], labels, g), tau=0.5,
                                form="correlated", spurious_class=torch.tensor(spurious_class[keep])).item()
    assert got == pytest.approx(without, rel=1e-12)


def test_region_loss_parts_add_up_to_the_spec_loss():
    batch = as_torch(*hand_batch())
    r, a = region_aware_loss(*batch, tau=0.5, parts=True)
    assert (r + a).item() == pytest.approx(region_aware_loss(*batch, tau=0.5).item(), rel=1e-12)
    with pytest.raises(ValueError, match="one of spec, correlated"):
        region_aware_loss(*batch, form="nope")
    with pytest.raises(ValueError, match="correlated class of every spurious region"):
        region_aware_loss(*batch, form="correlated")


def direct_spurious_aware(f, labels, t, a):
    """Spurious-Aware's terms with loops over pairs (cosines of unit vectors)."""
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    f = [unit(v) for v in f]
    t = [unit(v) for v in t]
    a = [unit(v) for v in a]
    cos = lambda u, v: float(u @ v)  # noqa: E731
    n, c = len(f), len(t)
    same = [cos(f[i], f[j]) for i in range(n) for j in range(n) if i != j and labels[i] == labels[j]]
    diff = [cos(f[i], f[j]) for i in range(n) for j in range(n) if labels[i] != labels[j]]
    text = [cos(t[y], t[z]) for y in range(c) for z in range(c) if y != z]
    own = [cos(f[i], t[labels[i]]) for i in range(n)]
    other = [cos(f[i], t[y]) for i in range(n) for y in range(c) if y != labels[i]]
    present = sorted(set(labels))
    return {"image": -np.mean(same) + np.mean(diff), "text": np.mean(text), "class": -np.mean(own) + np.mean(other),
            "spurious_image": np.mean([abs(cos(f[i], a[s])) for i in range(n) for s in range(len(a))]),
            "spurious_text": np.mean([abs(cos(t[y], a[s])) for y in present for s in range(len(a))])}


def test_spurious_aware_terms_match_a_direct_computation():
    from ravl_pipeline.mitigate.losses import spurious_aware_terms

    rng = np.random.default_rng(3)
    f = rng.normal(size=(5, 4)) * rng.uniform(0.5, 3, size=(5, 1))  # any norm
    labels = np.array([0, 2, 0, 2, 0])  # class 1 absent from the batch
    t = rng.normal(size=(3, 4))
    a = rng.normal(size=(2, 4))
    got = spurious_aware_terms(torch.tensor(f), torch.tensor(labels), torch.tensor(t), torch.tensor(a))
    want = direct_spurious_aware(f, labels, t, a)
    assert set(got) == set(want)
    for k in want:
        assert got[k].item() == pytest.approx(want[k], rel=1e-10), k
    # an attribute text orthogonal to everything costs nothing; one equal to an image costs it |cos| = 1
    e = np.eye(4)
    zero = spurious_aware_terms(torch.tensor(e[:2]), torch.tensor([0, 1]), torch.tensor(e[:2]), torch.tensor(e[3:]))
    assert zero["spurious_image"].item() == 0.0 and zero["spurious_text"].item() == 0.0
    assert zero["image"].item() == 0.0  # no same-class pair, orthogonal images of different classes
    one = spurious_aware_terms(torch.tensor(e[:2]), torch.tensor([0, 1]), torch.tensor(e[2:4]), torch.tensor(e[:1]))
    assert one["spurious_image"].item() == pytest.approx(0.5)


def test_spurious_aware_method_is_clip_plus_the_terms():
    lm = load_unzeroed("ravl-tiny-rn")
    data, batch = tiny_batch(lm)
    state = {}
    loss = METHODS["spurious-aware"].loss(lm.model, batch, data, TrainConfig(method="spurious-aware"), state)
    terms = state["terms"]
    assert set(terms) == {"clip", "image", "text", "class", "spurious_image", "spurious_text"}
    assert loss.item() == pytest.approx(sum(t.item() for t in terms.values()), rel=1e-6)
    assert METHODS["spurious-aware"].needs_attribute_text and not METHODS["spurious-aware"].needs_findings


def test_correlated_loss_warns_and_records_a_finding_without_a_class(tiny_stage2, tmp_path, capsys):
    """Under the ``correlated`` region loss a finding whose ``attribute`` is
    not a training class pushes its regions from no class text: said on
    stderr and recorded in the checkpoint's record, not silent."""
    import dataclasses

    root, findings = tiny_stage2
    orphan = dataclasses.replace(findings, features=[dataclasses.replace(findings.features[0], attribute=None)])
    stages.train(f"local-dir:{root / 'init'}", root / "setting" / "finetune", tmp_path / "m", _cfg("ravl"),
                 findings=orphan, audited_model=findings.model)
    err = capsys.readouterr().err
    assert "warning:" in err and "feature rank(s) 1 name no training class" in err
    meta = json.loads((tmp_path / "m" / "ravl_model.json").read_text())
    assert any("region_loss 'correlated'" in w for w in meta["warnings"])
    # with the class named, or under the spec form, there is nothing to warn about
    stages.train(f"local-dir:{root / 'init'}", root / "setting" / "finetune", tmp_path / "s",
                 _cfg("ravl", region_loss="spec"), findings=orphan, audited_model=findings.model)
    assert "warning:" not in capsys.readouterr().err
    assert "warnings" not in json.loads((tmp_path / "s" / "ravl_model.json").read_text())


@pytest.mark.parametrize("extra", [["--method", "vl-erm"], ["--method", "spurious-aware", "--attribute-text", "red"],
                                   ["--method", "standard", "--audited-model", "AUDITED"]])
def test_cli_baselines_get_stage2s_step_rule_without_findings(tiny_stage2, tmp_path, capsys, extra):
    """A baseline to Stage 2 (any method but plain ``standard``, or
    ``standard`` named against an audited model) resolves its budget as
    Stage 2 does, findings or not; plain fine-tuning says it has no floor."""
    from ravl_pipeline.cli import main

    root, findings = tiny_stage2
    extra = [findings.model if x == "AUDITED" else x for x in extra]
    base = ["finetune", "--model", f"local-dir:{root / 'init'}", "--data", str(root / "setting" / "finetune"),
            "--max-steps", "1", "--batch-size", "16"]
    assert main(base + ["--out", str(tmp_path / "b"), *extra]) == 0
    out = capsys.readouterr().out
    assert "Stage 2:" in out and "at least 256 steps" in out
    assert main(base + ["--out", str(tmp_path / "p")]) == 0
    assert "plain fine-tuning" in capsys.readouterr().out
    # recorded in the checkpoint too, not only printed
    assert "no Stage 2 step floor" in json.loads((tmp_path / "p" / "ravl_model.json").read_text())["budget"]
    assert "budget" not in json.loads((tmp_path / "b" / "ravl_model.json").read_text())


def test_cli_evaluate_forms_groups_from_the_findings_where_the_data_names_no_feature(tiny_stage2, tmp_path, capsys):
    import shutil

    from ravl_pipeline.cli import main
    from ravl_pipeline.core.metrics import feature_presence
    from ravl_pipeline.io.dataset import load_dataset

    root, findings = tiny_stage2
    data = tmp_path / "eval"
    shutil.copytree(root / "setting" / "eval", data)  # setting.json stays behind: no annotated feature
    out = tmp_path / "metrics.json"
    base = ["evaluate", "--model", findings.model, "--data", str(data), "--out", str(out), "--min-group-size", "1",
            "--quiet"]
    assert main(base + ["--findings", str(root / "findings.json")]) == 0
    assert "(groups from findings)" in capsys.readouterr().out
    m = json.loads(out.read_text())
    assert m["groups_from"] == "findings" and {r["feature"] for r in m["groups"]} == {"finding 1"}
    assert m["by_feature"][0]["class"] == "nine"
    # the finding's medoid is a red square: its groups are the planted ones
    planted = feature_presence(load_dataset(data, split="test").region_labels, "red square")
    present = sum(r["n"] for r in m["groups"] if r["feature_present"])
    assert present == planted.sum()
    # without --findings the groups are the classes, and the metrics say so
    assert main(base) == 0
    assert json.loads(out.read_text())["groups_from"] == "class"
