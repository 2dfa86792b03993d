"""The ``ravl`` command: one module per subcommand, each a thin layer that
turns flags into configuration, calls :mod:`ravl_pipeline.pipeline` (or the
Dagster graph) and prints what it did."""
from __future__ import annotations

import argparse
import logging
import sys

from . import bench, demo, discover, embed_shard, evaluate, finetune, importer, materialize, report, synth, ui, worker
from .errors import Parser, run_guarded

COMMANDS = (synth, importer, finetune, evaluate, discover, embed_shard, bench, report, materialize, demo, worker, ui)
VERBOSE_HELP = "on an error, print its traceback; show progress logs"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ravl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    for command_parser in set(sub.choices.values()):  # `ravl discover -v …` as well as `ravl -v discover …`
        command_parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                    help=VERBOSE_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``ravl`` command: exit status 0 on success, 2 for bad input (one
    line naming it), 1 for an internal error (``-v`` shows the traceback)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a bad flag (one line printed) or --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR)
    return run_guarded(args.command, lambda: args.func(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
