"""Names for discovered features, read off the audited model's own text
tower (SPEC §1.3, §5 extra keys).

Each finding's medoid region embedding is compared with the text embedding
of every term of a concept vocabulary (colours, shapes, common objects and
colour+shape combinations, ``vocab/concepts.txt``; users add their own with
a file).  The top terms describe what *the model* associates with the
cluster — a hint for a person reading the findings, not ground truth, which
is why every result carries ``model_derived: true``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ...config import DEFAULT_TEMPLATE, InputError
from ..findings import Feature
from ..scores import class_text_embeddings

VOCAB_DIR = Path(__file__).parent / "vocab"
DEFAULT_VOCAB = VOCAB_DIR / "concepts.txt"
DEFAULT_NAME_TEMPLATE = DEFAULT_TEMPLATE
DEFAULT_TOP = 5

__all__ = ["DEFAULT_VOCAB", "read_vocabulary", "load_vocabulary", "rank_terms", "name_features"]


def read_vocabulary(path) -> list[str]:
    """Terms of a vocabulary file: one per line; blank lines and lines
    starting with ``#`` are skipped; duplicates keep their first position."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"vocabulary file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"vocabulary file {path}: not UTF-8 text ({exc})") from None
    terms: list[str] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        term = line.strip()
        if not term or term.startswith("#"):
            continue
        if "{" in term or "}" in term:
            raise InputError(f"vocabulary file {path}, line {line_no}: braces are not allowed in a term ({term!r})")
        if term not in terms:
            terms.append(term)
    if not terms:
        raise InputError(f"vocabulary file {path} holds no terms")
    return terms


def load_vocabulary(extra: Sequence | None = None, include_default: bool = True) -> list[str]:
    """The packaged vocabulary followed by the terms of each ``extra`` file."""
    terms = read_vocabulary(DEFAULT_VOCAB) if include_default else []
    for path in extra or []:
        terms += [t for t in read_vocabulary(path) if t not in terms]
    if not terms:
        raise InputError("the concept vocabulary is empty")
    return terms


def rank_terms(embedding: np.ndarray, term_emb: np.ndarray, terms: Sequence[str],
               top: int = DEFAULT_TOP) -> list[dict]:
    """The ``top`` terms by cosine similarity to ``embedding`` (ties: vocabulary order)."""
    e = np.asarray(embedding, dtype=np.float64)
    e = e / max(np.linalg.norm(e), 1e-12)
    t = np.asarray(term_emb, dtype=np.float64)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    sims = t @ e
    order = np.argsort(-sims, kind="stable")[: int(top)]
    return [{"term": terms[j], "score": float(sims[j])} for j in order]


def name_features(features: Sequence[Feature], lm, region_emb: np.ndarray, terms: Sequence[str] | None = None,
                  template: str = DEFAULT_NAME_TEMPLATE, top: int = DEFAULT_TOP) -> dict[int, dict]:
    """``names`` of every feature, by cluster id: ranked terms for its medoid region."""
    if "{}" not in template:
        raise ValueError(f"name template {template!r} has no '{{}}' placeholder for the term")
    terms = list(terms) if terms is not None else load_vocabulary()
    if not features:
        return {}
    term_emb = class_text_embeddings(lm, terms, [template]).cpu().numpy()
    return {f.cluster_id: {"model_derived": True, "template": template,
                           "terms": rank_terms(region_emb[int(f.medoid)], term_emb, terms, top)}
            for f in features}
