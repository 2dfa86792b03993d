"""What the commands share: model and training flags built from the one
definition of each default (:mod:`ravl_pipeline.config`), and how findings
and metrics are printed."""
from __future__ import annotations

import argparse
import json

from ..compute import Compute, resolve_compute, use_threads
from ..config import PRECISIONS, REGION_LOSS_FORMS, TRAIN_TRANSFORMS, ComputeConfig, InputError, MitigationConfig, TrainConfig, option
from ..core.findings import Findings, read_findings
from ..core.regions import ProposerError, parse_proposer
from ..core.scores import check_templates
from ..io.manifest import SPLITS
from ..mitigate.methods import METHODS
from ..models import untrained
from ..pipeline import ModelRecord
from .errors import warn


def fmt(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="ravl-tiny-rn | ravl-tiny-rn-clip | ravl-tiny-vit | an open_clip name | local-dir:PATH")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or weights file")


def add_compute_args(p: argparse.ArgumentParser) -> None:
    """Where the command's models run (read back by :func:`compute_flags`)."""
    p.add_argument("--device", **option(ComputeConfig, "device"))
    p.add_argument("--precision", choices=list(PRECISIONS), **option(ComputeConfig, "precision"))
    p.add_argument("--workers", **option(ComputeConfig, "workers"))


def compute_flags(args) -> Compute:
    """The device, precision and workers the flags name, checked against this
    machine (a device it lacks is a one-line error naming ``--device``);
    torch's threads set for this process (:func:`use_threads`)."""
    use_threads()
    return resolve_compute(device=args.device, precision=args.precision, workers=args.workers)


def warn_if_untrained(command: str, model: str, pretrained: str | None, seed: int | None) -> None:
    """Say so when the model has no trained weights: its results describe a random network."""
    if untrained(model, pretrained):
        seeded = f"random initialisation seeded with {seed}" if seed is not None else "random initialisation"
        warn(command, f"--model {model} without --pretrained has no trained weights ({seeded}); its results "
                      "say nothing about a trained model: pass a local-dir:PATH checkpoint or --pretrained")


def proposer_flag(text: str) -> str:
    """``--proposer``'s value, checked by the parser."""
    try:
        parse_proposer(text)
    except ProposerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def flag_templates(templates: list[str] | None, flag: str = "--template") -> list[str] | None:
    """Prompt templates from a repeatable flag, checked before any work."""
    return check_templates(templates, flag) if templates else None


def flag_classes(text: str | None, flag: str = "--classes") -> list[str] | None:
    """Comma-separated class names: non-empty and distinct."""
    if not text:
        return None
    classes = [c.strip() for c in text.split(",")]
    if not all(classes) or len(set(classes)) != len(classes):
        raise InputError(f"{flag} {text!r}: expected distinct, non-empty class names separated by commas")
    return classes


# the TrainConfig fields ``ravl finetune`` takes as flags; each flag's default is None (left out), resolved by
# config.train_config or, for Stage 2, config.stage2_config
TRAINING_FLAGS = ("method", "epochs", "max_steps", "min_steps", "batch_size", "lr", "lam", "tau", "region_loss",
                  "max_repeat", "seed", "lock_text", "train_transform", "micro_batch_size")


def training_option(name: str) -> dict:
    """``argparse`` keywords of a training flag. Its default is ``None`` so
    that a flag given can be told from one left out (:func:`training_flags`); the help
    says what a left-out flag becomes: the definition's default, or with
    ``--findings`` Stage 2's (the audited model's recorded fine-tuning under
    ``params.yaml``'s mitigation defaults, as the pipeline resolves it)."""
    out = option(TrainConfig, name)
    plain = out.pop("default")
    stage2 = getattr(MitigationConfig(), name, None)
    text = out["help"].rsplit(" (default: ", 1)[0]
    if stage2 is None:
        with_findings = "the audited model's own fine-tuning where its checkpoint records it"
    elif stage2 != plain:
        with_findings = f"{stage2}, as the pipeline's Stage 2"
    else:
        with_findings = None
    shown = "none" if plain is None else plain
    out["help"] = f"{text} (default: {shown}" + (f"; with --findings: {with_findings})" if with_findings else ")")
    return {**out, "default": None}


def add_training_args(p: argparse.ArgumentParser) -> None:
    """The options of one fine-tuning run (read back by :func:`training_flags`)."""
    p.add_argument("--data", required=True)
    p.add_argument("--split", default=None, choices=SPLITS, help="train on this split only (default: every row)")
    p.add_argument("--out", required=True, help="checkpoint folder to write (replaces an earlier checkpoint there)")
    p.add_argument("--method", choices=sorted(METHODS), **option(TrainConfig, "method"))
    p.add_argument("--epochs", **training_option("epochs"))
    p.add_argument("--max-steps", **training_option("max_steps"))
    p.add_argument("--min-steps", **training_option("min_steps"))
    p.add_argument("--batch-size", **training_option("batch_size"))
    p.add_argument("--lr", **training_option("lr"))
    p.add_argument("--lam", **training_option("lam"))
    p.add_argument("--tau", **training_option("tau"))
    p.add_argument("--region-loss", choices=list(REGION_LOSS_FORMS), **training_option("region_loss"))
    p.add_argument("--max-repeat", **training_option("max_repeat"))
    p.add_argument("--micro-batch-size", **training_option("micro_batch_size"))
    p.add_argument("--train-transform", choices=list(TRAIN_TRANSFORMS), **training_option("train_transform"))
    p.add_argument("--seed", **training_option("seed"))
    p.add_argument("--lock-text", action="store_true", help=training_option("lock_text")["help"], default=None)
    p.add_argument("--caption-template", default=None,
                   help="caption for rows without one, {} = label (default: the dataset's setting.json "
                        "template, else 'a photo of a {}.')")
    p.add_argument("--quiet", action="store_true")


def training_flags(args, caption_template: str) -> dict:
    """The training configuration's values as given on the command line
    (``None``: left out) and the caption template, for ``config.train_config``
    or ``config.stage2_config`` to lay over their defaults."""
    return {**{name: getattr(args, name) for name in TRAINING_FLAGS}, "caption_template": caption_template}


def print_findings(findings: Findings, path) -> None:
    feats = findings.features
    print(f"findings: {path}")
    took = f", {findings.seconds:.1f}s" if findings.seconds is not None else ""
    print(f"  K={findings.k} (silhouette {fmt(findings.silhouette)}), "
          f"{findings.n_regions} regions, image accuracy {fmt(findings.image_accuracy)}{took}")
    if not feats:
        print("  no spurious feature found")
    elif findings.has_significance:
        standing = [f.standing for f in feats]
        print(f"  {standing.count('confirmed')} confirmed (significant, masking supports), "
              f"{standing.count('candidate')} candidate(s) (significant, masking inconclusive), "
              f"{standing.count('other')} other cluster(s) kept")
    warning = (findings.significance or {}).get("warning")
    if warning:
        print(f"  significance: {warning}")
    for f in feats[:5]:
        standing = f" [{f.standing}]" if findings.has_significance else ""
        print(f"  #{f.rank}{standing} cluster {f.cluster_id}: score {f.score:.3f}, influence "
              f"{f.influence:.2f}, attribute {f.attribute!r}, {f.size if f.size is not None else '?'} regions")
        if f.q_value is not None:
            names = ", ".join(t["term"] for t in (f.names or {}).get("terms", [])[:3])
            flips = (f.causal or {}).get("flip_rate")
            control = (f.causal_control or {}).get("flip_rate")
            support = f.support
            verdict = "" if support is None else (
                f"; errors fixed {support['errors_fixed']} vs made {support['errors_made']}, {f.verdict}"
                + (f" ({support['reason']})" if support.get("reason") else ""))
            print(f"      p={f.p_value:.3f} q={f.q_value:.3f} {'CALLED' if f.called else 'not called'}"
                  + (f", masking flips {flips:.0%} of its images" if flips is not None else "")
                  + (f" vs {control:.0%} for random regions" if control is not None else "") + verdict
                  + (f"; model-derived names: {names}" if names else ""))
    if findings.causal is not None:
        selection = findings.causal.get("fill_selection")
        if selection:
            rates = ", ".join(f"{k} {v:.0%}" for k, v in selection["flip_rates"].items())
            print(f"  masking fill: {findings.causal['fill']} (random regions flip {rates} of predictions)")
        lead = findings.lead_rank
        print("  lead finding (highest-ranked called feature the masking check does not refute): "
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


def print_closed_loop(audit) -> None:
    """The end of one set's audit: the findings, what was trained, each
    model's metrics with its steps, the answer lines and the report's path."""
    findings = read_findings(audit.paths.findings) if audit.paths.findings.is_file() else None
    if findings is not None:
        print_findings(findings, audit.paths.findings)
    for name, path in (("mitigated", audit.paths.mitigated_record), ("control", audit.paths.control_record)):
        if not path.is_file():
            continue
        record = ModelRecord.read(path)
        standing = {f.rank: f.standing for f in findings.features} if findings is not None else {}
        ranks = ", ".join(f"{r} ({standing[r]})" if r in standing else str(r)
                          for r in record.extra.get("feature_ranks") or [])
        steps = f"; {record.extra['steps']} steps" if "steps" in record.extra else ""  # absent in older records
        print(f"{name} model: {record.extra.get('method')} on findings {ranks}{steps}" if record.extra.get("trained")
              else f"{name} model: not trained ({record.extra.get('reason', 'nothing to mitigate')})")
    if audit.paths.metrics.is_file():
        metrics = json.loads(audit.paths.metrics.read_text())
        steps = metrics.get("steps") or {}
        print(f"metrics on {metrics.get('split') or 'every row'} (groups from {metrics.get('groups_from', 'annotation')}):")
        for name in ("audited", "control", "mitigated"):
            if metrics.get(name):
                label = f"{name}, {steps[name]} steps" if steps.get(name) is not None else name
                print(f"  {label}: {metrics_line(metrics[name])}")
        for line in metrics.get("answer") or []:
            print(f"  {line}")
        for line in metrics.get("warnings") or []:
            print(f"  warning: {line}")
