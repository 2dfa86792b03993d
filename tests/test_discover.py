"""Stage 1 (SPEC §2) arithmetic on hand-built inputs, clustering, findings I/O."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ravl_pipeline.ml.discover import (
    Clustering,
    assign_to_medoids,
    cluster_performance_gap,
    cluster_regions,
    cosine_distance,
    discover,
    influence_score,
    is_spurious,
    k_candidates,
    precision_at_k,
    read_findings,
    region_label_map,
    write_findings,
)


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# --------------------------------------------------------------------------
# cosine distance, K range, assignment
# --------------------------------------------------------------------------


def test_cosine_distance_properties():
    e = np.array(
        [
            [1, 0, 0],
            [0, 1, 0],  # orthogonal to row 0 -> distance 1
            [-1, 0, 0],  # opposite to row 0 -> 1 - (-1) = 2, clipped to 1
            [1, 0, 0],  # identical to row 0 -> 0
            _unit([1, 1, 0]),  # cos 45° to row 0 -> 1 - 0.7071
        ],
        dtype=np.float32,
    )
    d = cosine_distance(e)
    assert d.dtype == np.float32 and d.shape == (5, 5)
    assert np.all(np.diag(d) == 0)
    assert np.array_equal(d, d.T)
    assert d.min() >= 0 and d.max() <= 1
    assert d[0, 1] == pytest.approx(1.0)
    assert d[0, 2] == 1.0
    assert d[0, 3] == 0.0
    assert d[0, 4] == pytest.approx(1 - math.sqrt(0.5), abs=1e-6)
    assert cosine_distance(e.astype(np.float64)).dtype == np.float64


def test_k_candidates_range_and_clamp():
    # SPEC §2.1: [2|Y|, 5|Y|), upper end excluded
    assert k_candidates(3, 1000) == list(range(6, 15))
    # clamp to K < number of points
    assert k_candidates(3, 10) == [6, 7, 8, 9]
    # nothing left in range: largest feasible K
    assert k_candidates(3, 5) == [4]
    assert k_candidates(3, 2) == []
    assert k_candidates(3, 100, k_range=(2, 4)) == [2, 3]
    assert k_candidates(3, 100, k_range=[5, 3, 9]) == [3, 5, 9]


def test_assign_to_medoids_chunked_matches_bruteforce():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(500, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    med = e[[3, 70, 250]] * np.array([[2.0], [0.5], [1.0]], dtype=np.float32)  # norms ignored
    # 3 medoids * 4 bytes * 10 rows = 120 bytes -> 50 chunks of 10 rows
    got = assign_to_medoids(e, med, chunk_bytes=120)
    want = np.argmax(e @ _normalise_rows(med).T, axis=1)
    assert np.array_equal(got, want)
    assert got[3] == 0 and got[70] == 1 and got[250] == 2


def _normalise_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------
# clustering on planted clusters
# --------------------------------------------------------------------------


def _planted(n_groups, per_group, dim=16, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.eye(dim)[:n_groups]
    x = np.repeat(centers, per_group, axis=0) + noise * rng.normal(size=(n_groups * per_group, dim))
    x = _normalise_rows(x).astype(np.float32)
    truth = np.repeat(np.arange(n_groups), per_group)
    return x, truth


def _same_partition(a, b):
    """True when labelings a and b induce the same partition."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_cluster_regions_picks_planted_k_and_is_deterministic():
    # 3 classes -> K in [6, 15); 7 tight orthogonal groups -> silhouette peaks at K=7
    x, truth = _planted(7, 10)
    res = cluster_regions(x, n_classes=3, seed=0)
    assert res.k == 7
    assert [s["k"] for s in res.sweep] == list(range(6, 15))
    best = max(s["silhouette"] for s in res.sweep)
    assert res.silhouette == best == [s for s in res.sweep if s["k"] == 7][0]["silhouette"]
    assert res.silhouette > 0.9
    assert _same_partition(res.labels, truth)
    assert not res.sampled and res.n_sample == 70
    # medoids[c] is a member of cluster c
    assert len(res.medoids) == 7
    assert all(res.labels[m] == c for c, m in enumerate(res.medoids))
    again = cluster_regions(x, n_classes=3, seed=0)
    assert np.array_equal(res.labels, again.labels)
    assert np.array_equal(res.medoids, again.medoids)
    assert res.sweep == again.sweep


def test_cluster_regions_sampled_assigns_every_region():
    x, truth = _planted(7, 30, seed=3)
    res = cluster_regions(x, n_classes=3, seed=0, max_regions=50)
    assert res.sampled and res.n_sample == 50
    assert res.labels.shape == (210,)
    assert res.k == 7
    assert set(res.labels.tolist()) == set(range(7))
    assert _same_partition(res.labels, truth)
    assert all(res.labels[m] == c for c, m in enumerate(res.medoids))


def test_cluster_regions_sklearn_extra_backend_clear_error():
    try:
        import sklearn_extra  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("scikit-learn-extra importable here")
    x, _ = _planted(3, 5)
    with pytest.raises(ImportError, match="scikit-learn-extra"):
        cluster_regions(x, n_classes=1, backend="sklearn_extra")


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
# discover: ranking, attribute, regions, empty case
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


def test_discover_ties_rank_by_cluster_id():
    inputs, _ = _toy()
    out = discover(**inputs, model="m", dataset="d")
    json.dumps(out, allow_nan=False)
    assert [f["cluster_id"] for f in out["features"]] == [0, 1]  # G 1.5 == 1.5 -> lower id first
    assert [f["rank"] for f in out["features"]] == [1, 2]
    f0, f1 = out["features"]
    assert f0["score"] == pytest.approx(1.5) and f1["score"] == pytest.approx(1.5)
    assert f0["influence"] == 1.0 and f1["influence"] == 1.0
    rows = {r["label"]: r for r in f0["per_class"]}
    assert rows["a"]["gap"] == pytest.approx(0.5) and rows["b"]["gap"] == pytest.approx(-1.0)
    assert (rows["a"]["n_present"], rows["a"]["n_absent"]) == (2, 2)
    # attribute: largest unweighted acc_in - acc_out: c0 -> a (+.5 vs -1), c1 -> b (+1 vs -.5)
    assert f0["attribute"] == "a" and f1["attribute"] == "b"
    assert (out["model"], out["dataset"], out["classes"], out["k"]) == ("m", "d", ["a", "b"], 4)
    assert out["medoids"] == [1, 5, 0, 8]
    assert [c["kept"] for c in out["clusters"]] == [True, True, False, False]
    assert [c["score"] for c in out["clusters"]][2:] == [0.0, 0.0]
    assert out["clusters"][2]["influence"] is None  # -inf written as None


def test_discover_ranks_by_score_and_drops_low_influence():
    inputs, _ = _toy(extra_image=True)
    out = discover(**inputs)
    # G_1 = 1.4 > G_0 = 1.2667 -> cluster 1 first despite the higher id
    assert [f["cluster_id"] for f in out["features"]] == [1, 0]
    assert out["features"][0]["score"] == pytest.approx(1.4)
    assert out["features"][1]["score"] == pytest.approx(0.8 / 3 + 1.0)
    a_row = [r for r in out["features"][1]["per_class"] if r["label"] == "a"][0]
    assert (a_row["n_present"], a_row["n_absent"]) == (2, 3)
    assert a_row["gap"] == pytest.approx(0.8 * (1 - 2 / 3))
    # i3's r* for its prediction b is now its object region (.6 > .3): H_1 = 0 -> dropped
    inputs, _ = _toy(i3_empty_score_b=0.3)
    out = discover(**inputs)
    assert [f["cluster_id"] for f in out["features"]] == [0]
    assert out["clusters"][1]["influence"] == 0.0 and not out["clusters"][1]["kept"]
    # threshold above every H -> nothing kept
    assert discover(**inputs, influence_threshold=1.01)["features"] == []


def test_discover_regions_ranked_by_similarity_to_medoid():
    inputs, rlabels = _toy()
    out = discover(**inputs)
    regs = out["features"][0]["regions"]
    # medoid i0 (sim 1), i4 (cos = 1/sqrt(1.01)), then tied i1, i5 in row order
    assert [r["image_id"] for r in regs] == ["img0", "img4", "img1", "img5"]
    assert regs[0]["similarity"] == pytest.approx(1.0)
    assert regs[1]["similarity"] == pytest.approx(1 / math.sqrt(1.01), rel=1e-6)
    assert regs[2]["similarity"] == regs[3]["similarity"] == pytest.approx(1 / math.sqrt(1.25), rel=1e-6)
    assert all(r["region_index"] == 1 for r in regs)
    assert regs[0]["box"] == [0.0, 0.0, 28.0, 28.0]
    assert out["features"][0]["medoid"] == 1 and out["features"][0]["size"] == 4
    top2 = discover(**inputs, top_regions=2)["features"][0]["regions"]
    assert [r["image_id"] for r in top2] == ["img0", "img4"]
    # precision@k on the discovered feature, ground truth keyed by (image_id, region_index)
    gt = region_label_map(inputs["image_ids"], inputs["region_image"], inputs["region_index"], rlabels)
    assert precision_at_k(out["features"][0], gt, "feature", k=4) == 1.0
    assert precision_at_k(out["features"][1], gt, "feature", k=4) == 0.0


def test_discover_empty_when_nothing_qualifies():
    inputs, _ = _toy()
    inputs["image_pred"] = inputs["image_labels"].copy()  # all right -> every gap 0
    out = discover(**inputs)
    assert out["features"] == []
    assert not any(c["kept"] for c in out["clusters"])
    json.dumps(out, allow_nan=False)


def test_discover_end_to_end_on_random_inputs_is_json_clean():
    rng = np.random.default_rng(0)
    n, r, c = 12, 3, 2
    emb = _normalise_rows(rng.normal(size=(n * r, 8))).astype(np.float32)
    scores = rng.dirichlet(np.ones(c), size=n * r)
    out = discover(
        emb, np.repeat(np.arange(n), r), np.tile(np.arange(r), n), scores,
        rng.integers(0, c, n), rng.integers(0, c, n), ["x", "y"], seed=0,
    )
    json.dumps(out, allow_nan=False)
    assert 4 <= out["k"] < 10 and len(out["medoids"]) == out["k"]
    assert [s["k"] for s in out["k_sweep"]] == list(range(4, 10))
    assert sum(cl["size"] for cl in out["clusters"]) == n * r
    assert out["schema_version"] == 1 and out["sampled"] is False


# --------------------------------------------------------------------------
# precision@k and findings I/O
# --------------------------------------------------------------------------


def test_precision_at_k():
    feature = {"regions": [{"image_id": f"i{j}", "region_index": j % 4} for j in range(12)]}
    labels = {(f"i{j}", j % 4): ("red" if j in (0, 1, 2, 5, 9, 11) else "empty") for j in range(12)}
    # top 10 = j 0..9: red at 0, 1, 2, 5, 9 -> 5/10 (j = 11 is outside the top 10)
    assert precision_at_k(feature, labels, "red") == 0.5
    assert precision_at_k(feature, labels, "red", k=3) == 1.0
    # fewer than k regions: missing ones count as misses
    short = {"regions": feature["regions"][:2]}
    assert precision_at_k(short, labels, "red", k=10) == 0.2
    assert precision_at_k(None, labels, "red") == 0.0
    assert precision_at_k(feature, {}, "red") == 0.0


def test_findings_roundtrip_and_errors(tmp_path):
    inputs, _ = _toy()
    out = discover(**inputs)
    path = tmp_path / "sub" / "findings.json"
    write_findings(out, path)
    assert read_findings(path) == out
    assert [p.name for p in path.parent.iterdir()] == ["findings.json"]  # no temp left

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        read_findings(bad)
    missing = dict(out)
    del missing["silhouette"]
    bad.write_text(json.dumps(missing))
    with pytest.raises(ValueError, match=r"bad\.json.*silhouette"):
        read_findings(bad)
    bad.write_text(json.dumps({**out, "schema_version": 2}))
    with pytest.raises(ValueError, match=r"bad\.json.*schema_version"):
        read_findings(bad)
    bad.write_text(json.dumps({**out, "features": [{"rank": 1}]}))
    with pytest.raises(ValueError, match=r"features\[0\]"):
        read_findings(bad)
    bad.write_text("[]")
    with pytest.raises(ValueError, match="bad.json"):
        read_findings(bad)
    # a plain SPEC §5 file without schema_version is accepted
    plain = {k: out[k] for k in ("model", "dataset", "classes", "k", "silhouette", "features")}
    bad.write_text(json.dumps(plain))
    assert read_findings(bad)["k"] == 4
    with pytest.raises(ValueError):
        write_findings({"x": float("inf")}, tmp_path / "inf.json")
    assert not (tmp_path / "inf.json").exists()
