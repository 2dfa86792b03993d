"""Cost of region embeddings (SPEC §1.2) relative to a plain image pass, in one process.

For each model, one batch of preprocessed images with the four quadrant
boxes per image, three ways:

* ``image``: ``model.encode_image`` — the plain image-embedding pass;
* ``roi``: :func:`embed.encode_image_and_regions` — image *and* all region
  embeddings from one backbone pass (what discovery and RaVL training use);
* ``crop``: the exact fallback — encode the image plus every region crop
  resized to the input size (model time only; the PIL crop/resize that crop
  mode also pays is left out, which flatters ``crop``);
* ResNet only, ``roi_half``: mode ``roi-half`` (RoI-align at half the
  layer3 size, so layer4 and the pool cost a quarter per region);
* ResNet only, a candidate optimisation measured against the shipped path:
  open_clip's attention pool computes every token's query and keeps only
  the mean token's output; ``roi_one_query`` computes that one query only
  (:func:`embed.pool_at_size` at the pool's own size: same embedding, to
  float rounding) and ``image_one_query`` is the image pass with it.

With ``--nonsquare ASPECT`` (e.g. 1.333), a second measurement on
landscape photos of that aspect ratio (short side = the model's input) with
four boxes at the left, right, top and bottom edges, where the model's own
centre crop drops the left and right ones (SPEC §1.2, "every box sees its
own pixels"):

* ``image``: the model's own pass (its centre crop);
* ``aspect``: image pass + region pass over the whole photo at its own
  aspect ratio (:mod:`ravl_pipeline.core.views`, the default);
* ``letterbox``: image pass + region pass over the photo letterboxed to S×S;
* ``crop``: image pass + every box cropped from the photo and encoded;
* ``floor`` (ResNet): the physical floor of one backbone pass plus the
  per-region layer4 and attention pool, i.e. the image pass plus layer4 and
  the pool over the RoIs (as if the regions came free from that one pass).

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

from torchvision.ops import roi_align

import numpy as np
from PIL import Image

from ravl_pipeline.core.embed import encode_image_and_regions, pool_at_size
from ravl_pipeline.core.views import region_view
from ravl_pipeline.models import load_model

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


def roi_one_query(visual, pixels, boxes):
    feat3 = visual.layer3(visual.layer2(visual.layer1(visual.stem(pixels))))
    h3, w3 = feat3.shape[-2:]
    rois = roi_align(feat3, boxes, output_size=(h3, w3), spatial_scale=w3 / pixels.shape[-1],
                     sampling_ratio=0, aligned=True)
    pool = visual.attnpool
    return pool_at_size(pool, visual.layer4(feat3)), pool_at_size(pool, visual.layer4(rois))


def image_one_query(visual, pixels):
    feat = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(pixels)))))
    return pool_at_size(visual.attnpool, feat)


def _interleaved(modes: dict, reps: int) -> dict:
    times = {m: [] for m in modes}
    with torch.inference_mode():
        for fn in modes.values():  # warm-up
            fn()
        for _ in range(reps):
            for name, fn in modes.items():
                t0 = time.process_time()
                fn()
                times[name].append(time.process_time() - t0)
    return times


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
    if lm.architecture == "resnet":
        modes["roi_half"] = lambda: encode_image_and_regions(model, pixels, boxes, roi_scale=0.5)
        modes["roi_one_query"] = lambda: roi_one_query(model.visual, pixels, boxes)
        modes["image_one_query"] = lambda: image_one_query(model.visual, pixels)
    times = _interleaved(modes, reps)
    with torch.inference_mode():
        # the whole-image box must give back the image embedding (SPEC §1.2 check)
        whole = [torch.tensor([[0.0, 0.0, size, size]])] * batch
        img, reg = encode_image_and_regions(model, pixels, whole)
        err = float((F.normalize(img, dim=-1) - F.normalize(reg, dim=-1)).abs().max())
        q_err = None
        if lm.architecture == "resnet":
            shipped = torch.cat(encode_image_and_regions(model, pixels, boxes))
            q_err = float((torch.cat(roi_one_query(model.visual, pixels, boxes)) - shipped).abs().max())
    if lm.architecture != "resnet":
        err = None  # ViT: the image embedding is the class token, regions pool patch tokens
    med = {m: statistics.median(t) / batch for m, t in times.items()}
    return {"model": spec, "arch": lm.architecture, "input": size, "batch": batch, "regions": 4,
            "per_image_s": med, "whole_box_max_abs_err": err, "one_query_max_abs_err": q_err}


def edge_boxes(width: int, height: int) -> np.ndarray:
    """Left, right, top and bottom edge boxes, a fifth of each side."""
    a, b = width / 5, height / 5
    return np.array([[0, 2 * b, a, 3 * b], [width - a, 2 * b, width, 3 * b], [2 * a, 0, 3 * a, b],
                     [2 * a, height - b, 3 * a, height]], dtype=np.float32)


def bench_views(spec: str, batch: int, reps: int, aspect: float) -> dict:
    """Region embeddings of landscape photos (module docstring)."""
    lm = load_model(spec, seed=0)
    model = lm.model.eval()
    s = lm.image_size
    w, h = int(round(s * aspect)), s
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for _ in range(batch)]
    pixels = torch.stack([lm.preprocess(p) for p in photos])
    boxes = edge_boxes(w, h)
    views = {}
    for name in ("aspect", "letterbox"):
        rvs = [region_view(lm, p, name) for p in photos]
        views[name] = ([rv.pixels for rv in rvs], [torch.from_numpy(rv.boxes(boxes)) for rv in rvs])
    crops = torch.stack([lm.preprocess(p.crop(tuple(float(v) for v in b))) for p in photos for b in boxes])
    modes = {
        "image": lambda: model.encode_image(pixels),
        "aspect": lambda: encode_image_and_regions(model, pixels, views["aspect"][1], views=views["aspect"][0]),
        "letterbox": lambda: encode_image_and_regions(model, pixels, views["letterbox"][1],
                                                      views=views["letterbox"][0]),
        "crop": lambda: (model.encode_image(pixels), model.encode_image(crops)),
    }
    if lm.architecture == "resnet":
        visual = model.visual
        with torch.inference_mode():
            feat3 = visual.layer3(visual.layer2(visual.layer1(visual.stem(pixels))))
        rois = feat3.repeat_interleave(len(boxes), dim=0)  # as many RoIs as regions, at the full layer3 size
        modes["regions_only"] = lambda: visual.attnpool(visual.layer4(rois))
    times = _interleaved(modes, reps)
    med = {m: statistics.median(t) / batch for m, t in times.items()}
    if "regions_only" in med:
        med["floor"] = med["image"] + med.pop("regions_only")
    view_sizes = {name: tuple(v[0][0].shape[-2:]) for name, v in views.items()}
    return {"model": spec, "arch": lm.architecture, "photo": (w, h), "batch": batch, "regions": len(boxes),
            "view_sizes": view_sizes, "per_image_s": med}


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.2f}"


def _x(a: float, b: float) -> str:
    return f"{a / b:.2f}×"


def _table(title: str, head: list[str], rows: list[list]) -> None:
    """One markdown table, after a blank line and an optional title."""
    print(f"\n{title}\n" if title else "")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def _err(x) -> str:
    return "n/a (class token vs pooled patches)" if x is None else f"{x:.1e}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["ravl-tiny-rn:64", "ravl-tiny-vit:64", "RN50:8"],
                    help="MODEL:BATCH")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--nonsquare", type=float, default=None, metavar="ASPECT",
                    help="also measure landscape photos of this aspect ratio (e.g. 1.333)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.nonsquare:
        return main_views(args)
    rows = _measure(args, lambda spec, batch: bench_model(spec, batch, args.reps), "4 quadrant regions per image")
    _table("", ["model", "input", "batch", "image pass (CPU ms/img)", "RoI image+regions (CPU ms/img)",
                "crop image+regions (CPU ms/img)", "RoI / image", "crop / image", "crop / RoI",
                "whole-box check (max abs err)"],
           [[f"{r['model']} ({r['arch']})", r["input"], r["batch"], _ms(t["image"]), _ms(t["roi"]), _ms(t["crop"]),
             _x(t["roi"], t["image"]), _x(t["crop"], t["image"]), _x(t["crop"], t["roi"]),
             _err(r["whole_box_max_abs_err"])] for r, t in ((r, r["per_image_s"]) for r in rows)])
    resnets = [(r, r["per_image_s"]) for r in rows if "roi_one_query" in r["per_image_s"]]
    if resnets:
        _table("ResNet `roi-half` mode (RoI at half the layer3 size; same process)",
               ["model", "roi-half image+regions (CPU ms/img)", "roi-half / image", "roi / roi-half",
                "crop / roi-half"],
               [[r["model"], _ms(t["roi_half"]), _x(t["roi_half"], t["image"]), _x(t["roi"], t["roi_half"]),
                 _x(t["crop"], t["roi_half"])] for r, t in resnets])
        _table("ResNet attention pool, candidate: compute only the query that is kept (same process)",
               ["model", "RoI / image (shipped)", "RoI, one-query pool / image", "shipped / one-query (RoI)",
                "one-query RoI / one-query image", "max abs difference"],
               [[r["model"], _x(t["roi"], t["image"]), _x(t["roi_one_query"], t["image"]),
                 _x(t["roi"], t["roi_one_query"]), _x(t["roi_one_query"], t["image_one_query"]),
                 f"{r['one_query_max_abs_err']:.1e}"] for r, t in resnets])
    return 0


def _measure(args, bench, what: str) -> list[dict]:
    """``bench(spec, batch)`` for every ``MODEL:BATCH`` of ``--models``, and the machine line."""
    rows = []
    for item in args.models:
        spec, batch = item.rsplit(":", 1)
        rows.append(bench(spec, int(batch)))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread, CPU time, load avg {os.getloadavg()[0]:.1f}; {what}; "
          f"median of {args.reps} interleaved repetitions")
    return rows


def main_views(args) -> int:
    rows = _measure(args, lambda spec, batch: bench_views(spec, batch, args.reps, args.nonsquare),
                    f"landscape photos of aspect {args.nonsquare:g}, 4 edge boxes per photo")
    _table("", ["model", "photo (w×h)", "batch", "aspect view", "image pass (CPU ms/img)",
                "aspect / image", "letterbox / image", "crop / image", "aspect / letterbox",
                "ResNet floor / image", "aspect / floor"],
           [[f"{r['model']} ({r['arch']})", "×".join(map(str, r["photo"])), r["batch"],
             "×".join(map(str, r["view_sizes"]["aspect"][::-1])), _ms(t["image"]), _x(t["aspect"], t["image"]),
             _x(t["letterbox"], t["image"]), _x(t["crop"], t["image"]), _x(t["aspect"], t["letterbox"]),
             _x(t["floor"], t["image"]) if "floor" in t else "n/a",
             _x(t["aspect"], t["floor"]) if "floor" in t else "n/a"]
            for r, t in ((r, r["per_image_s"]) for r in rows)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
