"""The ``ravl`` command: one module per subcommand, each a thin layer that
turns flags into configuration, calls :mod:`ravl_pipeline.pipeline` (or the
Dagster graph) and prints what it did."""
from __future__ import annotations

import argparse
import logging
import sys

from . import bench, demo, discover, evaluate, finetune, importer, materialize, report, synth, ui, worker

COMMANDS = (synth, importer, finetune, evaluate, discover, bench, report, materialize, demo, worker, ui)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ravl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
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
