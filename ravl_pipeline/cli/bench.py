"""``ravl bench``: the discovery benchmark over a grid of synthetic settings,
and the permutation test's calibration."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import COUNT, EMBEDDING_MODES, MASK_FILL_CHOICES, DiscoveryConfig, RegionsConfig, flag_type, option
from ..experiments.bench import GRIDS, run_bench, significance_calibration
from .errors import check_output_dir


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks", description=__doc__)
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("discovery", help="RaVL vs image-level baselines over synthetic settings (SPEC §4)")
    b.add_argument("--grid", default="small", choices=list(GRIDS),
                   help="small (CI) | full (the 44-setting grid) | extra (null and two-feature settings "
                        "on four more seeds) | evidence (single and null settings on two model families)")
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


def run_significance(args) -> int:
    print(json.dumps(significance_calibration(args.tests, args.permutations), indent=2))
    return 0
