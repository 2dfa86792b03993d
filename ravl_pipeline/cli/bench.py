"""``ravl bench``: the discovery benchmark over a grid of synthetic settings,
the mitigation benchmark (Stage 2 against its baselines over seeds), and the
permutation test's calibration."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import COUNT, EMBEDDING_MODES, MASK_FILL_CHOICES, DiscoveryConfig, RegionsConfig, flag_type, option
from ..experiments.bench import GRIDS, run_bench, significance_calibration
from .errors import check_output_dir
from ..experiments.mitigation import METHODS, PLANS, SETTINGS, run_mitigation_bench


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks", description=__doc__)
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("discovery", help="RaVL vs image-level baselines over synthetic settings (SPEC §4)")
    b.add_argument("--grid", default="small", choices=list(GRIDS),
                   help="small (CI) | full (the 44-setting grid) | extra (null and two-feature settings "
                        "on four more seeds) | evidence (single and null settings on two model families) | "
                        "scenes (COCO-style photos with boxes)")
    b.add_argument("--out", default="runs/bench-discovery", help="output folder (resumes a partial run)")
    b.add_argument("--limit", type=flag_type(COUNT), default=None, help="run only the first N settings of the grid")
    b.add_argument("--permutations", **option(DiscoveryConfig, "permutations"))
    b.add_argument("--alpha", **option(DiscoveryConfig, "alpha"))
    b.add_argument("--workers", type=flag_type(COUNT), default=1,
                   help="settings run at once, each in its own process (default 1)")
    b.add_argument("--threads", type=flag_type(COUNT), default=None,
                   help="torch threads per worker (default: CPU count / workers)")
    b.add_argument("--mode", choices=list(EMBEDDING_MODES), **option(RegionsConfig, "mode"))
    b.add_argument("--mask-fill", choices=list(MASK_FILL_CHOICES), **option(DiscoveryConfig, "mask_fill"))
    b.add_argument("--match", default=None, metavar="TEXT",
                   help="run only the settings whose name contains TEXT (e.g. red-square)")
    b.set_defaults(func=run_discovery)
    b = bench.add_parser("mitigation", help="Stage 2 vs its baselines over seeds, with paired intervals (SPEC §3-4)")
    b.add_argument("--setting", default="default", choices=list(SETTINGS),
                   help="default (ravl-tiny-rn) | default-clip (the same setting, CLIP's standard "
                        "normalisation) | default-1k, default-500, default-250 (the default with 1,000, 500 or "
                        "250 fine-tuning images instead of 2,000) and each with -clip (on the second family) | "
                        "scenes (COCO-style scenes with boxes, ravl-tiny-rn)")
    b.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    b.add_argument("--plans", nargs="+", default=["main"], choices=list(PLANS),
                   help="main (every method) | ablation (Upsampled FT and RaVL only) | lambda | batch | steps "
                        "(16 epochs) | steps-main (every method, 16 epochs) | floor (the pipeline's Stage 2 step "
                        "floor) | features | oracle | order | sampler (see the module docstring)")
    b.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help="run only these methods of the chosen plans (default: every one)")
    b.add_argument("--out", default="runs/bench-mitigation",
                   help="output folder; each setting in its own subfolder (resumes a partial run)")
    b.add_argument("--trace-seeds", type=int, nargs="*", default=[0],
                   help="seeds whose RaVL and Upsampled FT runs record the loss-term diagnostics")
    b.add_argument("--mode", choices=list(EMBEDDING_MODES), **option(RegionsConfig, "mode"))
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    b.add_argument("--keep-models", action="store_true", help="keep every trained checkpoint (13 MB each)")
    b.add_argument("--discovered-groups", action="store_true",
                   help="also score every model on the test groups the findings form (as on data without an "
                        "annotation of the feature), beside the annotated groups")
    b.set_defaults(func=run_mitigation)
    b = bench.add_parser("significance", help="calibration and speed of the permutation test (no training)")
    b.add_argument("--tests", type=flag_type(COUNT), default=1000)
    b.add_argument("--permutations", **option(DiscoveryConfig, "permutations"))
    b.set_defaults(func=run_significance)


def run_discovery(args) -> int:
    check_output_dir(args.out)
    summary = run_bench(args.grid, args.out, limit=args.limit, permutations=args.permutations, alpha=args.alpha,
                        workers=args.workers, threads_per_worker=args.threads, mode=args.mode, match=args.match,
                        mask_fill=args.mask_fill)
    print((Path(args.out) / "summary.md").read_text(), end="")
    return 0 if summary["n_settings"] else 1


def run_mitigation(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = run_mitigation_bench(args.setting, args.seeds, args.plans, args.out, trace_seeds=args.trace_seeds,
                                   mode=args.mode, keep_models=args.keep_models, methods=args.methods,
                                   discovered_groups=args.discovered_groups)
    print((Path(args.out) / args.setting / "summary.md").read_text(), end="")
    return 0 if summary["runs"] else 1


def run_significance(args) -> int:
    print(json.dumps(significance_calibration(args.tests, args.permutations), indent=2))
    return 0
