"""Cost of region embeddings (SPEC §1.2) relative to a plain image pass, in one process.

For each model, one batch of preprocessed images with the four quadrant
boxes per image, three ways:

* ``image``: ``model.encode_image`` — the plain image-embedding pass;
* ``roi``: :func:`embed.encode_image_and_regions` — image *and* all region
  embeddings from one backbone pass (what discovery and RaVL training use);
* ``crop``: the exact fallback — encode the image plus every region crop
  resized to the input size (model time only; the PIL crop/resize that crop
  mode also pays is left out, which flatters ``crop``).

Modes are interleaved and repeated; the median per mode is reported, and
ratios are per image.  Torch runs one thread and the clock is the process's
CPU time, so the figures measure work, not the load of a shared machine.

    .venv/bin/python benchmarks/perf_embed.py
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ravl_pipeline.ml.embed import encode_image_and_regions
from ravl_pipeline.ml.models import load_model

QUADRANTS = ((0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0))


def quadrant_boxes(batch: int, size: int) -> list[torch.Tensor]:
    box = torch.tensor(QUADRANTS) * size
    return [box.clone() for _ in range(batch)]


def crops_of(pixels: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    size = pixels.shape[-1]
    out = []
    for img, bxs in zip(pixels, boxes):
        for x1, y1, x2, y2 in bxs.round().long().tolist():
            crop = img[:, y1:y2, x1:x2].unsqueeze(0)
            out.append(F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False)[0])
    return torch.stack(out)


def bench_model(spec: str, batch: int, reps: int) -> dict:
    lm = load_model(spec, seed=0)
    model = lm.model.eval()
    size = lm.image_size
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    boxes = quadrant_boxes(batch, size)
    crops = crops_of(pixels, boxes)
    modes = {
        "image": lambda: model.encode_image(pixels),
        "roi": lambda: encode_image_and_regions(model, pixels, boxes),
        "crop": lambda: (model.encode_image(pixels), model.encode_image(crops)),
    }
    times = {m: [] for m in modes}
    with torch.inference_mode():
        for fn in modes.values():  # warm-up
            fn()
        for _ in range(reps):
            for name, fn in modes.items():
                t0 = time.process_time()
                fn()
                times[name].append(time.process_time() - t0)
        # the whole-image box must give back the image embedding (SPEC §1.2 check)
        whole = [torch.tensor([[0.0, 0.0, size, size]])] * batch
        img, reg = encode_image_and_regions(model, pixels, whole)
        err = float((F.normalize(img, dim=-1) - F.normalize(reg, dim=-1)).abs().max())
    if lm.architecture != "resnet":
        err = None  # ViT: the image embedding is the class token, regions pool patch tokens
    med = {m: statistics.median(t) / batch for m, t in times.items()}
    return {"model": spec, "arch": lm.architecture, "input": size, "batch": batch, "regions": 4,
            "per_image_s": med, "whole_box_max_abs_err": err}


def _err(x) -> str:
    return "n/a (class token vs pooled patches)" if x is None else f"{x:.1e}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["ravl-tiny-rn:64", "ravl-tiny-vit:64", "RN50:8"],
                    help="MODEL:BATCH")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for item in args.models:
        spec, batch = item.rsplit(":", 1)
        rows.append(bench_model(spec, int(batch), args.reps))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread, CPU time, load avg {os.getloadavg()[0]:.1f}; 4 quadrant regions per image; "
          f"median of {args.reps} interleaved repetitions")
    print("\n| model | input | batch | image pass (CPU ms/img) | RoI image+regions (CPU ms/img) | crop image+regions (CPU ms/img) | "
          "RoI / image | crop / image | crop / RoI | whole-box check (max abs err) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["per_image_s"]
        print(f"| {r['model']} ({r['arch']}) | {r['input']} | {r['batch']} | {1e3 * t['image']:.2f} | "
              f"{1e3 * t['roi']:.2f} | {1e3 * t['crop']:.2f} | {t['roi'] / t['image']:.2f}× | "
              f"{t['crop'] / t['image']:.2f}× | {t['crop'] / t['roi']:.2f}× | {_err(r['whole_box_max_abs_err'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
