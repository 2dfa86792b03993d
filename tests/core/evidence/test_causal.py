"""Causal masking check (core/evidence/causal.py)."""
import numpy as np
import pytest
from ravl_pipeline.core.evidence import causal
from ravl_pipeline.core.findings import Feature, Findings


def test_random_control_rows_are_seeded_and_distinct():
    a = causal.random_control_rows(10, 100, seed=3)
    assert len(set(a.tolist())) == 10 and a.max() < 100
    np.testing.assert_array_equal(a, causal.random_control_rows(10, 100, seed=3))
    assert causal.random_control_rows(50, 20, seed=0).size == 20


def _effect(fixed, made, toward=0, away=0):
    return {"n_errors_fixed": fixed, "n_errors_made": made, "n_toward_parity": toward, "n_away_from_parity": away}


def test_masking_support_is_a_sign_test_on_errors_fixed():
    s = causal.masking_support(_effect(12, 1, toward=20, away=1), alpha=0.05)
    assert s["supported"] and (s["errors_fixed"], s["errors_made"]) == (12, 1)
    assert (s["toward_parity"], s["away_from_parity"]) == (20, 1)
    assert s["p_value"] == pytest.approx(14 / 2 ** 13)  # P(X >= 12), X ~ Bin(13, 1/2)
    # an "absence" cluster: hiding it changes nothing, which supports nothing
    none = causal.masking_support(_effect(0, 0))
    assert not none["supported"] and none["p_value"] == 1.0
    # a cluster of class objects: hiding them breaks their own class (toward parity) but fixes nothing
    assert not causal.masking_support(_effect(0, 0, toward=18, away=1))["supported"]
    # one-sided: more errors made than fixed is no support, nor is a coin's split
    assert not causal.masking_support(_effect(1, 12))["supported"]
    assert not causal.masking_support(_effect(6, 6))["supported"]
    # four fixes out of four cannot reach 0.05 (p = 1/16); five can (1/32)
    assert not causal.masking_support(_effect(4, 0))["supported"]
    assert causal.masking_support(_effect(5, 0))["supported"]
    assert causal.masking_support(_effect(4, 0), alpha=0.1)["supported"]
    # checks recorded before the counts existed have no verdict
    assert causal.masking_support({"n_images": 40, "flip_rate": 0.75, "n_toward_parity": 3}) is None
    # without a control the verdict is the sign test's
    assert causal.masking_support(_effect(12, 1))["verdict"] == "supported"
    assert causal.masking_support(_effect(0, 5))["verdict"] == "not supported"


def _flips(n_images, n_flipped, fixed=0, made=0):
    return {"n_images": n_images, "n_flipped": n_flipped, "n_errors_fixed": fixed, "n_errors_made": made,
            "n_toward_parity": 0, "n_away_from_parity": 0}


def test_a_fill_that_breaks_predictions_by_itself_is_inconclusive_not_a_refutation():
    # a model that reads the fill as an object: hiding the feature flips 92% of its images, hiding as many
    # random regions flips 92% of theirs; the feature's mask "makes" 33 errors and fixes none
    s = causal.masking_support(_flips(100, 92, fixed=0, made=33), 0.05, control=_flips(100, 92))
    assert s["verdict"] == "inconclusive" and not s["supported"]
    assert "92%" in s["reason"] and s["control"]["p_more"] > 0.05 and s["control"]["p_fewer"] > 0.05
    # the same counts with a harmless fill (random regions flip 30%) refute the feature
    refuted = causal.masking_support(_flips(100, 92, fixed=0, made=33), 0.05, control=_flips(100, 30))
    assert refuted["verdict"] == "not supported" and refuted["control"]["p_more"] < 1e-6
    # a supported feature whose mask flips no more than random masking does is not evidence either:
    # a fill that turns every image into the hurt class "fixes" that class's errors
    fake = causal.masking_support(_flips(100, 90, fixed=40, made=0), 0.05, control=_flips(100, 90))
    assert fake["verdict"] == "inconclusive"
    real = causal.masking_support(_flips(100, 87, fixed=85, made=0), 0.05, control=_flips(100, 33))
    assert real["verdict"] == "supported" and real["supported"]


def test_an_inert_mask_stays_not_supported_whatever_the_control():
    # an "absence" cluster: hiding it flips nothing, while random regions (some of them the class
    # objects) flip 29%: the regions do not drive predictions, and the fill is not the reason
    s = causal.masking_support(_flips(80, 0), 0.05, control=_flips(80, 23))
    assert s["verdict"] == "not supported"
    # fewer flips than the inert rate are inert too, even when the control flips as few
    assert causal.masking_support(_flips(100, 4), 0.05, control=_flips(100, 4))["verdict"] == "not supported"
    assert causal.masking_support(_flips(100, 5), 0.05, control=_flips(100, 5))["verdict"] == "inconclusive"
    # a mask that flips clearly fewer predictions than random masking does: the feature's regions matter less
    # than random ones (the planted feature of a null setting, which the model ignores)
    fewer = causal.masking_support(_flips(100, 7, fixed=3, made=1), 0.05, control=_flips(100, 31))
    assert fewer["verdict"] == "not supported" and fewer["control"]["p_fewer"] < 0.05
    # ... unless hiding it undid errors: a fill that disturbs random regions more (63% here, the
    # normalisation mean on a black background) cannot refute a mask that fixes 7 errors and makes none
    conflict = causal.masking_support(_flips(60, 7, fixed=7, made=0), 0.05, control=_flips(60, 38))
    assert conflict["control"]["p_fewer"] < 0.05 and conflict["p_value"] < 0.05
    assert conflict["verdict"] == "inconclusive" and "undoes errors" in conflict["reason"]


def _feature(rank, called=None, supported=None, cluster_id=None, verdict=None):
    support = None if supported is None else {"supported": supported, **({"verdict": verdict} if verdict else {})}
    return Feature(rank=rank, cluster_id=rank if cluster_id is None else cluster_id, score=1.0, influence=1.0,
                   called=called, causal=None if support is None else {"support": support})


def _findings(features):
    return Findings(model=None, dataset=None, classes=[], k=len(features), silhouette=None, features=features)


def test_lead_finding_skips_uncalled_and_unsupported_features():
    feats = [_feature(1, True, False), _feature(2, False, True), _feature(4, True), _feature(3, True, True)]
    assert _findings(feats).lead().rank == 3
    assert feats[0].supported is False and feats[3].supported is True
    assert feats[2].supported is None and feats[2].support is None
    assert not feats[0].actionable and not feats[1].actionable and feats[2].actionable
    assert _findings([_feature(1, True, False), _feature(2, False)]).lead() is None
    assert _findings([]).lead() is None
    # without significance every kept feature may lead
    assert _findings([_feature(2), _feature(1)]).lead().rank == 1
    # an inconclusive check refutes nothing: the feature may lead (and Stage 2 keeps it)
    unsure = _feature(1, True, False, verdict="inconclusive")
    assert unsure.verdict == "inconclusive" and unsure.supported is None and unsure.actionable
    assert _findings([unsure, _feature(2, True, True)]).lead() is unsure
    assert _feature(1, True, True).verdict == "supported" and _feature(1, True, False).verdict == "not supported"
    # a causal record without a verdict (an old check) neither supports nor refutes
    old = Feature(rank=1, cluster_id=0, score=1.0, influence=1.0, called=True, causal={"flip_rate": 0.5})
    assert old.supported is None and _findings([old]).lead() is old


def test_the_top_features_and_every_called_one_are_checked():
    feats = [_feature(r, called=r in (2, 7)) for r in range(1, 9)]
    chosen = causal.features_to_check(_findings(feats), max_features=3)
    assert [f.rank for f in chosen] == [1, 2, 3, 7]
    assert [f.rank for f in causal.features_to_check(_findings(feats), max_features=None)] == list(range(1, 9))
    assert [f.rank for f in causal.features_to_check(_findings(feats), max_features=0)] == [2, 7]


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    from ravl_pipeline.experiments.synth import SynthConfig, make_setting
    from ravl_pipeline.io.dataset import load_dataset
    from ravl_pipeline.models import load_model

    out = tmp_path_factory.mktemp("causal")
    cfg = SynthConfig(classes=["zero", "one", "nine"], correlated_class="nine", n_pretrain=3, n_finetune=3,
                      n_val=24, n_test=3, seed=0)
    make_setting(out, cfg)
    ds = load_dataset(out / "eval", split="val")
    return ds, load_model("ravl-tiny-rn", seed=0)


CLASSES = ["zero", "one", "nine"]
TEMPLATES = ["the number is a {}"]


@pytest.fixture(scope="module")
def scored(tiny_eval):
    """The evaluation set embedded and scored once: (emb, scores, labels, region labels)."""
    from ravl_pipeline.core.embed import embed_dataset
    from ravl_pipeline.core.scores import label_indices, score

    ds, lm = tiny_eval
    emb = embed_dataset(lm, ds, progress=False)
    region_labels = np.array([lab for labs in ds.region_labels for lab in labs])
    return emb, score(lm, emb, CLASSES, TEMPLATES, 0.07), label_indices(ds, CLASSES), region_labels


def test_causal_effect_on_a_real_model(tiny_eval):
    from ravl_pipeline.core.embed import embed_dataset
    from ravl_pipeline.core.scores import class_text_embeddings, label_indices, score

    ds, lm = tiny_eval
    classes = ["zero", "one", "nine"]
    templates = ["the number is a {}"]
    emb = embed_dataset(lm, ds, progress=False)
    sc = score(lm, emb, classes, templates, 0.07)
    labels = label_indices(ds, classes)
    text = class_text_embeddings(lm, classes, templates).numpy()
    region_labels = [lab for labs in ds.region_labels for lab in labs]
    empty = np.flatnonzero(np.array(region_labels) == "empty")
    # black quadrants filled with black: nothing changes, so nothing may flip
    res = causal.causal_effect(lm, ds, empty, emb.region_image, emb.boxes, labels, sc.image_pred, classes,
                               text, 0.07, fill="black", attribute="nine")
    assert res["n_regions"] == empty.size
    assert res["n_images"] == np.unique(emb.region_image[empty]).size
    assert res["flip_rate"] == 0.0 and res["acc_before"] == res["acc_after"]
    for row in res["per_class"]:
        assert row["gap_before"] == pytest.approx(row["gap_after"])
    # "before" through encode_image agrees with the RoI image embedding of discovery
    images = np.unique(emb.region_image[empty])
    assert res["acc_before"] == pytest.approx(float(np.mean(sc.image_pred[images] == labels[images])))
    # hiding the digits themselves does change what the model sees
    digits = np.flatnonzero(np.isin(region_labels, classes))
    res = causal.causal_effect(lm, ds, digits, emb.region_image, emb.boxes, labels, sc.image_pred, classes,
                               text, 0.07, fill="mean")
    assert res["n_images"] == len(ds) and 0.0 <= res["flip_rate"] <= 1.0
    assert sum(r["n_present"] for r in res["per_class"]) == len(ds)


def test_before_pred_shortcut_matches_recomputing(tiny_eval):
    from ravl_pipeline.core.embed import embed_dataset
    from ravl_pipeline.core.scores import class_text_embeddings, label_indices

    ds, lm = tiny_eval
    classes = ["zero", "one", "nine"]
    emb = embed_dataset(lm, ds, progress=False)
    labels = label_indices(ds, classes)
    text = class_text_embeddings(lm, classes, ["the number is a {}"]).numpy()
    rows = np.arange(0, emb.n_regions, 3)
    args = (emb.region_image, emb.boxes, labels, labels, classes, text, 0.07)
    slow = causal.causal_effect(lm, ds, rows, *args, fill="blur")
    before = causal.predict_dataset(lm, ds, text, 0.07, batch_size=7)  # batches that do not divide 24
    fast = causal.causal_effect(lm, ds, rows, *args, fill="blur", before_pred=before)
    a, b = fast.pop(causal.PER_IMAGE), slow.pop(causal.PER_IMAGE)
    assert fast == slow
    for key in ("images", "outcome", "class_sign"):
        np.testing.assert_array_equal(a[key], b[key])


def test_check_features_masks_the_selected_features_and_their_controls(tiny_eval, scored):
    from ravl_pipeline.core.scores import class_text_embeddings

    ds, lm = tiny_eval
    classes, templates = CLASSES, TEMPLATES
    emb, sc, labels, region_labels = scored
    # cluster 0: the empty quadrants, 1: the digits, 2: everything else
    clusters = np.where(region_labels == "empty", 0, np.where(np.isin(region_labels, classes), 1, 2))
    findings = _findings([_feature(1, called=False, cluster_id=0), _feature(2, called=False, cluster_id=2),
                          _feature(3, called=True, cluster_id=1)])
    check = causal.check_features(findings, lm, ds, clusters, emb.region_image, emb.boxes, labels, sc.image_pred,
                                  classes, templates, 0.07, fill="black", max_features=1, seed=0, alpha=0.05)
    assert set(check.effects) == set(check.controls) == {0, 1}  # the first one and the called one
    assert findings.features[0].causal is None  # a result is returned; the findings are left as they were
    text = class_text_embeddings(lm, classes, templates).numpy()
    for cid in (0, 1):
        rows = np.flatnonzero(clusters == cid)
        effect = dict(check.effects[cid])
        support = effect.pop("support")
        again = causal.causal_effect(lm, ds, rows, emb.region_image, emb.boxes, labels, sc.image_pred,
                                     classes, text, 0.07, fill="black",
                                     attribute=findings.features[[0, 2][cid]].attribute)
        again.pop(causal.PER_IMAGE)  # the per-image outcomes are for a paired control, never recorded
        assert effect == again
        assert support == causal.masking_support(effect, 0.05, check.controls[cid])
        assert check.controls[cid]["n_regions"] == rows.size
    # black quadrants filled with black change nothing, which supports nothing
    assert check.effects[0]["n_flipped"] == 0 and check.effects[0]["support"]["supported"] is False
    assert check.summary["fill"] == "black" and check.summary["features_checked"] == 2
    assert "fill_selection" not in check.summary  # a named fill is used as it is
    with pytest.raises(ValueError, match="unknown mask fill 'grey'"):
        causal.check_features(findings, lm, ds, clusters, emb.region_image, emb.boxes, labels, sc.image_pred,
                              classes, templates, 0.07, fill="grey")
    # auto: every candidate hides the same random regions, and the least disturbing one is used
    auto = causal.check_features(findings, lm, ds, clusters, emb.region_image, emb.boxes, labels, sc.image_pred,
                                 classes, templates, 0.07, fill="auto", max_features=1, seed=0, alpha=0.05)
    selection = auto.summary["fill_selection"]
    rates = selection["flip_rates"]
    assert set(rates) == set(causal.FILL_CANDIDATES) and all(0.0 <= r <= 1.0 for r in rates.values())
    assert auto.summary["fill"] == selection["chosen"] == min(causal.FILL_CANDIDATES, key=lambda f: rates[f])
    assert auto.effects[0]["fill"] == selection["chosen"]


def test_discover_command_adds_evidence(tiny_eval, tmp_path, capsys):
    import json

    from ravl_pipeline import cli

    ds, _ = tiny_eval
    out = tmp_path / "findings.json"
    base = ["discover", "--model", "ravl-tiny-rn", "--data", str(ds.root), "--split", "val", "--quiet",
            "--out", str(out)]
    assert cli.main(base + ["--permutations", "20", "--alpha", "0.2", "--mask-fill", "black"]) == 0
    findings = json.loads(out.read_text())
    sig = findings["significance"]
    assert sig["n_permutations"] == 20 and sig["alpha"] == 0.2 and sig["n_tests"] == findings["k"]
    for feat in findings["features"]:
        assert feat["called"] == (feat["q_value"] <= 0.2)
        assert feat["names"]["model_derived"] is True
    for i, feat in enumerate(findings["features"]):
        if i < 5 or feat["called"]:  # the top five and every called feature are checked
            assert feat["causal"]["fill"] == "black" and "causal_control" in feat
            support = feat["causal"]["support"]
            changes = support["toward_parity"] + support["away_from_parity"]
            assert changes <= feat["causal"]["n_flipped"] <= feat["causal"]["n_images"]
            assert support["errors_fixed"] + support["errors_made"] <= changes
            assert support["errors_fixed"] <= support["toward_parity"]
            assert support["supported"] == (support["p_value"] <= 0.2)
        else:
            assert "causal" not in feat
    lead = Findings.from_dict(findings).lead()
    assert findings["lead_rank"] == (None if lead is None else lead.rank)
    assert cli.main(base + ["--no-evidence"]) == 0
    assert "significance" not in json.loads(out.read_text())
    assert cli.main(base + ["--alpha", "2"]) == 2
    assert "argument --alpha: must be a number in (0, 1), got '2'" in capsys.readouterr().err


def test_same_image_control_takes_a_region_of_the_closest_size_on_each_image():
    boxes = np.array([[0, 0, 2, 2], [2, 0, 4, 2], [0, 2, 2, 4], [2, 2, 4, 4],  # image 0: four equal quadrants
                      [0, 0, 10, 10], [30, 0, 50, 20], [60, 0, 79, 20],        # image 1: areas 100, 400, 380
                      [0, 0, 5, 5]], dtype=float)                               # image 2: the feature alone
    region_image = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    feature = np.array([1, 6, 7])
    ctrl = causal.same_image_control_rows(feature, region_image, boxes, seed=0)
    assert 5 in ctrl and 4 not in ctrl  # image 1: the region whose area (400) is closest to 380
    assert len(ctrl) == 2 and not set(ctrl) & set(feature)  # image 2 has no other region: no control there
    assert set(region_image[ctrl]) == {0, 1}
    np.testing.assert_array_equal(ctrl, causal.same_image_control_rows(feature, region_image, boxes, seed=0))
    # two feature regions on one image never share a control region
    both = causal.same_image_control_rows(np.array([0, 1]), region_image, boxes, seed=3)
    assert len(both) == 2 and set(both) <= {2, 3}
    # a region that overlaps the feature is not a control: it would hide part of it
    nested = np.array([[0, 0, 10, 10], [2, 2, 8, 8], [20, 20, 30, 30]], dtype=float)
    assert causal.same_image_control_rows(np.array([0]), np.zeros(3, int), nested, seed=0).tolist() == [2]


def _per_image(outcomes, flipped, n_images=40):
    outcome = np.zeros(n_images, dtype=int)
    outcome[: len(outcomes)] = outcomes
    return {"n_images": n_images, "n_flipped": flipped, "flip_rate": flipped / n_images,
            "n_errors_fixed": int(np.sum(outcome > 0)), "n_errors_made": int(np.sum(outcome < 0)),
            "n_toward_parity": 0, "n_away_from_parity": 0,
            causal.PER_IMAGE: {"images": np.arange(n_images), "outcome": outcome, "class_sign": np.array([-1, 1])}}


def test_random_masks_that_flip_many_predictions_but_undo_no_error_do_not_make_a_feature_inconclusive():
    """Where the two controls disagree. Hiding the feature undoes 20 errors
    and makes 3 (23 of 40 images flip); hiding a region of the same size on
    the same images makes 25 errors and undoes none (25 flips). By flip
    rates the feature does no more than random masks, so the verdict was
    "inconclusive"; image by image the feature's masks end better on 22
    images (the 20 errors undone, and 2 the random masks made) and worse on
    none: what they undo is the feature's doing, not the
    fill's. The like-for-like control is right, and says "supported"."""
    feature = _per_image([1] * 20 + [-1] * 3, flipped=23)
    random_masks = _per_image([-1] * 25, flipped=25)
    by_flip_rate = causal.masking_support(feature, 0.05, random_masks)
    assert by_flip_rate["verdict"] == "inconclusive"
    like_for_like = causal.masking_support(feature, 0.05, random_masks, paired=True)
    assert like_for_like["verdict"] == "supported" and like_for_like["supported"]
    control = like_for_like["control"]
    assert (control["better"], control["worse"], control["control_errors_fixed"]) == (22, 0, 0)
    assert control["feature_flip_rate"] == 23 / 40 and control["control_flip_rate"] == 25 / 40  # reported beside


def test_a_fill_that_undoes_the_errors_by_itself_is_inconclusive_like_for_like():
    """Hiding the feature undoes 15 errors, but hiding a region of the same
    size on the same images undoes the same ones: the fill, not the feature,
    is what the model reacts to."""
    feature = _per_image([1] * 15 + [-1] * 2, flipped=17)
    same = _per_image([1] * 15 + [-1] * 2, flipped=17)
    verdict = causal.masking_support(feature, 0.05, same, paired=True)
    assert verdict["verdict"] == "inconclusive" and "does as well" in verdict["reason"]
    # a mask that undoes nothing is not supported, whatever the control does
    assert causal.masking_support(_per_image([-1] * 4, 4), 0.05, _per_image([-1] * 30, 30),
                                  paired=True)["verdict"] == "not supported"


def test_check_features_with_the_same_images_control(tiny_eval, scored):
    import json

    ds, lm = tiny_eval
    classes, templates = CLASSES, TEMPLATES
    emb, sc, labels, region_labels = scored
    clusters = np.where(region_labels == "red square", 0, 1)
    findings = _findings([_feature(1, called=True, cluster_id=0)])
    check = causal.check_features(findings, lm, ds, clusters, emb.region_image, emb.boxes, labels, sc.image_pred,
                                  classes, templates, 0.07, fill="black", seed=0, mask_control="same-images")
    effect, control = check.effects[0], check.controls[0]
    # the control hides one other quadrant (same size) on each image the feature's mask hid
    assert control["n_images"] == effect["n_images"] and control["n_regions"] == effect["n_regions"]
    assert effect["support"]["control"]["n_images"] == effect["n_images"]
    assert check.summary["mask_control"] == "same-images"
    json.dumps({"causal": effect, "causal_control": control})  # nothing but JSON is recorded
    with pytest.raises(ValueError, match="unknown mask control"):
        causal.check_features(findings, lm, ds, clusters, emb.region_image, emb.boxes, labels, sc.image_pred,
                              classes, templates, 0.07, fill="black", mask_control="nearby")
