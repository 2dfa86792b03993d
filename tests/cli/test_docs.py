"""The README's command table names every command the parser registers."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from ravl_pipeline.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command_paths() -> list[tuple[str, ...]]:
    """Every command as the words a user types, nested ones included (``bench mitigation``)."""
    paths = []
    for name, sub in _subparsers(build_parser()).items():
        nested = _subparsers(sub)
        paths.extend([(name, child) for child in nested] if nested else [(name,)])
    return paths


def _command_table() -> str:
    text = README.read_text()
    start = text.index("### Commands")
    return text[start:text.index("\n#", start + 1)]


@pytest.mark.parametrize("path", _command_paths(), ids=" ".join)
def test_readme_command_table_names_every_command(path):
    table = _command_table()
    first, *rest = path
    rows = [line for line in table.splitlines() if re.search(rf"`ravl {re.escape(first)}\b", line)]
    assert rows, f"README's command table has no row for `ravl {first}`"
    if rest:  # `ravl import imagefolder|coco` names its nested commands in one cell, or one row each
        assert any(re.search(rf"\b{re.escape(rest[0])}\b", row) for row in rows), \
            f"README's command table does not name `ravl {' '.join(path)}`"
