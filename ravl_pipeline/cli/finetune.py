"""``ravl finetune`` (alias ``ravl train``): fine-tune a CLIP model with any
registered method; Stage-2 methods read ``--findings``. Under ``torchrun
--nproc-per-node N`` the run is data-parallel (DDP) and rank 0 alone writes."""
from __future__ import annotations

import argparse
import os

from ..config import (COUNT, DEFAULT_FEATURE_SELECTION, FEATURE_SELECTIONS, InputError, ParamsError, TrainConfig,
                      check_template, flag_type, stage2_config, train_config)
from ..core.findings import read_findings
from ..io.files import check_input_file, write_json_atomic
from ..mitigate.distributed import world_from_env
from ..io.dataset import dataset_inputs
from ..models import CONFIG_NAME, meta_path, model_inputs, read_meta
from ..pipeline import stages
from .common import add_compute_args, add_model_args, add_training_args, compute_flags, training_flags
from .errors import check_output_dir, check_output_file

HELP = "fine-tune a CLIP model (Stage 2 with --method ravl --findings); data-parallel under torchrun"


def register(sub) -> None:
    for name, help_text in (("finetune", HELP), ("train", "the same as finetune")):
        p = sub.add_parser(name, help=help_text, description=__doc__)
        add_model_args(p)
        add_training_args(p)
        p.add_argument("--findings", default=None, help="findings.json (methods that need groups/spurious regions)")
        p.add_argument("--audited-model", default=None,
                       help="the audited model the findings came from (default: the findings' 'model' and "
                            "'pretrained')")
        p.add_argument("--audited-pretrained", default=None,
                       help="open_clip pretrained tag or weights file of --audited-model")
        p.add_argument("--features", default=DEFAULT_FEATURE_SELECTION, type=features_flag,
                       help="discovered features treated as spurious: called (significant ones where the findings "
                            "carry significance, else all kept, less those the masking check does not support) | "
                            "significant (every called one) | all (every kept cluster) | top1 (the first called one) | "
                            "rank1 (the top-ranked kept cluster, as the reference code) | N (the first N called ones) "
                            f"(default: {DEFAULT_FEATURE_SELECTION})")
        p.add_argument("--attribute-text", action="append", default=None, metavar="TEXT",
                       help="the spurious attribute in words, for --method spurious-aware (repeatable; default: "
                            "the top model-derived name of each chosen finding)")
        p.add_argument("--cache-dir", default=None,
                       help="cache the spurious-region assignment in this folder, for runs on the same data and "
                            "findings (default: no cache)")
        p.add_argument("--history", default=None, help="write the training history JSON here (rank 0)")
        p.add_argument("--record-indices", action="store_true",
                       help="under torchrun: record which sample indices each process saw at each step")
        add_compute_args(p)
        p.add_argument("--checkpoint-every", default=None, type=flag_type(COUNT), metavar="STEPS",
                       help="save the run's state to OUT.resume.pt every STEPS steps; the same command after an "
                            "interruption resumes from it, and the file is removed when the checkpoint is written "
                            "(default: off; the pipeline saves every compute.checkpoint_every steps)")
        p.set_defaults(func=run)


def features_flag(text: str) -> str:
    """``--features``: one of the selections or a positive count."""
    if text in FEATURE_SELECTIONS or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(FEATURE_SELECTIONS)} or a positive count, "
                                     f"got {text!r}")


def inputs(args) -> list:
    """What the command reads, which its outputs may not replace."""
    return [*dataset_inputs(args.data), *model_inputs(args.model, args.pretrained),
            *model_inputs(args.audited_model, args.audited_pretrained, "--audited-model", "--audited-pretrained"),
            *([("--findings", args.findings)] if args.findings else [])]


def run(args) -> int:
    reads = inputs(args)
    check_output_dir(args.out, replaces_if=CONFIG_NAME, what="checkpoint", inputs=reads)
    compute = compute_flags(args)
    if args.history:
        check_output_file(args.history, "--history", inputs=reads, outputs=[("--out", args.out, True)])
    if args.cache_dir:
        check_output_dir(args.cache_dir, "--cache-dir")
    if args.caption_template:
        check_template(args.caption_template, "--caption-template")
    if args.findings:
        check_input_file(args.findings, "--findings")
    findings = read_findings(args.findings) if args.findings else None
    # Stage 2's class texts in the audit's prompt: the one the findings were scored with
    template = (args.caption_template or (findings.templates[0] if findings is not None and findings.templates
                                          else stages.templates_for(args.data)[0]))
    if findings is not None and not args.audited_model:
        check_recorded_model(findings.model, args.findings)
    flags = training_flags(args, template)
    budget = None
    if findings is not None or args.audited_model or (args.method or "standard") != "standard":
        cfg = stage2_train_config(args, flags, findings)  # Stage 2 or a baseline to it: Stage 2's budget
    else:
        cfg = train_config(None, **flags)
        budget = (f"plain fine-tuning: {cfg.epochs:g} epochs at batch {cfg.batch_size}, no Stage 2 step floor "
                  "(for a baseline at Stage 2's budget, name the model it is compared with: --audited-model)")
        if not args.quiet:
            print(budget)
    world = world_from_env()
    history = stages.train(args.model, args.data, args.out, cfg, pretrained=args.pretrained, split=args.split,
                           findings=findings, findings_path=args.findings, audited_model=args.audited_model,
                           audited_pretrained=args.audited_pretrained, features=args.features,
                           attribute_text=args.attribute_text, cache_dir=args.cache_dir,
                           record_indices=args.record_indices,
                           progress=not (args.quiet or not world.is_main), compute=compute,
                           checkpoint_every=args.checkpoint_every,
                           inherited_transform=findings is not None and args.train_transform is None,
                           extra_meta={"budget": budget} if budget else None)
    if world.is_main:
        if args.history:
            write_json_atomic(args.history, history)
        losses = history["losses"]
        where = f"{compute.device}, {compute.precision}" if not compute.is_reference else "cpu"
        print(f"wrote {args.out}  ({cfg.method}: {history['steps']} steps on {world.world_size} process(es), {where}, "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {history['seconds']:.1f}s)")
    return 0


def check_recorded_model(model: str | None, findings_path: str) -> None:
    """The audited model a findings file records, when it is a checkpoint
    folder, still exists; the error says where the path came from."""
    if model and model.startswith("local-dir:") and not os.path.isdir(model.removeprefix("local-dir:")):
        raise InputError(f"{findings_path}, key 'model': the audited checkpoint {model.removeprefix('local-dir:')} "
                         "is not a folder (moved or removed?); pass --audited-model local-dir:PATH to say where it is")


def stage2_train_config(args, flags: dict, findings) -> TrainConfig:
    """Stage 2 (``--findings``) and its baselines (any method but
    ``standard``, or ``standard`` with ``--audited-model``) resolve flags
    left out as the pipeline's Stage 2 does: the audited model's recorded
    fine-tuning (when its checkpoint records one) under the mitigation
    defaults, e.g. the 256-step floor; it says where its budget came from."""
    audited = args.audited_model or (findings.model if findings is not None else None)
    meta = read_meta(audited) if audited else {}
    recorded = meta.get("train") if isinstance(meta, dict) else meta  # only a local-dir checkpoint records one
    if recorded is not None and not isinstance(recorded, dict):
        raise InputError(f"{meta_path(audited)}: expected an object with the training configuration under 'train'")
    try:
        cfg = stage2_config(recorded, **flags)
    except ParamsError as exc:
        raise InputError(f"{meta_path(audited)}, key 'train': {exc}") from None
    if not args.quiet:
        source = (f"the audited model's fine-tuning ({audited})" if recorded is not None
                  else f"the defaults: {audited or 'the audited model'} records no fine-tuning")
        floor = f", at least {cfg.min_steps} steps" if cfg.min_steps else ""
        print(f"Stage 2: {cfg.epochs:g} epochs at batch {cfg.batch_size}, lr {cfg.lr:g}, seed {cfg.seed}{floor} "
              f"(flags left out: {source})")
    return cfg
