"""The evidence on a model family the defaults were not built on: the tiny
ResNet with CLIP's standard normalisation, which maps black to about -1.8.

With the normalisation-mean fill, a grey box on a black background is a new
object to such a model: masking anything changes predictions. The masking
check must then say so (inconclusive) instead of refuting the planted
feature, and the automatic fill must find a fill the model does not react to.
"""
from __future__ import annotations

import numpy as np
import pytest

from ravl_pipeline.config import DiscoveryConfig
from ravl_pipeline.core.evidence import causal
from ravl_pipeline.core.findings import Feature, Findings
from ravl_pipeline.core.scores import class_text_embeddings, label_indices
from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.io.manifest import write_manifest
from ravl_pipeline.models import load_model
from ravl_pipeline.pipeline import stages

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def audit(clip_setting):
    eval_dir = clip_setting["setting"] / "eval"
    ds = load_dataset(eval_dir, split="val", require_labels=True)
    lm = load_model(f"local-dir:{clip_setting['audited']}")
    result = stages.stage1(lm, ds, ds.classes(), templates=stages.templates_for(eval_dir),
                           discovery=DiscoveryConfig(mask_fill="auto"))
    truth = stages.ground_truth(result.findings, ds, result.embeddings, result.scores, [("red square", "nine")])
    return ds, lm, result, truth["red square"]


def test_the_clip_normalised_model_learned_the_planted_correlation(audit):
    assert audit[3]["validity"]["valid"], audit[3]["validity"]


def test_the_automatic_fill_supports_the_planted_feature_and_its_control_stays_low(audit):
    findings, truth = audit[2].findings, audit[3]
    selection = findings.causal["fill_selection"]
    rates = selection["flip_rates"]
    assert findings.causal["fill"] == selection["chosen"] == min(rates, key=rates.get)
    lead = findings.lead()
    assert lead is not None and lead.attribute == "nine" and lead.verdict == "supported"
    assert truth["precision_at_10_lead"] >= 0.9
    control, flips = lead.causal_control["flip_rate"], lead.causal["flip_rate"]
    assert control < flips and control <= rates[selection["chosen"]] + 0.25


def test_the_mean_fill_does_not_refute_the_planted_feature(audit):
    """The normalisation mean is grey: on black backgrounds a new object to
    this model. Hiding the planted feature with it must not read as "hiding
    it fixes nothing"."""
    ds, lm, result, _ = audit
    lead = result.findings.lead()
    only = Findings(model=None, dataset=None, classes=result.scores.classes, k=result.findings.k, silhouette=None,
                    features=[lead])
    labels = label_indices(ds, result.scores.classes)
    check = causal.check_features(only, lm, ds, result.clustering.labels, result.embeddings.region_image,
                                  result.embeddings.boxes, labels, result.scores.image_pred, result.scores.classes,
                                  result.scores.templates, result.scores.tau, fill="mean", seed=0)
    support = check.effects[lead.cluster_id]["support"]
    assert support["verdict"] in ("supported", "inconclusive"), support
    assert check.controls[lead.cluster_id]["flip_rate"] > lead.causal_control["flip_rate"]  # mean disturbs more


def test_a_fill_of_the_whole_image_is_inconclusive_whatever_the_fill(clip_setting, tmp_path):
    """Each region is the whole image: hiding it with any fill erases the
    image, for the feature's images and the random control's alike."""
    src = load_dataset(clip_setting["setting"] / "eval", split="val", require_labels=True)
    ds_rows = src.subset(np.arange(120))
    root = tmp_path / "whole"
    import shutil

    shutil.copytree(src.root / "images", root / "images")
    write_manifest(root, {"image_id": ds_rows.image_ids, "path": ds_rows.paths, "label": ds_rows.labels,
                          "boxes": [[[0.0, 0.0, 56.0, 56.0]]] * len(ds_rows),
                          "region_labels": [["whole"]] * len(ds_rows)})
    ds = load_dataset(root, require_labels=True)
    lm = load_model(f"local-dir:{clip_setting['audited']}")
    classes = ds.classes()
    text = class_text_embeddings(lm, classes, ["the number is a {}"]).numpy()
    labels = label_indices(ds, classes)
    pred = causal.predict_dataset(lm, ds, text, 0.07)
    region_image = np.arange(len(ds))
    boxes = np.tile([[0.0, 0.0, 56.0, 56.0]], (len(ds), 1))
    clusters = np.arange(len(ds)) % 2  # two halves of the images
    findings = Findings(model=None, dataset=None, classes=classes, k=2, silhouette=None,
                        features=[Feature(rank=1, cluster_id=0, score=1.0, influence=1.0, attribute="nine",
                                          called=True)])
    for fill in causal.FILLS:
        check = causal.check_features(findings, lm, ds, clusters, region_image, boxes, labels, pred, classes,
                                      ["the number is a {}"], 0.07, fill=fill, seed=0)
        support = check.effects[0]["support"]
        assert check.effects[0]["flip_rate"] >= causal.INERT_FLIP_RATE, fill
        assert support["verdict"] == "inconclusive", (fill, support)
