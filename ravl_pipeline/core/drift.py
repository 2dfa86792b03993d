"""What changed between two audits of the same validation set (re-audit drift).

A weekly re-audit produces a fresh findings file; its reader first wants to
know what is new. Cluster ids mean nothing across runs (K-medoids labels are
arbitrary and K itself may change), so a finding of the previous audit is
matched to one of the current audit by the cosine similarity of their
medoid embeddings (``findings.json``'s ``medoid_embeddings``, unit vectors),
greedily from the most similar pair down to ``min_similarity``. Without
medoid vectors on either side, findings are matched by the overlap of their
top regions instead. Then:

* **appeared**: a current finding with no match in the previous audit;
* **disappeared**: a previous finding with no match in the current one;
* **changed**: a matched pair whose rank, attribute or called flag differs;
* **new called**: a called current finding that is new or was not called
  before — what the re-audit asset check warns about;
* metric deltas: each of the four SPEC §4.2 metrics, per model, current
  minus previous.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .findings import Feature, Findings
from .metrics import METRIC_KEYS

MIN_SIMILARITY = 0.8  # cosine between medoids for "the same finding"
MIN_REGION_OVERLAP = 0.5  # Jaccard of top regions, when there are no medoid vectors


def _medoid(findings: Findings, feature: Feature) -> np.ndarray | None:
    vectors = findings.medoid_embeddings
    if not vectors or feature.cluster_id is None or feature.cluster_id >= len(vectors):
        return None
    v = np.asarray(vectors[feature.cluster_id], dtype=np.float64)
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else None


def _regions(feature: Feature) -> set[tuple[str, int]]:
    return {(str(r["image_id"]), int(r["region_index"])) for r in feature.regions}


def similarity_matrix(previous: Findings, current: Findings) -> tuple[np.ndarray, str]:
    """Pairwise similarity of previous (rows) and current (columns) findings,
    and what it measures: ``medoid cosine`` or ``region overlap``."""
    prev = [_medoid(previous, f) for f in previous.features]
    cur = [_medoid(current, f) for f in current.features]
    sims = np.zeros((len(prev), len(cur)))
    if all(v is not None for v in prev + cur) and (len(prev) == 0 or len(cur) == 0
                                                 or len(prev[0]) == len(cur[0])):
        if prev and cur:
            sims = np.clip(np.stack(prev) @ np.stack(cur).T, -1.0, 1.0)
        return sims, "medoid cosine"
    for i, a in enumerate(previous.features):
        for j, b in enumerate(current.features):
            ra, rb = _regions(a), _regions(b)
            sims[i, j] = len(ra & rb) / len(ra | rb) if ra | rb else 0.0
    return sims, "region overlap"


def match_findings(previous: Findings, current: Findings, min_similarity: float | None = None
                   ) -> tuple[list[tuple[int, int, float]], str]:
    """Greedy one-to-one matching, most similar pair first: ``(previous
    index, current index, similarity)`` for every pair at or above the
    threshold, and the similarity used."""
    sims, kind = similarity_matrix(previous, current)
    if min_similarity is None:
        min_similarity = MIN_SIMILARITY if kind == "medoid cosine" else MIN_REGION_OVERLAP
    pairs, used_prev, used_cur = [], set(), set()
    order = np.dstack(np.unravel_index(np.argsort(-sims, axis=None, kind="stable"), sims.shape))[0]
    for i, j in order:
        if sims[i, j] < min_similarity:
            break
        if i in used_prev or j in used_cur:
            continue
        pairs.append((int(i), int(j), float(sims[i, j])))
        used_prev.add(i)
        used_cur.add(j)
    return pairs, kind


def _brief(f: Feature) -> dict[str, Any]:
    return {"rank": f.rank, "attribute": f.attribute, "called": f.called, "score": f.score,
            "q_value": f.q_value, "verdict": (f.support or {}).get("verdict")}


def findings_drift(previous: Findings, current: Findings, min_similarity: float | None = None) -> dict[str, Any]:
    """The findings part of a re-audit's drift (see the module docstring)."""
    pairs, kind = match_findings(previous, current, min_similarity)
    matched_prev = {i for i, _, _ in pairs}
    matched_cur = {j: (i, s) for i, j, s in pairs}
    changed, unchanged, new_called = [], 0, []
    for i, j, sim in sorted(pairs, key=lambda p: p[1]):
        a, b = previous.features[i], current.features[j]
        what = [name for name, x, y in (("rank", a.rank, b.rank), ("attribute", a.attribute, b.attribute),
                                        ("called", a.called, b.called)) if x != y]
        if what:
            changed.append({"rank": b.rank, "previous_rank": a.rank, "attribute": b.attribute,
                            "previous_attribute": a.attribute, "called": b.called, "previously_called": a.called,
                            "similarity": round(sim, 4), "changed": what})
        else:
            unchanged += 1
        if b.called and not a.called:
            new_called.append(b.rank)
    appeared = [_brief(f) for j, f in enumerate(current.features) if j not in matched_cur]
    new_called += [f["rank"] for f in appeared if f["called"]]
    return {
        "matched_by": kind,
        "previous": {"k": previous.k, "n_features": len(previous.features),
                     "n_called": len(previous.called) if previous.has_significance else None,
                     "lead_rank": previous.lead_rank, "model": previous.model},
        "same_model": previous.model == current.model,
        "appeared": appeared,
        "disappeared": [_brief(f) for i, f in enumerate(previous.features) if i not in matched_prev],
        "changed": changed,
        "unchanged": unchanged,
        "new_called": sorted(new_called),
        "k_change": [previous.k, current.k] if previous.k != current.k else None,
        "lead_change": ([previous.lead_rank, current.lead_rank] if previous.lead_rank != current.lead_rank
                        else None),
    }


def metrics_drift(previous: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, dict[str, dict]]:
    """Per model (``audited``, ``mitigated``) and metric: previous, current and
    their difference (current − previous; None where either is missing)."""
    out = {}
    for model in ("audited", "mitigated"):
        a, b = previous.get(model) or {}, current.get(model) or {}
        rows = {}
        for key in METRIC_KEYS:
            x, y = a.get(key), b.get(key)
            rows[key] = {"previous": x, "current": y,
                         "change": (y - x) if x is not None and y is not None else None}
        out[model] = rows
    return out


def has_changes(drift: Mapping[str, Any]) -> bool:
    """Whether a findings drift says anything changed."""
    return bool(drift["appeared"] or drift["disappeared"] or drift["changed"] or drift["k_change"]
                or drift["lead_change"])
