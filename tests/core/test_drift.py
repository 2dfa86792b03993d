"""Re-audit drift: findings matched across audits by medoid similarity (not
cluster id), what appeared, disappeared or changed, and metric deltas."""
from __future__ import annotations

import numpy as np

from ravl_pipeline.core.drift import findings_drift, has_changes, match_findings, metrics_drift
from ravl_pipeline.core.findings import Feature, Findings


def unit(*v) -> list[float]:
    a = np.asarray(v, dtype=float)
    return list(a / np.linalg.norm(a))


def audit(features: list[tuple[int, str, bool, list[float]]], k: int = 4, model: str = "m") -> Findings:
    """Findings whose feature i has cluster id i + 10 (ids are arbitrary across runs)."""
    medoids = [unit(0, 0, 0, 1)] * (len(features) + 10)
    feats = []
    for i, (rank, attribute, called, medoid) in enumerate(features):
        medoids[i + 10] = medoid
        feats.append(Feature(rank=rank, cluster_id=i + 10, score=1.0 / rank, influence=0.5, attribute=attribute,
                             regions=[{"image_id": f"im{rank}", "region_index": 0, "box": None, "similarity": 1.0}],
                             q_value=0.01 if called else 0.5, called=called))
    return Findings(model=model, dataset="d", classes=["nine", "three"], k=k, silhouette=0.3, features=feats,
                    medoid_embeddings=medoids)


SQUARE, EMPTY, DIGIT = unit(1, 0, 0, 0), unit(0, 1, 0, 0), unit(0, 0, 1, 0)


def test_the_same_audit_has_no_drift():
    a = audit([(1, "nine", True, SQUARE), (2, "three", False, EMPTY)])
    drift = findings_drift(a, a)
    assert drift["unchanged"] == 2 and not has_changes(drift) and drift["new_called"] == []
    assert drift["matched_by"] == "medoid cosine"


def test_findings_are_matched_by_medoid_not_cluster_id_or_rank():
    before = audit([(1, "nine", True, SQUARE), (2, "three", False, EMPTY)])
    # same two features, ranks swapped and stored under other cluster ids; medoids moved slightly
    after = audit([(1, "three", False, unit(0.05, 1, 0, 0)), (2, "nine", True, unit(1, 0.05, 0, 0))])
    pairs, _ = match_findings(before, after)
    assert sorted((i, j) for i, j, _ in pairs) == [(0, 1), (1, 0)]
    drift = findings_drift(before, after)
    assert drift["appeared"] == [] and drift["disappeared"] == []
    assert sorted((c["previous_rank"], c["rank"], c["changed"][0]) for c in drift["changed"]) == [
        (1, 2, "rank"), (2, 1, "rank")]
    assert drift["new_called"] == []


def test_a_new_called_finding_appears_and_an_old_one_disappears():
    before = audit([(1, "nine", True, SQUARE), (2, "three", False, EMPTY)])
    after = audit([(1, "nine", True, SQUARE), (2, "three", True, DIGIT)], k=5)
    drift = findings_drift(before, after)
    assert [f["rank"] for f in drift["appeared"]] == [2] and drift["appeared"][0]["called"] is True
    assert [f["attribute"] for f in drift["disappeared"]] == ["three"]
    assert drift["new_called"] == [2] and drift["k_change"] == [4, 5]
    assert has_changes(drift)


def test_a_finding_that_becomes_called_counts_as_new_called():
    before = audit([(1, "nine", False, SQUARE)])
    after = audit([(1, "nine", True, SQUARE)])
    drift = findings_drift(before, after)
    assert drift["changed"][0]["changed"] == ["called"] and drift["new_called"] == [1]


def test_without_medoids_findings_match_by_region_overlap():
    before = audit([(1, "nine", True, SQUARE)])
    after = audit([(1, "nine", True, SQUARE)])
    before.medoid_embeddings = None
    drift = findings_drift(before, after)
    assert drift["matched_by"] == "region overlap" and drift["unchanged"] == 1


def test_metric_deltas_are_current_minus_previous():
    prev = {"audited": {"image_overall": 0.5, "image_worst_group": 0.0, "region_overall": 0.3,
                        "region_worst_group": None},
            "mitigated": {"image_overall": 0.6, "image_worst_group": 0.1, "region_overall": 0.4,
                          "region_worst_group": 0.1}}
    cur = {"audited": dict(prev["audited"]), "mitigated": dict(prev["mitigated"], image_worst_group=0.25)}
    deltas = metrics_drift(prev, cur)
    assert deltas["audited"]["image_overall"]["change"] == 0.0
    assert deltas["audited"]["region_worst_group"]["change"] is None
    assert np.isclose(deltas["mitigated"]["image_worst_group"]["change"], 0.15)
