"""The mitigation benchmark and its diagnostics (experiments/mitigation.py,
experiments/diagnostics.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ravl_pipeline.cli import main as cli_main
from ravl_pipeline.config import InputError, MitigationConfig, TrainConfig
from ravl_pipeline.core.embed import preprocess_images
from ravl_pipeline.experiments import mitigation
from ravl_pipeline.experiments.diagnostics import LossTrace, assignment_quality, parameter_block
from ravl_pipeline.experiments.recipe import DEFAULT_RECIPE, SCENES_RECIPE
from ravl_pipeline.experiments.synth import SynthConfig, make_setting
from ravl_pipeline.io.dataset import induced_pairs, load_dataset
from ravl_pipeline.mitigate.assign import RegionAssignment
from ravl_pipeline.mitigate.data import TrainData
from ravl_pipeline.mitigate.methods import METHODS, Method
from ravl_pipeline.mitigate.train import finetune, total_steps
from ravl_pipeline.models import load_model


# --------------------------------------------------------------------------- assignment quality

@pytest.fixture(scope="module")
def tiny_finetune_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("assign") / "setting"
    make_setting(root, SynthConfig(classes=["one", "nine"], n_pretrain=4, n_finetune=20, n_val=4, n_test=4,
                                   strength=0.9, seed=2))
    return load_dataset(root / "finetune")


def test_assignment_quality_by_hand(tiny_finetune_set):
    """Flags: every red square but the first, plus the class object of one
    "nine" image; precision and recall per region and per image follow."""
    ds = tiny_finetune_set
    flat = [(i, j, lab) for i, labs in enumerate(ds.region_labels) for j, lab in enumerate(labs)]
    truth = np.array([lab == "red square" for _, _, lab in flat])
    n_true = int(truth.sum())
    assert n_true >= 3
    flagged = truth.copy()
    flagged[np.flatnonzero(truth)[0]] = False
    nine_object = next(k for k, (i, _, lab) in enumerate(flat) if lab == "nine" and ds.labels[i] == "nine")
    flagged[nine_object] = True
    a = RegionAssignment(list(ds.image_ids), np.array([i for i, _, _ in flat]), np.array([j for _, j, _ in flat]),
                         np.zeros((len(flat), 4), np.float32), np.zeros(len(flat), np.int64), flagged)
    q = assignment_quality(a, ds, ["red square"], "quadrants", ["nine"])
    assert q["regions"]["true"] == n_true and q["regions"]["flagged"] == n_true
    assert q["regions"]["precision"] == pytest.approx((n_true - 1) / n_true)
    assert q["regions"]["recall"] == pytest.approx((n_true - 1) / n_true)
    assert q["flagged_labels"] == {"red square": n_true - 1, "nine": 1}
    assert q["missed_labels"] == {"red square": 1}
    n_nine = sum(y == "nine" for y in ds.labels)
    assert q["correlated_class_objects"]["nine"]["own_object_flagged"] == pytest.approx(1 / n_nine)
    img_truth = np.array(["red square" in labs for labs in ds.region_labels])
    assert q["images"]["true"] == int(img_truth.sum())


def test_parameter_blocks():
    lm = load_model("ravl-tiny-rn", seed=0)
    blocks = {parameter_block(n) for n, _ in lm.model.named_parameters()}
    assert blocks == {"stem", "layer1", "layer2", "layer3", "layer4", "attnpool", "text", "logit_scale"}


# --------------------------------------------------------------------------- the loss trace

def _probe_data(lm, n=6):
    torch.manual_seed(1)
    pixels = torch.randn(n, 3, lm.image_size, lm.image_size)
    labels = torch.tensor([k % 2 for k in range(n)])
    tokens = lm.tokenizer([f"a {'one' if k else 'two'}" for k in labels.tolist()])
    data = TrainData(pixels, tokens, labels, ["two", "one"])
    return data, lm.tokenizer(["a two", "a one"])


def test_trace_of_a_probe_descent_term_is_its_squared_gradient(monkeypatch):
    """A method whose loss is minus the probe's own objective: a descent step
    on it raises the probe by ``|∇|²`` to first order, so the trace's effect
    must be positive and equal the squared gradient norm (a ViT: no
    BatchNorm, so training and evaluation modes compute the same thing)."""
    lm = load_model("ravl-tiny-vit", seed=0)
    data, class_tokens = _probe_data(lm)
    probe = {"all": (data.pixels, data.labels)}
    trace = LossTrace(probe, class_tokens, every=1)

    def minus_probe(model, batch, data_, cfg, state):
        objective, _ = trace._probe(model, data.pixels, data.labels)
        state["terms"] = {"minus_probe": -objective}
        return -objective

    monkeypatch.setitem(METHODS, "probe", Method("probe", minus_probe))
    grads = {}

    def check(step, model, batch, state, loss):
        params = [p for p in model.parameters() if p.requires_grad]
        g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads[step] = sum(float(x.pow(2).sum()) for x in g if x is not None)
        trace(step, model, batch, state, loss)

    finetune(lm, data, TrainConfig(method="probe", max_steps=2, batch_size=6), progress=False, inspect=check)
    assert [r["step"] for r in trace.rows] == [0, 1]
    for r in trace.rows:
        effect = r["probes"]["all"]["effect"]["minus_probe"]
        assert effect["all"] == pytest.approx(grads[r["step"]], rel=1e-4)
        assert effect["all"] == pytest.approx(effect["visual"] + effect.get("text", 0) + effect.get("logit_scale", 0))
        assert r["terms"]["minus_probe"]["grad_norm"]["visual"] > 0


def test_the_trace_does_not_change_training(tiny_finetune_set):
    """Same losses and weights with and without the hook (RaVL on a ResNet,
    whose BatchNorm statistics the probes' evaluation pass must not touch)."""
    from ravl_pipeline.mitigate.methods import attach_class_tokens, attach_region_extras
    from ravl_pipeline.mitigate.data import build_train_data

    ds = tiny_finetune_set
    flat = np.array([lab == "red square" for labs in ds.region_labels for lab in labs])
    n = len(ds)
    a = RegionAssignment(list(ds.image_ids), np.repeat(np.arange(n), 4), np.tile(np.arange(4), n),
                         np.tile(np.array(ds.boxes[0], np.float32), (n, 1)), np.zeros(4 * n, np.int64), flat)
    runs = []
    for traced in (False, True):
        lm = load_model("ravl-tiny-rn", seed=0)
        data = build_train_data(lm, ds, "a {}", classes=["one", "nine"])
        attach_class_tokens(data, lm, "a {}")
        attach_region_extras(data, lm, ds, a, cluster_class={0: 1})  # the red square's cluster ↔ "nine"
        hook = LossTrace({"x": (preprocess_images(lm, ds, range(4)), data.labels[:4])}, data.extras["class_tokens"],
                         every=1) \
            if traced else None
        hist = finetune(lm, data, TrainConfig(method="ravl", max_steps=2, batch_size=10), progress=False,
                        inspect=hook)
        runs.append((hist["losses"], {k: v.clone() for k, v in lm.model.state_dict().items()}, hook))
    (l0, w0, _), (l1, w1, hook) = runs
    assert l0 == l1
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert set(hook.rows[0]["terms"]) == {"clip", "L_R", "L_A"}
    assert sum(t["value"] for t in hook.rows[0]["terms"].values()) == pytest.approx(l0[0], rel=1e-5)


# --------------------------------------------------------------------------- tables

def _rows():
    rows = []
    for seed, (ravl, up) in enumerate([(0.5, 0.3), (0.4, 0.4), (0.6, 0.3)]):
        for run, wg in (("ravl", ravl), ("upsampled", up)):
            rows.append({"run": run, "seed": seed, "metrics": {"image_overall": 0.7, "image_worst_group": wg,
                                                              "region_overall": 0.5, "region_worst_group": None},
                         "groups": [{"n": 100}, {"n": 120}]})
    rows.append({"run": "ravl[features=rank1]", "seed": 0, "skipped": "nothing called"})
    return rows


def test_summarise_pairs_by_seed():
    s = mitigation.summarise(_rows())
    up = s["runs"]["upsampled"]
    assert up["n"] == 3 and up["image_worst_group"]["mean"] == pytest.approx(1 / 3)
    d = up["image_worst_group"]["ravl_minus"]
    # differences +0.2, 0.0, +0.3: mean 1/6, exact bootstrap interval over the 27 resamples
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.5 / 3) and d["exact"]
    assert d["ci"] == pytest.approx([0.0, 0.3]) and d["wins"] == 2 and d["ties"] == 1
    assert up["region_worst_group"]["mean"] is None
    assert "ravl_minus" not in s["runs"]["ravl"]["image_overall"]
    assert s["group_sizes"] == [100, 120]
    assert s["skipped"] == [{"run": "ravl[features=rank1]", "seed": 0, "why": "nothing called"}]
    md = mitigation.summary_markdown(s, "default")
    assert "| upsampled | 3 | +0.0 [+0.0, +0.0] | +16.7 [+0.0, +30.0] |" in md
    assert "test group sizes [100, 120]" in md


def test_summarise_pairs_baselines_with_ravl_at_the_same_budget():
    rows = _rows()
    for seed, (ravl, std) in enumerate([(0.6, 0.2), (0.5, 0.5), (0.9, 0.4)]):
        for run, wg in (("ravl[epochs=16.0]", ravl), ("standard[epochs=16.0]", std), ("standard", 0.0)):
            rows.append({"run": run, "seed": seed, "metrics": {"image_overall": 0.7, "image_worst_group": wg,
                                                              "region_overall": 0.5, "region_worst_group": None}})
    s = mitigation.summarise(rows)
    std = s["runs"]["standard[epochs=16.0]"]
    assert std["counterpart"] == "ravl[epochs=16.0]"
    d = std["image_worst_group"]["counterpart_minus"]
    # differences +0.4, 0.0, +0.5: mean 0.3, the default RaVL (0.5, 0.4, 0.6) is not the partner
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.3) and d["ci"] == pytest.approx([0.0, 0.5])
    assert std["image_worst_group"]["ravl_minus"]["mean"] == pytest.approx(0.4 / 3)  # 0.3, −0.1, 0.2
    # an unchanged baseline and RaVL runs have no counterpart; the upsampled run is RaVL's ablation
    assert "counterpart" not in s["runs"]["standard"] and "counterpart" not in s["runs"]["ravl[epochs=16.0]"]
    assert mitigation.Run.from_key("upsampled[batch=32]").counterpart == mitigation.Run("ravl", batch_size=32)
    md = mitigation.summary_markdown(s, "default")
    assert "| standard[epochs=16.0] | ravl[epochs=16.0] | 3 | +0.0 [+0.0, +0.0] | +30.0 [+0.0, +50.0] |" in md


def test_run_keys_and_plans():
    assert mitigation.Run("ravl").key == "ravl"
    assert mitigation.Run("ravl", lam=0.5, batch_size=32).key == "ravl[lam=0.5,batch=32]"
    for plan in mitigation.PLANS.values():
        assert len({r.key for r in plan}) == len(plan)
    keys = [r.key for p in mitigation.PLANS.values() for r in p]
    assert {r.method for r in mitigation.PLANS["main"]} == {"standard", "upsampled", "vl-erm", "vl-gdro",
                                                             "spurious-aware", "ravl"}
    assert {r.lam for r in mitigation.PLANS["lambda"]} == {0.5, 0.7, 0.9}
    assert {r.batch_size for r in mitigation.PLANS["batch"]} == {32, 256}
    # the larger budget trains every method of main once, and includes the steps plan's pair
    steps_main = mitigation.PLANS["steps-main"]
    assert {r.method for r in steps_main} == {r.method for r in mitigation.PLANS["main"]}
    assert {r.epochs for r in steps_main} == {16.0} and set(mitigation.PLANS["steps"]) <= set(steps_main)
    for key in keys:
        assert mitigation.Run.from_key(key).key == key
    run = mitigation.Run.from_key("ravl[lam=0.5,batch=32,features=all,loss=correlated]")
    assert run == mitigation.Run("ravl", lam=0.5, batch_size=32, features="all", region_loss="correlated")
    assert run.ablation == mitigation.Run("upsampled", batch_size=32, features="all")
    assert mitigation.Run("vl-gdro").ablation is None
    capped = mitigation.Run.from_key("ravl[features=oracle,repeat=8]")
    assert capped.max_repeat == 8 and capped.train_overrides() == {"max_repeat": 8}
    assert capped.ablation == mitigation.Run("upsampled", features="oracle", max_repeat=8)
    reordered = mitigation.Run.from_key("ravl[order=101]")
    assert reordered.train_overrides() == {"seed": 101}
    assert reordered.ablation == mitigation.Run("upsampled", order_seed=101)
    floored = mitigation.Run.from_key("ravl[min_steps=256]")
    assert floored.train_overrides() == {"min_steps": 256} and floored.key == "ravl[min_steps=256]"
    assert floored.ablation == mitigation.Run("upsampled", min_steps=256)
    longer = mitigation.Run.from_key("ravl[epochs=16.0]")
    assert longer.train_overrides() == {"epochs": 16.0} and longer.key == "ravl[epochs=16.0]"
    assert longer.ablation == mitigation.Run("upsampled", epochs=16.0)


def test_select_runs_keeps_the_named_methods_in_plan_order():
    every = mitigation.select_runs(["ablation", "steps-main"])
    assert every == list(dict.fromkeys(mitigation.PLANS["ablation"] + mitigation.PLANS["steps-main"]))
    two = mitigation.select_runs(["ablation", "steps-main"], ["vl-gdro", "ravl"])
    assert [r.key for r in two] == ["ravl", "ravl[loss=spec]", "vl-gdro[epochs=16.0]", "ravl[epochs=16.0]"]
    # the baseline kept is paired with RaVL trained the same way (its counterpart), which is kept too
    assert two[2].counterpart == two[3]
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['gdro'\]"):
        mitigation.select_runs(["main"], ["gdro"])
    with pytest.raises(InputError, match="--plans lambda has no run of --methods vl-gdro"):
        mitigation.select_runs(["lambda"], ["vl-gdro"])
    with pytest.raises(ValueError, match="unknown plan"):
        mitigation.select_runs(["nope"])


def test_cli_refuses_methods_no_plan_runs_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_main(["bench", "mitigation", "--plans", "lambda", "--methods", "vl-gdro", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "ravl bench: error: --plans lambda has no run of --methods vl-gdro"
    assert not out.exists()  # refused before anything is written


@pytest.mark.parametrize("plan", sorted(mitigation.PLANS))
@pytest.mark.parametrize("recipe", [DEFAULT_RECIPE, SCENES_RECIPE], ids=["default", "scenes"])
def test_every_plan_trains_its_own_budget_not_the_pipeline_floor(plan, recipe):
    # SPEC §3.4: every method of a plan at the same budget, the recipe's 4 epochs of 2,000 images at batch
    # 128 (64 steps) unless the run changes it; Stage 2's default floor (mitigation.min_steps) stays out
    n = recipe.synth.n_finetune
    assert n == 2000
    expected = {None: {None: 64, 32: 252, 256: 32}, mitigation.STEPS_EPOCHS: {None: 256}}
    for run in mitigation.PLANS[plan]:
        cfg = run.train_config(recipe.finetune, seed=3)
        assert (cfg.method, cfg.seed, cfg.min_steps) == (run.method, run.order_seed or 3, run.min_steps)
        want = 256 if run.min_steps == MitigationConfig.min_steps else expected[run.epochs][run.batch_size]
        assert total_steps(n, cfg) == want, run.key
    # the floor on half the images: 4 epochs are 32 steps, the floor 256 (32 epochs)
    half = mitigation.Run("ravl", min_steps=MitigationConfig.min_steps).train_config(recipe.finetune, seed=0)
    assert total_steps(1000, half) == 256 and total_steps(1000, recipe.finetune) == 32


def test_each_ravl_run_is_paired_with_its_ablation():
    rows = [{"run": run, "seed": seed, "metrics": {"image_overall": v, "image_worst_group": v,
                                                   "region_overall": v, "region_worst_group": v}}
            for seed in (0, 1) for run, v in (("ravl[batch=32]", 0.5 + seed / 10), ("upsampled[batch=32]", 0.4),
                                              ("upsampled", 0.9))]
    s = mitigation.summarise(rows)
    e = s["runs"]["ravl[batch=32]"]
    assert e["ablation"] == "upsampled[batch=32]"
    assert e["image_worst_group"]["minus_ablation"]["mean"] == pytest.approx(0.15)  # +0.1 and +0.2
    assert e["image_worst_group"]["minus_ablation"]["ci"] == pytest.approx([0.1, 0.2])
    assert "ablation" not in s["runs"]["upsampled"]
    assert "| ravl[batch=32] | upsampled[batch=32] | 2 | +15.0 [+10.0, +20.0]" in mitigation.summary_markdown(s, "x")


def test_each_setting_names_the_regions_stage1_and_stage2_use(tmp_path, monkeypatch):
    """Scenes carry COCO boxes: discovery there must run on the boxes, not on quadrants."""
    monkeypatch.setattr(mitigation, "build_audited_model",
                        lambda root, recipe: {k: tmp_path / k for k in ("setting", "pretrained", "audited")})
    monkeypatch.setattr(mitigation, "induced_pairs", lambda eval_dir: [("red square", "nine")])
    assert mitigation.SETTINGS["scenes"](tmp_path, 0).proposer == "boxes"  # every setting's: below
    seen = {}

    class Stop(Exception):
        pass

    def stage1(model, ds, classes, *, regions, **kwargs):
        seen["proposer"] = regions.proposer
        raise Stop

    monkeypatch.setattr(mitigation, "load_dataset", lambda *a, **k: type("DS", (), {"classes": lambda self: []})())
    monkeypatch.setattr(mitigation, "load_model", lambda spec: None)
    monkeypatch.setattr(mitigation.stages, "templates_for", lambda d: ["{}"])
    monkeypatch.setattr(mitigation.stages, "stage1", stage1)
    with pytest.raises(Stop):
        mitigation.discover(mitigation.SETTINGS["scenes"](tmp_path, 0), 0, tmp_path)
    assert seen["proposer"] == "boxes"


# what each built-in setting promises in its name: (fine-tuning images, base model, regions)
SETTING_RECIPES = {"default": (2000, "ravl-tiny-rn", "quadrants"),
                   "default-clip": (2000, "ravl-tiny-rn-clip", "quadrants"),
                   "default-1k": (1000, "ravl-tiny-rn", "quadrants"),
                   "default-1k-clip": (1000, "ravl-tiny-rn-clip", "quadrants"),
                   "default-500": (500, "ravl-tiny-rn", "quadrants"),
                   "default-500-clip": (500, "ravl-tiny-rn-clip", "quadrants"),
                   "default-250": (250, "ravl-tiny-rn", "quadrants"),
                   "default-250-clip": (250, "ravl-tiny-rn-clip", "quadrants"),
                   "scenes": (2000, "ravl-tiny-rn", "boxes")}


@pytest.mark.parametrize("name", sorted(mitigation.SETTINGS))
def test_every_setting_builds_its_recipe_with_the_seed(name, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(mitigation, "build_audited_model", lambda root, recipe: built.append(recipe) or
                        {k: tmp_path / k for k in ("setting", "pretrained", "audited")})
    monkeypatch.setattr(mitigation, "induced_pairs", lambda eval_dir: [("red square", "nine")])
    setting = mitigation.SETTINGS[name](tmp_path, 7)
    (recipe,) = built
    assert recipe.synth.seed == recipe.finetune.seed == 7 and setting.finetune == recipe.finetune
    assert setting.finetune.min_steps is None  # the protocol's budget, not the pipeline's floor
    assert (recipe.synth.n_finetune, recipe.base_model, setting.proposer) == SETTING_RECIPES[name]


def test_feature_gaps_and_reliance_by_hand():
    def group(label, present, acc):
        return {"label": label, "feature_present": present, "n": 100, "image_acc": acc}

    groups = [group("nine", True, 0.9), group("nine", False, 0.3), group("one", True, 0.2),
              group("one", False, 0.8), group("two", True, 0.7), group("two", False, 0.7)]
    gaps = mitigation.feature_gaps(groups, "nine")
    assert gaps["correlated_gap"] == pytest.approx(0.6) and gaps["other_mean_gap"] == pytest.approx(-0.3)
    assert mitigation.feature_gaps(groups[2:], "nine") is None  # the correlated class missing
    validity = {"run": "validity", "method": "validity", "seed": 0,
                "validity": {"red square": {"valid": True, "correlated_class": "nine"}}}
    rows = [validity, {**validity, "seed": 1}, {"run": "ravl", "seed": 0, "groups": groups},
            {"run": "ravl", "seed": 1, "groups": [group("nine", True, 0.5), group("nine", False, 0.5),
                                                  group("one", True, 0.4), group("one", False, 0.5)]}]
    r = mitigation.reliance(rows)["ravl"]
    assert r["n"] == 2 and r["correlated_gap"] == pytest.approx(0.3) and r["other_mean_gap"] == pytest.approx(-0.2)


def test_invalid_seeds_are_named_and_left_out_of_a_second_table(tmp_path):
    def metrics(v):
        return {"image_overall": v, "image_worst_group": v, "region_overall": v, "region_worst_group": v}

    def valid(ok):
        return {"red square": {"valid": ok, "correlated_class": "nine", "correlated_gap": 0.5 if ok else 0.01,
                               "other_mean_gap": -0.4}}

    rows = [{"run": "validity", "method": "validity", "seed": s, "validity": valid(s != 2)} for s in (0, 1, 2)]
    rows += [{"run": run, "seed": s, "metrics": metrics(v + s / 100)} for s in (0, 1, 2)
             for run, v in (("ravl", 0.6), ("upsampled", 0.5))]
    assert mitigation.valid_seeds(rows) == [0, 1]
    assert mitigation.valid_seeds(rows[3:]) is None
    summary = mitigation.write_summary(tmp_path, "x", rows)
    assert summary["runs"]["upsampled"]["n"] == 3
    assert summary["valid_seeds_only"]["runs"]["upsampled"]["n"] == 2
    assert summary["valid_seeds_only"]["runs"]["upsampled"]["image_overall"]["mean"] == pytest.approx(0.505)
    md = (tmp_path / "summary.md").read_text()
    assert "- seed 2: red square ↔ nine **not valid** (+0.01 / -0.40)" in md
    assert md.count("## Valid seeds only") == 1
    # every seed valid: one table
    mitigation.write_summary(tmp_path, "x", [r for r in rows if r["seed"] != 2])
    assert "Valid seeds only" not in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_bench_runs_and_resumes(tiny_setting, tmp_path, monkeypatch, capsys):
    """One seed of a tiny setting: Stage 1, the audited model, assignment
    quality and two runs, each a results line; a second call trains nothing."""
    eval_dir = tiny_setting["setting"] / "eval"

    def build(root, seed):
        return mitigation.BuiltSetting(f"local-dir:{tiny_setting['pretrained']}",
                                       f"local-dir:{tiny_setting['audited']}", tiny_setting["setting"] / "finetune",
                                       eval_dir, TrainConfig(max_steps=2, batch_size=32,
                                                             caption_template="the number is a {}"),
                                       induced_pairs(eval_dir))

    monkeypatch.setitem(mitigation.SETTINGS, "tiny", build)
    monkeypatch.setitem(mitigation.PLANS, "tiny", [mitigation.Run("upsampled"), mitigation.Run("ravl")])
    summary = mitigation.run_mitigation_bench("tiny", [0], ["tiny"], tmp_path, trace_seeds=[0], progress=False)
    lines = [json.loads(x) for x in (tmp_path / "tiny" / "results.jsonl").read_text().splitlines()]
    assert [r["run"] for r in lines] == ["audited", "validity", "assignment[called]", "upsampled", "ravl"]
    assert all(r["steps"] == 2 for r in lines[3:])
    (feature, cls), = induced_pairs(eval_dir)
    assert set(lines[1]["validity"]) == {feature} and lines[1]["validity"][feature]["correlated_class"] == cls
    assert isinstance(lines[1]["validity"][feature]["valid"], bool)
    assert lines[2]["quality"]["regions"]["precision"] is not None
    assert "trace" in lines[4] and (tmp_path / "tiny" / "seed0" / "trace-ravl.json").is_file()
    assert not (tmp_path / "tiny" / "seed0" / "models" / "ravl").exists()  # deleted once evaluated
    assert summary["runs"]["upsampled"]["image_overall"]["ravl_minus"]["n"] == 1
    assert "| upsampled | 1 |" in (tmp_path / "tiny" / "summary.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("resumed run trained again")

    monkeypatch.setattr(mitigation.stages, "train", no_training)
    again = mitigation.run_mitigation_bench("tiny", [0], ["tiny"], tmp_path, progress=False)
    assert again == summary
    with pytest.raises(ValueError, match="unknown setting 'nope'"):
        mitigation.run_mitigation_bench("nope", [0], ["main"], tmp_path)


def test_oracle_assignment_is_the_ground_truth(tiny_finetune_set):
    from ravl_pipeline.core.findings import Findings
    from ravl_pipeline.mitigate.assign import select_features

    ds = tiny_finetune_set
    built = mitigation.BuiltSetting("p", "a", ds.root, ds.root, TrainConfig(), [("red square", "nine")])
    findings = Findings(model="a", dataset="d", classes=["one", "nine"], k=3, silhouette=None, features=[],
                        proposer="quadrants")
    oracle_findings, a = mitigation.oracle(built, findings)
    truth = np.array([lab == "red square" for labs in ds.region_labels for lab in labs])
    assert a.spurious.tolist() == truth.tolist() and a.cluster[truth].tolist() == [0] * int(truth.sum())
    assert a.image_ids == list(ds.image_ids) and len(a.boxes) == 4 * len(ds)
    chosen = select_features(oracle_findings, "all")
    assert [(f.cluster_id, f.attribute) for f in chosen] == [(0, "nine")]
