"""Discovery benchmark (experiments/bench.py)."""
import json

import pytest

from ravl_pipeline.experiments import bench
from ravl_pipeline.experiments.recipe import DEFAULT_RECIPE


def test_grids_cover_the_required_kinds():
    small = bench.grid_settings("small")
    assert sorted(s.kind for s in small) == ["null", "single", "two"]
    full = bench.grid_settings("full")
    singles = [s for s in full if s.kind == "single"]
    assert {s.strength for s in singles} == {0.7, 0.85, 0.99}
    assert len({s.features[0] for s in singles}) >= 3
    assert len({s.correlated_classes[0] for s in singles}) >= 2
    assert len({s.seed for s in full}) >= 2
    assert all(s.strength == 0.0 for s in full if s.kind == "null")
    assert all(len(s.features) == 2 and len(set(s.correlated_classes)) == 2 for s in full if s.kind == "two")
    assert len({s.name for s in full}) == len(full)
    extra = bench.grid_settings("extra")
    assert sorted({s.kind for s in extra}) == ["null", "two"] and len(extra) == 16
    assert {s.seed for s in extra}.isdisjoint({s.seed for s in full})  # new settings, not repeats
    assert not {s.name for s in extra} & {s.name for s in full}
    from ravl_pipeline import cli
    for grid in bench.GRIDS:  # the command line offers every grid
        assert cli.build_parser().parse_args(["bench", "discovery", "--grid", grid]).grid == grid
    with pytest.raises(ValueError, match="unknown benchmark grid 'huge'"):
        bench.grid_settings("huge")


def test_scenes_grid_covers_three_seeds_strengths_nulls_and_two_features():
    grid = bench.grid_settings("scenes")
    assert len(grid) >= 12 and all(s.data == "scenes" and s.proposer == "boxes" for s in grid)
    singles = [s for s in grid if s.kind == "single"]
    assert sorted((s.seed, s.strength) for s in singles) == sorted(
        (seed, v) for seed in (0, 1, 2) for v in (0.8, 0.9, 0.99))
    assert len({s.features[0] for s in singles}) == 3
    nulls = [s for s in grid if s.kind == "null"]
    assert len(nulls) == 6 and all(s.strength == 0.0 for s in nulls)
    assert len([s for s in grid if s.kind == "two"]) == 3
    recipe = bench.setting_recipe(singles[0])
    assert type(recipe.synth).__name__ == "ScenesConfig" and recipe.base_model == DEFAULT_RECIPE.base_model
    assert recipe.pretrain == DEFAULT_RECIPE.pretrain.__class__(**{**DEFAULT_RECIPE.pretrain.to_dict(),
                                                                   "seed": singles[0].seed})
    assert [f.name for f in recipe.synth.features] == singles[0].features
    assert recipe.synth.pretrain_feature_rate == 0.0  # as the default recipe: the feature is new in fine-tuning
    assert bench.setting_recipe(nulls[0]).synth.pretrain_feature_rate == 0.5  # SPEC §4.2: nulls show it before
    assert len({s.name for s in grid}) == len(grid)


def test_setting_recipe_derives_from_the_default_recipe():
    s = bench.grid_settings("small")[2]  # two features
    recipe = bench.setting_recipe(s)
    base = DEFAULT_RECIPE.small()
    assert recipe.synth.n_pretrain == round(base.synth.n_pretrain * s.data_scale)
    assert recipe.synth.n_val == round(base.synth.n_val * s.data_scale)
    assert [f.name for f in recipe.synth.features] == ["red square", "blue circle"]
    assert recipe.synth.resolved_correlated_classes() == ["nine", "one"]
    assert recipe.synth.strength == 0.99 and recipe.synth.classes == ["zero", "one", "nine"]
    assert recipe.pretrain.epochs == base.pretrain.epochs and recipe.finetune.lr == base.finetune.lr
    assert recipe.synth.seed == recipe.pretrain.seed == recipe.finetune.seed == s.seed


def _row(kind, valid=True, ravl=1.0, base=0.5, n_called=1, n_kept=1, best_called=None, flips=(0.6, 0.1),
         lead=None, lead_rank=1):
    feats = ["red square"] if kind != "two" else ["red square", "blue circle"]
    f = {name: {"validity": valid,
                "ravl": {"top": ravl, "top_called": ravl, "best_called": ravl if best_called is None else best_called,
                         "lead": ravl if lead is None else lead},
                "baselines": {"random": base / 2, "domino": base, "george": base, "distill": base / 5}}
         for name in feats}
    return {"setting": {"kind": kind, "name": f"{kind}-{ravl}-{valid}"}, "features": f, "n_called": n_called,
            "n_kept": n_kept, "lead_rank": lead_rank if n_called else None,
            "causal_top": {"finding": {"flip_rate": flips[0], "parity_shift": 0.2, "attribute_gap_before": 0.8,
                                       "attribute_gap_after": 0.1},
                           "control": {"flip_rate": flips[1], "parity_shift": 0.0}},
            "seconds": {"total": 10.0, "cpu": 8.0}}


def test_summarise_by_hand():
    rows = [_row("single", ravl=1.0, base=0.5), _row("single", ravl=0.8, base=0.3, best_called=1.0, lead=0.2),
            _row("single", valid=False, ravl=0.0, base=0.9),
            _row("null", n_called=0, n_kept=2), _row("null", n_called=1, n_kept=1, lead_rank=None),
            _row("null", n_called=0, n_kept=0), _row("null", n_called=0, n_kept=1),
            _row("two", best_called=1.0), _row("two", best_called=0.4)]
    s = bench.summarise(rows)
    assert s["n_valid"] == 2 and s["n_single"] == 3
    p = s["precision_at_10"]
    assert p["ravl"] == pytest.approx(0.9)  # (1.0 + 0.8) / 2; the invalid setting is left out
    assert p["ravl_best_called"] == pytest.approx(1.0)  # the second's feature is called, though not ranked first
    assert p["ravl_lead"] == pytest.approx(0.6)  # (1.0 + 0.2) / 2
    assert p["domino"] == pytest.approx(0.4) and p["random"] == pytest.approx(0.2)
    assert p["distill"] == pytest.approx(0.08)
    assert s["ravl_over_best_baseline"] == pytest.approx(0.9 / 0.4)
    assert s["null_false_finding_rate"] == pytest.approx(1 / 4)
    assert s["null_uncorrected_rate"] == pytest.approx(3 / 4)
    assert s["null_lead_rate"] == 0.0  # the one null call is refuted by masking
    assert s["two_feature_recall"] == pytest.approx(2 / 4)  # both of the first, none of the second
    assert s["two_feature_both_found"] == pytest.approx(1 / 2)
    assert s["causal"]["n_true_findings"] == 2
    assert s["causal"]["finding_flip_rate"] == pytest.approx(0.6)
    assert s["causal"]["control_flip_rate"] == pytest.approx(0.1)
    md = bench.summary_markdown(s, "test", complete=False)
    assert "PARTIAL" in md and "| ravl | 0.900 |" in md
    assert "9 of 44 settings" in bench.summary_markdown(s, "full", complete=False, n_grid=44)


@pytest.mark.slow
def test_small_grid_end_to_end(tmp_path):
    out = tmp_path / "bench"
    # the first two settings on two worker processes, then the rest resumed in this one
    part = bench.run_bench("small", out, limit=2, permutations=50, progress=False, workers=2,
                           threads_per_worker=1)
    assert part["n_settings"] == 2
    assert json.loads((out / "summary.json").read_text())["complete"] is False
    summary = bench.run_bench("small", out, permutations=50, progress=False)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["setting"]["name"] for r in rows) == sorted(s.name for s in bench.grid_settings("small"))
    assert rows[-1]["setting"]["name"] == bench.grid_settings("small")[-1].name
    assert summary["n_settings"] == 3 and summary["n_null"] == 1 and summary["n_two"] == 1
    for r in rows:
        for f in r["features"].values():
            assert 0.0 <= f["ravl"]["top"] <= 1.0
            assert set(f["baselines"]) == {"random", "domino", "george", "distill"}
        assert r["n_called"] <= r["n_kept"]
        assert r["n_unsupported"] <= r["n_called"] and (r["lead_rank"] is None or 1 <= r["lead_rank"] <= r["n_kept"])
        for f in r["features"].values():
            assert 0.0 <= f["ravl"]["lead"] <= 1.0
    saved = json.loads((out / "summary.json").read_text())
    assert saved["complete"] is True and saved["n_settings"] == 3
    assert "grid `small`" in (out / "summary.md").read_text()
    # resuming a finished grid recomputes nothing and gives the same table
    again = bench.run_bench("small", out, permutations=50, progress=False)
    assert again == summary


def test_run_bench_rejects_zero_workers_and_an_empty_selection(tmp_path):
    with pytest.raises(ValueError, match="workers"):
        bench.run_bench("small", tmp_path / "b", workers=0, progress=False)
    with pytest.raises(ValueError, match="no setting of grid 'small' has 'purple'"):
        bench.run_bench("small", tmp_path / "b", match="purple", progress=False)


def test_significance_calibration_is_fast_and_calibrated():
    out = bench.significance_calibration(n_tests=200, permutations=100, seed=0)
    assert out["p_le_0.05"] <= 0.1 and 0.35 <= out["p_le_0.5"] <= 0.65
    assert out["speedup"] > 1.0
