"""The ``ravl`` command."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path("runs/demo")


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="ravl-tiny-rn | ravl-tiny-vit | an open_clip name | local-dir:PATH")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or weights file")


def _add_embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--proposer", default="quadrants", help="quadrants | grid:N | boxes")
    p.add_argument("--mode", default="auto", choices=["auto", "roi", "crop"],
                   help="region embedding mode (auto: RoI for ResNet/ViT, crop otherwise)")
    p.add_argument("--template", action="append", default=None,
                   help="prompt template with {} for the class (repeatable); default from the dataset")
    p.add_argument("--classes", default=None, help="comma-separated class names (default: labels in the data)")
    p.add_argument("--tau", type=float, default=None, help="softmax temperature (default 0.07)")
    p.add_argument("--batch-size", type=int, default=64)


def cmd_synth(args) -> int:
    from .ml.synth import FeatureSpec, SynthConfig, make_setting

    features = [FeatureSpec(name=n, color=_color(c), shape=s)
                for n, c, s in _feature_triples(args.feature, "red square:255,0,0:square")]
    distractors = [FeatureSpec(name=n, color=_color(c), shape=s)
                   for n, c, s in _feature_triples(args.distractor, None)]
    cfg = SynthConfig(correlated_class=args.correlated_class, features=features,
                      correlated_classes=args.correlated_classes.split(",") if args.correlated_classes else None,
                      strength=args.strength, distractors=distractors, n_pretrain=args.n_pretrain,
                      n_finetune=args.n_finetune, n_val=args.n_val, n_test=args.n_test, seed=args.seed)
    setting = make_setting(args.out, cfg)
    print(json.dumps({"out": str(args.out), "stats": setting.get("stats")}, indent=2, default=str))
    return 0


def _feature_triples(values, default):
    values = values or ([default] if default else [])
    out = []
    for v in values:
        parts = v.split(":")
        if len(parts) != 3:
            raise SystemExit(f"--feature/--distractor {v!r}: expected NAME:R,G,B:SHAPE")
        out.append(tuple(parts))
    return out


def _color(text: str) -> tuple[int, int, int]:
    try:
        r, g, b = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"colour {text!r}: expected R,G,B") from None
    return r, g, b


def cmd_import(args) -> int:
    from .ml.data import import_coco, import_imagefolder

    if args.format == "imagefolder":
        ds = import_imagefolder(args.src, args.out, split=args.split, copy=args.copy)
    else:
        if not args.images:
            raise SystemExit("ravl import coco: --images DIR is required")
        ds = import_coco(args.src, args.images, args.out)
    print(f"wrote {ds.manifest_file} ({len(ds)} images)")
    return 0


def cmd_finetune(args) -> int:
    from .ml import train
    from .ml.data import load_dataset
    from .ml.models import load_model, save_model

    ds = load_dataset(args.data, split=args.split)
    lm = load_model(args.model, args.pretrained, seed=args.seed)
    template = args.caption_template or _default_caption_template(args.data)
    cfg = train.TrainConfig(method=args.method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            seed=args.seed, lock_text=args.lock_text, caption_template=template,
                            lam=args.lam, max_steps=args.max_steps)
    data = train.build_train_data(lm, ds, template, progress=not args.quiet)
    history = train.finetune(lm, data, cfg, progress=not args.quiet)
    meta = {"base_model": args.model, "pretrained": args.pretrained, "train_data": str(Path(args.data).resolve()),
            "split": args.split, "train": cfg.to_dict(), "findings": args.findings,
            "history": {k: v for k, v in history.items() if k != "config"}}
    save_model(lm, args.out, meta)
    losses = history["losses"]
    print(f"wrote {args.out}  ({history['steps']} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"{history['seconds']:.1f}s)")
    return 0


def _default_caption_template(data_dir) -> str:
    from .ml.audit import dataset_templates
    return dataset_templates(data_dir)[0]


def cmd_discover(args) -> int:
    from .ml.audit import dataset_setting, dataset_templates, ground_truth_summary, run_discovery
    from .ml.data import load_dataset
    from .ml.discover import write_findings
    from .ml.models import load_model

    classes = args.classes.split(",") if args.classes else None
    ds = load_dataset(args.data, classes=classes, split=args.split, require_labels=True)
    classes = classes or ds.classes()
    lm = load_model(args.model, args.pretrained)
    templates = args.template or dataset_templates(args.data)
    t0 = time.perf_counter()
    findings, emb, sc = run_discovery(lm, ds, classes, templates=templates, proposer=args.proposer,
                                      mode=args.mode, tau=args.tau, seed=args.seed,
                                      batch_size=args.batch_size, progress=not args.quiet)
    findings["seconds"] = time.perf_counter() - t0
    setting = dataset_setting(args.data)
    if setting is not None:
        induced = _induced_pairs(setting)
        findings["ground_truth"] = ground_truth_summary(findings, ds, emb, sc, classes, induced)
    write_findings(findings, args.out)
    _print_findings(findings, args.out)
    return 0


def _induced_pairs(setting: dict) -> list[tuple[str, str]]:
    cfg = setting.get("config", {})
    feats = cfg.get("features", [])
    classes = cfg.get("correlated_classes") or [cfg.get("correlated_class")] * len(feats)
    return [(f["name"], c) for f, c in zip(feats, classes)]


def _print_findings(findings: dict, path) -> None:
    feats = findings["features"]
    print(f"findings: {path}")
    print(f"  K={findings['k']} (silhouette {findings['silhouette']:.3f}), "
          f"{findings.get('n_regions')} regions, image accuracy {findings.get('image_accuracy', 0):.3f}, "
          f"{findings.get('seconds', 0):.1f}s")
    if not feats:
        print("  no spurious feature found")
    for f in feats[:5]:
        print(f"  #{f['rank']} cluster {f['cluster_id']}: score {f['score']:.3f}, influence "
              f"{f['influence']:.2f}, attribute {f['attribute']!r}, {f.get('size', '?')} regions")
    for name, gt in (findings.get("ground_truth") or {}).items():
        v = gt["validity"]
        print(f"  ground truth {name!r} ↔ {gt['correlated_class']!r}: valid={v['valid']} "
              f"(gap {_fmt(v['correlated_gap'])}, others {_fmt(v['other_mean_gap'])}), "
              f"Precision@10 top={gt['precision_at_10_top']:.2f}")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def cmd_demo(args) -> int:
    """Synthetic setting → pre-train → fine-tune → discover, through the CLI steps."""
    out = Path(args.out)
    t0 = time.perf_counter()
    steps = [
        ["synth", "--out", str(out / "setting"), "--seed", str(args.seed)],
        ["finetune", "--model", "ravl-tiny-rn", "--data", str(out / "setting/pretrain"),
         "--out", str(out / "models/pretrained"), "--epochs", "6", "--seed", str(args.seed)],
        ["finetune", "--model", f"local-dir:{out / 'models/pretrained'}", "--data",
         str(out / "setting/finetune"), "--out", str(out / "models/audited"), "--epochs", "4",
         "--lr", "1e-4", "--seed", str(args.seed)],
        ["discover", "--model", f"local-dir:{out / 'models/audited'}", "--data", str(out / "setting/eval"),
         "--split", "val", "--out", str(out / "findings.json")],
    ]
    for argv in steps:
        print(f"$ ravl {' '.join(argv)}", flush=True)
        rc = main(argv)
        if rc:
            return rc
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; outputs under {out}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ravl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a controlled synthetic setting (SPEC §4.1)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--correlated-class", default="nine")
    p.add_argument("--correlated-classes", default=None, help="comma list, one per --feature")
    p.add_argument("--feature", action="append", help="NAME:R,G,B:SHAPE (repeatable); default red square")
    p.add_argument("--distractor", action="append", help="NAME:R,G,B:SHAPE, independent of the label")
    p.add_argument("--strength", type=float, default=0.9, help="target Cramér's V in the fine-tuning set")
    p.add_argument("--n-pretrain", type=int, default=4000)
    p.add_argument("--n-finetune", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("import", help="build a dataset manifest from an ImageFolder tree or COCO JSON")
    p.add_argument("format", choices=["imagefolder", "coco"])
    p.add_argument("src", help="ImageFolder root, or COCO instances JSON")
    p.add_argument("--images", help="COCO images directory")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--copy", action="store_true", help="copy images into the dataset directory")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("finetune", help="fine-tune a CLIP model on a dataset")
    _add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="standard")
    p.add_argument("--findings", default=None, help="findings.json (methods that need groups/spurious regions)")
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lam", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lock-text", action="store_true")
    p.add_argument("--caption-template", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("discover", help="Stage 1: find spurious region features (SPEC §2)")
    _add_model_args(p)
    _add_embed_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser("demo", help="run the whole audit on the built-in synthetic default")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"ravl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
