"""``ravl synth``: write a controlled synthetic setting (SPEC §4.1): digits
and a planted feature correlated with one class at a target Cramér's V."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import COUNT, INTEGER, UNIT, InputError, flag_type
from ..experiments.synth import FeatureSpec, SynthConfig, make_setting
from .errors import check_output_dir

DEFAULT_FEATURE = "red square:255,0,0:square"


def register(sub) -> None:
    p = sub.add_parser("synth", help="write a controlled synthetic setting (SPEC §4.1)", description=__doc__)
    defaults = SynthConfig()
    p.add_argument("--out", required=True, type=Path, help="folder of the setting (pretrain/, finetune/, eval/, "
                                                          "setting.json)")
    p.add_argument("--correlated-class", default=defaults.correlated_class)
    p.add_argument("--correlated-classes", default=None, help="comma list, one per --feature")
    p.add_argument("--feature", action="append", help=f"NAME:R,G,B:SHAPE (repeatable; default {DEFAULT_FEATURE})")
    p.add_argument("--distractor", action="append", help="NAME:R,G,B:SHAPE, independent of the label")
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
    cfg = SynthConfig(correlated_class=args.correlated_class,
                      features=feature_specs(args.feature or [DEFAULT_FEATURE], "--feature"),
                      correlated_classes=args.correlated_classes.split(",") if args.correlated_classes else None,
                      strength=args.strength, distractors=feature_specs(args.distractor, "--distractor"),
                      n_pretrain=args.n_pretrain, n_finetune=args.n_finetune, n_val=args.n_val, n_test=args.n_test,
                      seed=args.seed)
    setting = make_setting(args.out, cfg)
    print(json.dumps({"out": str(args.out), "stats": setting.get("stats")}, indent=2, default=str))
    return 0
