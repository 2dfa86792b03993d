"""Stage 1 on the default synthetic setting (red square ↔ "nine", V = 0.9).

Builds (or reuses) the default setting and its audited model, runs discovery
on the val split with RoI region embeddings and again with ``crop``
embeddings in the same process, and prints the validity gaps, the selected
K, Precision@10 of the top feature and the wall times with their ratio.

    .venv/bin/python benchmarks/discovery_default.py [--out runs/bench-default] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ravl_pipeline.config import DiscoveryConfig, RegionsConfig
from ravl_pipeline.experiments.recipe import DEFAULT_RECIPE, build_audited_model
from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.models import load_model
from ravl_pipeline.pipeline import stages


def discover_once(lm, ds, classes, templates, mode):
    t0 = time.perf_counter()
    result = stages.stage1(lm, ds, classes, templates=templates, regions=RegionsConfig(mode=mode),
                           discovery=DiscoveryConfig(evidence=False))
    seconds = time.perf_counter() - t0
    gt = stages.ground_truth(result.findings, ds, result.embeddings, result.scores,
                             [("red square", "nine")])["red square"]
    return result.findings, gt, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench-default")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    paths = build_audited_model(Path(args.out), DEFAULT_RECIPE.with_seed(args.seed))
    build_seconds = time.perf_counter() - t0
    eval_dir = paths["setting"] / "eval"
    ds = load_dataset(eval_dir, split="val", require_labels=True)
    classes = ds.classes()
    templates = stages.templates_for(eval_dir)
    lm = load_model(f"local-dir:{paths['audited']}")
    roi_findings, gt, roi_s = discover_once(lm, ds, classes, templates, "roi")
    crop_findings, crop_gt, crop_s = discover_once(lm, ds, classes, templates, "crop")
    v = gt["validity"]
    result = {
        "seed": args.seed,
        "build_audited_model_seconds": round(build_seconds, 1),
        "valid": v["valid"],
        "nine_gap_present_minus_absent": v["correlated_gap"],
        "other_classes_mean_gap": v["other_mean_gap"],
        "k": roi_findings.k, "silhouette": roi_findings.silhouette,
        "n_features": len(roi_findings.features),
        "top_attribute": gt["top_attribute"],
        "precision_at_10_top": gt["precision_at_10_top"],
        "roi_discover_seconds": round(roi_s, 2),
        "crop_discover_seconds": round(crop_s, 2),
        "crop_over_roi_time": round(crop_s / roi_s, 2),
        "crop_precision_at_10_top": crop_gt["precision_at_10_top"],
        "crop_k": crop_findings.k,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
