"""Models and region embeddings (SPEC §1.2, §1.3, §5 checkpoints)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ravl_pipeline.core.embed import (Embeddings, EmbedError, embed_dataset, encode_image_and_regions,
                                      input_boxes, pixel_box, pool_at_size)
from ravl_pipeline.core.scores import ScoresError, class_text_embeddings, zero_shot_probs
from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.io.manifest import write_manifest
from ravl_pipeline.models import (BUILTIN_MODELS, ModelError, check_same_architecture, load_model,
                                  save_model)

_LOADED: dict[str, object] = {}


def _builtin(name: str):
    """A built-in tiny model with seed-0 weights, loaded once per module."""
    if name not in _LOADED:
        _LOADED[name] = load_model(name, seed=0)
    return _LOADED[name]


@pytest.fixture(scope="module", autouse=True)
def _forget_models():
    yield
    _LOADED.clear()


@pytest.fixture(scope="module")
def rn():
    return _builtin("ravl-tiny-rn")


@pytest.fixture(scope="module")
def vit():
    return _builtin("ravl-tiny-vit")


@pytest.fixture()
def small_ds(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    (tmp_path / "img").mkdir()
    for i, (w, h) in enumerate([(56, 56), (80, 56), (56, 90)]):
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image_id": f"im{i}", "path": f"img/{i}.png", "label": "a" if i % 2 else "b",
                     "boxes": [[0, 0, w, h], [0, 0, w / 2, h / 2]], "region_labels": ["all", "tl"]})
    write_manifest(tmp_path, rows)
    return load_dataset(tmp_path)


def _whole_input_reference(lm, pixels: torch.Tensor) -> torch.Tensor:
    """What the box covering the whole preprocessed input must give (SPEC §1.2).

    ResNet: the image embedding itself (layer3 RoI-aligned at its full size is
    layer3, so layer4 and the attention pool see what the image pass saw).
    ViT: every final patch token pooled, then ``ln_post`` and ``proj``; this
    is the image embedding only for a ViT that pools patch tokens, and the
    tiny ViT reads its class token instead.
    """
    if lm.architecture == "resnet":
        return lm.model.encode_image(pixels)
    if lm.architecture == "vit":
        visual = lm.model.visual
        seen = {}
        hook = visual.transformer.register_forward_hook(lambda module, args, out: seen.update(x=out))
        try:
            lm.model.encode_image(pixels)
        finally:
            hook.remove()
        x = seen["x"]
        n_patches = visual.grid_size[0] * visual.grid_size[1]
        pooled = visual.ln_post(x[:, x.shape[1] - n_patches:].mean(dim=1))
        return pooled @ visual.proj if visual.proj is not None else pooled
    raise AssertionError(f"no whole-input identity stated for {lm.architecture!r} models")


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_whole_image_box_reproduces_image_embedding(name):
    """SPEC §1.2 check: the box covering the whole input gives back f(I)
    (ResNet), or all patch tokens pooled (ViT)."""
    lm = _builtin(name)
    torch.manual_seed(1)
    s = float(lm.image_size)
    pixels = torch.randn(4, 3, lm.image_size, lm.image_size)
    whole = [torch.tensor([[0.0, 0.0, s, s], [0.0, 0.0, s / 2, s / 2]])] * 4
    with torch.no_grad():
        image, regions = encode_image_and_regions(lm.model, pixels, whole)
        reference = lm.model.encode_image(pixels)
        expected = _whole_input_reference(lm, pixels)
    cos = F.cosine_similarity(regions[0::2], expected, dim=-1)
    assert torch.all(cos > 0.9999), cos
    assert torch.allclose(regions[0::2], expected, rtol=1e-4, atol=1e-5)
    assert torch.allclose(image, reference, atol=1e-5)
    # a quadrant is not the whole image
    assert not torch.allclose(regions[1::2], regions[0::2], atol=1e-6)


def _crop_box(width: int, height: int, preprocess_cfg: dict) -> list[float]:
    """The part of a ``width`` × ``height`` image the model's own preprocessing keeps."""
    assert preprocess_cfg.get("resize_mode", "shortest") == "shortest"
    side = min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return [x0, y0, x0 + side, y0 + side]


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_box_of_the_models_crop_reproduces_the_image_embedding_in_roi_mode(name, tmp_path):
    """The same identity through :func:`embed_dataset` (mode ``roi``): on a
    square image the box covering the model's own crop is the whole
    preprocessed input, read from the image pass itself. A non-square
    image's regions are read from the whole image at its own aspect ratio,
    so the crop's box there also sees what lies beside the crop (its
    receptive field): close to the image embedding, not equal."""
    lm = _unzeroed(name)
    rng = np.random.default_rng(4)
    rows = []
    (tmp_path / "img").mkdir()
    for i, (w, h) in enumerate([(56, 56), (80, 56), (56, 90)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image_id": f"im{i}", "path": f"img/{i}.png",
                     "boxes": [_crop_box(w, h, lm.preprocess_cfg), [0, 0, w / 2, h / 2]]})
    write_manifest(tmp_path, rows)
    ds = load_dataset(tmp_path)
    emb = embed_dataset(lm, ds, proposer="boxes", mode="roi", progress=False)
    assert emb.mode == "roi"
    pixels = torch.stack([lm.preprocess(ds.load_image(i)) for i in range(len(ds))])
    with torch.no_grad():
        expected = F.normalize(_whole_input_reference(lm, pixels), dim=-1).numpy()
    np.testing.assert_allclose(emb.region_emb[0], expected[0], atol=1e-5)  # square: exact
    if lm.architecture == "resnet":
        np.testing.assert_allclose(emb.region_emb[0], emb.image_emb[0], atol=1e-5)
    crop_cos = np.sum(emb.region_emb[2::2] * expected[1:], axis=1)
    assert np.all(crop_cos > 0.8) and not np.allclose(emb.region_emb[2::2], expected[1:], atol=1e-4), crop_cos
    assert not np.allclose(emb.region_emb[1::2], emb.region_emb[0::2], atol=1e-3)  # a quadrant is not the crop


def _unzeroed(name):
    """A built-in model whose zero-initialised weights (open_clip's last
    BatchNorm of each residual branch) are made non-zero: at random init
    those zeros make a ResNet's features nearly independent of the input,
    which would hide regions that read the wrong pixels."""
    key = f"{name}:unzeroed"
    if key not in _LOADED:
        lm = load_model(name, seed=0)
        with torch.no_grad():
            for p in lm.model.parameters():
                if torch.count_nonzero(p) == 0:
                    p.fill_(0.5)
        _LOADED[key] = lm
    return _LOADED[key]


EDGE_SIZES = [(96, 48), (48, 96), (150, 100), (100, 150)]


def _edge_boxes(w: int, h: int) -> list[list[float]]:
    """Boxes at the left, right, top and bottom edges (outside a centre
    crop of the short side on the long axis), the four corners and the centre."""
    a, b = w / 5, h / 5
    return [[0, 2 * b, a, 3 * b], [w - a, 2 * b, w, 3 * b], [2 * a, 0, 3 * a, b], [2 * a, h - b, 3 * a, h],
            [0, 0, a, b], [w - a, 0, w, b], [0, h - b, a, h], [w - a, h - b, w, h], [2 * a, 2 * b, 3 * a, 3 * b]]


@pytest.fixture()
def edge_ds(tmp_path):
    rng = np.random.default_rng(7)
    (tmp_path / "img").mkdir()
    rows = []
    for i, (w, h) in enumerate(EDGE_SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image_id": f"e{i}", "path": f"img/{i}.png", "label": "a", "boxes": _edge_boxes(w, h)})
    write_manifest(tmp_path, rows)
    return load_dataset(tmp_path)


@pytest.mark.parametrize("view", ["aspect", "letterbox"])
@pytest.mark.parametrize("mode", ["roi", "roi-half"])
@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_boxes_at_every_edge_of_non_square_images_see_their_own_pixels(name, mode, view, edge_ds, tmp_path):
    """SPEC §1.2 "every box sees its own pixels": on 96×48 to 100×150 images,
    boxes at the left, right, top and bottom edges — outside the model's
    centre crop on the long axis — get finite, unit embeddings that differ
    between the boxes of an image, and a box's embedding changes with its
    own pixels."""
    lm = _unzeroed(name)
    emb = embed_dataset(lm, edge_ds, proposer="boxes", mode=mode, progress=False, view=view)
    r = emb.region_emb
    assert r.shape == (len(EDGE_SIZES) * 9, 64) and np.all(np.isfinite(r))
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1.0, atol=1e-5)
    for i in range(len(EDGE_SIZES)):  # no two boxes of an image share a vector
        mine = r[emb.region_image == i]
        diff = np.abs(mine[:, None, :] - mine[None, :, :]).max(axis=2) + np.eye(len(mine))
        assert diff.min() > 1e-5, (i, np.unravel_index(diff.argmin(), diff.shape), diff.min())
    # paint the left-edge box of the first image: its embedding moves
    image = np.asarray(edge_ds.load_image(0)).copy()
    x1, y1, x2, y2 = (int(v) for v in _edge_boxes(*EDGE_SIZES[0])[0])
    image[y1:y2, x1:x2] = 255  # noise becomes a white patch
    Image.fromarray(image).save(edge_ds.image_path(0))
    again = embed_dataset(lm, load_dataset(edge_ds.root), proposer="boxes", mode=mode, progress=False, view=view)
    moved = np.abs(again.region_emb - r).max(axis=1)
    assert moved[0] > 1e-4 and moved[0] == moved[:9].max(), moved[:9]  # before: exactly 0
    np.testing.assert_allclose(again.image_emb[0], emb.image_emb[0], atol=1e-6)  # outside the model's crop


def test_a_box_with_no_area_in_the_region_view_is_an_error(tmp_path, rn):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (96, 48)).save(tmp_path / "img" / "0.png")
    write_manifest(tmp_path, [{"image_id": "thin", "path": "img/0.png", "boxes": [[0, 0, 96, 48],
                                                                                  [10, 10, 10.0001, 20]]}])
    with pytest.raises(EmbedError, match=r"row 0 \(image_id 'thin'\): region 1 .* has no area"):
        embed_dataset(rn, load_dataset(tmp_path), proposer="boxes", progress=False)


def test_pool_at_size_is_the_module_at_its_own_size_and_resizes_otherwise(rn):
    pool = rn.model.visual.attnpool
    side = int(round((pool.positional_embedding.shape[0] - 1) ** 0.5))
    torch.manual_seed(3)
    x = torch.randn(3, pool.k_proj.in_features, side, side)
    with torch.no_grad():
        assert torch.allclose(pool_at_size(pool, x), pool(x), atol=1e-5)
        half = pool_at_size(pool, x[..., : side // 2, : side // 2])
    assert half.shape == (3, pool.c_proj.out_features) and torch.isfinite(half).all()


def test_roi_half_mode(rn, vit, small_ds):
    full = embed_dataset(rn, small_ds, mode="roi", progress=False)
    half = embed_dataset(rn, small_ds, mode="roi-half", progress=False)
    assert half.mode == "roi-half" and half.region_emb.shape == full.region_emb.shape
    assert np.allclose(np.linalg.norm(half.region_emb, axis=1), 1.0, atol=1e-5)
    assert np.allclose(half.image_emb, full.image_emb, atol=1e-6)  # the image pass is unchanged
    # a different computation of the regions (its quality is measured by the discovery benchmark)
    assert not np.allclose(half.region_emb, full.region_emb, atol=1e-3)
    # ViT token pooling has nothing to halve: roi-half is roi
    v = embed_dataset(vit, small_ds, mode="roi-half", progress=False)
    assert v.mode == "roi" and np.allclose(v.region_emb, embed_dataset(vit, small_ds, mode="roi", progress=False).region_emb)


@pytest.mark.parametrize("mode", ["roi", "crop"])
@pytest.mark.parametrize("which", ["rn", "vit"])
def test_region_embeddings_shapes_and_norms(request, small_ds, mode, which):
    lm = request.getfixturevalue(which)
    emb = embed_dataset(lm, small_ds, proposer="boxes", mode=mode, progress=False)
    assert emb.image_emb.shape == (3, 64)
    assert emb.region_emb.shape == (6, 64)
    np.testing.assert_allclose(np.linalg.norm(emb.region_emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb.image_emb, axis=1), 1.0, atol=1e-5)
    assert emb.region_image.tolist() == [0, 0, 1, 1, 2, 2]
    assert emb.region_index.tolist() == [0, 1, 0, 1, 0, 1]
    assert np.all(np.isfinite(emb.region_emb))


def test_crop_of_whole_square_image_equals_image_embedding(rn, small_ds):
    emb = embed_dataset(rn, small_ds.subset([0]), proposer="boxes", mode="crop", progress=False)
    # image 0 is square, so cropping the whole-image box and re-encoding is the image itself
    np.testing.assert_allclose(emb.region_emb[0], emb.image_emb[0], atol=1e-5)


def test_roi_and_crop_agree_on_whole_image_box_resnet(rn, small_ds):
    roi = embed_dataset(rn, small_ds.subset([0]), proposer="boxes", mode="roi", progress=False)
    crop = embed_dataset(rn, small_ds.subset([0]), proposer="boxes", mode="crop", progress=False)
    assert float(roi.region_emb[0] @ crop.region_emb[0]) > 0.99


def test_input_boxes_follow_shortest_side_resize_and_centre_crop():
    cfg = {"resize_mode": "shortest"}
    # 128×64 image → resized to 128×64·(64/64)... short side 64 → scale 1, crop 32 px each side
    out = input_boxes(np.array([[32, 0, 96, 64], [0, 0, 128, 64]]), 128, 64, cfg, 64)
    np.testing.assert_allclose(out, [[0, 0, 64, 64], [0, 0, 64, 64]])
    out = input_boxes(np.array([[0, 0, 28, 28]]), 56, 56, cfg, 64)
    np.testing.assert_allclose(out, [[0, 0, 32, 32]], atol=1e-5)
    squash = input_boxes(np.array([[0, 0, 50, 25]]), 100, 50, {"resize_mode": "squash"}, 64)
    np.testing.assert_allclose(squash, [[0, 0, 32, 32]])


def test_embeddings_round_trip(tmp_path, rn, small_ds):
    emb = embed_dataset(rn, small_ds, proposer="quadrants", progress=False)
    emb.save(tmp_path / "out" / "emb")
    back = Embeddings.load(tmp_path / "out" / "emb")
    np.testing.assert_array_equal(back.region_emb, emb.region_emb)
    np.testing.assert_array_equal(back.boxes, emb.boxes)
    assert back.image_ids == emb.image_ids and back.proposer == "quadrants" and back.mode == "roi"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["emb"]  # no temporary directory left
    with pytest.raises(EmbedError, match="cannot read embeddings"):
        Embeddings.load(tmp_path / "out" / "nothing")
    with pytest.raises(EmbedError, match="unknown embedding mode 'nope'"):
        embed_dataset(rn, small_ds, mode="nope", progress=False)


def test_text_embeddings_and_zero_shot(rn):
    t = class_text_embeddings(rn, ["cat", "dog"], ["a {}", "the {}"])
    assert t.shape == (2, 64)
    np.testing.assert_allclose(t.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    probs = zero_shot_probs(t.numpy(), t.numpy(), tau=0.07)
    assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1.0)
    assert probs[0, 0] > probs[0, 1]
    with pytest.raises(ScoresError, match="placeholder"):
        class_text_embeddings(rn, ["cat"], ["no slot"])


def test_checkpoint_round_trip_and_architecture_check(tmp_path, rn, vit):
    save_model(rn, tmp_path / "ck", meta={"note": "x"})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "open_clip_config.json", "open_clip_model.safetensors", "ravl_model.json"]
    back = load_model(f"local-dir:{tmp_path / 'ck'}")
    x = torch.randn(2, 3, rn.image_size, rn.image_size)
    with torch.no_grad():
        assert torch.equal(back.model.encode_image(x), rn.model.encode_image(x))
    assert back.meta == {"note": "x"}
    check_same_architecture(rn, back)
    with pytest.raises(ModelError, match="different architecture"):
        check_same_architecture(rn, vit)


def test_open_clip_loads_saved_checkpoint_unchanged(tmp_path, rn):
    import open_clip
    save_model(rn, tmp_path / "ck")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'ck'}")
    x = torch.randn(1, 3, rn.image_size, rn.image_size)
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(x), rn.model.encode_image(x), atol=1e-6)


def test_open_clip_name_with_pretrained_file(tmp_path, rn):
    from safetensors.torch import save_file
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in rn.model.state_dict().items()}, str(weights))
    lm = load_model("ravl-tiny-rn", pretrained=str(weights))
    x = torch.randn(1, 3, rn.image_size, rn.image_size)
    with torch.no_grad():
        assert torch.equal(lm.model.encode_image(x), rn.model.encode_image(x))


def test_bad_model_names(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        load_model("nope")
    with pytest.raises(ModelError, match="missing open_clip_config.json"):
        load_model(f"local-dir:{tmp_path}")
    with pytest.raises(ModelError, match="neither a file nor a known tag"):
        load_model("RN50", pretrained="not-a-tag")


def test_random_init_warning_only_for_models_that_are_not_built_in(caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        load_model("ravl-tiny-vit", seed=0)
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_model("RN50", seed=0)  # an open_clip model without weights: the user is told
    assert [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    assert not logging.getLogger().filters  # the filter does not outlive the call


@pytest.mark.parametrize("box, expected", [
    ([1, 1, 1.4, 1.4], (1, 1, 2, 2)),  # a fraction of a pixel: one pixel, not an empty crop
    ([55.8, 0, 56.2, 0.2], (55, 0, 56, 1)),  # at the edge: still inside the image
    ([2.4, 3.6, 20.5, 30.2], (2, 4, 20, 30)),  # an ordinary box: rounded as PIL rounds it
])
def test_a_crop_takes_at_least_one_pixel_inside_the_image(box, expected):
    assert pixel_box(box, 56, 56) == expected
