"""Stage 1 (SPEC §2.2–2.6) arithmetic on hand-built inputs: gaps, influence,
the spurious criterion, ranking; Precision@k and the findings file."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from ravl_pipeline.core.cluster import Clustering, cluster_regions
from ravl_pipeline.core.findings import Feature, Findings, FindingsError, read_findings, write_findings
from ravl_pipeline.core.metrics import precision_at_k, region_label_map
from ravl_pipeline.core.rank import cluster_performance_gap, influence_score, is_spurious, rank_features


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _normalise_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------
# SPEC §2.2 performance gap
# --------------------------------------------------------------------------


def test_cluster_performance_gap_weighting_and_skips():
    #            class 0: 2 in (both right), 6 out (3 right)
    #            class 1: 2 in, 0 out -> skipped (n_out == 0)
    #            class 2: 0 in, 3 out -> absent (n_in == 0)
    #            class 3: 3 in (0 right), 1 out (1 right)
    labels = np.array([0, 0] + [0] * 6 + [1, 1] + [2] * 3 + [3] * 3 + [3])
    inside = np.array([1, 1] + [0] * 6 + [1, 1] + [0] * 3 + [1] * 3 + [0], dtype=bool)
    correct = np.array([1, 1] + [1, 1, 1, 0, 0, 0] + [1, 0] + [1, 1, 1] + [0, 0, 0] + [1], dtype=bool)
    gaps = cluster_performance_gap(inside, labels, correct)
    assert set(gaps) == {0, 3}
    # class 0: acc_in 1, acc_out 3/6 = .5; w = 2*min(2,6)/8 = .5; gap = .5 * .5 = .25
    g0 = gaps[0]
    assert (g0["n_present"], g0["n_absent"]) == (2, 6)
    assert g0["acc_present"] == 1.0 and g0["acc_absent"] == 0.5
    assert g0["raw_gap"] == pytest.approx(0.5)
    assert g0["gap"] == pytest.approx(0.25)
    # class 3: acc_in 0, acc_out 1; w = 2*1/4 = .5; gap = .5 * -1 = -.5
    g3 = gaps[3]
    assert (g3["n_present"], g3["n_absent"]) == (3, 1)
    assert g3["raw_gap"] == pytest.approx(-1.0)
    assert g3["gap"] == pytest.approx(-0.5)


def test_balanced_split_has_full_weight():
    # n_in == n_out -> w = 1, gap equals the raw difference
    labels = np.zeros(4, dtype=int)
    inside = np.array([1, 1, 0, 0], dtype=bool)
    correct = np.array([1, 0, 0, 0], dtype=bool)
    g = cluster_performance_gap(inside, labels, correct)[0]
    assert g["gap"] == pytest.approx(0.5) == g["raw_gap"]


# --------------------------------------------------------------------------
# SPEC §2.3 influence
# --------------------------------------------------------------------------


def _influence_fixture():
    """Cluster 0 under test; classes 0..3. gaps: 0 -> +, 1 -> -, 3 -> -, 2 absent.

    img  y  pred  regions (cluster: score for pred)          recorded?
    0    1  0     c0: .9, c1: .1   -> r* in c0               yes, True  (class 1)
    1    1  0     c0: .2, c1: .8   -> r* in c1               yes, False (class 1)
    2    1  0     c0 only (one region)                       no: single region
    3    1  1     c0: .9, c1: .1   (correct)                 no: correct
    4    0  1     c0: .9, c1: .1   (class 0 gap positive)    no: gap > 0
    5    2  0     c0: .9, c1: .1   (class 2 has no gap)      no: no gap
    6    1  0     c1: .9, c1: .1   (no region in c0)         no: not in In_c
    7    3  0     c0: .9, c2: .1   -> r* in c0               yes, True  (class 3)
    H(1) = 1/2, H(3) = 1/1 -> H = 1.0
    """
    regs = [  # (image, cluster, score for that image's predicted class)
        (0, 0, 0.9), (0, 1, 0.1),
        (1, 0, 0.2), (1, 1, 0.8),
        (2, 0, 0.9),
        (3, 0, 0.9), (3, 1, 0.1),
        (4, 0, 0.9), (4, 1, 0.1),
        (5, 0, 0.9), (5, 1, 0.1),
        (6, 1, 0.9), (6, 1, 0.1),
        (7, 0, 0.9), (7, 2, 0.1),
    ]
    image_labels = np.array([1, 1, 1, 1, 0, 2, 1, 3])
    image_pred = np.array([0, 0, 0, 1, 1, 0, 0, 0])
    region_image = np.array([r[0] for r in regs])
    labels = np.array([r[1] for r in regs])
    scores = np.full((len(regs), 4), 0.0)
    for row, (img, _, s) in enumerate(regs):
        scores[row, image_pred[img]] = s
        scores[row, (image_pred[img] + 1) % 4] = 1 - s  # a distractor class
    gaps = {0: {"gap": 0.3}, 1: {"gap": -0.4}, 3: {"gap": -0.1}}
    return labels, region_image, scores, image_labels, image_pred, gaps


def test_influence_counts_only_eligible_images():
    labels, region_image, scores, y, pred, gaps = _influence_fixture()
    h, per_class = influence_score(0, labels, region_image, scores, y, pred, gaps)
    assert per_class == {1: 0.5, 3: 1.0}
    assert h == 1.0
    # dropping class 3's negative gap leaves H = H(1) = 0.5
    h, per_class = influence_score(0, labels, region_image, scores, y, pred, {0: 0.3, 1: -0.4})
    assert (h, per_class) == (0.5, {1: 0.5})


def test_influence_is_minus_inf_when_nothing_recorded():
    labels, region_image, scores, y, pred, _ = _influence_fixture()
    # no negative gap -> nothing recorded
    h, per_class = influence_score(0, labels, region_image, scores, y, pred, {0: 0.3, 1: 0.2})
    assert h == -math.inf and per_class == {}
    # negative gap only for class 2, whose one In_c image (5) is misclassified but ...
    # ... make it correct: then no eligible image remains
    pred2 = pred.copy()
    pred2[5] = 2
    h, _ = influence_score(0, labels, region_image, scores, y, pred2, {2: -0.5})
    assert h == -math.inf


def test_influence_best_region_ties_break_by_region_index():
    # one misclassified image, two regions with equal score for the prediction;
    # row 0 has region_index 1, row 1 has region_index 0 -> r* = row 1 (cluster 1)
    labels = np.array([0, 1])
    region_image = np.array([0, 0])
    scores = np.array([[0.5, 0.5], [0.5, 0.5]])
    y, pred = np.array([1]), np.array([0])
    h0, _ = influence_score(0, labels, region_image, scores, y, pred, {1: -1.0}, region_index=np.array([1, 0]))
    h1, _ = influence_score(1, labels, region_image, scores, y, pred, {1: -1.0}, region_index=np.array([1, 0]))
    assert (h0, h1) == (0.0, 1.0)


# --------------------------------------------------------------------------
# SPEC §2.4 criterion
# --------------------------------------------------------------------------


def test_spurious_criterion():
    both = {0: {"gap": 0.1}, 1: {"gap": -0.1}}
    assert is_spurious(both, 0.25)  # boundary: H == 0.25 is kept
    assert not is_spurious(both, 0.2499)
    assert not is_spurious(both, -math.inf)
    assert not is_spurious({0: 0.1, 1: 0.2}, 1.0)  # no negative gap
    assert not is_spurious({0: -0.1, 1: -0.2}, 1.0)  # no positive gap
    assert not is_spurious({0: 0.1, 1: 0.0}, 1.0)  # zero is neither
    assert not is_spurious({}, 1.0)
    assert is_spurious(both, 0.4, threshold=0.4)


# --------------------------------------------------------------------------
# rank_features: ranking, attribute, regions, empty case
# --------------------------------------------------------------------------


def _toy(extra_image=False, i3_empty_score_b=0.7):
    """Two classes a(0), b(1). Each image: region 0 = object, region 1 = feature or empty.

    Clusters: 0 = feature regions, 1 = empty regions, 2 = a objects, 3 = b objects.
      i0, i1: a + feature, right        i2: a, no feature, right
      i3: a, no feature, wrong (pred b)  i4, i5: b + feature, wrong (pred a)
      i6, i7: b, no feature, right       i8 (extra): a, one region (object only), right

    Without i8:
      c0: a in 2 acc 1, out 2 acc .5, w 1 -> +.5;  b in 2 acc 0, out 2 acc 1 -> -1;  G = 1.5
          influence: i4, i5 (b, negative) r* = feature region (.9 for a) -> H = 1
      c1: a in 2 acc .5, out 2 acc 1 -> -.5;  b in 2 acc 1, out 2 acc 0 -> +1;  G = 1.5
          influence: i3 (a, negative) r* = argmax score for b over (object .6, empty x)
      c2/c3: n_out == 0 for their class -> no gaps, G = 0, not kept.
    With i8 (in neither c0 nor c1; a has 5 images):
      c0: a in 2 acc 1, out 3 acc 2/3, w = 2*2/5 = .8 -> .8/3;  b -> -1;  G = 1.2667
      c1: a in 2 acc .5, out 3 acc 1, w .8 -> -.4;  b -> +1;  G = 1.4
    """
    # feature-cluster embeddings: medoid i0 = e0; i4 closest; i1 and i5 identical (tie)
    e = np.eye(6)
    feat = {0: e[0], 1: _unit([1, 0.5, 0, 0, 0, 0]), 4: _unit([1, 0.1, 0, 0, 0, 0]),
            5: _unit([1, 0.5, 0, 0, 0, 0])}
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    pred = [0, 0, 0, 1, 0, 0, 1, 1]
    has_feature = [1, 1, 0, 0, 1, 1, 0, 0]
    emb, rimg, ridx, lab, scores, rlabels = [], [], [], [], [], []
    for i in range(8):
        # object region
        emb.append(e[2] if y[i] == 0 else e[3])
        lab.append(2 if y[i] == 0 else 3)
        obj = {0: [0.8, 0.2], 1: [0.2, 0.8]}[y[i]]
        if i == 3:
            obj = [0.4, 0.6]
        scores.append(obj)
        rlabels.append("a" if y[i] == 0 else "b")
        rimg.append(i), ridx.append(0)
        # second region
        if has_feature[i]:
            emb.append(feat[i])
            lab.append(0)
            scores.append([0.9, 0.1])
            rlabels.append("feature")
        else:
            emb.append(_unit([0, 0, 0, 0, 1, 0.01 * i]))
            lab.append(1)
            scores.append([1 - i3_empty_score_b, i3_empty_score_b] if i == 3 else [0.5, 0.5])
            rlabels.append("empty")
        rimg.append(i), ridx.append(1)
    if extra_image:
        y.append(0), pred.append(0)
        emb.append(e[2]), lab.append(2), scores.append([0.8, 0.2]), rlabels.append("a")
        rimg.append(8), ridx.append(0)
    emb = np.array(emb, dtype=np.float32)
    lab = np.array(lab)
    medoids = np.array([1, 5, 0, 8])  # rows: i0 feature, i2 empty, i0 object, i4 object
    clustering = Clustering(k=4, silhouette=0.5, labels=lab, medoids=medoids, sweep=[],
                            sampled=False, n_sample=len(lab))
    n = len(y)
    boxes = np.tile(np.array([0.0, 0.0, 28.0, 28.0]), (len(lab), 1))
    return dict(
        region_emb=emb, region_image=np.array(rimg), region_index=np.array(ridx),
        region_scores=np.array(scores), image_labels=np.array(y), image_pred=np.array(pred),
        classes=["a", "b"], boxes=boxes, image_ids=[f"img{i}" for i in range(n)],
        clustering=clustering,
    ), rlabels


def _rank(inputs: dict, **kwargs) -> Findings:
    return rank_features(**inputs, **kwargs)


def _json(findings: Findings) -> str:
    return json.dumps(findings.to_dict(), allow_nan=False)


def test_rank_ties_rank_by_cluster_id():
    inputs, _ = _toy()
    out = _rank(inputs, model="m", dataset="d")
    _json(out)
    assert [f.cluster_id for f in out.features] == [0, 1]  # G 1.5 == 1.5 -> lower id first
    assert [f.rank for f in out.features] == [1, 2]
    f0, f1 = out.features
    assert f0.score == pytest.approx(1.5) and f1.score == pytest.approx(1.5)
    assert f0.influence == 1.0 and f1.influence == 1.0
    rows = {r["label"]: r for r in f0.per_class}
    assert rows["a"]["gap"] == pytest.approx(0.5) and rows["b"]["gap"] == pytest.approx(-1.0)
    assert (rows["a"]["n_present"], rows["a"]["n_absent"]) == (2, 2)
    # attribute: largest unweighted acc_in - acc_out: c0 -> a (+.5 vs -1), c1 -> b (+1 vs -.5)
    assert f0.attribute == "a" and f1.attribute == "b"
    assert (out.model, out.dataset, out.classes, out.k) == ("m", "d", ["a", "b"], 4)
    assert out.medoids == [1, 5, 0, 8]
    assert [c["kept"] for c in out.clusters] == [True, True, False, False]
    assert [c["score"] for c in out.clusters][2:] == [0.0, 0.0]
    assert out.clusters[2]["influence"] is None  # -inf written as None
    assert out.problems() == []


def test_rank_by_score_and_drop_low_influence():
    inputs, _ = _toy(extra_image=True)
    out = _rank(inputs)
    # G_1 = 1.4 > G_0 = 1.2667 -> cluster 1 first despite the higher id
    assert [f.cluster_id for f in out.features] == [1, 0]
    assert out.features[0].score == pytest.approx(1.4)
    assert out.features[1].score == pytest.approx(0.8 / 3 + 1.0)
    a_row = [r for r in out.features[1].per_class if r["label"] == "a"][0]
    assert (a_row["n_present"], a_row["n_absent"]) == (2, 3)
    assert a_row["gap"] == pytest.approx(0.8 * (1 - 2 / 3))
    # i3's r* for its prediction b is now its object region (.6 > .3): H_1 = 0 -> dropped
    inputs, _ = _toy(i3_empty_score_b=0.3)
    out = _rank(inputs)
    assert [f.cluster_id for f in out.features] == [0]
    assert out.clusters[1]["influence"] == 0.0 and not out.clusters[1]["kept"]
    # threshold above every H -> nothing kept
    assert _rank(inputs, influence_threshold=1.01).features == []


def test_regions_ranked_by_similarity_to_medoid():
    inputs, rlabels = _toy()
    out = _rank(inputs)
    regs = out.features[0].regions
    # medoid i0 (sim 1), i4 (cos = 1/sqrt(1.01)), then tied i1, i5 in row order
    assert [r["image_id"] for r in regs] == ["img0", "img4", "img1", "img5"]
    assert regs[0]["similarity"] == pytest.approx(1.0)
    assert regs[1]["similarity"] == pytest.approx(1 / math.sqrt(1.01), rel=1e-6)
    assert regs[2]["similarity"] == regs[3]["similarity"] == pytest.approx(1 / math.sqrt(1.25), rel=1e-6)
    assert all(r["region_index"] == 1 for r in regs)
    assert regs[0]["box"] == [0.0, 0.0, 28.0, 28.0]
    assert out.features[0].medoid == 1 and out.features[0].size == 4
    top2 = _rank(inputs, top_regions=2).features[0].regions
    assert [r["image_id"] for r in top2] == ["img0", "img4"]
    assert [r["image_id"] for r in _rank(inputs, top_regions=None).features[0].regions] == [
        "img0", "img4", "img1", "img5"]
    # precision@k on the discovered feature, ground truth keyed by (image_id, region_index)
    gt = region_label_map(inputs["image_ids"], inputs["region_image"], inputs["region_index"], rlabels)
    assert precision_at_k(out.features[0], gt, "feature", k=4) == 1.0
    assert precision_at_k(out.features[1], gt, "feature", k=4) == 0.0
    # region_labels (evaluation ground truth) travel with the region rows
    labelled = _rank(inputs, region_labels=rlabels).features[0].regions
    assert [r["region_label"] for r in labelled] == ["feature"] * 4


def test_empty_when_nothing_qualifies():
    inputs, _ = _toy()
    inputs["image_pred"] = inputs["image_labels"].copy()  # all right -> every gap 0
    out = _rank(inputs)
    assert out.features == []
    assert not any(c["kept"] for c in out.clusters)
    assert out.lead() is None
    _json(out)


def test_rank_end_to_end_on_random_inputs_is_json_clean():
    rng = np.random.default_rng(0)
    n, r, c = 12, 3, 2
    emb = _normalise_rows(rng.normal(size=(n * r, 8))).astype(np.float32)
    scores = rng.dirichlet(np.ones(c), size=n * r)
    clustering = cluster_regions(emb, n_classes=c, seed=0)
    out = rank_features(
        clustering, emb, np.repeat(np.arange(n), r), np.tile(np.arange(r), n), scores,
        rng.integers(0, c, n), rng.integers(0, c, n), ["x", "y"],
    )
    _json(out)
    assert 4 <= out.k < 10 and len(out.medoids) == out.k
    assert [s["k"] for s in out.k_sweep] == list(range(4, 10))
    assert sum(cl["size"] for cl in out.clusters) == n * r
    assert out.to_dict()["schema_version"] == 1 and out.sampled is False
    assert out.seed == 0 and (out.n_images, out.n_regions) == (n, n * r)
    # the medoid vectors Stage 2 assigns training regions to (SPEC §3.1)
    np.testing.assert_allclose(out.medoid_embeddings, emb[out.medoids], atol=1e-7)


def test_rank_rejects_inputs_of_the_wrong_shape():
    inputs, _ = _toy()
    with pytest.raises(ValueError, match="region_scores"):
        _rank({**inputs, "region_scores": inputs["region_scores"][:, :1]})
    with pytest.raises(ValueError, match="image_ids"):
        _rank({**inputs, "image_ids": inputs["image_ids"][:-1]})
    with pytest.raises(ValueError, match="boxes"):
        _rank({**inputs, "boxes": inputs["boxes"][:-1]})


# --------------------------------------------------------------------------
# precision@k and findings I/O
# --------------------------------------------------------------------------


def _feature(regions: list[dict]) -> Feature:
    return Feature(rank=1, cluster_id=0, score=1.0, influence=1.0, regions=regions)


def test_precision_at_k():
    feature = _feature([{"image_id": f"i{j}", "region_index": j % 4} for j in range(12)])
    labels = {(f"i{j}", j % 4): ("red" if j in (0, 1, 2, 5, 9, 11) else "empty") for j in range(12)}
    # top 10 = j 0..9: red at 0, 1, 2, 5, 9 -> 5/10 (j = 11 is outside the top 10)
    assert precision_at_k(feature, labels, "red") == 0.5
    assert precision_at_k(feature, labels, "red", k=3) == 1.0
    # fewer than k regions: missing ones count as misses
    short = _feature(feature.regions[:2])
    assert precision_at_k(short, labels, "red", k=10) == 0.2
    assert precision_at_k(None, labels, "red") == 0.0
    assert precision_at_k(feature, {}, "red") == 0.0


def test_findings_roundtrip_and_errors(tmp_path):
    inputs, _ = _toy()
    out = _rank(inputs)
    path = tmp_path / "sub" / "findings.json"
    write_findings(out, path)
    assert read_findings(path) == out
    assert [p.name for p in path.parent.iterdir()] == ["findings.json"]  # no temp left
    data = out.to_dict()

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FindingsError, match="bad.json"):
        read_findings(bad)
    missing = dict(data)
    del missing["silhouette"]
    bad.write_text(json.dumps(missing))
    with pytest.raises(FindingsError, match=r"bad\.json.*silhouette"):
        read_findings(bad)
    bad.write_text(json.dumps({**data, "schema_version": 2}))
    with pytest.raises(FindingsError, match=r"bad\.json.*schema_version"):
        read_findings(bad)
    bad.write_text(json.dumps({**data, "features": [{"rank": 1}]}))
    with pytest.raises(FindingsError, match=r"features\[0\]"):
        read_findings(bad)
    bad.write_text("[]")
    with pytest.raises(FindingsError, match="bad.json"):
        read_findings(bad)
    # a plain SPEC §5 file without schema_version is accepted
    plain = {k: data[k] for k in ("model", "dataset", "classes", "k", "silhouette", "features")}
    bad.write_text(json.dumps(plain))
    assert read_findings(bad).k == 4
    # keys another tool added survive a read and a write
    bad.write_text(json.dumps({**data, "reviewer": "x", "features": [{**data["features"][0], "note": "y"}]}))
    again = read_findings(bad)
    write_findings(again, bad)
    reread = json.loads(bad.read_text())
    assert reread["reviewer"] == "x" and reread["features"][0]["note"] == "y"
    # a non-finite number is refused before anything is written
    with pytest.raises(ValueError):
        write_findings(dataclasses.replace(out, silhouette=float("inf")), tmp_path / "inf.json")
    assert not (tmp_path / "inf.json").exists()
