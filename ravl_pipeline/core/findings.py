"""The findings of one audit as a typed record, its one schema check and its
one reader and writer (SPEC §5, ``findings.json``).

A :class:`Findings` holds the SPEC §5 keys (``model``, ``dataset``,
``classes``, ``k``, ``silhouette``, ``features``) and what discovery adds
(the clustering's summary, the medoid vectors Stage 2 assigns regions to,
the evidence of every feature). Keys it does not know — written by another
tool — are kept in ``extra`` and written back after the known ones, so a
file read and written again keeps them.

Table rows (a feature's ``per_class`` and ``regions``, the ``clusters``
summary) stay plain JSON objects: they are rows, read by name, and outside
tools add columns to them.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..config import InputError
from ..io.files import json_bytes, read_json, write_bytes_atomic

__all__ = ["SCHEMA_VERSION", "REQUIRED_KEYS", "REQUIRED_FEATURE_KEYS", "FindingsError", "Feature", "Findings",
           "check_findings", "read_findings", "write_findings"]

SCHEMA_VERSION = 1
REQUIRED_KEYS = ("model", "dataset", "classes", "k", "silhouette", "features")
REQUIRED_FEATURE_KEYS = ("rank", "cluster_id", "score", "influence", "attribute", "per_class", "regions")


class FindingsError(InputError):
    """A findings file or object that does not follow the schema; the message names it."""


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]


def _to_dict(record, always: Sequence[str]) -> dict[str, Any]:
    """Known fields in declaration order (optional ones only when set), then ``extra``."""
    out = {}
    for name in _fields(type(record)):
        value = getattr(record, name)
        if value is not None or name in always:
            out[name] = value
    out.update(record.extra)
    return out


def _from_dict(cls, data: Mapping[str, Any]):
    known = set(_fields(cls))
    return cls(**{k: v for k, v in data.items() if k in known},
               extra={k: v for k, v in data.items() if k not in known})


STANDINGS = ("confirmed", "candidate", "other")


def standing_of(called: bool | None, verdict: str | None) -> str:
    """:attr:`Feature.standing` from a finding's ``called`` flag and masking verdict."""
    if called is not True:
        return "other"
    return "confirmed" if verdict == "supported" else "candidate" if verdict in (None, "inconclusive") else "other"


@dataclass
class Feature:
    """One spurious feature: a cluster that passed the criterion of SPEC §2.4."""

    rank: int
    cluster_id: int
    score: float  # G_c
    influence: float | None  # H_c
    influence_per_class: dict[str, float] | None = None
    attribute: str | None = None  # the correlated class (largest unweighted gap)
    per_class: list[dict] = field(default_factory=list)  # label, n_present, acc_present, n_absent, acc_absent, gap
    regions: list[dict] = field(default_factory=list)  # image_id, region_index, box, similarity (ranked)
    medoid: int | None = None  # region row of the medoid in the discovery embeddings
    size: int | None = None  # regions in the cluster
    # evidence (SPEC §5: p_value, q_value, called, causal.support)
    p_value: float | None = None
    q_value: float | None = None
    called: bool | None = None
    causal: dict | None = None
    causal_control: dict | None = None
    names: dict | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, REQUIRED_FEATURE_KEYS)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Feature":
        return _from_dict(cls, data)

    @property
    def support(self) -> dict | None:
        """The masking verdict's record (``causal.support``), if checked."""
        support = (self.causal or {}).get("support")
        return support if isinstance(support, Mapping) and "supported" in support else None

    @property
    def verdict(self) -> str | None:
        """The masking verdict: ``supported``, ``inconclusive`` (the fill
        changes predictions by itself about as much as hiding the feature),
        ``not supported``, or None (unchecked)."""
        support = self.support
        if support is None:
            return None
        return support.get("verdict") or ("supported" if support["supported"] else "not supported")

    @property
    def supported(self) -> bool | None:
        """True (supported), False (hiding its regions undoes none of the
        errors it goes with) or None (unchecked, or inconclusive)."""
        verdict = self.verdict
        return None if verdict in (None, "inconclusive") else verdict == "supported"

    @property
    def standing(self) -> str:
        """What a reader is told (SPEC §5): ``confirmed`` (called significant
        and supported by the masking check), ``candidate`` (called, the check
        inconclusive or not run) or ``other`` (kept by the criterion, not
        called, or refuted by the check). ``called`` stays the statistical
        fact."""
        return standing_of(self.called, self.verdict)

    @property
    def actionable(self) -> bool:
        """Called significant (or no significance computed) and not refuted
        by the masking check (an inconclusive check refutes nothing): what
        the lead finding and Stage 2 consider."""
        return self.called is not False and self.supported is not False


@dataclass
class Findings:
    """Everything Stage 1 says about one model on one dataset (SPEC §5)."""

    model: str | None
    dataset: str | None
    classes: list[str]
    k: int
    silhouette: float | None
    features: list[Feature]
    pretrained: str | None = None  # the model's open_clip pretrained tag or weights file, when it has one
    n_images: int | None = None
    n_regions: int | None = None
    sampled: bool | None = None
    n_sample: int | None = None
    k_sweep: list[dict] | None = None
    seed: int | None = None
    influence_threshold: float | None = None
    medoids: list[int] | None = None  # region row of each cluster's medoid, by cluster id
    clusters: list[dict] | None = None  # every cluster's summary, kept or not
    embedding_mode: str | None = None
    proposer: str | None = None
    templates: list[str] | None = None
    image_accuracy: float | None = None
    medoid_embeddings: list[list[float]] | None = None  # Stage 2 assigns training regions to these
    significance: dict | None = None
    causal: dict | None = None
    lead_rank: int | None = None  # written whenever the masking check ran; null: no lead finding
    seconds: float | None = None
    ground_truth: dict | None = None  # synthetic settings: Precision@k and validity per induced feature
    compute: dict | None = None  # device and precision, when not the CPU in fp32 (ravl_pipeline.compute)
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {"schema_version": self.schema_version}
        always = REQUIRED_KEYS + (("lead_rank",) if self.causal is not None else ())
        body = _to_dict(dataclasses.replace(self, features=[f.to_dict() for f in self.features]), always)
        body.pop("schema_version")
        out.update(body)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "findings") -> "Findings":
        data = check_findings(data, where)
        record = _from_dict(cls, data)
        record.features = [Feature.from_dict(f) for f in data["features"]]
        return record

    def feature(self, rank: int) -> Feature | None:
        return next((f for f in self.features if f.rank == rank), None)

    @property
    def called(self) -> list[Feature]:
        return [f for f in self.features if f.called]

    @property
    def has_significance(self) -> bool:
        return any(f.called is not None for f in self.features)

    def lead(self) -> Feature | None:
        """The lead finding: the highest-ranked feature that is called (or,
        without significance, kept) and not refuted by the masking check."""
        return next((f for f in sorted(self.features, key=lambda f: f.rank) if f.actionable), None)

    def problems(self) -> list[str]:
        """What is inconsistent beyond the schema (SPEC §2.2, §2.4, §2.5)."""
        problems = []
        feats = self.features
        if [f.rank for f in feats] != list(range(1, len(feats) + 1)):
            problems.append("ranks are not 1..n")
        scores = [f.score for f in feats]
        if scores != sorted(scores, reverse=True):
            problems.append("features are not sorted by score G_c, descending")
        threshold = self.influence_threshold if self.influence_threshold is not None else 0.25
        for f in feats:
            where = f"feature rank {f.rank}"
            if f.attribute not in self.classes:
                problems.append(f"{where}: attribute {f.attribute!r} is not a class")
            gaps = [row["gap"] for row in f.per_class]
            if not (any(g > 0 for g in gaps) and any(g < 0 for g in gaps)):
                problems.append(f"{where}: needs a positive and a negative per-class gap (SPEC §2.4)")
            if abs(sum(abs(g) for g in gaps) - f.score) > 1e-6:
                problems.append(f"{where}: score is not the sum of |gap| (SPEC §2.2)")
            sims = [r["similarity"] for r in f.regions]
            if sims != sorted(sims, reverse=True):
                problems.append(f"{where}: regions are not sorted by similarity to the medoid")
            if f.influence is None or f.influence < threshold - 1e-12:
                problems.append(f"{where}: influence below the threshold (SPEC §2.4)")
        return problems


def check_findings(data: Any, where: str, *, required: Sequence[str] = REQUIRED_KEYS,
                   feature_keys: Sequence[str] = REQUIRED_FEATURE_KEYS, error: type = FindingsError) -> dict:
    """Check a findings object against the schema (SPEC §5); ``error``
    naming ``where`` on any problem.

    A missing ``schema_version`` (a plain SPEC §5 file) is accepted; any
    other version than :data:`SCHEMA_VERSION` is refused by name. Readers
    that need less than a full findings file (the report) pass their own
    ``required`` and ``feature_keys``.
    """
    if not isinstance(data, Mapping):
        raise error(f"{where}: findings must be a JSON object, got {type(data).__name__}")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise error(f"{where}: findings schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    missing = [key for key in required if key not in data]
    if missing:
        raise error(f"{where}: findings missing required key(s): {', '.join(missing)}")
    if not isinstance(data.get("features"), list):
        raise error(f"{where}: 'features' must be a list")
    for key, (ok, what) in _TOP_TYPES.items():
        if key in data and data[key] is not None and not ok(data[key]):
            raise error(f"{where}: '{key}' must be {what}, got {_shown(data[key])}")
    for i, feat in enumerate(data["features"]):
        if not isinstance(feat, Mapping):
            raise error(f"{where}: features[{i}] must be an object")
        missing = [key for key in feature_keys if key not in feat]
        if missing:
            raise error(f"{where}: features[{i}] missing required key(s): {', '.join(missing)}")
        for key, (ok, what) in _FEATURE_TYPES.items():
            if key in feat and not ok(feat[key]):
                raise error(f"{where}: features[{i}] (rank {_shown(feat.get('rank'))}): '{key}' must be {what}, "
                            f"got {_shown(feat[key])}")
    return dict(data)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _rows(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(row, Mapping) for row in x)


def _shown(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _optional(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or ok(x)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_object(x: Any) -> bool:
    return isinstance(x, Mapping)


# What a key holds when present (SPEC §5); readers may rely on these types.
_TOP_TYPES = {
    "seconds": (_is_number, "a number"),
    "silhouette": (_is_number, "a number"),
    "image_accuracy": (_is_number, "a number"),
    "n_regions": (lambda x: _is_int(x) and x >= 0, "a non-negative integer"),
    "medoids": (lambda x: isinstance(x, list) and all(_is_int(m) for m in x), "a list of integers"),
    "significance": (_is_object, "an object"),
    "causal": (_is_object, "an object"),
    "ground_truth": (_is_object, "an object"),
    "classes": (lambda x: isinstance(x, list) and all(isinstance(c, str) and c for c in x)
                and len(set(x)) == len(x), "a list of distinct class names"),
    "k": (lambda x: _is_int(x) and x >= 1, "a positive integer"),
    "medoid_embeddings": (lambda x: isinstance(x, list) and all(isinstance(row, list) for row in x),
                          "a list of vectors"),
}
_FEATURE_TYPES = {
    "rank": (_is_int, "an integer"),
    "cluster_id": (lambda x: _is_int(x) and x >= 0, "a non-negative integer"),
    "score": (_is_finite, "a finite number"),
    "influence": (lambda x: x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)), "a number"),
    "per_class": (_rows, "a list of objects (one per class)"),
    "regions": (_rows, "a list of objects (one per region)"),
    "called": (_optional(lambda x: isinstance(x, bool)), "true or false"),
    "p_value": (_optional(_is_number), "a number"),
    "q_value": (_optional(_is_number), "a number"),
    "size": (_optional(lambda x: _is_int(x) and x >= 0), "a non-negative integer"),
    "attribute": (_optional(lambda x: isinstance(x, str)), "a string"),
    "names": (_optional(_is_object), "an object"),
    "causal": (_optional(_is_object), "an object"),
    "causal_control": (_optional(_is_object), "an object"),
    "support": (_optional(_is_object), "an object"),
}


def read_findings(path: str | os.PathLike) -> Findings:
    """Read and check ``findings.json``; :class:`FindingsError` naming the file on any problem."""
    path = os.fspath(path)
    return Findings.from_dict(read_json(path, FindingsError, expect=None), path)


def write_findings(findings: Findings, path: str | os.PathLike) -> None:
    """The one writer of ``findings.json``: checked, then written atomically
    (a non-finite number is refused before anything is written)."""
    data = findings.to_dict()
    check_findings(data, os.fspath(path))
    write_bytes_atomic(path, json_bytes(data))


def finite_or_none(x) -> float | None:
    """A JSON number: ``None`` for missing or non-finite values."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
