"""Which region view? Quality of RoI region embeddings on scenes (SPEC §1.2,
§4.3), against the exact ``crop`` embeddings, and discovery on the same models.

For each built scenes setting (``ravl bench discovery --grid scenes`` leaves
them under ``<out>/settings/<name>``) and its audited model, on ``val``:

* every COCO box embedded four ways: ``crop`` (crop the box, encode it:
  exact, R× slower), RoI on the ``aspect`` view (the whole photo at its own
  aspect ratio), RoI on the ``letterbox`` view (the whole photo padded to
  S×S), and ``clipped`` — RoI on the model's own centre crop with boxes
  clipped to it, which is what region embeddings did before region views (a
  box the crop drops collapses onto the crop's edge);
* cosine of each RoI embedding with the box's crop embedding, for boxes the
  centre crop keeps whole and for boxes it cuts or drops;
* Stage 1 (evidence as ``ravl discover`` runs it) on the aspect and the
  letterbox embeddings: Precision@10 of the top feature (SPEC ranking,
  ``features[0]``) and of the lead finding, for the planted object.

    .venv/bin/python benchmarks/views_quality.py runs/scenes-grid/settings/scenes-single_*
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ravl_pipeline.config import DiscoveryConfig, RegionsConfig
from ravl_pipeline.core.embed import embed_dataset, encode_image_and_regions
from ravl_pipeline.core.metrics import precision_at_k, region_label_map
from ravl_pipeline.core.views import input_boxes, own_transform
from ravl_pipeline.io.dataset import induced_pairs, load_dataset
from ravl_pipeline.models import load_model
from ravl_pipeline.pipeline import stages


def clipped_embeddings(lm, ds) -> np.ndarray:
    """Region embeddings read from the model's own input, boxes clipped to it."""
    out = []
    with torch.inference_mode():
        for i in range(len(ds)):
            w, h = ds.image_size(i)
            pixels = lm.preprocess(ds.load_image(i))[None]
            boxes = torch.from_numpy(input_boxes(ds.boxes[i], w, h, lm.preprocess_cfg, lm.image_size))
            _, reg = encode_image_and_regions(lm.model, pixels, [boxes])
            out.append(F.normalize(reg.float(), dim=-1).numpy())
    return np.concatenate(out)


def kept_whole(ds, lm) -> np.ndarray:
    """Per box: does the model's centre crop keep it whole?"""
    flags = []
    for i in range(len(ds)):
        w, h = ds.image_size(i)
        sx, sy, ox, oy = own_transform(w, h, lm.preprocess_cfg, lm.image_size)
        s = lm.image_size
        for x1, y1, x2, y2 in ds.boxes[i]:
            flags.append(x1 * sx - ox >= -1e-3 and y1 * sy - oy >= -1e-3 and x2 * sx - ox <= s + 1e-3
                         and y2 * sy - oy <= s + 1e-3)
    return np.asarray(flags)


def setting_row(setting_dir: Path) -> dict:
    eval_dir = setting_dir / "setting" / "eval"
    ds = load_dataset(eval_dir, split="val")
    lm = load_model(f"local-dir:{setting_dir / 'models' / 'audited'}")
    classes = json.loads((setting_dir / "setting" / "setting.json").read_text())["classes"]
    emb = {mode: embed_dataset(lm, ds, proposer="boxes", mode="crop" if mode == "crop" else "roi", progress=False,
                               view=mode if mode != "crop" else "aspect")
           for mode in ("crop", "aspect", "letterbox")}
    clipped = clipped_embeddings(lm, ds)
    whole = kept_whole(ds, lm)
    ref = emb["crop"].region_emb
    row = {"setting": setting_dir.name, "n_boxes": int(len(ref)), "cut_by_crop": int((~whole).sum())}
    for name, vecs in (("aspect", emb["aspect"].region_emb), ("letterbox", emb["letterbox"].region_emb),
                       ("clipped", clipped)):
        cos = np.sum(vecs * ref, axis=1)
        row[f"cos_{name}_whole"] = float(np.mean(cos[whole]))
        row[f"cos_{name}_cut"] = float(np.mean(cos[~whole])) if (~whole).any() else None
    flat = [lab for labs in ds.region_labels for lab in labs]
    (feature, _), *_ = induced_pairs(eval_dir)
    templates = stages.templates_for(eval_dir)
    for name in ("aspect", "letterbox"):
        e = emb[name]
        result = stages.stage1(lm, ds, classes, templates=templates, embeddings=e,
                               regions=RegionsConfig(proposer="boxes"), discovery=DiscoveryConfig())
        f = result.findings
        lookup = region_label_map(e.image_ids, e.region_image, e.region_index, flat)
        row[f"p10_top_{name}"] = precision_at_k(f.features[0] if f.features else None, lookup, feature)
        row[f"p10_lead_{name}"] = precision_at_k(f.lead(), lookup, feature)
        row[f"valid_{name}"] = f.ground_truth[feature]["validity"]["valid"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("settings", nargs="+", type=Path, help="built scenes settings (bench --grid scenes)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = []
    for path in args.settings:
        rows.append(setting_row(path))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    cols = ["cos_aspect_whole", "cos_aspect_cut", "cos_letterbox_whole", "cos_letterbox_cut", "cos_clipped_whole",
            "cos_clipped_cut"]
    print("| setting | valid | boxes (cut by the crop) | " + " | ".join(cols)
          + " | P@10 top aspect | P@10 top letterbox | P@10 lead aspect | P@10 lead letterbox |")
    print("|" + "---|" * (len(cols) + 7))
    for r in rows:
        print(f"| {r['setting']} | {r['valid_aspect']} | {r['n_boxes']} ({r['cut_by_crop']}) | "
              + " | ".join("n/a" if r[c] is None else f"{r[c]:.3f}" for c in cols)
              + f" | {r['p10_top_aspect']:.2f} | {r['p10_top_letterbox']:.2f} | {r['p10_lead_aspect']:.2f} | "
              f"{r['p10_lead_letterbox']:.2f} |")
    valid = [r for r in rows if r["valid_aspect"]]
    print(f"\nmeans over {len(rows)} settings: " + ", ".join(
        f"{c} {statistics.mean(r[c] for r in rows if r[c] is not None):.3f}" for c in cols))
    if valid:
        print(f"valid settings ({len(valid)}): " + ", ".join(
            f"{c} {statistics.mean(r[c] for r in valid):.3f}" for c in
            ("p10_top_aspect", "p10_top_letterbox", "p10_lead_aspect", "p10_lead_letterbox")))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
