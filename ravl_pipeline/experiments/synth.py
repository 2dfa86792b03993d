"""Controlled synthetic settings (SPEC §4.1) — one concept, the generator,
which is why this module is longer than most.

Each image is 56×56 RGB made of four 28×28 quadrants, in the fixed order
TL, TR, BL, BR. One quadrant holds the class object, a digit from
scikit-learn's shipped ``load_digits()`` (8×8, values 0..16) upscaled
bilinearly to 28×28 and drawn white on black, shifted by up to
``DIGIT_JITTER`` pixels. Other quadrants may hold features (coloured
shapes); the rest stay black. Captions name the class only.

A setting is three dataset directories (SPEC §5):

- ``pretrain``: balanced classes; every feature independent of the label;
- ``finetune``: each induced feature correlated with its class at Cramér's V
  ``strength``;
- ``eval``: balanced ``val`` rows (discovery) then balanced ``test`` rows
  (metrics); no correlation.

Presence counts are set exactly per group rather than drawn as Bernoulli
trials, so small settings reach the target V (and V = 0 where no
correlation is wanted) instead of scattering around it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from ..config import InputError
from ..io.files import atomic_dir, write_json_atomic
from ..io.manifest import SCHEMA, write_manifest

__all__ = [
    "CAPTION_TEMPLATE",
    "DIGIT_CLASSES",
    "EMPTY_REGION",
    "FeatureSpec",
    "IMAGE_SIZE",
    "QUADRANT_BOXES",
    "QUADRANT_NAMES",
    "QUADRANT_SIZE",
    "SHAPES",
    "SynthConfig",
    "cramers_v",
    "feature_rates_for_v",
    "make_setting",
    "phi_coefficient",
]

DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATE = "the number is a {}"
EMPTY_REGION = "empty"

QUADRANT_SIZE = 28
IMAGE_SIZE = 2 * QUADRANT_SIZE
QUADRANT_NAMES = ("TL", "TR", "BL", "BR")
QUADRANT_BOXES = ((0, 0, 28, 28), (28, 0, 56, 28), (0, 28, 28, 56), (28, 28, 56, 56))
"""``[x1, y1, x2, y2]`` of each quadrant; every row's ``boxes`` is this list."""

SHAPES = ("square", "circle", "triangle", "cross", "stripes", "checker", "ring")
DIGIT_JITTER = 2
EVAL_DIGIT_FRACTION = 0.3
"""Share of each class's digit instances kept for ``eval`` only, so that
evaluation digits are never seen in pre-training or fine-tuning."""

DATASET_NAMES = ("pretrain", "finetune", "eval")
_MAX_EXTRA_OBJECTS = 3  # four quadrants, one taken by the digit


# --------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------


@lru_cache(maxsize=None)
def shape_mask(shape: str) -> np.ndarray:
    """Boolean 28×28 mask of a feature shape (read-only)."""
    n = QUADRANT_SIZE
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    c = (n - 1) / 2
    if shape == "square":
        mask = np.ones((n, n), dtype=bool)
    elif shape == "circle":
        mask = (x - c) ** 2 + (y - c) ** 2 <= 11.5**2
    elif shape == "triangle":
        top, bottom = 3, 24
        half_width = (y - top) / (bottom - top) * 11.5
        mask = (y >= top) & (y <= bottom) & (np.abs(x - c) <= half_width)
    elif shape == "cross":
        inside = (x >= 2) & (x <= 25) & (y >= 2) & (y <= 25)
        mask = inside & ((np.abs(x - c) <= 3.5) | (np.abs(y - c) <= 3.5))
    elif shape == "stripes":
        mask = np.broadcast_to((np.arange(n) // 4) % 2 == 0, (n, n)).T.copy()
    elif shape == "checker":
        mask = ((x.astype(int) // 7) + (y.astype(int) // 7)) % 2 == 0
    elif shape == "ring":
        r2 = (x - c) ** 2 + (y - c) ** 2
        mask = (r2 <= 12.5**2) & (r2 >= 7.5**2)
    else:
        raise InputError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")
    mask.setflags(write=False)
    return mask


@dataclass
class FeatureSpec:
    """A feature drawn into one quadrant; ``name`` is its region label.

    Shapes: ``square`` (the solid quadrant, the reference's feature),
    ``circle`` (filled disc), ``triangle``, ``cross`` (plus sign),
    ``stripes`` (horizontal, 4 px), ``checker`` (7 px checks) and ``ring``.
    """

    name: str = "red square"
    color: tuple[int, int, int] = (255, 0, 0)
    shape: str = "square"

    def __post_init__(self) -> None:
        self.color = tuple(int(v) for v in self.color)
        if len(self.color) != 3 or not all(0 <= v <= 255 for v in self.color):
            raise InputError(f"feature {self.name!r}: color must be 3 values in 0..255, got {self.color}")
        shape_mask(self.shape)  # fail early on an unknown shape

    def draw(self, img_array: np.ndarray, quadrant: int) -> None:
        """Paint the feature into quadrant ``quadrant`` (0..3 = TL, TR, BL,
        BR) of an ``[56, 56, 3]`` uint8 array, in place."""
        x1, y1, x2, y2 = QUADRANT_BOXES[quadrant]
        img_array[y1:y2, x1:x2][shape_mask(self.shape)] = self.color

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "color": list(self.color), "shape": self.shape}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(name=d["name"], color=tuple(d["color"]), shape=d["shape"])


def _as_feature(f: FeatureSpec | dict) -> FeatureSpec:
    return f if isinstance(f, FeatureSpec) else FeatureSpec.from_dict(f)


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


class PlantedFeatures:
    """What every synthetic setting says about its planted features
    (``classes``, ``correlated_class``, ``features``, ``correlated_classes``)."""

    def _coerce(self) -> None:
        self.classes = list(self.classes)
        self.features = [_as_feature(f) for f in self.features]
        if self.correlated_classes is not None:
            self.correlated_classes = list(self.correlated_classes)

    def resolved_correlated_classes(self) -> list[str]:
        if self.correlated_classes is None:
            return [self.correlated_class] * len(self.features)
        return list(self.correlated_classes)


@dataclass
class SynthConfig(PlantedFeatures):
    """One synthetic setting (SPEC §4.1).

    ``strength`` is the target Cramér's V between the presence of each
    induced feature and ``label == its correlated class`` in ``finetune``.
    ``correlated_classes`` gives one class per induced feature (default:
    ``correlated_class`` for all). ``distractors`` appear at
    ``distractor_rate`` independently of the label in every split; induced
    features appear independently of the label at ``pretrain_feature_rate``
    in ``pretrain`` (default 0: a clean, balanced base set) and at
    ``eval_feature_rate`` in ``eval``. At most three features and distractors in
    all, each drawn in its own quadrant.
    """

    classes: list[str] = field(default_factory=lambda: list(DIGIT_CLASSES))
    correlated_class: str = "nine"
    features: list[FeatureSpec] = field(default_factory=lambda: [FeatureSpec()])
    correlated_classes: list[str] | None = None
    strength: float = 0.9
    distractors: list[FeatureSpec] = field(default_factory=list)
    distractor_rate: float = 0.5
    eval_feature_rate: float = 0.5
    pretrain_feature_rate: float = 0.0
    n_pretrain: int = 4000
    n_finetune: int = 2000
    n_val: int = 500
    n_test: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        self._coerce()
        self.distractors = [_as_feature(f) for f in self.distractors]
        self.check()

    def check(self) -> None:
        """Raise :class:`InputError` on an unusable configuration."""
        unknown = [c for c in self.classes if c not in DIGIT_CLASSES]
        if unknown or len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise InputError(f"classes must be at least 2 distinct names from {DIGIT_CLASSES}, got {self.classes}")
        correlated = self.resolved_correlated_classes()
        if len(correlated) != len(self.features):
            raise InputError(f"correlated_classes needs one class per feature ({len(self.features)}), got {correlated}")
        if self.correlated_class not in self.classes or any(c not in self.classes for c in correlated):
            raise InputError(f"correlated classes {[self.correlated_class, *correlated]} must be among {self.classes}")
        names = [f.name for f in self.features + self.distractors]
        if len(set(names)) != len(names) or any(n in self.classes or n == EMPTY_REGION for n in names):
            raise InputError(f"feature names must be distinct and differ from class names and {EMPTY_REGION!r}: {names}")
        if len(names) > _MAX_EXTRA_OBJECTS:
            raise InputError(f"at most {_MAX_EXTRA_OBJECTS} features and distractors fit beside the digit, got {len(names)}")
        for key in ("strength", "distractor_rate", "eval_feature_rate", "pretrain_feature_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise InputError(f"{key} must lie in [0, 1], got {getattr(self, key)}")
        for key in ("n_pretrain", "n_finetune", "n_val", "n_test"):
            if getattr(self, key) < len(self.classes):
                raise InputError(f"{key} must be at least the number of classes ({len(self.classes)}), got {getattr(self, key)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["features"] = [f.to_dict() for f in self.features]
        d["distractors"] = [f.to_dict() for f in self.distractors]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SynthConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------
# Association statistics
# --------------------------------------------------------------------------


def _table_2x2(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return (int(np.sum(a & b)), int(np.sum(a & ~b)), int(np.sum(~a & b)), int(np.sum(~a & ~b)))


def _phi_from_counts(n11: int, n10: int, n01: int, n00: int) -> float:
    denominator = float(n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00)
    if denominator == 0:
        return 0.0
    return (n11 * n00 - n10 * n01) / np.sqrt(denominator)


def phi_coefficient(a: np.ndarray, b: np.ndarray) -> float:
    """Signed phi coefficient of two boolean vectors (0 when a margin is
    empty); positive when they tend to be true together."""
    return float(_phi_from_counts(*_table_2x2(a, b)))


def cramers_v(a: np.ndarray, b: np.ndarray) -> float:
    """Cramér's V of two boolean vectors: for a 2×2 table,
    ``|n11·n00 − n10·n01| / sqrt(row and column totals multiplied)``
    (= ``|phi|``); 0 when the table is degenerate (a row or column empty)."""
    return abs(phi_coefficient(a, b))


def feature_rates_for_v(v: float, q: float) -> tuple[float, float]:
    """``(P(feature | class), P(feature | other))`` giving phi = ``v`` when
    ``P(feature) = P(class) = q``.

    With equal margins, ``phi = (P(f & c) − q²) / (q(1 − q))``, so
    ``P(f & c) = v·q·(1 − q) + q²``; dividing by ``q`` and ``1 − q``:
    ``P(f | c) = q + v(1 − q)`` and ``P(f | ¬c) = q(1 − v)``.
    """
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"v must lie in [0, 1], got {v}")
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must lie in (0, 1), got {q}")
    joint = v * q * (1 - q) + q * q
    return joint / q, (q - joint) / (1 - q)


def _counts_for_v(v: float, n_class: int, n_other: int) -> tuple[int, int]:
    """Numbers of class and other rows to carry the feature so that the
    realised phi is as close to ``v`` as the sample allows, starting from
    the rates of :func:`feature_rates_for_v` and searching a few counts
    around them."""
    q = n_class / (n_class + n_other)
    p_class, p_other = feature_rates_for_v(v, q)
    k1, k0 = round(p_class * n_class), round(p_other * n_other)
    best = None
    for d1 in range(-3, 4):
        for d0 in range(-3, 4):
            a, b = k1 + d1, k0 + d0
            if not (0 <= a <= n_class and 0 <= b <= n_other):
                continue
            error = abs(_phi_from_counts(a, b, n_class - a, n_other - b) - v)
            key = (round(error, 12), abs(d1) + abs(d0))
            if best is None or key < best[0]:
                best = (key, a, b)
    return best[1], best[2]


# --------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------


def _balanced_labels(rng: np.random.Generator, n: int, n_classes: int) -> np.ndarray:
    """Class indices with counts differing by at most one, shuffled; which
    classes get the extra rows is random."""
    labels = np.concatenate([np.tile(np.arange(n_classes), n // n_classes), rng.permutation(n_classes)[: n % n_classes]])
    return rng.permutation(labels)


def _choose_in_group(rng: np.random.Generator, present: np.ndarray, members: np.ndarray, count: int) -> None:
    present[rng.choice(members, size=count, replace=False)] = True


def _independent_presence(rng: np.random.Generator, labels: np.ndarray, rate: float) -> np.ndarray:
    """Presence at ``rate`` within every class separately, so the feature
    carries no information about the label."""
    present = np.zeros(labels.size, dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        _choose_in_group(rng, present, members, round(rate * members.size))
    return present


def _correlated_presence(rng: np.random.Generator, is_class: np.ndarray, v: float) -> np.ndarray:
    """Presence with phi ≈ ``v`` against ``is_class`` (SPEC §4.1)."""
    present = np.zeros(is_class.size, dtype=bool)
    members_class, members_other = np.flatnonzero(is_class), np.flatnonzero(~is_class)
    k_class, k_other = _counts_for_v(v, members_class.size, members_other.size)
    _choose_in_group(rng, present, members_class, k_class)
    _choose_in_group(rng, present, members_other, k_other)
    return present


@dataclass
class _Sample:
    """Everything random about one block of rows, drawn before rendering so
    that the images depend on the seed alone."""

    labels: np.ndarray  # class index per row
    digit_index: np.ndarray  # row of load_digits() per row
    shift: np.ndarray  # [n, 2] (dy, dx) jitter of the digit
    quadrants: np.ndarray  # [n, 4] quadrant order: digit first, then extra objects
    presence: np.ndarray  # [n, n_objects] bool, features then distractors


def _sample_block(rng: np.random.Generator, n: int, cfg: SynthConfig, pools: list[np.ndarray], correlated: bool, feature_rate: float) -> _Sample:
    labels = _balanced_labels(rng, n, len(cfg.classes))
    columns = []
    for class_name in cfg.resolved_correlated_classes():
        if correlated:
            columns.append(_correlated_presence(rng, labels == cfg.classes.index(class_name), cfg.strength))
        else:
            columns.append(_independent_presence(rng, labels, feature_rate))
    columns += [_independent_presence(rng, labels, cfg.distractor_rate) for _ in cfg.distractors]
    presence = np.stack(columns, axis=1) if columns else np.zeros((n, 0), dtype=bool)
    digit_index = np.array([rng.choice(pools[c]) for c in labels], dtype=np.int64)
    shift = rng.integers(-DIGIT_JITTER, DIGIT_JITTER + 1, size=(n, 2))
    quadrants = np.argsort(rng.random((n, 4)), axis=1)
    return _Sample(labels, digit_index, shift, quadrants, presence)


def _concat(blocks: list[_Sample]) -> _Sample:
    return _Sample(*(np.concatenate([getattr(b, f.name) for b in blocks]) for f in dataclasses.fields(_Sample)))


# --------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _digit_bank() -> tuple[np.ndarray, np.ndarray]:
    """All sklearn digits as uint8 28×28 (bilinear upscaling of 0..16 to
    0..255) with their targets."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    size = (QUADRANT_SIZE, QUADRANT_SIZE)
    images = np.stack(
        [np.asarray(Image.fromarray((img * (255.0 / 16.0)).astype(np.float32)).resize(size, Image.BILINEAR)) for img in digits.images]
    )
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    images.setflags(write=False)
    return images, np.asarray(digits.target, dtype=np.int64)


def _digit_pools(cfg: SynthConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Disjoint digit instances per class: (train pools, eval pools), each
    indexed like ``cfg.classes``."""
    _, targets = _digit_bank()
    rng = np.random.default_rng([cfg.seed, 1000])
    train, evaluation = [], []
    for name in cfg.classes:
        members = rng.permutation(np.flatnonzero(targets == DIGIT_CLASSES.index(name)))
        n_eval = max(1, round(EVAL_DIGIT_FRACTION * members.size))
        evaluation.append(np.sort(members[:n_eval]))
        train.append(np.sort(members[n_eval:]))
    return train, evaluation


def _shifted(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``img`` moved by (dy, dx) with zeros shifted in (no wrap-around)."""
    out = np.zeros_like(img)
    h, w = img.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out


# --------------------------------------------------------------------------
# Rendering and writing
# --------------------------------------------------------------------------


def _render(sample: _Sample, i: int, objects: list[FeatureSpec]) -> tuple[np.ndarray, list[int]]:
    """Image ``i`` and the quadrant of each present object (-1 if absent)."""
    bank, _ = _digit_bank()
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    order = sample.quadrants[i]
    x1, y1, x2, y2 = QUADRANT_BOXES[order[0]]
    img[y1:y2, x1:x2] = _shifted(bank[sample.digit_index[i]], *sample.shift[i])[:, :, None]
    placed, slot = [], 1
    for k, obj in enumerate(objects):
        if sample.presence[i, k]:
            obj.draw(img, int(order[slot]))
            placed.append(int(order[slot]))
            slot += 1
        else:
            placed.append(-1)
    return img, placed


def _write_images_and_manifest(directory: Path, sample: _Sample, splits: list[str], cfg: SynthConfig, prefix: str) -> None:
    objects = cfg.features + cfg.distractors
    (directory / "images").mkdir(parents=True)
    ids, paths, labels, region_labels = [], [], [], []
    for i in range(sample.labels.size):
        img, placed = _render(sample, i, objects)
        image_id = f"{prefix}-{i:06d}"
        path = f"images/{image_id}.png"
        # compress_level=1: these tiny images compress well anyway, and a
        # setting writes thousands of them
        Image.fromarray(img).save(directory / path, format="PNG", compress_level=1)
        label = cfg.classes[sample.labels[i]]
        regions = [EMPTY_REGION] * 4
        regions[int(sample.quadrants[i, 0])] = label
        for obj, q in zip(objects, placed):
            if q >= 0:
                regions[q] = obj.name
        ids.append(image_id)
        paths.append(path)
        labels.append(label)
        region_labels.append(regions)
    n = len(ids)
    table = pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "path": pa.array(paths, pa.string()),
            "label": pa.array(labels, pa.string()),
            "caption": pa.array([CAPTION_TEMPLATE.format(label) for label in labels], pa.string()),
            "split": pa.array(splits, pa.string()),
            "boxes": pa.array([[list(b) for b in QUADRANT_BOXES]] * n, SCHEMA.field("boxes").type),
            "region_labels": pa.array(region_labels, SCHEMA.field("region_labels").type),
        }
    )
    write_manifest(directory, table)


def _write_dataset_dir(target: Path, sample: _Sample, splits: list[str], cfg: SynthConfig) -> None:
    """Build the dataset directory next to ``target`` and swap it in only
    once complete."""
    with atomic_dir(target) as tmp:
        _write_images_and_manifest(tmp, sample, splits, cfg, prefix=target.name)


def _split_stats(sample: _Sample, cfg: SynthConfig) -> dict[str, Any]:
    """Class counts and, per feature, its rate and association with its
    class (the primary correlated class for distractors)."""
    labels = sample.labels
    names = cfg.classes
    stats: dict[str, Any] = {
        "n": int(labels.size),
        "class_counts": {name: int(np.sum(labels == k)) for k, name in enumerate(names)},
    }
    correlated = cfg.resolved_correlated_classes() + [cfg.correlated_class] * len(cfg.distractors)
    for group, specs, offset in (("features", cfg.features, 0), ("distractors", cfg.distractors, len(cfg.features))):
        stats[group] = {}
        for k, spec in enumerate(specs):
            present = sample.presence[:, offset + k]
            class_name = correlated[offset + k]
            is_class = labels == names.index(class_name)
            stats[group][spec.name] = {
                "correlated_class": class_name,
                "rate": float(present.mean()),
                "rate_given_class": float(present[is_class].mean()),
                "rate_given_other": float(present[~is_class].mean()),
                "cramers_v": cramers_v(present, is_class),
                "phi": phi_coefficient(present, is_class),
            }
    return stats


def make_setting(out_dir: str | os.PathLike, cfg: SynthConfig) -> dict[str, Any]:
    """Write one synthetic setting (SPEC §4.1) and return its description.

    Writes ``out_dir/pretrain``, ``out_dir/finetune`` and ``out_dir/eval``
    (each a dataset directory loadable with ``io.dataset.load_dataset``; images
    are PNGs under ``images/``) and ``out_dir/setting.json``, which holds
    the returned dict: the configuration, the quadrant boxes, and per
    dataset (and for ``val`` and ``test``) class counts and each feature's
    achieved Cramér's V. The same configuration gives byte-identical files.
    """
    cfg.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_pools, eval_pools = _digit_pools(cfg)

    def rng(stream: int) -> np.random.Generator:
        # one stream per block: changing one size leaves the other blocks as they were
        return np.random.default_rng([cfg.seed, stream])

    pretrain = _sample_block(rng(1), cfg.n_pretrain, cfg, train_pools, correlated=False, feature_rate=cfg.pretrain_feature_rate)
    finetune = _sample_block(rng(2), cfg.n_finetune, cfg, train_pools, correlated=True, feature_rate=cfg.eval_feature_rate)
    val = _sample_block(rng(3), cfg.n_val, cfg, eval_pools, correlated=False, feature_rate=cfg.eval_feature_rate)
    test = _sample_block(rng(4), cfg.n_test, cfg, eval_pools, correlated=False, feature_rate=cfg.eval_feature_rate)
    evaluation = _concat([val, test])

    _write_dataset_dir(out_dir / "pretrain", pretrain, ["train"] * cfg.n_pretrain, cfg)
    _write_dataset_dir(out_dir / "finetune", finetune, ["train"] * cfg.n_finetune, cfg)
    _write_dataset_dir(out_dir / "eval", evaluation, ["val"] * cfg.n_val + ["test"] * cfg.n_test, cfg)

    setting = {
        "config": cfg.to_dict(),
        "correlated_classes": cfg.resolved_correlated_classes(),
        "classes": list(cfg.classes),
        "caption_template": CAPTION_TEMPLATE,
        "quadrant_boxes": [list(b) for b in QUADRANT_BOXES],
        "datasets": {name: name for name in DATASET_NAMES},
        "stats": {
            "pretrain": _split_stats(pretrain, cfg),
            "finetune": _split_stats(finetune, cfg),
            "eval": _split_stats(evaluation, cfg),
            "val": _split_stats(val, cfg),
            "test": _split_stats(test, cfg),
        },
    }
    write_json_atomic(out_dir / "setting.json", setting)
    return setting
