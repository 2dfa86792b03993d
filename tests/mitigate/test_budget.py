"""Stage 2's step budget: epochs, the ``min_steps`` floor and ``max_steps``,
and where the pipeline's Stage 2 takes them from."""

from __future__ import annotations

import dataclasses

import pytest

from ravl_pipeline.config import MitigationConfig, Params, TrainConfig, load_params
from ravl_pipeline.mitigate.train import iter_batches, set_seed, total_steps
from ravl_pipeline.pipeline.audit import Audit, ModelRecord


@pytest.mark.parametrize("n, kw, steps", [
    (2000, {}, 64),  # the built-in setting: 4 epochs of ceil(2000 / 128) = 16 steps
    (2000, {"min_steps": 256}, 256),  # raised to the floor: 16 epochs' worth
    (2000, {"min_steps": 10}, 64),  # a floor below the epochs' steps changes nothing
    (2000, {"min_steps": 256, "max_steps": 5}, 5),  # max_steps wins
    (100_000, {"min_steps": 256}, 3128),  # a large set: 4 * ceil(100000 / 128), the floor is a no-op
    (100, {"epochs": 0.5, "batch_size": 32}, 2),  # round(0.5 * ceil(100 / 32))
    (100, {"epochs": 0.5, "batch_size": 32, "min_steps": 3}, 3),
])
def test_total_steps_hand_computed(n, kw, steps):
    assert total_steps(n, TrainConfig(**({"epochs": 4.0, "batch_size": 128} | kw))) == steps


def test_the_floor_trains_exactly_the_batches_of_the_epochs_it_implies():
    # 40 images at batch 8 are 5 steps an epoch: a floor of 20 steps on 1 epoch
    # must be the run of 4 epochs, batch for batch (same orders, same schedule)
    def batches(cfg):
        return [idx.tolist() for _, idx in iter_batches(40, cfg, set_seed(cfg.seed), None)]

    floored = batches(TrainConfig(epochs=1.0, batch_size=8, min_steps=20, seed=5))
    assert len(floored) == 20
    assert floored == batches(TrainConfig(epochs=4.0, batch_size=8, seed=5))
    assert floored != batches(TrainConfig(epochs=4.0, batch_size=8, seed=6))


def _audit(tmp_path, params: Params, recorded: TrainConfig | dict) -> Audit:
    record = tmp_path / "audited_model.json"
    train = recorded.to_dict() if isinstance(recorded, TrainConfig) else recorded
    ModelRecord(model="ravl-tiny-rn", train=train).write(record)
    return Audit(name="set", dataset_dir=tmp_path / "set", out=tmp_path / "out", params=params, record_path=record,
                 progress=False)


def test_pipeline_stage2_inherits_the_audited_budget_and_adds_the_floor(tmp_path):
    recorded = TrainConfig(epochs=4.0, batch_size=128, lr=1e-3, seed=7)
    cfg = _audit(tmp_path, Params(), recorded).stage2_config
    assert (cfg.method, cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed) == ("ravl", 4.0, 128, 1e-3, 7)
    assert cfg.min_steps == MitigationConfig().min_steps == 256
    assert total_steps(2000, cfg) == 256 and total_steps(10_000, cfg) == 316


def test_a_null_floor_inherits_the_audited_models(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("mitigation:\n  min_steps: null\n  epochs: 2\n")
    params = load_params(path)
    cfg = _audit(tmp_path, params, TrainConfig()).stage2_config
    assert cfg.min_steps is None and total_steps(2000, cfg) == 32
    inherited = _audit(tmp_path, params, TrainConfig(min_steps=100)).stage2_config
    assert inherited.min_steps == 100 and inherited.epochs == 2.0


def test_a_record_from_before_the_floor_trains_its_epochs_with_a_null_floor(tmp_path):
    # checkpoints written before min_steps existed record no such key: with
    # min_steps null Stage 2 is the audited model's own 4 epochs, 64 steps
    old = {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k != "min_steps"}
    path = tmp_path / "params.yaml"
    path.write_text("mitigation:\n  min_steps: null\n")
    cfg = _audit(tmp_path, load_params(path), old).stage2_config
    assert cfg.min_steps is None and total_steps(2000, cfg) == 64
