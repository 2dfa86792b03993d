"""What the Dagster UI shows about each materialization: Markdown tables of
findings and metrics, and a small PNG grid of each finding's top regions
(embedded as a base64 data URI, so the UI needs no file server)."""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import dagster as dg
from PIL import Image

from ..ml.data import load_dataset

THUMB = 40  # pixels per region thumbnail in the grid


def _num(x: Any, fmt: str = "{:+.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def findings_table(findings: Mapping, top: int = 5) -> str:
    """Top findings with their per-class gaps (SPEC §2.2, §2.5), as Markdown."""
    feats = findings.get("features") or []
    head = (f"K = {findings.get('k')}, silhouette {_num(findings.get('silhouette'), '{:.3f}')}, "
            f"{len(feats)} spurious feature(s)\n\n")
    if not feats:
        return head + "_No cluster meets the spurious criterion (SPEC §2.4)._"
    rows = ["| rank | cluster | score G_c | influence H_c | attribute | per-class gap (n present / n absent) |",
            "|---:|---:|---:|---:|---|---|"]
    for f in feats[:top]:
        gaps = "; ".join(f"{r['label']} {_num(r['gap'])} ({r['n_present']}/{r['n_absent']})"
                         for r in sorted(f["per_class"], key=lambda r: -abs(r["gap"]))[:4])
        rows.append(f"| {f['rank']} | {f['cluster_id']} | {f['score']:.3f} | {_num(f['influence'], '{:.2f}')} "
                    f"| {f['attribute']} | {gaps} |")
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


def region_grid_png(dataset_dir: Path, features: Sequence[Mapping], n_features: int = 3,
                    n_regions: int = 8) -> bytes | None:
    """A PNG with one row per finding: its top regions, cropped from the images."""
    feats = [f for f in features[:n_features] if f.get("regions")]
    if not feats:
        return None
    ds = load_dataset(dataset_dir, check_images=False)
    row_of = {image_id: i for i, image_id in enumerate(ds.image_ids)}
    grid = Image.new("RGB", (n_regions * THUMB, len(feats) * THUMB), "white")
    for r, feature in enumerate(feats):
        for c, region in enumerate(feature["regions"][:n_regions]):
            i = row_of.get(region["image_id"])
            if i is None or region.get("box") is None:
                continue
            crop = ds.load_image(i).crop(tuple(float(v) for v in region["box"]))
            grid.paste(crop.resize((THUMB, THUMB), Image.NEAREST), (c * THUMB, r * THUMB))
    buf = io.BytesIO()
    grid.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def region_grid_markdown(dataset_dir: Path, findings: Mapping) -> str:
    png = region_grid_png(dataset_dir, findings.get("features") or [])
    if png is None:
        return "_No spurious feature, no regions to show._"
    data = base64.b64encode(png).decode()
    return ("One row per finding (rank 1 first), its regions most similar to the medoid first.\n\n"
            f"![top regions](data:image/png;base64,{data})")


def md(text: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(text)
