"""What the report reads: findings and metrics files, checked for what it
needs (SPEC §5), the dataset images by id, and the provenance it can tell on
its own. Findings may come from another tool: the report reads the JSON
interface, tolerating extra keys and alternative spellings of intervals."""
from __future__ import annotations

import math
import os
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Mapping

from ..config import InputError
from ..core.findings import Findings, check_findings as _check_schema
from ..core.metrics import METRIC_KEYS
from ..io.dataset import load_dataset
from ..io.files import read_json
from ..io.hashing import file_sha256
from ..io.manifest import BOX_TOLERANCE, MANIFEST_NAME

__all__ = ["ReportError", "METRIC_KEYS", "check_findings", "checked_box", "load_findings", "load_metrics", "normalise_metrics",
           "metric_value", "row_intervals", "dataset_version", "default_provenance", "ImageSource", "json_safe"]



class ReportError(InputError):
    """Findings, metrics or images that cannot be rendered."""


REPORT_FEATURE_KEYS = ("rank", "score", "per_class", "regions")  # what the report reads of a feature


# --------------------------------------------------------------------------- inputs

def check_findings(findings: Mapping[str, Any], where: str = "findings") -> dict:
    """The findings dict, checked for the schema this report understands
    (SPEC §5; the one schema check, with the keys the report reads)."""
    return _check_schema(findings, where, required=("features",), feature_keys=REPORT_FEATURE_KEYS,
                         error=ReportError)


def load_findings(findings, where: str) -> dict:
    """A findings file, a :class:`Findings` record or a dict, as a checked dict."""
    if isinstance(findings, Findings):
        return findings.to_dict()
    if isinstance(findings, (str, os.PathLike)):
        try:
            data = read_json(findings, ReportError, expect=None)
        except FileNotFoundError as exc:
            raise ReportError(f"{findings}: findings file not found") from exc
        return check_findings(data, str(findings))
    return check_findings(findings, where)


def load_metrics(path: str | os.PathLike) -> dict:
    """A ``metrics.json`` (SPEC §5) read and checked for the four metrics."""
    path = Path(path)
    try:
        data = read_json(path, ReportError, expect=None)
    except FileNotFoundError as exc:
        raise ReportError(f"{path}: metrics file not found") from exc
    _check_metrics(data, str(path))
    return data


def _check_metrics(data: Any, where: str) -> None:
    if not isinstance(data, Mapping):
        raise ReportError(f"{where}: metrics must be a JSON object, got {type(data).__name__}")
    missing = [k for k in METRIC_KEYS if k not in data]
    if missing:
        raise ReportError(f"{where}: metrics missing key(s): {', '.join(missing)}")
    for key in METRIC_KEYS:
        if data[key] is not None and metric_value(data[key]) is None:
            raise ReportError(f"{where}: metric {key!r} must be a finite number or null, got {data[key]!r}")


def checked_box(box: Any, size: tuple[int, int], where: str) -> list[float] | None:
    """``box`` as four numbers inside an image of ``size``; :class:`ReportError` naming ``where`` otherwise."""
    if box is None:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ReportError(f"{where}: box {box!r} is not 4 numbers [x1, y1, x2, y2]") from None
    width, height = size
    t = BOX_TOLERANCE
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        raise ReportError(f"{where}: box {list(box)} is not a box (needs finite x1 < x2, y1 < y2)")
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        raise ReportError(f"{where}: box {list(box)} lies outside its {width}x{height} image "
                          "(is --data the dataset the findings were computed on?)")
    return [x1, y1, x2, y2]


def metric_value(value: Any) -> float | None:
    """A metric as a number; tolerates ``{"value": x, "ci": ...}`` and ``None``."""
    if isinstance(value, Mapping):
        value = value.get("value", value.get("mean"))
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _interval(value: Any) -> tuple[float, float] | None:
    """A confidence interval from ``[lo, hi]``, ``{"lo","hi"}`` or ``{"low","high"}``."""
    if isinstance(value, Mapping):
        lo = value.get("lo", value.get("low", value.get("lower")))
        hi = value.get("hi", value.get("high", value.get("upper")))
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        lo, hi = value
    else:
        return None
    try:
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        return None
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def row_intervals(row: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """Confidence intervals of a per-class row, keyed by column.

    Accepts ``ci`` as a mapping column → interval, ``ci`` as a bare interval
    (taken to be the gap's), and ``<column>_ci`` keys.
    """
    out: dict[str, tuple[float, float]] = {}
    ci = row.get("ci")
    if isinstance(ci, Mapping) and _interval(ci) is None:
        for key, val in ci.items():
            iv = _interval(val)
            if iv is not None:
                out[str(key)] = iv
    elif ci is not None and _interval(ci) is not None:
        out["gap"] = _interval(ci)
    for key, val in row.items():
        if key.endswith("_ci"):
            iv = _interval(val)
            if iv is not None:
                out[key[:-3]] = iv
    return out


# --------------------------------------------------------------------------- provenance

def dataset_version(root: str | os.PathLike) -> str | None:
    """Content version of a dataset directory: sha256 of its manifest (short)."""
    manifest = Path(root) / MANIFEST_NAME
    return "sha256:" + file_sha256(manifest)[:16] if manifest.is_file() else None


def _code_version() -> str:
    try:
        pkg = version("ravl_pipeline")
    except PackageNotFoundError:  # not installed (running from a source tree)
        pkg = "unknown"
    commit = None
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        if res.returncode == 0:
            commit = res.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{pkg}+g{commit}" if commit else pkg


def default_provenance(findings: Mapping[str, Any], dataset_root=None) -> dict:
    """What the report can tell on its own: model, dataset, its version,
    discovery parameters and the code version."""
    prov = {
        "model": findings.get("model"),
        "dataset": findings.get("dataset") or (str(dataset_root) if dataset_root else None),
        "code_version": _code_version(),
    }
    if dataset_root is not None:
        prov["data_version"] = dataset_version(dataset_root)
    params = {key: findings[key] for key in ("seed", "influence_threshold", "embedding_mode", "proposer",
                                             "templates", "sampled", "n_sample") if key in findings}
    if params:
        prov["discovery_parameters"] = params
    return prov


class ImageSource:
    """Images of a dataset directory by ``image_id`` (SPEC §5 manifest)."""

    def __init__(self, root):
        self.root = Path(root)
        # images are opened one by one when drawn; a broken one is named then
        self.ds = load_dataset(self.root, check_images=False)
        self.row_of = {image_id: i for i, image_id in enumerate(self.ds.image_ids)}

    def image(self, image_id: str, where: str | None = None):
        row = self.row_of.get(str(image_id))
        if row is None:
            raise ReportError(f"{where + ': ' if where else ''}{self.ds.manifest_file}: no image with image_id "
                              f"{image_id!r} (is --data the dataset the findings were computed on?)")
        return self.ds.load_image(row)


def json_safe(obj: Any) -> Any:
    """Plain JSON: numpy scalars to Python, non-finite floats to ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def normalise_metrics(metrics) -> dict[str, dict]:
    """``{method: metrics dict}`` from dicts or ``metrics.json`` paths."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ReportError("metrics must map method name -> metrics.json dict or path")
    out = {}
    for name, value in metrics.items():
        if isinstance(value, (str, os.PathLike)):
            value = load_metrics(value)
        else:
            _check_metrics(value, f"metrics[{name!r}]")
        out[str(name)] = dict(value)
    return out
