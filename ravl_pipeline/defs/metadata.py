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
from PIL import Image

from ..core.cluster import Clustering
from ..core.embed import Embeddings
from ..core.findings import Feature, Findings
from ..core.scores import Scores
from ..io.dataset import load_dataset
from ..pipeline import Audit, ModelRecord

THUMB = 40  # pixels per region thumbnail in the grid


def _num(x: Any, fmt: str = "{:+.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def md(text: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(text)


def path(p: Path) -> dg.MetadataValue:
    return dg.MetadataValue.path(str(p))


# --------------------------------------------------------------------------- tables

def findings_table(findings: Findings, top: int = 5) -> str:
    """Top findings with their per-class gaps (SPEC §2.2, §2.5), as Markdown."""
    feats = findings.features
    head = (f"K = {findings.k}, silhouette {_num(findings.silhouette, '{:.3f}')}, "
            f"{len(feats)} spurious feature(s)\n\n")
    if not feats:
        return head + "_No cluster meets the spurious criterion (SPEC §2.4)._"
    rows = ["| rank | cluster | score G_c | influence H_c | attribute | per-class gap (n present / n absent) |",
            "|---:|---:|---:|---:|---|---|"]
    for f in feats[:top]:
        gaps = "; ".join(f"{r['label']} {_num(r['gap'])} ({r['n_present']}/{r['n_absent']})"
                         for r in sorted(f.per_class, key=lambda r: -abs(r["gap"]))[:4])
        rows.append(f"| {f.rank} | {f.cluster_id} | {f.score:.3f} | {_num(f.influence, '{:.2f}')} "
                    f"| {f.attribute} | {gaps} |")
    return head + "\n".join(rows)


def k_sweep_table(sweep: Sequence[Mapping]) -> str:
    rows = ["| K | silhouette |", "|---:|---:|"]
    rows += [f"| {s['k']} | {_num(s['silhouette'], '{:.4f}')} |" for s in sweep]
    return "\n".join(rows)


def metrics_table(metrics_by_model: Mapping[str, Mapping]) -> str:
    """One row per model: the four SPEC §4.2 metrics."""
    keys = ("image_overall", "image_worst_group", "region_overall", "region_worst_group")
    rows = ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, m in metrics_by_model.items():
        rows.append(f"| {name} | " + " | ".join(_num(m.get(k), "{:.3f}") for k in keys) + " |")
    return "\n".join(rows)


def region_grid_png(dataset_dir: Path, features: Sequence[Feature], n_features: int = 3,
                    n_regions: int = 8) -> bytes | None:
    """A PNG with one row per finding: its top regions, cropped from the images."""
    feats = [f for f in features[:n_features] if f.regions]
    if not feats:
        return None
    ds = load_dataset(dataset_dir, check_images=False)
    row_of = {image_id: i for i, image_id in enumerate(ds.image_ids)}
    grid = Image.new("RGB", (n_regions * THUMB, len(feats) * THUMB), "white")
    for r, feature in enumerate(feats):
        for c, region in enumerate(feature.regions[:n_regions]):
            i = row_of.get(region["image_id"])
            if i is None or region.get("box") is None:
                continue
            crop = ds.load_image(i).crop(tuple(float(v) for v in region["box"]))
            grid.paste(crop.resize((THUMB, THUMB), Image.NEAREST), (c * THUMB, r * THUMB))
    buf = io.BytesIO()
    grid.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def region_grid_markdown(dataset_dir: Path, findings: Findings) -> str:
    png = region_grid_png(dataset_dir, findings.features)
    if png is None:
        return "_No spurious feature, no regions to show._"
    data = base64.b64encode(png).decode()
    return ("One row per finding (rank 1 first), its regions most similar to the medoid first.\n\n"
            f"![top regions](data:image/png;base64,{data})")


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
    silhouette = None if np.isnan(cl.silhouette) else float(cl.silhouette)
    return {"dagster/row_count": int(len(cl.labels)), "k": cl.k,
            "silhouette": silhouette if silhouette is not None else -1.0, "sampled": cl.sampled,
            "k_sweep": md(k_sweep_table(cl.sweep)), "path": path(audit.paths.clusters)}


def findings(audit: Audit, found: Findings, file: Path) -> dict:
    return {"dagster/row_count": len(found.features), "k": found.k,
            "silhouette": found.silhouette if found.silhouette is not None else -1.0,
            "top_attribute": found.features[0].attribute if found.features else "none",
            "called": len(found.called) if found.has_significance else -1,
            "lead_rank": found.lead_rank or -1,
            "findings": md(findings_table(found)),
            "top_regions": md(region_grid_markdown(audit.dataset_dir, found)), "path": path(file)}


def mitigated_model(audit: Audit, record: ModelRecord, history: dict) -> dict:
    if not record.extra.get("trained"):
        return {"model": record.model, "trained": False,
                "reason": f"{record.extra.get('reason')}; the audited model is kept"}
    losses = history.get("losses") or []
    ranks = record.extra.get("feature_ranks") or []
    return {"model": record.model, "trained": True, "method": record.extra["method"],
            "steps": history.get("steps", 0),
            "first_loss": float(losses[0]) if losses else -1.0, "last_loss": float(losses[-1]) if losses else -1.0,
            "spurious_features_used": len(ranks), "feature_ranks": ", ".join(map(str, ranks)) or "none",
            "train_config": dg.MetadataValue.json(history.get("config")), "path": path(audit.paths.mitigated_model)}


def metrics(audit: Audit, m: dict) -> dict:
    return {"image_overall_change": m["image_overall_change"],
            "metrics": md(metrics_table({"audited": m["audited"], "mitigated": m["mitigated"]})),
            "path": path(audit.paths.metrics)}


def report(audit: Audit, summary: dict) -> dict:
    rows = ["| | before | after |", "|---|---:|---:|"]
    for key in ("n_features", "top_score", "image_accuracy"):
        rows.append(f"| {key} | {summary['before'][key]} | {summary['after'][key]} |")
    m = summary["metrics"]
    return {"before_after": md("\n".join(rows)),
            "metrics": md(metrics_table({"audited": m["audited"], "mitigated": m["mitigated"]})),
            "summary": path(audit.paths.report / "summary.json"), "report": path(audit.paths.report / "report.html")}
