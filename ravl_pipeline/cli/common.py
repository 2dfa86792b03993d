"""What the commands share: model and training flags built from the one
definition of each default (:mod:`ravl_pipeline.config`), and how findings
and metrics are printed."""
from __future__ import annotations

import argparse

from ..config import REGION_LOSS_FORMS, TrainConfig, option
from ..core.findings import Findings
from ..mitigate.methods import METHODS


def fmt(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="ravl-tiny-rn | ravl-tiny-vit | an open_clip name | local-dir:PATH")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or weights file")


def add_training_args(p: argparse.ArgumentParser) -> None:
    """The options of one fine-tuning run (read back by :func:`train_config`)."""
    p.add_argument("--data", required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--method", choices=sorted(METHODS), **option(TrainConfig, "method"))
    p.add_argument("--epochs", type=float, **option(TrainConfig, "epochs"))
    p.add_argument("--max-steps", type=int, **option(TrainConfig, "max_steps"))
    p.add_argument("--batch-size", type=int, **option(TrainConfig, "batch_size"))
    p.add_argument("--lr", type=float, **option(TrainConfig, "lr"))
    p.add_argument("--lam", type=float, **option(TrainConfig, "lam"))
    p.add_argument("--tau", type=float, **option(TrainConfig, "tau"))
    p.add_argument("--region-loss", choices=list(REGION_LOSS_FORMS), **option(TrainConfig, "region_loss"))
    p.add_argument("--seed", type=int, **option(TrainConfig, "seed"))
    p.add_argument("--lock-text", action="store_true", help=option(TrainConfig, "lock_text")["help"])
    p.add_argument("--caption-template", default=None,
                   help="caption for rows without one, {} = label (default: the dataset's setting.json "
                        "template, else 'a photo of a {}.')")
    p.add_argument("--quiet", action="store_true")


def train_config(args, caption_template: str) -> TrainConfig:
    return TrainConfig(method=args.method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       seed=args.seed, lock_text=args.lock_text, caption_template=caption_template,
                       lam=args.lam, tau=args.tau, region_loss=args.region_loss, max_steps=args.max_steps)


def print_findings(findings: Findings, path) -> None:
    feats = findings.features
    print(f"findings: {path}")
    took = f", {findings.seconds:.1f}s" if findings.seconds is not None else ""
    print(f"  K={findings.k} (silhouette {fmt(findings.silhouette)}), "
          f"{findings.n_regions} regions, image accuracy {fmt(findings.image_accuracy)}{took}")
    if not feats:
        print("  no spurious feature found")
    warning = (findings.significance or {}).get("warning")
    if warning:
        print(f"  significance: {warning}")
    for f in feats[:5]:
        print(f"  #{f.rank} cluster {f.cluster_id}: score {f.score:.3f}, influence "
              f"{f.influence:.2f}, attribute {f.attribute!r}, {f.size if f.size is not None else '?'} regions")
        if f.q_value is not None:
            names = ", ".join(t["term"] for t in (f.names or {}).get("terms", [])[:3])
            flips = (f.causal or {}).get("flip_rate")
            control = (f.causal_control or {}).get("flip_rate")
            support = f.support
            verdict = "" if support is None else (
                f"; errors fixed {support['errors_fixed']} vs made {support['errors_made']}, "
                + ("supported" if support["supported"] else "not supported"))
            print(f"      p={f.p_value:.3f} q={f.q_value:.3f} {'CALLED' if f.called else 'not called'}"
                  + (f", masking flips {flips:.0%} of its images" if flips is not None else "")
                  + (f" vs {control:.0%} for random regions" if control is not None else "") + verdict
                  + (f"; model-derived names: {names}" if names else ""))
    if findings.causal is not None:
        lead = findings.lead_rank
        print("  lead finding (highest-ranked called feature the masking check supports): "
              + ("none" if lead is None else f"#{lead}"))
    for name, gt in (findings.ground_truth or {}).items():
        v = gt["validity"]
        print(f"  ground truth {name!r} ↔ {gt['correlated_class']!r}: valid={v['valid']} "
              f"(gap {fmt(v['correlated_gap'], '+.2f')}, others {fmt(v['other_mean_gap'], '+.2f')}), "
              f"Precision@10 top={gt['precision_at_10_top']:.2f}"
              + (f", lead={gt['precision_at_10_lead']:.2f}" if "precision_at_10_lead" in gt else ""))


def metrics_line(m: dict) -> str:
    return (f"image overall {fmt(m['image_overall'])}, worst-group {fmt(m['image_worst_group'])}; "
            f"region overall {fmt(m['region_overall'])}, worst-group {fmt(m['region_worst_group'])}")
