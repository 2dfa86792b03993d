"""Class text embeddings and zero-shot scores of images and regions (SPEC §1.3–1.4)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from ..config import DEFAULT_TAU, DEFAULT_TEMPLATES, InputError, template_problem
from ..io.files import atomic_dir, write_json_atomic
from ..io.tables import fixed_list, matrix
from ..models import LoadedModel

__all__ = ["Scores", "ScoresError", "check_templates", "check_tau",
           "class_text_embeddings", "zero_shot_probs", "model_tau", "score",
           "label_indices"]


class ScoresError(InputError):
    """Templates, classes or stored scores that cannot be used."""


def class_text_embeddings(lm: LoadedModel, classes: Sequence[str],
                          templates: Sequence[str] = DEFAULT_TEMPLATES,
                          grad: bool = False) -> torch.Tensor:
    """``t_y`` (SPEC §1.3): mean of L2-normalised template embeddings, renormalised."""
    check_templates(templates)
    texts = [t.format(c) for c in classes for t in templates]
    device = next(lm.model.parameters()).device
    tokens = lm.tokenizer(texts).to(device)
    with torch.set_grad_enabled(grad), lm.compute.autocast():
        emb = F.normalize(lm.model.encode_text(tokens).float(), dim=-1)
        emb = emb.reshape(len(classes), len(templates), -1).mean(dim=1)
        return F.normalize(emb, dim=-1)


def check_templates(templates: Sequence[str], where: str = "prompt template") -> list[str]:
    """Templates that can each be filled with a class name (SPEC §1.3); :class:`ScoresError` otherwise."""
    if not templates:
        raise ScoresError(f"at least one {where} is needed")
    for t in templates:
        if template_problem(t):
            raise ScoresError(f"{where} {t!r} {template_problem(t)}")
    return list(templates)


def class_key(name: str) -> str:
    """A class name as its prompts read it: case and runs of spaces ignored."""
    return " ".join(str(name).split()).casefold()


def check_classes(classes: Sequence[str], where: str = "classes") -> list[str]:
    """At least two classes, no two of which differ only by case or spaces
    (their prompts would name the same thing); :class:`ScoresError` naming
    ``where`` otherwise."""
    classes = list(classes)
    if len(classes) < 2:
        raise ScoresError(f"{where}: a contrastive audit needs at least two classes, got {len(classes)} "
                          f"({', '.join(map(repr, classes)) or 'none'})")
    seen: dict[str, str] = {}
    for name in classes:
        key = class_key(name)
        if key in seen:
            raise ScoresError(f"{where}: classes {seen[key]!r} and {name!r} differ only by case or spaces, so their "
                              "prompts name the same thing: give their images one label")
        seen[key] = name
    return classes


def check_prompts(lm: LoadedModel, classes: Sequence[str], templates: Sequence[str]) -> None:
    """No two classes whose prompts the tokenizer makes identical (a long
    name cut at the text tower's context length); :class:`ScoresError`
    naming both, before any image is embedded."""
    for template in templates:
        tokens = lm.tokenizer([template.format(c) for c in classes])
        seen: dict[tuple, str] = {}
        for name, row in zip(classes, tokens.tolist()):
            key = tuple(row)
            if key in seen:
                raise ScoresError(f"classes {seen[key]!r} and {name!r}: the prompts {template.format(seen[key])!r} "
                                  f"and {template.format(name)!r} are identical once tokenized (cut at "
                                  f"{len(row)} tokens): shorten the class names or the template")
            seen[key] = name


def check_tau(tau: float) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ScoresError(f"the softmax temperature tau must be a number > 0, got {tau!r}")
    return float(tau)


def zero_shot_probs(emb: np.ndarray | torch.Tensor, text_emb: np.ndarray | torch.Tensor,
                    tau: float = DEFAULT_TAU) -> np.ndarray:
    """``softmax(e · T / τ)`` (SPEC §1.4) for L2-normalised rows of ``emb``."""
    e = _as_float_tensor(emb)
    t = _as_float_tensor(text_emb)
    return torch.softmax(e @ t.T / check_tau(tau), dim=-1).numpy()


def _as_float_tensor(x) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.detach().to(torch.float32).cpu()
    return torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy


def model_tau(lm: LoadedModel, use_logit_scale: bool = False) -> float:
    if use_logit_scale:
        return float(1.0 / lm.model.logit_scale.exp().item())
    return DEFAULT_TAU


@dataclass
class Scores:
    """Zero-shot class probabilities of every image and region of one dataset."""

    classes: list[str]
    image_probs: np.ndarray  # [N, C]
    region_probs: np.ndarray  # [M, C]
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    tau: float = DEFAULT_TAU

    @property
    def image_pred(self) -> np.ndarray:
        return self.image_probs.argmax(axis=1)

    def save(self, out_dir: str | os.PathLike, image_ids: Sequence[str], labels: np.ndarray) -> Path:
        """``images.parquet`` (id, label, prediction, probabilities), ``regions.parquet``
        and ``scores.json`` (classes, templates, τ) in one folder, atomically."""
        out = Path(out_dir)
        with atomic_dir(out) as tmp:
            pq.write_table(pa.table({"image_id": list(image_ids), "label": pa.array(labels, pa.int64()),
                                     "pred": pa.array(self.image_pred, pa.int64()),
                                     "probs": fixed_list(self.image_probs)}), tmp / "images.parquet")
            pq.write_table(pa.table({"probs": fixed_list(self.region_probs)}), tmp / "regions.parquet")
            write_json_atomic(tmp / "scores.json", {"classes": self.classes, "templates": self.templates,
                                                    "tau": self.tau})
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Scores":
        path = Path(path)
        try:
            info = json.loads((path / "scores.json").read_text())
            images = pq.read_table(path / "images.parquet")
            regions = pq.read_table(path / "regions.parquet")
        except (OSError, ValueError, pa.ArrowInvalid) as exc:
            raise ScoresError(f"cannot read scores in {path}: {exc}") from exc
        return cls(info["classes"], matrix(images.column("probs")), matrix(regions.column("probs")),
                   list(info.get("templates") or DEFAULT_TEMPLATES), float(info.get("tau", DEFAULT_TAU)))


def score(lm: LoadedModel, emb, classes: Sequence[str], templates: Sequence[str],
          tau: float | None = None) -> Scores:
    """SPEC §1.4 for every image and region of ``emb`` (an :class:`~.embed.Embeddings`)."""
    check_classes(classes)
    text = class_text_embeddings(lm, classes, templates).cpu().numpy()
    tau = model_tau(lm) if tau is None else tau
    return Scores(list(classes), zero_shot_probs(emb.image_emb, text, tau),
                  zero_shot_probs(emb.region_emb, text, tau), list(templates), float(tau))


def label_indices(ds, classes: Sequence[str]) -> np.ndarray:
    """Each image's class as an index into ``classes``."""
    index = {c: k for k, c in enumerate(classes)}
    return np.array([index[y] for y in ds.labels], dtype=np.int64)
