"""The GPU check: the whole method on an accelerator at the real workload's
scale, compared with the CPU.

    .venv/bin/python benchmarks/device_check.py            # ≤ 8 minutes on one GPU
    .venv/bin/python benchmarks/device_check.py --device cpu --model ravl-tiny-rn --n 60 --steps 4   # a dry run

On ``--n`` (2,000) scenes photos at 224 px short side (the scenes generator,
SPEC §4.3) and ``--model`` (open_clip RN50, random initialisation):

1. the audited model: ``--audit-steps`` standard fine-tuning steps at batch
   128 on the fine-tuning set, on the device in its automatic precision
   (bf16 autocast where supported);
2. discovery (Stage 1 with its evidence: significance and the masking
   check) on the validation set, on the device;
3. Stage 2: RaVL for ``--steps`` (256) steps at batch 128 on the top-ranked
   feature (``rank1``, whatever its evidence: the check is of the machinery;
   when discovery keeps no feature at all, Standard FT, and it says so);
4. the CPU comparison: the audited model's image and region embeddings of
   ``--compare`` validation images on the CPU in fp32 and on the device in
   fp32 (no autocast), their cosine (target ≥ 0.999); and the top-ranked
   feature of discovery from the CPU's embeddings and from the device's
   mixed-precision run (same medoid region and attribute).

It prints one JSON object: throughput (images/s) and seconds of every
stage, peak GPU memory (``torch.cuda.max_memory_allocated``), the cosines,
whether the top-ranked features agree, and the device's name. Data is made
under ``--work`` (a temporary folder by default) and nothing in the
repository is written.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ravl_pipeline.compute import Compute, resolve_compute
from ravl_pipeline.config import DiscoveryConfig, RegionsConfig, TrainConfig
from ravl_pipeline.core.embed import embed_dataset
from ravl_pipeline.experiments.scenes import CAPTION_TEMPLATE, ScenesConfig, make_scenes_setting
from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.models import load_model
from ravl_pipeline.pipeline import stages


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="auto")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--model", default="RN50")
    p.add_argument("--n", type=int, default=2000, help="fine-tuning and validation images each")
    p.add_argument("--short-side", type=int, default=224)
    p.add_argument("--audit-steps", type=int, default=64)
    p.add_argument("--steps", type=int, default=256, help="Stage 2 steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--compare", type=int, default=256, help="validation images embedded on both devices")
    p.add_argument("--work", default=None, help="where the data and models go (default: a temporary folder)")
    return p.parse_args()


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def peak_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 2)


def cosines(a, b) -> dict:
    def rows(x, y):
        return np.sum(x * y, axis=1)  # both L2-normalised
    image, region = rows(a.image_emb, b.image_emb), rows(a.region_emb, b.region_emb)
    return {"image_min": float(image.min()), "image_mean": float(image.mean()),
            "region_min": float(region.min()), "region_mean": float(region.mean()),
            "meets_0.999": bool(min(image.min(), region.min()) >= 0.999)}


def top_feature(findings) -> dict | None:
    if not findings.features:
        return None
    top = findings.features[0]
    first = top.regions[0] if top.regions else {}
    return {"attribute": top.attribute, "medoid_region": [first.get("image_id"), first.get("region_index")],
            "top10": [[r["image_id"], r["region_index"]] for r in top.regions[:10]]}


def main() -> None:
    args = parse()
    device = resolve_compute(device=args.device, precision=args.precision, workers=args.workers)
    fp32 = Compute(device.device, "fp32", args.workers)
    cpu = Compute("cpu", "fp32", args.workers)
    work = Path(args.work or tempfile.mkdtemp(prefix="ravl-device-check-"))
    out: dict = {"device": device.device, "precision": device.precision, "workers": args.workers,
                 "model": args.model, "n": args.n, "short_side": args.short_side, "batch_size": args.batch_size,
                 "card": torch.cuda.get_device_name() if device.kind == "cuda" else device.device,
                 "torch": torch.__version__}

    cfg = ScenesConfig(short_side=args.short_side, n_pretrain=10, n_finetune=args.n, n_val=args.n, n_test=10,
                       strength=0.99)
    _, out["data_seconds"] = timed(lambda: make_scenes_setting(work / "setting", cfg))
    finetune_dir, eval_dir = work / "setting" / "finetune", work / "setting" / "eval"
    val = load_dataset(eval_dir, split="val")
    classes = val.classes()

    audit_cfg = TrainConfig(method="standard", max_steps=args.audit_steps, batch_size=args.batch_size,
                            caption_template=CAPTION_TEMPLATE)
    history, seconds = timed(lambda: stages.train(args.model, finetune_dir, work / "audited", audit_cfg,
                                                  compute=device))
    out["audited"] = {"steps": history["steps"], "seconds": round(seconds, 1),
                      "images_per_second": round(history["steps"] * args.batch_size / seconds, 1),
                      "peak_gib": peak_gib()}
    audited = f"local-dir:{work / 'audited'}"

    regions = RegionsConfig(proposer="boxes", batch_size=64)
    lm = load_model(audited, compute=device)
    result, seconds = timed(lambda: stages.stage1(lm, val, classes, templates=[CAPTION_TEMPLATE], regions=regions,
                                                  discovery=DiscoveryConfig(evidence=True)))
    findings = result.findings
    out["discovery"] = {"seconds": round(seconds, 1), "images_per_second": round(len(val) / seconds, 1),
                        "n_features": len(findings.features), "n_called": len(findings.called),
                        "peak_gib": peak_gib(), "top": top_feature(findings)}

    method = "ravl" if findings.features else "standard"
    stage2_cfg = TrainConfig(method=method, max_steps=args.steps, batch_size=args.batch_size,
                             caption_template=CAPTION_TEMPLATE)
    history, seconds = timed(lambda: stages.train(args.model, finetune_dir, work / "mitigated", stage2_cfg,
                                                  findings=findings if method == "ravl" else None,
                                                  audited_model=audited, features="rank1", compute=device))
    out["stage2"] = {"method": method, "steps": history["steps"], "seconds": round(seconds, 1),
                     "seconds_per_step": round(seconds / history["steps"], 3),
                     "images_per_second": round(history["steps"] * args.batch_size / seconds, 1),
                     "loss_first_last": [history["losses"][0], history["losses"][-1]], "peak_gib": peak_gib()}

    subset = val.subset(list(range(min(args.compare, len(val)))))
    on_cpu = embed_dataset(load_model(audited, compute=cpu), subset, proposer="boxes", progress=False)
    on_device = embed_dataset(load_model(audited, compute=fp32), subset, proposer="boxes", progress=False)
    out["fp32_cosine_cpu_vs_device"] = cosines(on_cpu, on_device)

    cpu_lm = load_model(audited, compute=cpu)
    plain = DiscoveryConfig(evidence=False)
    cpu_result, seconds = timed(lambda: stages.stage1(cpu_lm, val, classes, templates=[CAPTION_TEMPLATE],
                                                      regions=regions, discovery=plain))
    device_top = top_feature(stages.stage1(lm, val, classes, templates=[CAPTION_TEMPLATE], regions=regions,
                                           embeddings=result.embeddings, discovery=plain).findings)
    cpu_top = top_feature(cpu_result.findings)
    out["cpu_discovery_seconds"] = round(seconds, 1)
    out["top_feature"] = {"cpu_fp32": cpu_top, f"{device.device}_{device.precision}": device_top,
                          "same_attribute": bool(cpu_top and device_top and
                                                 cpu_top["attribute"] == device_top["attribute"]),
                          "top10_overlap": (len({tuple(r) for r in cpu_top["top10"]} &
                                                {tuple(r) for r in device_top["top10"]}) / 10
                                            if cpu_top and device_top else None)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
