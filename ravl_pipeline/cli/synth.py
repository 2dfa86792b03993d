"""``ravl synth``: write a controlled synthetic setting: digits and a planted
feature correlated with one class at a target Cramér's V.

``--kind quadrants`` (SPEC §4.1): 56×56 images of four quadrants, written as
dataset directories. ``--kind scenes`` (SPEC §4.3): COCO-style scenes —
non-square photos of 2–6 objects with COCO boxes, the class being the main
object's — written as images plus COCO instances files, to be imported with
``ravl import coco`` like real COCO (the command prints how)."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import COUNT, INTEGER, UNIT, InputError, flag_type
from ..experiments.scenes import ScenesConfig, scene_splits, write_scenes
from ..experiments.synth import FeatureSpec, SynthConfig, make_setting
from .errors import check_output_dir

DEFAULT_FEATURE = "red square:255,0,0:square"
KINDS = ("quadrants", "scenes")


def register(sub) -> None:
    p = sub.add_parser("synth", help="write a controlled synthetic setting (SPEC §4.1, §4.3)", description=__doc__)
    defaults = SynthConfig()
    p.add_argument("--out", required=True, type=Path,
                   help="folder of the setting: setting.json and its datasets (quadrants: pretrain/, finetune/, "
                        "eval/; scenes: images and COCO files per dataset)")
    p.add_argument("--kind", choices=KINDS, default="quadrants",
                   help="quadrants: 2x2 digit images (dataset directories); scenes: COCO-style photos with "
                        "several objects (images + COCO instances files)")
    p.add_argument("--correlated-class", default=defaults.correlated_class)
    p.add_argument("--correlated-classes", default=None, help="comma list, one per --feature")
    p.add_argument("--feature", action="append", help=f"NAME:R,G,B:SHAPE (repeatable; default {DEFAULT_FEATURE})")
    p.add_argument("--distractor", action="append",
                   help="NAME:R,G,B:SHAPE, independent of the label (scenes: replaces the distractor vocabulary)")
    p.add_argument("--strength", type=flag_type(UNIT), default=defaults.strength,
                   help=f"target Cramér's V in the fine-tuning set (default {defaults.strength})")
    for name in ("n_pretrain", "n_finetune", "n_val", "n_test"):
        p.add_argument(f"--{name.replace('_', '-')}", type=flag_type(COUNT), default=getattr(defaults, name))
    p.add_argument("--seed", type=flag_type(INTEGER), default=defaults.seed)
    p.set_defaults(func=run)


def feature_specs(values, flag: str) -> list[FeatureSpec]:
    out = []
    for v in values or []:
        parts = v.split(":")
        if len(parts) != 3:
            raise InputError(f"{flag} {v!r}: expected NAME:R,G,B:SHAPE")
        name, colour, shape = parts
        try:
            r, g, b = (int(x) for x in colour.split(","))
        except ValueError:
            raise InputError(f"{flag} {v!r}: colour {colour!r} is not R,G,B") from None
        try:
            out.append(FeatureSpec(name=name, color=(r, g, b), shape=shape))
        except InputError as exc:
            raise InputError(f"{flag} {v!r}: {exc}") from None
    return out


def run(args) -> int:
    check_output_dir(args.out, replaces_if="setting.json", what="synthetic setting")
    common = dict(correlated_class=args.correlated_class,
                  features=feature_specs(args.feature or [DEFAULT_FEATURE], "--feature"),
                  correlated_classes=args.correlated_classes.split(",") if args.correlated_classes else None,
                  strength=args.strength, n_pretrain=args.n_pretrain, n_finetune=args.n_finetune,
                  n_val=args.n_val, n_test=args.n_test, seed=args.seed)
    if args.kind == "quadrants":
        setting = make_setting(args.out, SynthConfig(distractors=feature_specs(args.distractor, "--distractor"),
                                                     **common))
        print(json.dumps({"out": str(args.out), "stats": setting.get("stats")}, indent=2, default=str))
        return 0
    vocabulary = feature_specs(args.distractor, "--distractor")
    cfg = ScenesConfig(**common, **({"vocabulary": vocabulary} if vocabulary else {}))
    setting = write_scenes(args.out, cfg)
    print(json.dumps({"out": str(args.out), "stats": setting["stats"]}, indent=2, default=str))
    print("import each dataset like real COCO:")
    for name, files in scene_splits(args.out).items():
        print(f"  ravl import coco {' '.join(str(p) for p, _ in files)} --images {args.out / name / 'images'} "
              f"--out {args.out / name} {' '.join(f'--split {s}' for _, s in files)}")
    return 0
