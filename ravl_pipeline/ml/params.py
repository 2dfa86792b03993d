"""``params.yaml``: the parameters that change results, by section.

Every top-level section is versioned on its own (:func:`section_version`), so
an orchestrator can make exactly the steps that read a section depend on it:
changing ``discovery.seed`` must re-run clustering, not the region
embeddings. Unknown sections or keys are refused with the file and key named,
since a misspelt key would otherwise silently fall back to its default.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

PARAMS_NAME = "params.yaml"

# ``None`` means "derive it": from the dataset (classes, templates) or from the
# audited model's own fine-tuning configuration (mitigation budget, SPEC §3.6).
DEFAULTS: dict[str, dict[str, Any]] = {
    "audited_model": {
        "source": "synthetic-default",  # synthetic-default | checkpoint
        "recipe": "default",  # default | small (synthetic-default only)
        "checkpoint": None,  # model name: local-dir:PATH, open_clip name, built-in
        "pretrained": None,  # open_clip pretrained tag or weights file of `checkpoint`
        "init_model": None,  # the model `checkpoint` was fine-tuned from (SPEC §3.2)
        "train_data": None,  # the fine-tuning dataset directory (SPEC §3.2)
    },
    "regions": {"proposer": "quadrants", "mode": "auto", "batch_size": 64},
    # the class set is read by scoring and by clustering (K range, SPEC §2.1)
    "labels": {"classes": None},
    "scores": {"tau": 0.07, "templates": None},
    "discovery": {"seed": 0, "influence_threshold": 0.25, "k_range": None,
                  "max_regions": 20000, "top_regions": 50, "cluster_workers": 1,
                  # evidence for every feature: significance (permutations, BH at alpha)
                  # decides which are called findings, which Stage 2 then mitigates
                  "evidence": True, "permutations": 2000, "alpha": 0.05, "mask_fill": "mean"},
    "mitigation": {"method": "ravl", "lam": 0.8, "epochs": None, "lr": None, "batch_size": None,
                   "seed": None, "max_steps": None},
    "evaluation": {"max_accuracy_drop": 0.05},
}
SECTIONS = tuple(DEFAULTS)
MODEL_SOURCES = ("synthetic-default", "checkpoint")
MASK_FILLS = ("mean", "black", "blur")  # causal.FILLS, without importing the model code


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the file and key."""


def load_params(path: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """Defaults overlaid with the file's values (a missing file gives the defaults)."""
    params = copy.deepcopy(DEFAULTS)
    if path is None or not Path(path).is_file():
        return params
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for section, values in raw.items():
        if section not in DEFAULTS:
            raise ParamsError(f"{path}: unknown section {section!r}; expected one of {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ParamsError(f"{path}: section {section!r} must be a mapping")
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                raise ParamsError(f"{path}: unknown key {section}.{key}; expected one of "
                                  f"{', '.join(DEFAULTS[section])}")
            params[section][key] = value
    check_params(params, path)
    return params


def check_params(params: Mapping[str, Mapping[str, Any]], where: str | os.PathLike = PARAMS_NAME) -> None:
    model = params["audited_model"]
    if model["source"] not in MODEL_SOURCES:
        raise ParamsError(f"{where}: audited_model.source must be one of {', '.join(MODEL_SOURCES)}, "
                          f"got {model['source']!r}")
    if model["source"] == "checkpoint" and not model["checkpoint"]:
        raise ParamsError(f"{where}: audited_model.checkpoint is required when source is 'checkpoint'")
    if model["recipe"] not in ("default", "small"):
        raise ParamsError(f"{where}: audited_model.recipe must be 'default' or 'small', got {model['recipe']!r}")
    threshold = params["discovery"]["influence_threshold"]
    if not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ParamsError(f"{where}: discovery.influence_threshold must lie in [0, 1], got {threshold!r}")
    disc = params["discovery"]
    if not isinstance(disc["evidence"], bool):
        raise ParamsError(f"{where}: discovery.evidence must be true or false, got {disc['evidence']!r}")
    workers = disc["cluster_workers"]
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ParamsError(f"{where}: discovery.cluster_workers must be a positive integer, got {workers!r}")
    perms = disc["permutations"]
    if not isinstance(perms, int) or isinstance(perms, bool) or perms < 1:
        raise ParamsError(f"{where}: discovery.permutations must be a positive integer, got {perms!r}")
    alpha = disc["alpha"]
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < 1:
        raise ParamsError(f"{where}: discovery.alpha must lie in (0, 1), got {alpha!r}")
    if disc["mask_fill"] not in MASK_FILLS:
        raise ParamsError(f"{where}: discovery.mask_fill must be one of {', '.join(MASK_FILLS)}, "
                          f"got {disc['mask_fill']!r}")
    tau = params["scores"]["tau"]
    if not isinstance(tau, (int, float)) or tau <= 0:
        raise ParamsError(f"{where}: scores.tau must be a positive number, got {tau!r}")
    drop = params["evaluation"]["max_accuracy_drop"]
    # a negative drop is allowed: it demands a gain of at least that much
    if not isinstance(drop, (int, float)) or isinstance(drop, bool):
        raise ParamsError(f"{where}: evaluation.max_accuracy_drop must be a number, got {drop!r}")


def section_version(params: Mapping[str, Mapping[str, Any]], section: str) -> str:
    """A short content hash of one section (stable key order)."""
    text = json.dumps(params[section], sort_keys=True, default=str)
    return hashlib.sha256(f"{section}:{text}".encode()).hexdigest()[:16]
