"""COCO-style synthetic scenes (SPEC §4.3): the analogue of the paper's COCO
settings — one concept, the generator.

Each image is a non-square canvas (landscape or portrait, aspect 5:4, 4:3
or 3:2, short side ``short_side``) on a dark background of a random colour
with pixel noise, holding 2–6 objects of varied size and position, overlaps
allowed:

* the **main object**, a digit (scikit-learn's shipped ``load_digits``,
  upscaled, white), 45–60% of the short side, inside the centre square so
  that a model's own centre crop sees it; its class is the image's class,
  and it is always the largest box (the COCO importer labels an image by its
  largest box);
* the **planted object(s)** (``features``): a coloured shape tied to one
  class at Cramér's V ``strength`` in ``finetune``, independent of the label
  elsewhere; 25–40% of the short side, anywhere on the canvas, edges
  included (where rulers and watermarks sit);
* 1–4 **distractors** drawn from ``vocabulary`` (coloured shapes and
  textured patches), independent of the label, 10–35% of the short side,
  anywhere.

:func:`write_scenes` writes what a user would bring: per dataset
(``pretrain``, ``finetune``, ``eval``) the images and one COCO instances
file per split (``annotations/instances_<split>.json``: ``train`` for the
training sets, ``val`` and ``test`` for ``eval``). :func:`make_scenes_setting`
then imports them with :func:`io.importers.import_coco` — exactly the path
real COCO takes — into dataset directories beside ``setting.json``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..config import InputError
from ..io.files import atomic_dir, write_json_atomic
from ..io.importers import import_coco
from .synth import (CAPTION_TEMPLATE, DIGIT_CLASSES, FeatureSpec, PlantedFeatures, SynthConfig, _as_feature, _balanced_labels,
                    _correlated_presence, _digit_bank, _digit_pools, _independent_presence, cramers_v,
                    phi_coefficient, shape_mask)

__all__ = ["ScenesConfig", "DEFAULT_VOCABULARY", "ASPECTS", "write_scenes", "make_scenes_setting", "scene_splits"]

ASPECTS = (5 / 4, 4 / 3, 3 / 2)
MAIN_SIZE = (0.45, 0.60)  # of the short side
PLANTED_SIZE = (0.25, 0.40)
DISTRACTOR_SIZE = (0.10, 0.35)
MAX_OVERLAP = 0.3  # of the smaller box: objects may overlap, but none hides another
PLACEMENT_TRIES = 30
MAX_OBJECTS = 6
DEFAULT_VOCABULARY = (
    FeatureSpec("blue circle", (0, 90, 255), "circle"),
    FeatureSpec("green triangle", (0, 200, 0), "triangle"),
    FeatureSpec("yellow cross", (255, 220, 0), "cross"),
    FeatureSpec("magenta ring", (230, 0, 230), "ring"),
    FeatureSpec("cyan stripes", (0, 220, 220), "stripes"),
    FeatureSpec("orange checker", (255, 140, 0), "checker"),
    FeatureSpec("grey square", (150, 150, 150), "square"),
)
SPLIT_FILES = {"pretrain": ("train",), "finetune": ("train",), "eval": ("val", "test")}


@dataclass
class ScenesConfig(PlantedFeatures):
    """One scenes setting (SPEC §4.3); the fields shared with
    :class:`~.synth.SynthConfig` mean the same. Distractors are drawn from
    ``vocabulary``, less any planted feature's name; each image has 1 to
    ``MAX_OBJECTS − 1 − len(features)`` of them."""

    classes: list[str] = field(default_factory=lambda: list(DIGIT_CLASSES))
    correlated_class: str = SynthConfig.correlated_class
    features: list[FeatureSpec] = field(default_factory=lambda: [FeatureSpec()])
    correlated_classes: list[str] | None = None
    strength: float = SynthConfig.strength
    vocabulary: list[FeatureSpec] = field(default_factory=lambda: list(DEFAULT_VOCABULARY))
    eval_feature_rate: float = SynthConfig.eval_feature_rate
    pretrain_feature_rate: float = SynthConfig.pretrain_feature_rate
    n_pretrain: int = SynthConfig.n_pretrain
    n_finetune: int = SynthConfig.n_finetune
    n_val: int = SynthConfig.n_val
    n_test: int = SynthConfig.n_test
    short_side: int = 128
    # backgrounds: a random colour below this level plus Gaussian pixel noise. Brighter, noisier ones (48, 6)
    # left the built-in tiny ResNet at chance after the recipe's training (BENCHMARKS.md, scenes)
    background: int = 16
    noise: float = 3.0
    seed: int = SynthConfig.seed

    def __post_init__(self) -> None:
        self._coerce()
        self.vocabulary = [_as_feature(f) for f in self.vocabulary]
        self.check()

    def distractors(self) -> list[FeatureSpec]:
        planted = {f.name for f in self.features}
        return [v for v in self.vocabulary if v.name not in planted]

    def check(self) -> None:
        """Raise ``ValueError`` on an unusable configuration."""
        if any(c not in DIGIT_CLASSES for c in self.classes) or len(set(self.classes)) != len(self.classes) \
                or len(self.classes) < 2:
            raise ValueError(f"classes must be at least 2 distinct names from {DIGIT_CLASSES}, got {self.classes}")
        correlated = self.resolved_correlated_classes()
        if len(correlated) != len(self.features) or any(c not in self.classes for c in correlated + [self.correlated_class]):
            raise ValueError(f"correlated classes {correlated} need one class per feature, among {self.classes}")
        names = [f.name for f in self.features + self.vocabulary]
        if len({f.name for f in self.features}) != len(self.features) or any(n in self.classes for n in names):
            raise ValueError(f"object names must be distinct and differ from the class names: {names}")
        if not 1 <= len(self.features) <= MAX_OBJECTS - 2 or not self.distractors():
            raise ValueError(f"need 1 to {MAX_OBJECTS - 2} features and at least one distractor kind")
        for key in ("strength", "eval_feature_rate", "pretrain_feature_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must lie in [0, 1], got {getattr(self, key)}")
        for key in ("n_pretrain", "n_finetune", "n_val", "n_test"):
            if getattr(self, key) < len(self.classes):
                raise InputError(f"--{key.replace('_', '-')}: {key} must be at least the number of classes "
                                 f"({len(self.classes)}), got {getattr(self, key)}")
        if self.short_side < 32:
            raise ValueError(f"short_side must be at least 32 px, got {self.short_side}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["features"] = [f.to_dict() for f in self.features]
        d["vocabulary"] = [f.to_dict() for f in self.vocabulary]
        return {"kind": "scenes", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScenesConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------- drawing

def object_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean ``[height, width]`` mask of a shape: its 28×28 quadrant mask
    (:func:`synth.shape_mask`) scaled with nearest neighbour."""
    return np.asarray(Image.fromarray(shape_mask(shape)).resize((width, height), Image.NEAREST))


def _digit(index: int, size: int) -> np.ndarray:
    """Digit ``index`` of the bank as a ``[size, size]`` alpha in 0..1."""
    bank, _ = _digit_bank()
    return np.asarray(Image.fromarray(bank[index]).resize((size, size), Image.BILINEAR), np.float32) / 255.0


def _overlap(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller


def _place(rng, size: int, area: tuple[int, int, int, int], placed: list) -> list[int]:
    """A ``size``² box inside ``area`` (x1, y1, x2, y2) overlapping no placed
    box by more than ``MAX_OVERLAP`` of the smaller one (the last try when
    none fits)."""
    for _ in range(PLACEMENT_TRIES):
        x = int(rng.integers(area[0], area[2] - size + 1))
        y = int(rng.integers(area[1], area[3] - size + 1))
        box = [x, y, x + size, y + size]
        if all(_overlap(box, other) <= MAX_OVERLAP for other in placed):
            break
    return box


def render_scene(cfg: ScenesConfig, rng: np.random.Generator, label: int, digit_index: int,
                 present: np.ndarray) -> tuple[np.ndarray, list[tuple[list[int], str]]]:
    """One image ``[H, W, 3]`` and its objects ``(box, category)``, main first."""
    s = cfg.short_side
    long = int(round(s * ASPECTS[int(rng.integers(len(ASPECTS)))]))
    w, h = (long, s) if rng.random() < 0.5 else (s, long)
    base = rng.integers(0, max(1, cfg.background), size=3)
    img = np.clip(base + rng.normal(0.0, cfg.noise, size=(h, w, 3)), 0, 255)
    x0, y0 = (w - s) // 2, (h - s) // 2
    main_size = int(round(s * rng.uniform(*MAIN_SIZE)))
    objects = [(_place(rng, main_size, (x0, y0, x0 + s, y0 + s), []), cfg.classes[label], None)]
    planted = [f for f, on in zip(cfg.features, present) if on]
    pool = cfg.distractors()
    n_extra = int(rng.integers(1, MAX_OBJECTS - len(cfg.features)))
    extras = [pool[k] for k in rng.choice(len(pool), size=min(n_extra, len(pool)), replace=False)]
    for spec, size_range in [(f, PLANTED_SIZE) for f in planted] + [(d, DISTRACTOR_SIZE) for d in extras]:
        size = int(round(s * rng.uniform(*size_range)))
        objects.append((_place(rng, size, (0, 0, w, h), [o[0] for o in objects]), spec.name, spec))
    for box, _, spec in objects[:0:-1]:  # the others first, the main object on top
        x1, y1, x2, y2 = box
        mask = object_mask(spec.shape, x2 - x1, y2 - y1)
        img[y1:y2, x1:x2][mask] = spec.color
    x1, y1, x2, y2 = objects[0][0]
    alpha = _digit(digit_index, x2 - x1)[:, :, None]
    img[y1:y2, x1:x2] = alpha * 255.0 + (1.0 - alpha) * img[y1:y2, x1:x2]
    return np.rint(img).astype(np.uint8), [(box, name) for box, name, _ in objects]


# --------------------------------------------------------------------------- COCO files

def _categories(cfg: ScenesConfig) -> list[dict]:
    names = list(cfg.classes) + [f.name for f in cfg.features] + [d.name for d in cfg.distractors()]
    return [{"id": k + 1, "name": n, "supercategory": "digit" if n in cfg.classes else "object"}
            for k, n in enumerate(names)]


def _write_block(directory: Path, cfg: ScenesConfig, split: str, stream: int, n: int, first_id: int,
                 pools: list[np.ndarray], correlated: bool, feature_rate: float) -> dict:
    """``n`` images into ``directory/images`` and their COCO instances file;
    returns the block's statistics."""
    rng = np.random.default_rng([cfg.seed, stream])
    labels = _balanced_labels(rng, n, len(cfg.classes))
    columns = [(_correlated_presence(rng, labels == cfg.classes.index(c), cfg.strength) if correlated
                else _independent_presence(rng, labels, feature_rate)) for c in cfg.resolved_correlated_classes()]
    presence = np.stack(columns, axis=1)
    digits = np.array([rng.choice(pools[c]) for c in labels], dtype=np.int64)
    category = {c["name"]: c["id"] for c in _categories(cfg)}
    images, annotations = [], []
    for i in range(n):
        image_id = first_id + i
        img, objects = render_scene(cfg, np.random.default_rng([cfg.seed, stream, i]), labels[i], digits[i],
                                    presence[i])
        name = f"{split}-{image_id:06d}.png"
        Image.fromarray(img).save(directory / "images" / name, format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": name, "width": img.shape[1], "height": img.shape[0]})
        for box, cat in objects:
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category[cat], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    coco = {"info": {"description": f"ravl_pipeline synthetic scenes, {split} split", "seed": cfg.seed},
            "images": images, "annotations": annotations, "categories": _categories(cfg)}
    write_json_atomic(directory / "annotations" / f"instances_{split}.json", coco)
    return _block_stats(cfg, labels, presence)


def _block_stats(cfg: ScenesConfig, labels: np.ndarray, presence: np.ndarray) -> dict:
    stats: dict[str, Any] = {"n": int(labels.size),
                             "class_counts": {c: int(np.sum(labels == k)) for k, c in enumerate(cfg.classes)},
                             "features": {}}
    for k, (spec, cls) in enumerate(zip(cfg.features, cfg.resolved_correlated_classes())):
        is_class = labels == cfg.classes.index(cls)
        stats["features"][spec.name] = {"correlated_class": cls, "rate": float(presence[:, k].mean()),
                                        "cramers_v": cramers_v(presence[:, k], is_class),
                                        "phi": phi_coefficient(presence[:, k], is_class)}
    return stats


def scene_splits(out_dir: str | os.PathLike) -> dict[str, list[tuple[Path, str]]]:
    """Per dataset, its COCO instances files and their splits, as
    :func:`write_scenes` lays them out."""
    out = Path(out_dir)
    return {name: [(out / name / "annotations" / f"instances_{split}.json", split) for split in splits]
            for name, splits in SPLIT_FILES.items()}


def write_scenes(out_dir: str | os.PathLike, cfg: ScenesConfig) -> dict[str, Any]:
    """Write the COCO side of a scenes setting (module docstring) and
    ``setting.json``; returns the setting's description. The same
    configuration gives byte-identical files."""
    cfg.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_pools, eval_pools = _digit_pools(cfg)
    blocks = {  # dataset: [(split, stream, n, first id, pools, correlated, feature rate)]
        "pretrain": [("train", 1, cfg.n_pretrain, 1, train_pools, False, cfg.pretrain_feature_rate)],
        "finetune": [("train", 2, cfg.n_finetune, 1, train_pools, True, cfg.eval_feature_rate)],
        "eval": [("val", 3, cfg.n_val, 1, eval_pools, False, cfg.eval_feature_rate),
                 ("test", 4, cfg.n_test, cfg.n_val + 1, eval_pools, False, cfg.eval_feature_rate)],
    }
    stats = {}
    for name, parts in blocks.items():
        with atomic_dir(out / name) as tmp:
            (tmp / "images").mkdir()
            for split, *args in parts:
                stats[name if name != "eval" else split] = _write_block(tmp, cfg, split, *args)
    setting = {
        "kind": "scenes",
        "config": cfg.to_dict(),
        "correlated_classes": cfg.resolved_correlated_classes(),
        "classes": list(cfg.classes),
        "caption_template": CAPTION_TEMPLATE,
        "datasets": {name: name for name in blocks},
        "coco": {name: [{"instances": str(p.relative_to(out)), "split": split} for p, split in files]
                 for name, files in scene_splits(out).items()},
        "stats": stats,
    }
    write_json_atomic(out / "setting.json", setting)
    return setting


def make_scenes_setting(out_dir: str | os.PathLike, cfg: ScenesConfig) -> dict[str, Any]:
    """:func:`write_scenes`, then every dataset imported in place through
    the COCO importer (its ``manifest.parquet`` beside its images)."""
    setting = write_scenes(out_dir, cfg)
    for name, files in scene_splits(out_dir).items():
        import_coco([p for p, _ in files], Path(out_dir) / name / "images", Path(out_dir) / name,
                    split=[s for _, s in files])
    return setting

