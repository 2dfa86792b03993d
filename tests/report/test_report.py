"""The audit report: one section per finding with its regions drawn, the
empty report, schema errors, the JSON twin and the ``ravl report`` command."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ravl_pipeline.cli import main as cli_main
from ravl_pipeline.core.findings import Findings
from ravl_pipeline.io.manifest import write_manifest
from ravl_pipeline.report.html import BOX_COLOUR, region_thumbnail, write_report
from ravl_pipeline.report.inputs import ReportError, row_intervals

RED = (255, 0, 0)
QUADRANTS = [[0, 0, 28, 28], [28, 0, 56, 28], [0, 28, 28, 56], [28, 28, 56, 56]]


def _image(red_quadrant: int | None) -> Image.Image:
    arr = np.zeros((56, 56, 3), dtype=np.uint8)
    arr[30:50, 6:22] = 200  # a grey "digit" in the lower-left quadrant
    if red_quadrant is not None:
        x1, y1, x2, y2 = QUADRANTS[red_quadrant]
        arr[y1:y2, x1:x2] = RED
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report_data")
    rows = []
    for i, (label, red) in enumerate([("nine", 1), ("nine", 3), ("one", None), ("one", 1)]):
        _image(red).save(root / f"img{i}.png")
        rows.append({"image_id": f"im{i}", "path": f"img{i}.png", "label": label,
                     "boxes": QUADRANTS, "region_labels": ["empty"] * 4})
    write_manifest(root, rows)
    return root


def _feature(rank: int, regions: list[tuple[str, int]], **extra) -> dict:
    feat = {
        "rank": rank,
        "cluster_id": 10 + rank,
        "score": 0.75 / rank,
        "influence": 0.5,
        "attribute": "nine",
        "per_class": [
            {"label": "nine", "n_present": 2, "acc_present": 1.0, "n_absent": 3, "acc_absent": 0.25,
             "gap": 0.6},
            {"label": "one", "n_present": 1, "acc_present": 0.0, "n_absent": 4, "acc_absent": 0.75,
             "gap": -0.3},
        ],
        "regions": [{"image_id": im, "region_index": r, "box": QUADRANTS[r], "similarity": 0.9 - 0.1 * j}
                    for j, (im, r) in enumerate(regions)],
    }
    feat.update(extra)
    return feat


def _findings(features: list[dict], **extra) -> dict:
    out = {"schema_version": 1, "model": "local-dir:/models/audited", "dataset": "toy", "classes": ["nine", "one"],
           "k": 4, "silhouette": 0.42, "n_images": 4, "n_regions": 16, "features": features}
    out.update(extra)
    return out


class _Collect(HTMLParser):
    """Section ids, headings, images and text of a page."""

    def __init__(self):
        super().__init__()
        self.sections: list[str] = []
        self.headings: list[str] = []
        self.images: list[dict] = []
        self.text: list[str] = []
        self._in_heading = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs)
        if tag in ("h1", "h2", "h3"):
            self._in_heading = True
            self.headings.append("")

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3"):
            self._in_heading = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_heading:
            self.headings[-1] += data


def _parse(path: Path) -> _Collect:
    parser = _Collect()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _decode(img_attrs: dict) -> Image.Image:
    src = img_attrs["src"]
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")


def test_report_renders_every_finding_with_its_regions(dataset, tmp_path):
    findings = _findings([
        _feature(1, [("im0", 1), ("im1", 3), ("im3", 1)], p_value=0.004, q_value=0.008, called=True,
                 names={"model_derived": True, "terms": [{"term": "red square", "score": 0.31},
                                                         {"term": "red", "score": 0.25}]},
                 causal={"fill": "mean", "n_images": 3, "flip_rate": 0.5, "acc_before": 0.25,
                         "acc_after": 0.75, "parity_shift": 0.2}),
        _feature(2, [("im2", 0)], called=False),
    ])
    out = write_report(tmp_path / "r" / "report.html", findings, dataset_root=dataset,
                       provenance={"data_version": "v-test", "code_version": "c-test"})
    page = _parse(out)
    assert {"provenance", "findings", "feature-1", "feature-2"} <= set(page.sections)
    assert "metrics" not in page.sections and "reaudit" not in page.sections
    # one thumbnail per listed region, in rank order
    alts = [im["alt"] for im in page.images]
    assert alts == ["region 1 of image im0", "region 3 of image im1", "region 1 of image im3",
                    "region 0 of image im2"]
    text = " ".join(page.text)
    for needed in ("0.004", "0.008", "called", "red square (0.31), red (0.25)",
                   "flip rate 0.50, accuracy 0.25 → 0.75, parity shift 0.20, 3 images, mean fill", "v-test", "c-test", "0.750", "0.375",
                   # called with no masking check: a candidate, never shown as a finding
                   "0 confirmed findings, 1 candidate (significant, masking check inconclusive), 1 other cluster kept",
                   "candidate: 1; other: 2"):
        assert needed in text, needed
    # the first region (image im0, quadrant 1 = top right) is drawn at 2x with its box outlined
    thumb = np.asarray(_decode(page.images[0]))
    assert thumb.shape == (112, 112, 3)
    assert tuple(thumb[20, 57]) == BOX_COLOUR  # left edge of the box, inner colour
    assert tuple(thumb[20, 56 + 28]) == RED  # inside the box: the red square, untouched
    assert tuple(thumb[20, 20]) == (0, 0, 0)  # top-left quadrant: empty, no outline
    # the JSON twin, named after the page, holds the same numbers
    twin = json.loads((tmp_path / "r" / "report.json").read_text())
    assert twin["findings"] == findings and twin["metrics"] is None and twin["reaudit"] is None
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["report.html", "report.json"]


def test_a_findings_record_renders_as_its_json(dataset, tmp_path):
    """The report takes the typed record Stage 1 returns as well as its JSON
    form, and renders both the same way."""
    data = _findings([_feature(1, [("im0", 1), ("im1", 3)], p_value=0.004, q_value=0.008, called=True),
                      _feature(2, [("im2", 0)], called=False)])
    record = Findings.from_dict(data)
    prov = {"data_version": "v-test", "code_version": "c-test"}
    from_dict = write_report(tmp_path / "dict" / "report.html", data, dataset_root=dataset, provenance=prov)
    from_record = write_report(tmp_path / "record" / "report.html", record, dataset_root=dataset, provenance=prov)
    assert from_record.read_text() == from_dict.read_text()
    assert json.loads((tmp_path / "record" / "report.json").read_text())["findings"] == data


def test_empty_findings_give_an_explicit_report(dataset, tmp_path):
    out = write_report(tmp_path / "report.html", _findings([]), dataset_root=dataset)
    page = _parse(out)
    text = " ".join(page.text)
    assert "No spurious feature found" in text
    assert page.images == []
    assert not any(s and s.startswith("feature-") for s in page.sections)
    assert json.loads((tmp_path / "report.json").read_text())["findings"]["features"] == []


def test_schema_version_mismatch_is_refused_by_name(tmp_path):
    bad = tmp_path / "findings.json"
    bad.write_text(json.dumps(_findings([], schema_version=7)))
    with pytest.raises(ValueError, match=r"schema_version 7 is not supported"):
        write_report(tmp_path / "out" / "report.html", str(bad))
    with pytest.raises(ReportError, match=r"schema_version 7"):
        write_report(tmp_path / "out" / "report.html", _findings([], schema_version=7))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unknown_image_id_names_the_manifest(dataset, tmp_path):
    findings = _findings([_feature(1, [("missing-image", 0)])])
    with pytest.raises(ReportError, match=r"manifest.parquet: no image with image_id 'missing-image'"):
        write_report(tmp_path / "report.html", findings, dataset_root=dataset)
    assert not (tmp_path / "report.html").exists()


def test_metrics_panel_and_reaudit(dataset, tmp_path):
    before = {"image_overall": 0.80, "image_worst_group": 0.30, "region_overall": 0.70,
              "region_worst_group": 0.40, "groups": []}
    after = {"image_overall": 0.82, "image_worst_group": 0.55, "region_overall": 0.75,
             "region_worst_group": 0.50, "groups": []}
    metrics_file = tmp_path / "ravl_metrics.json"
    metrics_file.write_text(json.dumps(after))
    out = write_report(tmp_path / "report.html", _findings([_feature(1, [("im0", 1)])]), dataset_root=dataset,
                       metrics={"standard": before, "ravl": str(metrics_file)}, reaudit=_findings([]))
    page = _parse(out)
    assert {"metrics", "reaudit"} <= set(page.sections)
    html_text = out.read_text()
    # worst-group image accuracy: 30.0 -> 55.0 is +25.0 points against the baseline
    assert "55.0 <span class=\"delta pos\">(+25.0)</span>" in html_text
    assert "Re-audit of the mitigated model" in page.headings
    twin = json.loads((tmp_path / "report.json").read_text())
    assert twin["metrics"] == {"standard": before, "ravl": after}
    assert twin["reaudit"]["features"] == []
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "findings.json").exists()


def test_metrics_missing_a_key_is_refused(tmp_path):
    with pytest.raises(ReportError, match=r"metrics\['ravl'\]: metrics missing key\(s\): region_worst_group"):
        write_report(tmp_path / "report.html", _findings([]),
                     metrics={"ravl": {"image_overall": 1, "image_worst_group": 1, "region_overall": 1}})


def test_confidence_intervals_in_any_supported_shape():
    row = {"ci": {"level": 0.95, "acc_present": [0.5, 0.9], "acc_absent": {"lo": 0.1, "hi": 0.3}},
           "gap_ci": [0.2, 0.6]}
    assert row_intervals(row) == {"acc_present": (0.5, 0.9), "acc_absent": (0.1, 0.3), "gap": (0.2, 0.6)}
    assert row_intervals({"ci": [0.0, 0.4]}) == {"gap": (0.0, 0.4)}
    assert row_intervals({"ci": None}) == {}


def test_ci_appears_in_the_per_class_table(dataset, tmp_path):
    feat = _feature(1, [("im0", 1)])
    feat["per_class"][0]["ci"] = {"acc_present": [0.612, 0.987]}
    out = write_report(tmp_path / "report.html", _findings([feat]), dataset_root=dataset)
    assert '<span class="ci">[0.612, 0.987]</span>' in out.read_text()


@pytest.mark.parametrize("size", [(150, 100), (100, 150)])
def test_boxes_are_drawn_where_they_are_on_non_square_images(tmp_path, size):
    """A box at the right or bottom edge of a non-square photo is outlined
    there, on a thumbnail that keeps the photo's aspect ratio."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    box = [w - 30, h - 20, w, h]  # the bottom-right corner, outside a centre crop on the long axis
    arr[box[1]:box[3], box[0]:box[2]] = RED
    Image.fromarray(arr).save(tmp_path / "photo.png")
    write_manifest(tmp_path, [{"image_id": "p", "path": "photo.png", "label": "nine", "boxes": [box],
                               "region_labels": ["red square"]}])
    feat = _feature(1, [])
    feat["regions"] = [{"image_id": "p", "region_index": 0, "box": box, "similarity": 1.0}]
    out = write_report(tmp_path / "r" / "report.html", _findings([feat]), dataset_root=tmp_path)
    (img,) = _parse(out).images
    thumb = np.asarray(_decode(img))
    scale = 112 / max(w, h)
    assert thumb.shape[:2] == (round(h * scale), round(w * scale))
    assert (int(img["width"]), int(img["height"])) == (thumb.shape[1], thumb.shape[0])
    x1, y1 = round(box[0] * scale), round(box[1] * scale)
    outline = np.all(thumb == BOX_COLOUR, axis=2)
    ys, xs = np.nonzero(outline)
    assert abs(xs.min() - x1) <= 2 and abs(ys.min() - y1) <= 2  # top-left corner of the outline
    assert xs.max() >= thumb.shape[1] - 4 and ys.max() >= thumb.shape[0] - 4  # reaches the edges
    assert not outline[: y1 - 3].any() and not outline[:, : x1 - 3].any()  # nothing elsewhere
    inner = thumb[(y1 + thumb.shape[0]) // 2, (x1 + thumb.shape[1]) // 2]
    assert tuple(inner) == RED


def test_thumbnail_without_a_box_is_the_plain_image():
    png = region_thumbnail(_image(None), None, size=56)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), np.asarray(_image(None)))


def test_cli_report(dataset, tmp_path, capsys):
    findings = tmp_path / "findings.json"
    findings.write_text(json.dumps(_findings([_feature(1, [("im1", 3)])])))
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"image_overall": 0.5, "image_worst_group": 0.25, "region_overall": 0.5,
                                   "region_worst_group": 0.25}))
    out = tmp_path / "site" / "report.html"
    rc = cli_main(["report", "--findings", str(findings), "--metrics", f"ravl={metrics}", "--data",
                   str(dataset), "--out", str(out)])
    assert rc == 0
    assert str(out) in capsys.readouterr().out
    page = _parse(out)
    assert "feature-1" in page.sections and "metrics" in page.sections
    assert [im["alt"] for im in page.images] == ["region 3 of image im1"]
    assert re.search(r"data_version.*sha256:[0-9a-f]{16}", out.read_text())
    # a bad schema is an exit status 2 with the file named
    findings.write_text(json.dumps(_findings([], schema_version=99)))
    rc = cli_main(["report", "--findings", str(findings), "--data", str(dataset), "--out", str(out)])
    assert rc == 2
    assert f"{findings}: findings schema_version 99" in capsys.readouterr().err


def test_significance_method_and_its_warning_are_shown(dataset, tmp_path):
    sig = {"n_permutations": 20, "n_tests": 4, "alpha": 0.05, "n_called": 0, "min_attainable_q": 4 / 21,
           "warning": "20 permutations over 4 clusters cannot call a lone finding at alpha=0.05"}
    out = write_report(tmp_path / "report.html", _findings([_feature(1, [("im0", 1)])], significance=sig),
                       dataset_root=dataset)
    text = out.read_text()
    assert "20 permutations per cluster, Benjamini–Hochberg over 4 clusters at α = 0.05; 0 called" in text
    assert "significance warning" in text and "cannot call a lone finding" in text
    plain = write_report(tmp_path / "plain" / "report.html", _findings([_feature(1, [("im0", 1)])]),
                         dataset_root=dataset).read_text()
    assert "permutations per cluster" not in plain


def test_masking_verdict_and_lead_finding_are_shown(dataset, tmp_path):
    def causal(fixed, made, p, ok):
        return {"fill": "mean", "n_images": 3, "n_flipped": fixed + made, "flip_rate": (fixed + made) / 3,
                "support": {"p_value": p, "supported": ok, "errors_fixed": fixed, "errors_made": made}}

    findings = _findings([_feature(1, [("im0", 1)], called=True, causal=causal(0, 0, 1.0, False)),
                          _feature(2, [("im1", 3)], called=True, causal=causal(3, 0, 0.125, True))],
                         lead_rank=2)
    page = _parse(write_report(tmp_path / "report.html", findings, dataset_root=dataset))
    text = " ".join(page.text)
    # feature 2 is significant and supported: confirmed; feature 1 is refuted by the masking check
    assert "1 confirmed finding, 0 candidates (significant, masking check inconclusive), 1 other cluster kept" in text
    assert "confirmed: 2; other: 1" in text
    summary = text.split("Summary", 1)[1].split("Model, data and parameters", 1)[0]
    assert "lead finding feature 2" in summary and "masking supported: 3 errors fixed, 0 made" in summary
    assert "not supported: 0 errors fixed, 0 made in the classes it hurts (one-sided sign test p = 1.0000)" in text
    assert "supported: 3 errors fixed, 0 made in the classes it hurts (one-sided sign test p = 0.1250)" in text
    assert "feature 2 (the highest-ranked called feature the masking check does not refute)" in text
    first, second = (h for h in page.headings if h.startswith("Feature"))
    assert "masking fixes no errors" in first and "lead finding" not in first
    assert "lead finding" in second and "masking:" not in second
    none = _findings([_feature(1, [("im0", 1)], called=True, causal=causal(0, 0, 1.0, False))], lead_rank=None)
    text = " ".join(_parse(write_report(tmp_path / "none" / "report.html", none, dataset_root=dataset)).text)
    assert "none: the masking check supports no called feature" in text


def test_a_reaudit_opens_with_what_changed(dataset, tmp_path):  # noqa: F811
    drift = {"matched_by": "medoid cosine", "previous": {"k": 4, "n_features": 2, "n_called": 1, "lead_rank": 1,
                                                         "model": "m"},
             "same_model": True, "unchanged": 1, "new_called": [2], "k_change": [4, 5], "lead_change": None,
             "appeared": [{"rank": 2, "attribute": "three", "called": True, "score": 0.4, "q_value": 0.01,
                           "verdict": "supported"}],
             "disappeared": [{"rank": 2, "attribute": "nine", "called": False, "score": 0.2, "q_value": 0.6,
                              "verdict": None}],
             "changed": [],
             "metrics": {"audited": {k: {"previous": 0.5, "current": 0.5, "change": 0.0}
                                     for k in ("image_overall", "image_worst_group", "region_overall",
                                               "region_worst_group")}}}
    out = write_report(tmp_path / "report.html", _findings([_feature(1, [("im0", 1)])]), dataset_root=dataset,
                       drift=drift)
    page = out.read_text()
    assert page.index('id="drift"') < page.index('id="provenance"')  # at the top
    assert "1 appeared, 1 disappeared, 0 changed, 1 unchanged" in page
    assert "New called finding(s): rank 2" in page and "K 4 → 5" in page
    assert json.loads((tmp_path / "report.json").read_text())["drift"]["new_called"] == [2]
    # a first audit has no drift section
    first = write_report(tmp_path / "first" / "report.html", _findings([_feature(1, [("im0", 1)])]),
                         dataset_root=dataset)
    assert 'id="drift"' not in first.read_text()
