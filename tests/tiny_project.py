"""A project folder in which `ravl materialize` and the DVC stages run in
seconds: a few dozen synthetic images and untrained tiny models.

The models stand in for the recipe's: ``build_audited_model`` reuses a
``default_setting`` whose ``recipe.json`` matches the recipe, so the
pipeline runs its real code path without minutes of training. Shared by the
DVC and crash-safety tests (they test plumbing, not the method).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from ravl_pipeline.config import TrainConfig
from ravl_pipeline.experiments.recipe import BASE_MODEL, DEFAULT_RECIPE, recipe_stamp
from ravl_pipeline.experiments.synth import SynthConfig, make_setting
from ravl_pipeline.models import load_model, save_model

REPO = Path(__file__).resolve().parents[1]
DVC = REPO / ".venv-dvc" / "bin" / "dvc"
RAVL = REPO / ".venv" / "bin" / "ravl"


def make_tiny_project(root: Path, n_val: int = 40, n_test: int = 24, validation_set: str | None = None) -> dict:
    """Write ``root/params.yaml`` and ``root/data/default_setting``; with
    ``validation_set``, also copy the eval set to
    ``data/validation_sets/<validation_set>``. Returns the environment to
    run ``ravl`` in (data dir, params file and Dagster home inside ``root``)."""
    root.mkdir(parents=True, exist_ok=True)
    default = root / "data" / "default_setting"
    make_setting(default / "setting", SynthConfig(n_pretrain=10, n_finetune=40, n_val=n_val, n_test=n_test, seed=0))
    save_model(load_model(BASE_MODEL, seed=0), default / "models" / "pretrained")
    train = TrainConfig(batch_size=16, max_steps=2).to_dict()
    save_model(load_model(BASE_MODEL, seed=1), default / "models" / "audited",
               {"train": train, "pretrained_from": str(default / "models" / "pretrained")})
    recipe = DEFAULT_RECIPE.small()
    (default / "recipe.json").write_text(recipe_stamp(recipe))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["audited_model"].update(source="synthetic-default", recipe="small")
    params["mitigation"].update(max_steps=2, batch_size=16)
    params["evaluation"]["max_accuracy_drop"] = 1.0  # untrained models: the check is not under test
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if validation_set:
        target = root / "data" / "validation_sets" / validation_set
        shutil.copytree(default / "setting" / "eval", target)
        shutil.copy2(default / "setting" / "setting.json", target / "setting.json")
    return dict(os.environ, RAVL_DATA_DIR=str(root / "data"), RAVL_PARAMS=str(root / "params.yaml"),
                DAGSTER_HOME=str(root / "dagster_home"), TQDM_DISABLE="1", OMP_NUM_THREADS="1",
                DVC_NO_ANALYTICS="1")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every visible file under ``folder`` (hidden names are temporaries of
    atomic writes) with its bytes."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[str(rel)] = path.read_bytes()
    return out
