"""Worst-group accuracy on the groups the findings form against the annotated groups.

    OMP_NUM_THREADS=1 .venv/bin/ravl bench mitigation --setting default --seeds 0 1 2 3 4 --plans pair \\
        --threads 1 --discovered-groups --out runs/groups
    (likewise --setting default-clip and --setting scenes)
    .venv/bin/python benchmarks/discovered_groups.py runs/groups/*/results.jsonl

On data without an annotation of the feature the closed loop forms its
groups from the mitigated findings (SPEC §5 ``groups_from: findings``). The
built-in settings annotate the planted feature, so the same test images can
be scored both ways. Per setting and model (the audited model, Upsampled FT
and RaVL, at the recipe's budget with ``--plans pair``: the closed loop's
audited, control and mitigated models): image and region worst-group on the
annotated and on the discovered groups (mean ± sd over the valid seeds),
their paired difference discovered − annotated (mean [95% bootstrap
interval], seeds resampled), the share of test images on which the group
column that best matches the planted feature agrees with it (mean, and the
lowest seed), the number of group columns the findings formed (one per class
the mitigated findings are tied to), and the wall time of the control
(Upsampled FT) against the mitigated model's (RaVL), same steps. Printed as
Markdown.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ravl_pipeline.core.evidence.stats import paired_difference_ci  # noqa: E402

METRICS = ("image_worst_group", "region_worst_group")
MODELS = ("audited", "upsampled", "ravl")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _valid(rows: list[dict]) -> set[int]:
    return {r["seed"] for r in rows if r["run"] == "validity" and all(v["valid"] for v in r["validity"].values())}


def _model(row: dict) -> str | None:
    if row["run"] == "audited":
        return "audited"
    return row["method"] if row.get("metrics") and row["method"] in MODELS else None


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else \
        f"{100 * xs[0]:.1f}"


def _ci(d: dict) -> str:
    if d["mean"] is None:
        return "n/a"
    lo, hi = d["ci"]
    return f"{100 * d['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _lead_p10(findings: Path) -> float:
    """Precision@10 of the lead finding against the planted feature (0 when unknown)."""
    if not findings.is_file():
        return 0.0
    gt = json.loads(findings.read_text()).get("ground_truth") or {}
    return max([g.get("precision_at_10_lead") or 0.0 for g in gt.values()], default=0.0)


def _agree(xs: list[float]) -> str:
    return "n/a" if not xs else f"{100 * statistics.mean(xs):.1f}% (lowest {100 * min(xs):.1f}%)"


def table(path: Path) -> list[str]:
    rows = _rows(path)
    setting = rows[0].get("setting", path.parent.name)
    valid = _valid(rows)
    by = {}
    for r in rows:
        model = _model(r)
        if model and r["seed"] in valid and r.get("discovered"):
            by.setdefault(model, {})[r["seed"]] = r
    seeds = sorted(set.intersection(*(set(v) for v in by.values()))) if by else []
    first = by["audited"] if "audited" in by else next(iter(by.values()))
    agree = {s: max(first[s]["discovered"]["agreement"].values()) for s in seeds}
    columns = [len(first[s]["discovered"]["features"]) for s in seeds]
    planted = [s for s in seeds if _lead_p10(path.parent / f"seed{s}" / "findings.json") >= 0.9]
    on_planted = [agree[s] for s in planted]
    out = [f"**{setting}** ({len(seeds)} valid seeds: {', '.join(map(str, seeds))}; the lead finding is the planted "
           f"feature, Precision@10 ≥ 0.9, on {len(planted)}): on those, the discovered groups agree with the planted "
           f"feature on {_agree(on_planted)} of test images; on every valid seed {_agree(list(agree.values()))}; "
           f"{min(columns)}–{max(columns)} group column(s) per seed", "",
           "| model | metric | annotated groups | discovered groups | discovered − annotated |",
           "|---|---|---:|---:|---:|"]
    for model in MODELS:
        if model not in by:
            continue
        for key in METRICS:
            ann = [by[model][s]["metrics"][key] for s in seeds]
            dis = [by[model][s]["discovered"]["metrics"][key] for s in seeds]
            out.append(f"| {model} | {key} | {_mean_sd([x for x in ann if x is not None])} | "
                       f"{_mean_sd([x for x in dis if x is not None])} | {_ci(paired_difference_ci(dis, ann))} |")
    if "upsampled" in by and "ravl" in by:
        up = [by["upsampled"][s]["seconds"] for s in seeds]
        rv = [by["ravl"][s]["seconds"] for s in seeds]
        out += ["", f"Control (Upsampled FT) wall time {statistics.mean(up):.0f} s against the mitigated model's "
                    f"(RaVL) {statistics.mean(rv):.0f} s per seed, same steps "
                    f"({by['ravl'][seeds[0]]['steps']}): the control adds "
                    f"{100 * statistics.mean(u / r for u, r in zip(up, rv)):.0f}% of Stage 2's training time."]
    return out + [""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.jsonl of `ravl bench mitigation`")
    args = parser.parse_args()
    for path in args.results:
        print("\n".join(table(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
