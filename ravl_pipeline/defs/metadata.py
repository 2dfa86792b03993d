"""What the Dagster UI shows about each materialization: Markdown tables of
findings and metrics, and a small PNG grid of each finding's top regions
(embedded as a base64 data URI, so the UI needs no file server).

One function per asset turns a pipeline step's result into its metadata,
so the assets stay a few lines each.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import dagster as dg
import numpy as np
from PIL import Image, ImageDraw

from ..core.cluster import Clustering
from ..core.embed import Embeddings
from ..core.findings import Feature, Findings
from ..core.metrics import METRIC_KEYS
from ..core.scores import Scores
from ..io.dataset import load_dataset
from ..pipeline import Audit, ModelRecord
from ..report.html import region_image
from .resources import report_url

THUMB = 64  # pixels per region thumbnail in the grid (the whole image, its box outlined)
GRID_FINDINGS = 8  # findings shown in the grid; the rest are counted
GRID_REGIONS = 6  # regions per finding
LABEL_WIDTH = 84


def _num(x: Any, fmt: str = "{:+.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _cell(x: Any) -> str:
    """A table cell: integers as they are, other numbers to 3 decimals."""
    return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def md(text: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(text)


def path(p: Path) -> dg.MetadataValue:
    return dg.MetadataValue.path(str(p))


# --------------------------------------------------------------------------- tables

def _verdict(f: Feature) -> str:
    support = f.support
    return "–" if support is None else str(support.get("verdict") or
                                          ("supported" if support.get("supported") else "not supported"))


def _gaps(f: Feature, n: int = 2) -> str:
    """The ``n`` largest per-class gaps, e.g. ``nine +0.92, three −0.40``."""
    rows = sorted(f.per_class, key=lambda r: -abs(r["gap"]))[:n]
    return ", ".join(f"{r['label']} {_num(r['gap'], '{:+.2f}')}" for r in rows)


def findings_table(findings: Findings, top: int = 10) -> str:
    """The findings with their evidence (SPEC §2.2–2.5, §5): rank (★ the lead
    finding), attribute, G_c, H_c, q-value, called, the masking verdict and
    the two largest per-class gaps, as a compact Markdown table."""
    feats = findings.features
    lead = findings.lead_rank
    standing = [f.standing for f in feats]
    counts = (f"{standing.count('confirmed')} confirmed, {standing.count('candidate')} candidate(s), "
              f"{standing.count('other')} other" if findings.has_significance else f"{len(feats)} kept")
    head = (f"K = {findings.k}, silhouette {_num(findings.silhouette, '{:.3f}')}, findings: {counts}"
            + (f"; lead finding: rank {lead} (★)" if lead is not None else "; no lead finding") + "\n\n")
    if not feats:
        return head + "_No cluster meets the spurious criterion (SPEC §2.4)._"
    rows = ["| rank | standing | attribute | G_c | H_c | q | called | masking | largest gaps |",
            "|---:|---|---|---:|---:|---:|:---:|---|---|"]
    for f in feats[:top]:
        called = "–" if f.called is None else ("yes" if f.called else "no")
        rows.append(f"| {'★ ' if f.rank == lead else ''}{f.rank} | {f.standing} | {f.attribute} | {f.score:.2f} "
                    f"| {_num(f.influence, '{:.2f}')} | {_num(f.q_value, '{:.3g}')} | {called} | {_verdict(f)} "
                    f"| {_gaps(f)} |")
    more = f"\n\n_… and {len(feats) - top} more in findings.json._" if len(feats) > top else ""
    return head + "\n".join(rows) + more


def drift_markdown(drift: Mapping | None) -> str:
    """The re-audit drift (core.drift) as Markdown: counts, new called
    findings, and one row per finding that appeared, disappeared or changed."""
    if drift is None:
        return "_First audit of this set: nothing to compare with._"
    prev = drift["previous"]
    text = (f"Since the previous audit ({prev['n_features']} findings, K = {prev['k']}): "
            f"**{len(drift['appeared'])} appeared, {len(drift['disappeared'])} disappeared, "
            f"{len(drift['changed'])} changed**, {drift['unchanged']} unchanged (matched by {drift['matched_by']}).")
    if drift["new_called"]:
        text += f" **New called finding(s): rank {', '.join(map(str, drift['new_called']))}.**"
    if drift["k_change"]:
        text += f" K {drift['k_change'][0]} → {drift['k_change'][1]}."
    if drift["lead_change"]:
        text += f" Lead finding: rank {drift['lead_change'][0]} → {drift['lead_change'][1]}."
    rows = ["| change | rank before | rank now | attribute | called |", "|---|---:|---:|---|---|"]
    rows += [f"| appeared | – | {f['rank']} | {f['attribute']} | {f['called']} |" for f in drift["appeared"]]
    rows += [f"| {', '.join(f['changed'])} | {f['previous_rank']} | {f['rank']} | "
             f"{f['previous_attribute']} → {f['attribute']} | {f['previously_called']} → {f['called']} |"
             for f in drift["changed"]]
    rows += [f"| disappeared | {f['rank']} | – | {f['attribute']} | {f['called']} |" for f in drift["disappeared"]]
    table = "\n\n" + "\n".join(rows) if len(rows) > 2 else ""
    if drift.get("metrics"):
        table += "\n\n" + metrics_delta_table(drift["metrics"])
    return text + table


def metrics_delta_table(deltas: Mapping[str, Mapping]) -> str:
    rows = ["| model | " + " | ".join(METRIC_KEYS) + " |", "|---|" + "---:|" * len(METRIC_KEYS)]
    for model, by_key in deltas.items():
        rows.append(f"| {model} | " + " | ".join(
            f"{_num(by_key[k]['previous'], '{:.3f}')} → {_num(by_key[k]['current'], '{:.3f}')} "
            f"({_num(by_key[k]['change'])})" for k in METRIC_KEYS) + " |")
    return "\n".join(rows)


def k_sweep_table(sweep: Sequence[Mapping]) -> str:
    rows = ["| K | silhouette |", "|---:|---:|"]
    rows += [f"| {s['k']} | {_num(s['silhouette'], '{:.4f}')} |" for s in sweep]
    return "\n".join(rows)


METRIC_HEADS = {"image_overall": "image", "image_worst_group": "image WG", "region_overall": "region",
                "region_worst_group": "region WG"}


def metrics_table(metrics_by_model: Mapping[str, Mapping]) -> str:
    """One row per model: the four SPEC §4.2 metrics, in percent (WG:
    worst-group), short enough for the asset page's panel."""
    rows = ["| model | " + " | ".join(METRIC_HEADS[k] for k in METRIC_KEYS) + " |",
            "|---|" + "---:|" * len(METRIC_KEYS)]
    for name, m in metrics_by_model.items():
        rows.append(f"| {name} | " + " | ".join(_num(None if m.get(k) is None else 100 * m[k], "{:.1f}")
                                                for k in METRIC_KEYS) + " |")
    return "\n".join(rows) + "\n\n_accuracy in percent; WG: worst-group_"


def region_grid_png(dataset_dir: Path, findings: Findings, n_features: int = GRID_FINDINGS,
                    n_regions: int = GRID_REGIONS) -> bytes | None:
    """A PNG with one row per kept finding (the first ``n_features``): its
    rank and attribute, then its top regions, each drawn inside its image
    thumbnail with the box outlined (as in the report); ★ marks the lead."""
    feats = [f for f in findings.features[:n_features] if f.regions]
    if not feats:
        return None
    ds = load_dataset(dataset_dir, check_images=False)
    row_of = {image_id: i for i, image_id in enumerate(ds.image_ids)}
    cell = THUMB + 4
    grid = Image.new("RGB", (LABEL_WIDTH + n_regions * cell, len(feats) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, feature in enumerate(feats):
        star = "* " if feature.rank == findings.lead_rank else ""
        draw.text((4, r * cell + 4), f"{star}#{feature.rank}", fill="black")
        draw.text((4, r * cell + 18), str(feature.attribute)[:12], fill="black")
        draw.text((4, r * cell + 32), "called" if feature.called else "", fill=(0, 110, 0))
        for c, region in enumerate(feature.regions[:n_regions]):
            i = row_of.get(region["image_id"])
            if i is None:
                continue
            thumb = region_image(ds.load_image(i), region.get("box"), THUMB)
            x = LABEL_WIDTH + c * cell + (THUMB - thumb.width) // 2
            grid.paste(thumb, (x, r * cell + 2 + (THUMB - thumb.height) // 2))
    buf = io.BytesIO()
    grid.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def region_grid_markdown(dataset_dir: Path, findings: Findings) -> str:
    png = region_grid_png(dataset_dir, findings)
    if png is None:
        return "_No spurious feature, no regions to show._"
    data = base64.b64encode(png).decode()
    rest = len(findings.features) - GRID_FINDINGS
    more = f" The first {GRID_FINDINGS} of {len(findings.features)} findings are shown." if rest > 0 else ""
    return ("One row per finding (rank, attribute; * the lead finding), its regions most similar to the medoid "
            f"first, each box outlined in its image.{more}\n\n![top regions](data:image/png;base64,{data})")


# --------------------------------------------------------------------------- one per asset

def audited_model(record: ModelRecord, record_path: Path) -> dict:
    n_params = sum(p.numel() for p in record.load().model.parameters())
    return {"model": record.model, "architecture": str(record.architecture), "parameters": n_params,
            "init_model": str(record.init_model), "train_data": str(record.train_data), "record": path(record_path)}


def proposals(audit: Audit, n_rows: int) -> dict:
    return {"dagster/row_count": n_rows, "images": len(audit.data), "proposer": audit.params.regions.proposer,
            "path": path(audit.paths.proposals / "proposals.parquet")}


def embeddings(audit: Audit, emb: Embeddings, seconds: float) -> dict:
    return {"dagster/row_count": emb.n_regions, "images": len(emb.image_ids), "dim": int(emb.region_emb.shape[1]),
            "mode": emb.mode, "seconds": round(seconds, 2), "path": path(audit.paths.embeddings)}


def scores(audit: Audit, sc: Scores, labels: np.ndarray) -> dict:
    per_class = ["| class | n | zero-shot accuracy |", "|---|---:|---:|"]
    for k, name in enumerate(sc.classes):
        mask = labels == k
        acc = float((sc.image_pred[mask] == k).mean()) if mask.any() else 0.0
        per_class.append(f"| {name} | {int(mask.sum())} | {acc:.3f} |")
    return {"dagster/row_count": int(len(sc.region_probs)), "image_accuracy": float((sc.image_pred == labels).mean()),
            "tau": sc.tau, "templates": dg.MetadataValue.json(sc.templates), "per_class": md("\n".join(per_class)),
            "path": path(audit.paths.scores)}


def clusters(audit: Audit, cl: Clustering) -> dict:
    return {"dagster/row_count": int(len(cl.labels)), "k": cl.k, "silhouette": _silhouette(cl.silhouette),
            "sampled": cl.sampled, "k_sweep": md(k_sweep_table(cl.sweep)), "path": path(audit.paths.clusters)}


def _silhouette(x) -> float:
    return -1.0 if x is None or np.isnan(x) else round(float(x), 3)


def findings(audit: Audit, found: Findings, file: Path, drift: Mapping | None = None,
             compared: bool = True) -> dict:
    """``compared``: the findings of a set's audit, with what changed since
    the previous one (``drift``, None for a first audit)."""
    lead = found.feature(found.lead_rank) if found.lead_rank is not None else None
    out = {"dagster/row_count": len(found.features), "k": found.k, "silhouette": _silhouette(found.silhouette),
           "called": len(found.called) if found.has_significance else -1,
           "lead_rank": found.lead_rank or -1, "lead_attribute": lead.attribute if lead else "none",
           "findings": md(findings_table(found)),
           "top_regions": md(region_grid_markdown(audit.dataset_dir, found)), "path": path(file)}
    if compared:
        out["changes_since_last_audit"] = md(drift_markdown(drift))
        out["new_called_findings"] = len(drift["new_called"]) if drift else 0
    return out


def mitigated_model(audit: Audit, record: ModelRecord, history: dict, folder: Path | None = None) -> dict:
    if not record.extra.get("trained"):
        return {"model": record.model, "trained": False, "reason": f"{record.extra.get('reason')}: nothing trained"}
    losses = history.get("losses") or []
    ranks = record.extra.get("feature_ranks") or []
    return {"model": record.model, "trained": True, "method": record.extra["method"],
            "steps": history.get("steps", 0),
            "first_loss": float(losses[0]) if losses else -1.0, "last_loss": float(losses[-1]) if losses else -1.0,
            "spurious_features_used": len(ranks), "feature_ranks": ", ".join(map(str, ranks)) or "none",
            "train_config": dg.MetadataValue.json(history.get("config")),
            "path": path(folder or audit.paths.mitigated_model)}


def answer_markdown(m: Mapping) -> str:
    """The closed loop's answer lines, then why a model was not trained."""
    lines = [f"- {line}" for line in m.get("answer") or []]
    lines += [f"- {name} not trained: {why}" for name, why in (m.get("not_trained") or {}).items()]
    lines += [f"- warning: {w}" for w in m.get("warnings") or []]
    return "\n".join(lines) or "no feature to form groups by: groups are the classes"


def metrics(audit: Audit, m: dict, drift: Mapping | None) -> dict:
    out = {"answer": md(answer_markdown(m)), "groups_from": m.get("groups_from") or "class",
           "metrics": md(metrics_table(audit.metrics_by_model(m))), "path": path(audit.paths.metrics)}
    if m.get("image_overall_change") is not None:
        out["image_overall_change"] = m["image_overall_change"]
    if drift and drift.get("metrics"):
        out["change_since_last_audit"] = md(metrics_delta_table(drift["metrics"]))
    return out


def report(audit: Audit, summary: dict) -> dict:
    rows = ["| | before | after |", "|---|---:|---:|"]
    after = summary["after"] or {}
    for key in ("n_features", "n_called", "top_score", "image_accuracy"):
        rows.append(f"| {key} | {_cell(summary['before'][key])} | "
                    f"{_cell(after.get(key)) if after else 'not re-audited'} |")
    m = summary["metrics"] or {}
    html = audit.paths.report / "report.html"
    return {"report_url": dg.MetadataValue.url(report_url(audit.name)),
            "answer": md(answer_markdown(m)),
            "before_after": md("\n".join(rows)),
            "changes_since_last_audit": md(drift_markdown(summary.get("drift"))),
            "metrics": md(metrics_table(audit.metrics_by_model(m) or {})),
            "summary": path(audit.paths.report / "summary.json"), "report": path(html)}
