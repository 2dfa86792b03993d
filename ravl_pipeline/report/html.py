"""The audit report: one static, self-contained HTML page and its JSON twin.

What a reader needs to judge a finding (SPEC §2.5, §5): the top-ranked regions
of each discovered feature drawn inside their images with the box outlined,
the per-class accuracy with and without the feature (confidence intervals and
significance where the findings carry them), its score ``G_c`` and influence
``H_c``, and, when given, the four mitigation metrics of SPEC §4.2 per method
and the re-audit of the mitigated model.

The page needs no server: images are embedded as base64 PNG, the style sheet
is inline, and nothing is fetched.  Beside it, its JSON twin — named after
the page, ``report.html`` → ``report.json`` (:func:`twin_path`) — holds the
same numbers for programs: the findings, and the metrics and the re-audit
when given.  Both files carry a generator mark, and an existing file at
either path is replaced only when it bears that mark (it is an earlier
report); anything else there is refused before any work.  Every file is
written to a temporary name and renamed.
A re-audit opens with what changed since the previous audit of the same set.

One concept — the page and how each part of it is drawn — which is why this
module is longer than most.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from PIL import Image, ImageDraw

from ..core.findings import STANDINGS, standing_of
from ..io.files import json_bytes, write_files_atomic
from .inputs import (METRIC_KEYS, ImageSource, checked_box, default_provenance, json_safe, load_findings,
                     metric_value, normalise_metrics, row_intervals)
from .outputs import GENERATOR, HTML_MARK, check_report_outputs, twin_path

__all__ = ["METRIC_KEYS", "write_report", "render_report", "region_image", "region_thumbnail", "twin_path",
           "check_report_outputs"]


METRIC_TITLES = {
    "image_overall": "Image overall",
    "image_worst_group": "Image worst-group",
    "region_overall": "Region overall",
    "region_worst_group": "Region worst-group",
}
# Method names that denote the model before mitigation, in order of preference;
# the before/after panel measures every other method against it.
BASELINE_NAMES = ("audited", "standard", "standard_ft", "Standard FT", "before")
DEFAULT_TOP_REGIONS = 12
THUMB_SIZE = 112  # px; the synthetic 56x56 images are shown at 2x
BOX_COLOUR = (255, 212, 0)  # yellow: visible on the red synthetic feature and on photos
BOX_HALO = (0, 0, 0)

ASSET_DIR = Path(__file__).parent / "assets"


# --------------------------------------------------------------------------- images

def thumbnail_size(width: int, height: int, size: int = THUMB_SIZE) -> tuple[int, int]:
    """``(w, h)`` of an image scaled to fit ``size`` at its own aspect ratio."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def region_image(image, box: Sequence[float] | None, size: int = THUMB_SIZE) -> Image.Image:
    """``image`` scaled to fit ``size`` (at its own aspect ratio) with ``box`` outlined.

    Small images are enlarged with nearest-neighbour so their pixels stay
    sharp; the outline is drawn after scaling so it has the same width on
    every image.
    """
    w, h = image.size
    scale = size / max(w, h)
    resample = Image.NEAREST if scale >= 1 else Image.BILINEAR
    out = image.convert("RGB").resize(thumbnail_size(w, h, size), resample)
    if box is not None:
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        x2, y2 = max(x1, x2 - 1), max(y1, y2 - 1)
        draw = ImageDraw.Draw(out)
        draw.rectangle([x1, y1, x2, y2], outline=BOX_HALO, width=4)
        draw.rectangle([x1 + 1, y1 + 1, max(x1 + 1, x2 - 1), max(y1 + 1, y2 - 1)], outline=BOX_COLOUR, width=2)
    return out


def region_thumbnail(image, box: Sequence[float] | None, size: int = THUMB_SIZE) -> bytes:
    """PNG bytes of :func:`region_image`."""
    buf = io.BytesIO()
    region_image(image, box, size).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --------------------------------------------------------------------------- HTML pieces

def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _num(x: Any, digits: int = 3) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(x):
        return "–"
    if math.isinf(x):
        return "−∞" if x < 0 else "∞"
    return f"{x:.{digits}f}"


def _pct(x: Any) -> str:
    value = metric_value(x)
    return "–" if value is None else f"{100 * value:.1f}"


def _with_ci(value: Any, iv: tuple[float, float] | None, digits: int = 3) -> str:
    text = _e(_num(value, digits))
    if iv is not None:
        text += f' <span class="ci">[{_num(iv[0], digits)}, {_num(iv[1], digits)}]</span>'
    return text


def _style() -> str:
    css = ASSET_DIR / "report.css"
    return css.read_text(encoding="utf-8") if css.is_file() else ""


def _kv_table(rows: Iterable[tuple[str, Any]], css_class: str = "kv") -> str:
    cells = []
    for key, value in rows:
        if isinstance(value, (Mapping, list, tuple)):
            shown = f"<code>{_e(json.dumps(value, sort_keys=True, default=str))}</code>"
        else:
            shown = _e("–" if value is None else value)
        cells.append(f"<tr><th>{_e(key)}</th><td>{shown}</td></tr>")
    return f'<table class="{css_class}">' + "".join(cells) + "</table>"


def _significance(feat: Mapping[str, Any]) -> list[tuple[str, Any]]:
    rows = []
    if "p_value" in feat:
        rows.append(("p-value", _num(feat.get("p_value"), 4)))
    if "q_value" in feat:
        rows.append(("q-value (BH)", _num(feat.get("q_value"), 4)))
    if "called" in feat:
        rows.append(("called", "yes" if feat.get("called") else "no"))
    if "n_permutations" in feat:
        rows.append(("permutations", feat.get("n_permutations")))
    return rows


def _names_text(names: Any) -> str | None:
    """``names`` as 'term (score), …'; tolerates strings, dicts and pairs."""
    if not names:
        return None
    if isinstance(names, Mapping):
        names = names.get("terms", names.get("top", [names]))
    parts = []
    for item in list(names)[:5]:
        if isinstance(item, Mapping):
            term = item.get("term", item.get("name", item.get("text")))
            score = item.get("score", item.get("similarity"))
            parts.append(f"{term} ({_num(score, 2)})" if score is not None else str(term))
        elif isinstance(item, (list, tuple)) and item:
            parts.append(f"{item[0]} ({_num(item[1], 2)})" if len(item) > 1 else str(item[0]))
        else:
            parts.append(str(item))
    return ", ".join(parts)


def _causal_text(causal: Any) -> str | None:
    """One line from a masking check (flip rate, accuracy before → after)."""
    if isinstance(causal, list):  # several random controls: show the first
        causal = causal[0] if causal else None
    if not isinstance(causal, Mapping):
        return None
    parts = []
    if causal.get("flip_rate") is not None:
        parts.append(f"flip rate {_num(causal['flip_rate'], 2)}")
    if causal.get("acc_before") is not None or causal.get("acc_after") is not None:
        parts.append(f"accuracy {_num(causal.get('acc_before'), 2)} → {_num(causal.get('acc_after'), 2)}")
    if causal.get("parity_shift") is not None:
        parts.append(f"parity shift {_num(causal['parity_shift'], 2)}")
    if causal.get("n_images") is not None:
        parts.append(f"{causal['n_images']} images, {causal.get('fill', '?')} fill")
    return ", ".join(parts) or None


def _per_class_table(feat: Mapping[str, Any]) -> str:
    attribute = feat.get("attribute")
    head = ("<tr><th>class</th><th>n present</th><th>acc present</th><th>n absent</th>"
            "<th>acc absent</th><th>gap</th></tr>")
    body = []
    for row in feat.get("per_class", []):
        ivs = row_intervals(row)
        gap = row.get("gap")
        sign = "pos" if (metric_value(gap) or 0) > 0 else "neg" if (metric_value(gap) or 0) < 0 else ""
        css = ' class="attribute"' if row.get("label") == attribute else ""
        body.append(
            f"<tr{css}><td>{_e(row.get('label'))}</td><td>{_e(row.get('n_present'))}</td>"
            f"<td>{_with_ci(row.get('acc_present'), ivs.get('acc_present'))}</td>"
            f"<td>{_e(row.get('n_absent'))}</td>"
            f"<td>{_with_ci(row.get('acc_absent'), ivs.get('acc_absent'))}</td>"
            f'<td class="gap {sign}">{_with_ci(gap, ivs.get("gap"))}</td></tr>')
    return f'<table class="per-class">{head}{"".join(body)}</table>'


def _region_grid(feat: Mapping[str, Any], images: ImageSource | None, top: int, where: str = "findings") -> str:
    regions = list(feat.get("regions", []))[:top]
    if not regions:
        return '<p class="note">No regions listed for this feature.</p>'
    if images is None:
        ids = ", ".join(f"{r.get('image_id')}#{r.get('region_index')}" for r in regions)
        return ('<p class="note">Region images not shown: no dataset directory was given. '
                f"Top region ids: {_e(ids)}</p>")
    cells = []
    for pos, region in enumerate(regions, start=1):
        at = f"{where}: feature rank {feat.get('rank')}, region {pos}"
        image = images.image(region.get("image_id"), at)
        box = checked_box(region.get("box"), image.size, f"{at} (image_id {region.get('image_id')!r})")
        png = region_thumbnail(image, box)
        caption = f"#{pos} {region.get('image_id')} r{region.get('region_index')} · sim {_num(region.get('similarity'), 2)}"
        if region.get("region_label"):
            caption += f" · {region['region_label']}"
        alt = f"region {region.get('region_index')} of image {region.get('image_id')}"
        tw, th = thumbnail_size(*image.size)
        cells.append(f'<figure class="region"><img src="{_data_uri(png)}" alt="{_e(alt)}" '
                     f'width="{tw}" height="{th}"><figcaption>{_e(caption)}</figcaption></figure>')
    return '<div class="grid">' + "".join(cells) + "</div>"


def _support(feat: Mapping[str, Any]) -> Mapping[str, Any] | None:
    causal = feat.get("causal")
    support = causal.get("support") if isinstance(causal, Mapping) else None
    return support if isinstance(support, Mapping) and "supported" in support else None


def _verdict(support: Mapping[str, Any]) -> str:
    return support.get("verdict") or ("supported" if support["supported"] else "not supported")


def _feature_section(feat: Mapping[str, Any], images, top: int, prefix: str, lead: bool = False,
                     where: str = "findings") -> str:
    rank = feat.get("rank")
    facts = [("score G_c", _num(feat.get("score"))), ("influence H_c", _num(feat.get("influence"))),
             ("correlated class", feat.get("attribute")), ("cluster", feat.get("cluster_id"))]
    if "size" in feat:
        facts.append(("regions in cluster", feat.get("size")))
    facts += _significance(feat)
    for key, label in (("causal", "masking check"), ("causal_control", "masking random regions")):
        text = _causal_text(feat.get(key))
        if text:
            facts.append((label, text))
    support = _support(feat)
    if support is not None:
        text = (f"{_verdict(support)}: {support.get('errors_fixed')} errors fixed, {support.get('errors_made')} "
                f"made in the classes it hurts (one-sided sign test p = {_num(support.get('p_value'), 4)})")
        if support.get("reason"):
            text += f"; {support['reason']}"
        facts.append(("masking verdict", text))
    names = _names_text(feat.get("names"))
    if names:
        facts.append(("name (model-derived)", names))
    called = feat.get("called")
    badge = ""
    if called is not None:
        badge = (' <span class="badge called">called</span>' if called
                 else ' <span class="badge not-called">not significant</span>')
    if support is not None and _verdict(support) == "not supported":
        badge += ' <span class="badge not-called">masking fixes no errors</span>'
    if support is not None and _verdict(support) == "inconclusive":
        badge += ' <span class="badge inconclusive">masking check inconclusive</span>'
    if lead:
        badge += ' <span class="badge called">lead finding</span>'
    lead_note = ("" if not lead else '<p class="note">Lead finding: the highest-ranked feature that is called '
                 "significant and not refuted by the masking check.</p>")
    title = f"Feature {rank}: correlated with “{feat.get('attribute')}”"
    return (f'<section class="feature" id="{prefix}feature-{_e(rank)}">'
            f"<h3>{_e(title)}{badge}</h3>{lead_note}"
            f'<div class="feature-body"><div class="facts">{_kv_table(facts)}</div>'
            f'<div class="table-wrap">{_per_class_table(feat)}</div></div>'
            f"<h4>Top regions</h4>{_region_grid(feat, images, top, where)}</section>")


def _findings_section(findings: Mapping[str, Any], images, top: int, *, section_id: str,
                      title: str, prefix: str = "", where: str = "findings") -> str:
    summary = [("K (clusters)", findings.get("k")), ("silhouette", _num(findings.get("silhouette"))),
               ("regions", findings.get("n_regions")), ("images", findings.get("n_images")),
               ("features found", len(findings.get("features", [])))]
    if findings.get("sampled"):
        summary.append(("clustered sample", f"{findings.get('n_sample')} regions, rest assigned to nearest medoid"))
    if "image_accuracy" in findings:
        summary.append(("image accuracy", _num(findings.get("image_accuracy"))))
    sig = findings.get("significance")
    if isinstance(sig, Mapping) and "n_permutations" in sig:
        summary.append(("significance", f"{sig['n_permutations']} permutations per cluster, "
                                        f"Benjamini–Hochberg over {sig.get('n_tests', '?')} clusters at "
                                        f"α = {sig.get('alpha', '?')}; {sig.get('n_called', 0)} called"))
        if sig.get("warning"):
            summary.append(("significance warning", sig["warning"]))
    if "lead_rank" in findings:
        lead = findings["lead_rank"]
        summary.append(("lead finding", "none: the masking check supports no called feature" if lead is None
                        else f"feature {lead} (the highest-ranked called feature the masking check does "
                             "not refute)"))
    causal = findings.get("causal")
    if isinstance(causal, Mapping) and isinstance(causal.get("fill_selection"), Mapping):
        rates = causal["fill_selection"].get("flip_rates") or {}
        summary.append(("masking fill", f"{causal.get('fill')} (chosen: hiding the same random regions flips "
                                        + ", ".join(f"{k} {_num(v, 2)}" for k, v in rates.items())
                                        + " of their images' predictions)"))
    parts = [f'<section id="{section_id}"><h2>{_e(title)}</h2>', _kv_table(summary, "kv summary")]
    features = findings.get("features", [])
    if not features:
        parts.append('<p class="empty" id="{}no-feature">No spurious feature found: no cluster has a '
                     'positive and a negative per-class gap together with influence ≥ {}.</p>'
                     .format(prefix, _e(_num(findings.get("influence_threshold", 0.25), 2))))
    lead = findings.get("lead_rank")
    for feat in features:
        parts.append(_feature_section(feat, images, top, prefix, lead=lead is not None and feat.get("rank") == lead,
                                      where=where))
    parts.append("</section>")
    return "".join(parts)


def _baseline_method(metrics: Mapping[str, Mapping]) -> str:
    for base in BASELINE_NAMES:
        for name in metrics:  # "audited" or "audited, 64 steps"
            if name == base or name.startswith(f"{base},"):
                return name
    return next(iter(metrics))


def _paired(m: Mapping[str, Any], key: str) -> str:
    """The paired bootstrap differences a model's metrics carry (the closed
    loop's ``comparisons``): ``vs audited +5.5 [+2.6, +8.8]; vs control …``."""
    parts = []
    for field_, name in (("paired_vs_audited", "audited"), ("paired_vs_control", "control")):
        row = (m.get(field_) or {}).get(key) or {}
        if row.get("diff") is None:
            continue
        ci = row.get("ci")
        iv = f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else ""
        parts.append(f"vs {name} {100 * row['diff']:+.1f}{iv}")
    return f'<br><span class="ci">{_e("; ".join(parts))}</span>' if parts else ""


def _sections(metrics, reaudit, drift) -> list[tuple[str, str]]:
    """``(id, title)`` of the sections the page has, in order."""
    out = [("drift", "since the last audit")] if drift else []
    out += [("provenance", "model, data, parameters"), ("findings", "findings")]
    out += [("metrics", "before and after")] if metrics else []
    out += [("reaudit", "re-audit")] if reaudit is not None else []
    return out


def _bar_chart(metrics: Mapping[str, Mapping], key: str) -> str:
    """Inline SVG bars, one per method, for one metric in [0, 1]."""
    names = list(metrics)
    bar_h, gap, label_w, width = 16, 6, 120, 320
    height = len(names) * (bar_h + gap) + gap
    rows = []
    for i, name in enumerate(names):
        value = metric_value(metrics[name].get(key))
        y = gap + i * (bar_h + gap)
        length = 0 if value is None else max(0.0, min(1.0, value)) * (width - label_w - 50)
        rows.append(f'<text x="0" y="{y + bar_h - 4}" class="bar-label">{_e(name)}</text>'
                    f'<rect x="{label_w}" y="{y}" width="{length:.1f}" height="{bar_h}" class="bar"></rect>'
                    f'<text x="{label_w + length + 4:.1f}" y="{y + bar_h - 4}" class="bar-value">{_pct(value)}</text>')
    return (f'<figure class="chart"><figcaption>{_e(METRIC_TITLES[key])}</figcaption>'
            f'<svg width="{width}" height="{height}" role="img" aria-label="{_e(METRIC_TITLES[key])}">'
            + "".join(rows) + "</svg></figure>")


def _metrics_section(metrics: Mapping[str, Mapping]) -> str:
    base = _baseline_method(metrics)
    head = "<tr><th>method</th>" + "".join(f"<th>{_e(METRIC_TITLES[k])}</th>" for k in METRIC_KEYS) + "</tr>"
    body = []
    for name, m in metrics.items():
        cells = []
        for key in METRIC_KEYS:
            value = metric_value(m.get(key))
            text = _pct(value)
            if name != base and value is not None and metric_value(metrics[base].get(key)) is not None:
                delta = 100 * (value - metric_value(metrics[base].get(key)))
                css = "pos" if delta > 0 else "neg" if delta < 0 else ""
                text += f' <span class="delta {css}">({delta:+.1f})</span>'
            cells.append(f"<td>{text}{_paired(m, key)}</td>")
        css = ' class="baseline"' if name == base else ""
        body.append(f"<tr{css}><th>{_e(name)}</th>{''.join(cells)}</tr>")
    charts = "".join(_bar_chart(metrics, key) for key in METRIC_KEYS)
    return ('<section id="metrics"><h2>Mitigation: before and after</h2>'
            f'<p class="note">Accuracy in percent on the test split (SPEC §4.2); '
            f'differences in points against <b>{_e(base)}</b>.</p>'
            f'<table class="metrics">{head}{"".join(body)}</table>'
            f'<div class="charts">{charts}</div></section>')


def _drift_rows(drift: Mapping[str, Any]) -> list[str]:
    rows = []
    for f in drift.get("appeared", []):
        rows.append(f"<tr><td>appeared</td><td>–</td><td>{_e(f['rank'])}</td><td>{_e(f['attribute'])}</td>"
                    f"<td>{_e(_flag(f.get('called')))}</td><td>{_e(f.get('verdict') or '–')}</td></tr>")
    for f in drift.get("changed", []):
        attr = (f"{_e(f['previous_attribute'])} → {_e(f['attribute'])}" if f["previous_attribute"] != f["attribute"]
                else _e(f["attribute"]))
        called = (f"{_flag(f['previously_called'])} → {_flag(f['called'])}"
                  if f["previously_called"] != f["called"] else _flag(f["called"]))
        rows.append(f"<tr><td>changed ({_e(', '.join(f['changed']))})</td><td>{_e(f['previous_rank'])}</td>"
                    f"<td>{_e(f['rank'])}</td><td>{attr}</td><td>{_e(called)}</td>"
                    f"<td>similarity {_num(f['similarity'], 2)}</td></tr>")
    for f in drift.get("disappeared", []):
        rows.append(f"<tr><td>disappeared</td><td>{_e(f['rank'])}</td><td>–</td><td>{_e(f['attribute'])}</td>"
                    f"<td>{_e(_flag(f.get('called')))}</td><td>{_e(f.get('verdict') or '–')}</td></tr>")
    return rows


def _delta(x: Any) -> str:
    return "–" if x is None else f"{x:+.3f}"


def _flag(x: Any) -> str:
    return "–" if x is None else ("called" if x else "not called")


def _drift_section(drift: Mapping[str, Any]) -> str:
    """What changed since the previous audit of the same set (core.drift)."""
    prev = drift.get("previous") or {}
    parts = [f"{len(drift.get('appeared', []))} appeared", f"{len(drift.get('disappeared', []))} disappeared",
             f"{len(drift.get('changed', []))} changed", f"{drift.get('unchanged', 0)} unchanged"]
    lines = [f"<p class=\"verdict\">Since the previous audit ({_e(prev.get('n_features'))} findings, "
             f"K = {_e(prev.get('k'))}): {_e(', '.join(parts))}; findings matched by {_e(drift.get('matched_by'))}."]
    if drift.get("new_called"):
        lines.append(f' <b class="warn">New called finding(s): rank {_e(", ".join(map(str, drift["new_called"])))}.'
                     "</b>")
    if drift.get("k_change"):
        lines.append(f" K {_e(drift['k_change'][0])} → {_e(drift['k_change'][1])}.")
    if drift.get("lead_change"):
        a, b = drift["lead_change"]
        lines.append(f" Lead finding: rank {_e(a if a is not None else 'none')} → {_e(b if b is not None else 'none')}.")
    if not drift.get("same_model", True):
        lines.append(f" The audited model changed (was {_e(prev.get('model'))}).")
    html_parts = ['<section id="drift"><h2>What changed since the last audit</h2>', "".join(lines), "</p>"]
    rows = _drift_rows(drift)
    if rows:
        html_parts.append('<table class="per-class drift"><tr><th>change</th><th>rank before</th><th>rank now</th>'
                          "<th>attribute</th><th>called</th><th>note</th></tr>" + "".join(rows) + "</table>")
    if drift.get("metrics"):
        head = "".join(f"<th>{_e(METRIC_TITLES[k])}</th>" for k in METRIC_KEYS)
        body = []
        for model, rows_ in drift["metrics"].items():
            cells = "".join(f"<td>{_num(r['previous'])} → {_num(r['current'])} ({_delta(r['change'])})</td>"
                            for r in rows_.values())
            body.append(f"<tr><td>{_e(model)}</td>{cells}</tr>")
        html_parts.append(f'<table class="metrics drift"><tr><th>model</th>{head}</tr>{"".join(body)}</table>')
    html_parts.append("</section>")
    return "".join(html_parts)


def _standings(findings: Mapping[str, Any]) -> dict[str, list]:
    """Ranks of the findings by what the reader is told (SPEC §5):
    confirmed, candidates, other kept clusters."""
    out: dict[str, list] = {k: [] for k in STANDINGS}
    for f in findings.get("features", []):
        support = _support(f)
        out[standing_of(f.get("called"), _verdict(support) if support else None)].append(f.get("rank"))
    return out


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _verdict_line(findings: Mapping[str, Any]) -> str:
    feats = findings.get("features", [])
    if not feats:
        return "No spurious feature found"
    st = _standings(findings)
    if not any("called" in f for f in feats):  # significance not computed: no finding can be confirmed
        return f"{_count(len(feats), 'cluster', 'clusters')} kept by the criterion (significance not computed)"
    return (f"{_count(len(st['confirmed']), 'confirmed finding', 'confirmed findings')}, "
            f"{_count(len(st['candidate']), 'candidate', 'candidates')} (significant, masking check inconclusive), "
            f"{_count(len(st['other']), 'other cluster', 'other clusters')} kept")


def _header(findings: Mapping[str, Any], provenance: Mapping[str, Any]) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<header id="top"><h1>RaVL audit report</h1>'
            f'<p class="verdict">{_e(_verdict_line(findings))} · model <b>{_e(provenance.get("model") or findings.get("model"))}</b>'
            f' · dataset <b>{_e(provenance.get("dataset") or findings.get("dataset"))}</b></p>'
            f'<p class="stamp">generated {stamp}</p></header>')


def _summary_section(findings: Mapping[str, Any], metrics: Mapping[str, Mapping] | None,
                     answer: Sequence[str] | None, sections: Sequence[tuple[str, str]]) -> str:
    """The first screen: the lead finding with its evidence, ground truth
    where the setting has one, the closed loop's answer and before/after
    metrics, and links to every section."""
    rows = []
    lead_rank = findings.get("lead_rank")
    lead = next((f for f in findings.get("features", []) if f.get("rank") == lead_rank), None)
    if lead is not None:
        support = _support(lead)
        evidence = [f"q = {_num(lead.get('q_value'), 3)}"] if lead.get("q_value") is not None else []
        if support is not None:
            evidence.append(f"masking {_verdict(support)}: {support.get('errors_fixed')} errors fixed, "
                            f"{support.get('errors_made')} made")
        names = _names_text(lead.get("names"))
        rows.append(("lead finding", f'<a href="#feature-{_e(lead_rank)}">feature {_e(lead_rank)}</a>, tied to '
                                     f'“{_e(lead.get("attribute"))}”' + (f" ({_e(names)})" if names else "")
                                     + (f"; {_e('; '.join(evidence))}" if evidence else "")))
    elif findings.get("features"):
        rows.append(("lead finding", "none: no called feature the masking check does not refute"))
    st = _standings(findings)
    if any(st.values()):
        rows.append(("findings", _e("; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in st.items() if v))))
    for name, gt in (findings.get("ground_truth") or {}).items():
        v = gt.get("validity") or {}
        rows.append((f"ground truth “{_e(name)}”",
                     f"setting {'valid' if v.get('valid') else 'not valid'} (gap {_num(v.get('correlated_gap'), 2)} "
                     f"for “{_e(gt.get('correlated_class'))}”, others {_num(v.get('other_mean_gap'), 2)}); "
                     f"Precision@10 of the lead finding {_num(gt.get('precision_at_10_lead'), 2)}, "
                     f"of the top-ranked {_num(gt.get('precision_at_10_top'), 2)}"))
    if metrics:
        base = _baseline_method(metrics)
        for name, m in metrics.items():
            rows.append((_e(name), _e(f"image overall {_pct(metric_value(m.get('image_overall')))}, worst-group "
                                  f"{_pct(metric_value(m.get('image_worst_group')))}; region overall "
                                  f"{_pct(metric_value(m.get('region_overall')))}, worst-group "
                                  f"{_pct(metric_value(m.get('region_worst_group')))}")
                         + ("" if name == base else _paired(m, "image_worst_group"))))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    items = "".join(f"<li>{_e(line)}</li>" for line in answer or [])
    links = " · ".join(f'<a href="#{_e(i)}">{_e(t)}</a>' for i, t in sections)
    return ('<section id="summary"><h2>Summary</h2>'
            + (f'<p class="answer-lead">Did the fix work?</p><ul class="answer">{items}</ul>' if items else "")
            + f'<table class="kv summary">{body}</table><nav class="toc">{links}</nav></section>')


def render_report(findings: Mapping[str, Any], *, dataset_root=None, metrics=None, reaudit=None,
                  provenance=None, top_regions: int = DEFAULT_TOP_REGIONS,
                  sources: tuple[str, str] = ("findings", "reaudit"), drift=None, answer=None) -> str:
    """The report as an HTML string (see :func:`write_report`); ``sources``
    name the findings and the re-audit in error messages."""
    images = ImageSource(dataset_root) if dataset_root is not None else None
    prov = default_provenance(findings, dataset_root)
    prov.update(dict(provenance or {}))
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">{HTML_MARK}",
             f"<title>RaVL audit report — {_e(prov.get('model') or findings.get('model'))}</title>",
             f"<style>{_style()}</style></head><body>", _header(findings, prov), "<main>",
             _summary_section(findings, metrics, answer, _sections(metrics, reaudit, drift)),
             _drift_section(drift) if drift else "",
             f'<section id="provenance"><h2>Model, data and parameters</h2>{_kv_table(prov.items())}</section>',
             _findings_section(findings, images, top_regions, section_id="findings",
                               title="Discovered spurious features", where=sources[0])]
    if metrics:
        parts.append(_metrics_section(metrics))
    if reaudit is not None:
        parts.append(_findings_section(reaudit, images, top_regions, section_id="reaudit",
                                       title="Re-audit of the mitigated model", prefix="reaudit-",
                                       where=sources[1]))
    parts.append("</main></body></html>\n")
    return "".join(parts)


# --------------------------------------------------------------------------- writing

def write_report(out_path, findings, *, dataset_root=None, metrics=None, reaudit=None,
                 provenance=None, top_regions: int = DEFAULT_TOP_REGIONS, drift=None, answer=None) -> Path:
    """Write the HTML report to ``out_path`` and its JSON twin beside it.

    ``findings`` and ``reaudit`` are findings dicts or ``findings.json``
    paths (SPEC §5); ``metrics`` maps a method name to a ``metrics.json``
    dict or path (SPEC §5); ``provenance`` adds or overrides entries of the
    model/data/parameters table (e.g. ``data_version``, ``code_version``);
    ``drift`` (``core.drift``: what changed since the previous audit of the
    same set) opens the page and is kept in the twin under ``drift``;
    ``answer`` (the closed loop's lines, :func:`core.metrics.answer_lines`)
    opens it before that, and is kept under ``answer``.
    ``dataset_root`` is the dataset the findings were computed on; its
    manifest maps each region's ``image_id`` to the image drawn.

    The twin (:func:`twin_path`: ``report.html`` → ``report.json``) holds
    ``findings``, ``metrics`` (method → metrics), ``reaudit`` and ``drift``. An
    existing page or twin that is not an earlier report is refused
    (:func:`check_report_outputs`) before anything else; everything is
    rendered before anything is written, and the page and its twin are
    replaced as one unit (:func:`~ravl_pipeline.io.files.write_files_atomic`),
    so a failure leaves both earlier files untouched.
    """
    out, twin = check_report_outputs(out_path)
    sources = tuple(str(x) if isinstance(x, (str, os.PathLike)) else name
                    for x, name in ((findings, "findings"), (reaudit, "reaudit")))
    findings = load_findings(findings, "findings")
    reaudit = load_findings(reaudit, "reaudit") if reaudit is not None else None
    metrics = normalise_metrics(metrics)
    page = render_report(findings, dataset_root=dataset_root, metrics=metrics, reaudit=reaudit,
                         provenance=provenance, top_regions=top_regions, sources=sources, drift=drift,
                         answer=answer)
    record = {"generator": GENERATOR, "report": out.name, "answer": list(answer or []),
              "findings": json_safe(findings),
              "metrics": json_safe(metrics) if metrics else None,
              "reaudit": json_safe(reaudit) if reaudit is not None else None,
              "drift": json_safe(drift) if drift else None}
    write_files_atomic({twin: json_bytes(record), out: page.encode("utf-8")})  # one unit: never one new, one old
    return out
