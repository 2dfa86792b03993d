"""Synthetic settings (SPEC §4.1): achieved correlation, ground truth that
matches the pixels, captions, reproducibility."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.io.manifest import MANIFEST_NAME
from ravl_pipeline.experiments.synth import (
    CAPTION_TEMPLATE,
    DIGIT_CLASSES,
    EMPTY_REGION,
    QUADRANT_BOXES,
    SHAPES,
    FeatureSpec,
    SynthConfig,
    _digit_pools,
    cramers_v,
    feature_rates_for_v,
    make_setting,
    phi_coefficient,
)

SMALL = dict(n_pretrain=200, n_finetune=200, n_val=100, n_test=100)


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("setting")
    return out, make_setting(out, SynthConfig(strength=0.9, **SMALL))


def _presence(ds, feature: str) -> np.ndarray:
    return np.array([feature in regions for regions in ds.region_labels])


def _is_class(ds, name: str) -> np.ndarray:
    return np.array(ds.labels) == name


# ---------------------------------------------------------------- statistics


def test_cramers_v_on_hand_computed_tables() -> None:
    t, f = True, False
    # n11=1, n10=1, n01=0, n00=2: |1*2 - 1*0| / sqrt(2*2*1*3)
    assert cramers_v(np.array([t, t, f, f]), np.array([t, f, f, f])) == pytest.approx(2 / np.sqrt(12))
    assert cramers_v(np.array([t, f, t, f]), np.array([t, f, t, f])) == pytest.approx(1.0)
    assert cramers_v(np.array([t, f, t, f]), np.array([f, t, f, t])) == pytest.approx(1.0)
    assert phi_coefficient(np.array([t, f, t, f]), np.array([f, t, f, t])) == pytest.approx(-1.0)
    assert cramers_v(np.array([t, f, t, f]), np.array([t, t, f, f])) == 0.0
    assert cramers_v(np.array([t, t, t]), np.array([t, f, t])) == 0.0  # degenerate margin


def test_feature_rates_for_v() -> None:
    assert feature_rates_for_v(0.9, 0.1) == pytest.approx((0.91, 0.01))
    assert feature_rates_for_v(0.0, 0.25) == pytest.approx((0.25, 0.25))
    assert feature_rates_for_v(1.0, 0.1) == pytest.approx((1.0, 0.0))
    # the rates reproduce P(feature) = q and phi = v in expectation
    p1, p0 = feature_rates_for_v(0.6, 0.2)
    joint = 0.2 * p1
    assert joint + 0.8 * p0 == pytest.approx(0.2)
    assert (joint - 0.2**2) / (0.2 * 0.8) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        feature_rates_for_v(1.2, 0.1)


# ---------------------------------------------------------------- a setting


def test_datasets_are_valid_manifest_dirs(setting) -> None:
    out, info = setting
    sizes = {"pretrain": 200, "finetune": 200, "eval": 200}
    for name, n in sizes.items():
        ds = load_dataset(out / name, classes=DIGIT_CLASSES, require_labels=True)
        assert len(ds) == n
        assert all(p.startswith("images/") and p.endswith(".png") for p in ds.paths)
        assert all(b.tolist() == [list(q) for q in QUADRANT_BOXES] for b in ds.boxes)
    assert load_dataset(out / "pretrain").splits == ["train"] * 200
    assert load_dataset(out / "eval").splits == ["val"] * 100 + ["test"] * 100
    for split in ("val", "test"):
        ds = load_dataset(out / "eval", split=split, classes=DIGIT_CLASSES, require_labels=True)
        assert set(np.unique(ds.labels, return_counts=True)[1]) == {10}  # balanced
    assert json.loads((out / "setting.json").read_text()) == info
    assert sorted(p.name for p in out.iterdir()) == ["eval", "finetune", "pretrain", "setting.json"]


def test_achieved_correlation(setting) -> None:
    out, info = setting
    finetune = load_dataset(out / "finetune")
    v = cramers_v(_presence(finetune, "red square"), _is_class(finetune, "nine"))
    assert abs(v - 0.9) <= 0.05
    assert phi_coefficient(_presence(finetune, "red square"), _is_class(finetune, "nine")) > 0
    assert info["stats"]["finetune"]["features"]["red square"]["cramers_v"] == pytest.approx(v)
    eval_ds = load_dataset(out / "eval")
    assert cramers_v(_presence(eval_ds, "red square"), _is_class(eval_ds, "nine")) < 0.15
    assert _presence(eval_ds, "red square").mean() == pytest.approx(0.5)
    # the base model's pre-training set is clean by default
    assert _presence(load_dataset(out / "pretrain"), "red square").mean() == 0.0
    for split in ("val", "test"):
        ds = load_dataset(out / "eval", split=split)
        assert cramers_v(_presence(ds, "red square"), _is_class(ds, "nine")) < 0.15
        assert abs(info["stats"][split]["features"]["red square"]["cramers_v"]) < 0.15


def test_region_labels_match_pixels(setting) -> None:
    out, _ = setting
    for name in ("finetune", "eval"):
        ds = load_dataset(out / name)
        for i in range(0, len(ds), 7):
            pixels = np.asarray(ds.load_image(i))
            assert pixels.shape == (56, 56, 3)
            regions = ds.region_labels[i]
            assert regions.count(ds.labels[i]) == 1
            for (x1, y1, x2, y2), region in zip(QUADRANT_BOXES, regions):
                quadrant = pixels[y1:y2, x1:x2]
                if region == "red square":
                    assert (quadrant == [255, 0, 0]).all()
                elif region == EMPTY_REGION:
                    assert not quadrant.any()
                else:  # the digit: grey levels, bright somewhere
                    assert quadrant.max() > 100
                    assert (quadrant[..., 0] == quadrant[..., 1]).all()


def test_captions_name_the_class_only(setting) -> None:
    out, _ = setting
    for name in ("pretrain", "finetune", "eval"):
        ds = load_dataset(out / name)
        assert ds.captions == [CAPTION_TEMPLATE.format(label) for label in ds.labels]
        assert not any("red" in c or "square" in c for c in ds.captions)


def test_same_seed_same_bytes_other_seed_differs(setting, tmp_path: Path) -> None:
    out, info = setting
    again = make_setting(tmp_path / "again", SynthConfig(strength=0.9, **SMALL))
    assert again == info
    for name in ("pretrain", "finetune", "eval"):
        assert (tmp_path / "again" / name / MANIFEST_NAME).read_bytes() == (out / name / MANIFEST_NAME).read_bytes()
    first_image = "images/finetune-000000.png"
    assert (tmp_path / "again" / "finetune" / first_image).read_bytes() == (out / "finetune" / first_image).read_bytes()

    make_setting(tmp_path / "other", SynthConfig(strength=0.9, seed=1, **SMALL))
    a = load_dataset(out / "finetune", check_images=False).table
    b = load_dataset(tmp_path / "other" / "finetune", check_images=False).table
    assert not a.equals(b)


def test_eval_digits_are_unseen_in_training() -> None:
    train, evaluation = _digit_pools(SynthConfig())
    for t, e in zip(train, evaluation):
        assert len(t) > 0 and len(e) > 0 and not set(t) & set(e)


def test_regenerating_replaces_the_datasets(tmp_path: Path) -> None:
    tiny = dict(n_pretrain=10, n_finetune=20, n_val=10, n_test=10)
    make_setting(tmp_path, SynthConfig(**tiny))
    make_setting(tmp_path, SynthConfig(**{**tiny, "n_finetune": 30}))
    assert len(load_dataset(tmp_path / "finetune")) == 30
    assert len(list((tmp_path / "finetune" / "images").iterdir())) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "finetune", "pretrain", "setting.json"]


def test_several_features_and_a_distractor(tmp_path: Path) -> None:
    cfg = SynthConfig(
        classes=["one", "seven", "nine"],
        features=[FeatureSpec(), FeatureSpec("blue circle", (0, 0, 255), "circle")],
        correlated_classes=["nine", "one"],
        distractors=[FeatureSpec("green stripes", (0, 255, 0), "stripes")],
        strength=1.0,
        n_pretrain=30,
        n_finetune=90,
        n_val=30,
        n_test=30,
    )
    info = make_setting(tmp_path, cfg)
    finetune = load_dataset(tmp_path / "finetune", classes=cfg.classes, require_labels=True)
    assert cramers_v(_presence(finetune, "red square"), _is_class(finetune, "nine")) == pytest.approx(1.0)
    assert cramers_v(_presence(finetune, "blue circle"), _is_class(finetune, "one")) == pytest.approx(1.0)
    for label in cfg.classes:
        assert cramers_v(_presence(finetune, "green stripes"), _is_class(finetune, label)) < 0.15
    for regions in finetune.region_labels:
        objects = [r for r in regions if r != EMPTY_REGION]
        assert len(set(objects)) == len(objects)  # one quadrant per object
    assert info["config"]["features"][1] == {"name": "blue circle", "color": [0, 0, 255], "shape": "circle"}
    assert SynthConfig.from_dict(info["config"]) == cfg


# ---------------------------------------------------------------- features and config


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_stays_in_its_quadrant(shape: str) -> None:
    img = np.zeros((56, 56, 3), dtype=np.uint8)
    FeatureSpec(shape, (10, 20, 30), shape).draw(img, 3)  # BR
    painted = img.any(axis=2)
    assert painted[28:, 28:].sum() >= 100
    assert painted.sum() == painted[28:, 28:].sum()
    assert (img[painted] == [10, 20, 30]).all()


def test_shapes_differ() -> None:
    masks = []
    for shape in SHAPES:
        img = np.zeros((56, 56, 3), dtype=np.uint8)
        FeatureSpec(shape, shape=shape).draw(img, 0)
        masks.append(img.any(axis=2).tobytes())
    assert len(set(masks)) == len(SHAPES)


@pytest.mark.parametrize(
    "changes",
    [
        {"shape_unknown": True},
        {"correlated_class": "ten"},
        {"classes": ["one", "two"]},  # default correlated class "nine" missing
        {"distractors": [FeatureSpec(f"d{i}") for i in range(3)]},  # 4 objects + digit > 4 quadrants
        {"features": [FeatureSpec(), FeatureSpec()]},  # same name twice
        {"strength": 1.5},
        {"n_val": 5},
        {"correlated_classes": ["nine", "one"]},  # two classes for one feature
    ],
)
def test_bad_config_is_refused(changes: dict) -> None:
    with pytest.raises(ValueError):
        if changes.pop("shape_unknown", False):
            FeatureSpec(shape="hexagon")
        else:
            SynthConfig(**changes)
