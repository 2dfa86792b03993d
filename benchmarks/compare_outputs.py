"""Compare two runs of ``ravl demo`` (or ``ravl materialize``) output by output.

    python benchmarks/compare_outputs.py OLD_DATA_DIR NEW_DATA_DIR [--set synthetic-default]

Each argument is a ``RAVL_DATA_DIR`` (the folder holding ``outputs/``). For
one validation set it compares, and prints one line per output:

* ``findings.json``, ``metrics.json``, ``findings_mitigated.json``,
  ``mitigated_model.json``, ``audited_model.json``: as JSON values — key
  order is ignored, every number must be exactly equal; timings (keys named
  ``seconds``) are ignored, and each run's own data folder in a string is
  replaced by ``<data>`` (paths differ from run to run by design);
* ``embeddings``, ``scores``, ``clusters`` and ``proposals``: every Parquet
  column, exactly (the float32 vectors bit for bit).

Exit status 0 when everything is identical under that tolerance, 1 otherwise.
It is how a refactoring shows that it left the results unchanged.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

JSON_FILES = ("findings.json", "metrics.json", "findings_mitigated.json", "mitigated_model.json")
TABLE_DIRS = ("proposals", "embeddings", "scores", "clusters")
IGNORED_KEYS = {"seconds"}


def normalise(value, root: str):
    """A JSON value with timings dropped and the run's data folder replaced."""
    if isinstance(value, dict):
        return {k: normalise(v, root) for k, v in value.items() if k not in IGNORED_KEYS}
    if isinstance(value, list):
        return [normalise(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<data>")
    return value


def first_difference(a, b, where: str = "") -> str | None:
    if type(a) is not type(b):
        return f"{where or '/'}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{where}/{key}: only in {'new' if key not in a else 'old'}"
            diff = first_difference(a[key], b[key], f"{where}/{key}")
            if diff:
                return diff
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            diff = first_difference(x, y, f"{where}[{i}]")
            if diff:
                return diff
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def compare_json(old: Path, new: Path, old_root: str, new_root: str) -> str | None:
    if not old.is_file() or not new.is_file():
        return "missing in " + ("old" if not old.is_file() else "new")
    return first_difference(normalise(json.loads(old.read_text()), old_root),
                            normalise(json.loads(new.read_text()), new_root))


def compare_tables(old: Path, new: Path) -> str | None:
    files = sorted(p.name for p in old.glob("*.parquet"))
    if files != sorted(p.name for p in new.glob("*.parquet")):
        return f"files differ: {files} vs {sorted(p.name for p in new.glob('*.parquet'))}"
    for name in files:
        a, b = pq.read_table(old / name), pq.read_table(new / name)
        if a.column_names != b.column_names:
            return f"{name}: columns {a.column_names} vs {b.column_names}"
        for column in a.column_names:
            if not a.column(column).equals(b.column(column)):
                return f"{name}: column {column!r} differs"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path, help="the first run's data folder (RAVL_DATA_DIR)")
    parser.add_argument("new", type=Path, help="the second run's data folder")
    parser.add_argument("--set", default="synthetic-default", help="validation set to compare")
    args = parser.parse_args(argv)
    old_root, new_root = str(args.old.resolve()), str(args.new.resolve())
    old, new = args.old / "outputs" / args.set, args.new / "outputs" / args.set
    results = {name: compare_json(old / name, new / name, old_root, new_root) for name in JSON_FILES}
    results["audited_model.json"] = compare_json(args.old / "outputs" / "audited_model.json",
                                                 args.new / "outputs" / "audited_model.json", old_root, new_root)
    results.update({name: compare_tables(old / name, new / name) for name in TABLE_DIRS})
    for name, diff in results.items():
        print(f"{name:28s} {'identical' if diff is None else 'DIFFERS: ' + diff}")
    return 0 if all(d is None for d in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
