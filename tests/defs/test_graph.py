"""The Dagster asset graph: materialization, partitions, staleness, checks,
sensor and schedule, on the tiny audited model and small validation sets."""
import datetime
import json
import re
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from PIL import Image

from ravl_pipeline.cli import dagster_runs as runner
from ravl_pipeline.core.findings import read_findings
from ravl_pipeline.definitions import build_definitions
from ravl_pipeline.defs.jobs import AUDIT_JOB, REAUDIT_JOB
from ravl_pipeline.defs.resources import RavlProject
from ravl_pipeline.defs.schedules import weekly_reaudit
from ravl_pipeline.defs.sensors import new_validation_sets
from ravl_pipeline.io.hashing import dataset_fingerprint
from ravl_pipeline.io.manifest import read_manifest, write_manifest

N_VAL, N_TEST = 60, 40
ALL_ASSETS = {"audited_model", "region_proposals", "region_embeddings", "zero_shot_scores", "region_clusters",
              "spurious_features", "mitigated_model", "control_model", "mitigation_metrics", "mitigated_findings",
              "evaluation_report"}
DISCOVERY = ["region_proposals", "region_embeddings", "zero_shot_scores", "region_clusters", "spurious_features"]


def make_validation_set(eval_dir: Path, target: Path, offset: int) -> Path:
    """``N_VAL`` val and ``N_TEST`` test rows of the setting's eval set, from ``offset``."""
    table = read_manifest(eval_dir)
    val = np.flatnonzero(pc.equal(table.column("split"), "val").to_numpy(zero_copy_only=False))
    test = np.flatnonzero(pc.equal(table.column("split"), "test").to_numpy(zero_copy_only=False))
    rows = np.concatenate([val[offset:offset + N_VAL], test[offset:offset + N_TEST]])
    sub = table.take(pa.array(rows))
    (target / "images").mkdir(parents=True)
    for rel in sub.column("path").to_pylist():
        shutil.copy2(eval_dir / rel, target / rel)
    shutil.copy2(eval_dir.parent / "setting.json", target / "setting.json")
    write_manifest(target, sub)
    return target


def small_finetune_set(tiny: dict, target: Path, n: int = 96) -> Path:
    """The first ``n`` fine-tuning images: Stage 2 only has to run here, not to converge."""
    if not target.exists():
        src = tiny["setting"] / "finetune"
        sub = read_manifest(src).slice(0, n)
        (target / "images").mkdir(parents=True)
        for rel in sub.column("path").to_pylist():
            shutil.copy2(src / rel, target / rel)
        write_manifest(target, sub)
    return target


def write_params(path: Path, tiny: dict, **overrides) -> Path:
    params = {
        "audited_model": {"source": "checkpoint", "checkpoint": f"local-dir:{tiny['audited']}",
                          "init_model": f"local-dir:{tiny['pretrained']}",
                          "train_data": str(small_finetune_set(tiny, path.parent / "finetune-small"))},
        "discovery": {"top_regions": 20},
        # two optimiser steps: the pipeline is under test here, not the method
        "mitigation": {"max_steps": 2, "batch_size": 32},
        "evaluation": {"max_accuracy_drop": 1.0},
    }
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def pipeline(tiny_setting, tmp_path_factory):
    """Set A registered and the whole graph materialized once."""
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"
    eval_dir = tiny_setting["setting"] / "eval"
    make_validation_set(eval_dir, data / "validation_sets" / "set-a", offset=0)
    params = write_params(root / "params.yaml", tiny_setting)
    project = RavlProject(data_dir=str(data), params_path=str(params))
    defs = build_definitions(project)
    # a temporary on-disk instance: schedules and sensors need an instance reference
    with dg.instance_for_test() as instance:
        runner.register_validation_sets(defs, instance, ["set-a"])
        runs = runner.materialize(defs, instance, partitions=["set-a"])
        yield {"root": root, "data": data, "eval_dir": eval_dir, "params": params, "project": project,
               "defs": defs, "instance": instance, "runs": runs, "tiny": tiny_setting}


def _latest_metadata(instance, asset: str, partition: str | None = None) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset)) if partition is None else None
    if partition is not None:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records
        event = records[0].event_log_entry
    return event.asset_materialization.metadata


def check_closed_loop(out: Path, findings, record: dict) -> dict:
    """metrics.json, the control's record and the report of one set's closed loop."""
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["groups_from"] == "annotation"  # setting.json names the feature
    assert metrics["audited"]["n_images"] == N_TEST
    control = json.loads((out / "control_model.json").read_text())
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["before"]["n_features"] == len(findings.features)
    assert control["trained"] == record["trained"]
    if record["trained"]:  # the same-budget control beside the mitigated model, same steps
        assert control["method"] == "upsampled" and control["steps"] == record["steps"]
        assert metrics["steps"]["mitigated"] == metrics["steps"]["control"] == 2
        assert metrics["image_overall_change"] == pytest.approx(
            metrics["mitigated"]["image_overall"] - metrics["audited"]["image_overall"])
        for pair in ("mitigated-audited", "control-audited", "mitigated-control"):
            a, b = pair.split("-")
            for key in ("image_overall", "region_overall"):
                row = metrics["comparisons"][pair][key]
                assert row["diff"] == pytest.approx(metrics[a][key] - metrics[b][key])
                assert row["ci"][0] <= row["diff"] <= row["ci"][1]
        assert metrics["answer"][0].startswith("images with red square: class nine accuracy ")
        assert "(control " in metrics["answer"][0]
        after = read_findings(out / "findings_mitigated.json")
        assert after.model == record["model"]
        assert summary["after"]["n_features"] == len(after.features)
        page = (out / "report" / "report.html").read_text()
        assert "Did the fix work?" in page and "upsampled (control), 2 steps" in page
        assert "ravl, 2 steps" in page and "vs control" in page
    else:  # nothing trained: no control, no second evaluation of the same model, no re-audit
        assert metrics["mitigated"] is None and metrics["control"] is None and not metrics["comparisons"]
        assert not (out / "findings_mitigated.json").exists() and summary["after"] is None
        shown = list(json.loads((out / "report" / "report.json").read_text())["metrics"])
        assert [name.split(",")[0] for name in shown] == ["audited"]  # "audited, N steps": no other row
    return metrics


def test_full_graph_materializes_with_checks(pipeline):
    runs = pipeline["runs"]
    assert [r.partition for r in runs] == [None, "set-a"]
    assert all(r.success for r in runs), [r.lines() for r in runs]
    assert set(runs[0].materialized) | set(runs[1].materialized) == ALL_ASSETS
    checks = {name.split(":")[1]: passed for name, passed, _ in runs[1].checks}
    assert set(checks) == {"embeddings_finite_and_normalised", "findings_well_formed", "audited_model_validity",
                           "no_new_called_finding", "mitigated_accuracy_within_margin"}
    assert checks["no_new_called_finding"]  # a first audit has nothing to compare with
    assert checks["embeddings_finite_and_normalised"] and checks["findings_well_formed"]

    out = pipeline["data"] / "outputs" / "set-a"
    findings = read_findings(out / "findings.json")
    classes = findings.classes
    # quadrants: four regions per discovery image
    instance = pipeline["instance"]
    assert _latest_metadata(instance, "region_proposals", "set-a")["dagster/row_count"].value == 4 * N_VAL
    assert _latest_metadata(instance, "region_embeddings", "set-a")["dagster/row_count"].value == 4 * N_VAL
    clusters = _latest_metadata(instance, "region_clusters", "set-a")
    assert 2 * len(classes) <= clusters["k"].value < 5 * len(classes)
    assert clusters["k"].value == findings.k
    assert "data:image/png;base64," in _latest_metadata(instance, "spurious_features", "set-a")["top_regions"].value \
        or not findings.features
    assert findings.ground_truth["red square"]["correlated_class"] == "nine"
    # every feature carries its evidence (params discovery.evidence defaults to true)
    feats = findings.features
    written = json.loads((out / "findings.json").read_text())
    assert all({"p_value", "q_value", "called", "names"} <= set(f) for f in written["features"])
    assert all(f.causal is not None for f in feats[:5])
    assert all(f.support is not None for f in feats if f.called)  # every called one is checked
    assert all(f.called == (f.q_value <= 0.05) for f in feats)
    # Stage 2 trains on the called findings the masking check supports, and only when there is one
    usable = [f.rank for f in feats if f.called and f.support["supported"]]
    assert findings.lead_rank == (usable[0] if usable else None)
    assert "lead_rank" in written  # written even when null
    record = json.loads((out / "mitigated_model.json").read_text())
    assert record["trained"] == bool(usable)
    if record["trained"]:
        assert record["feature_ranks"] == usable
        assert record["steps"] == 2  # max_steps (params and the audited record) wins over the min_steps floor
    else:
        assert record["model"] == findings.model
        assert not feats or "significant" in record["reason"] or "masking check supports no" in record["reason"]

    check_closed_loop(out, findings, record)
    # nothing half-written is left beside the outputs
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_switching_the_control_off_makes_only_the_control_stale(pipeline):
    s = pipeline
    write_params(s["params"], s["tiny"], mitigation={"control": False})
    runner.observe_sources(s["defs"], s["instance"])
    try:
        assert _status(s, "control_model", "set-a") == StaleStatus.STALE
        # the mitigated model and everything before it stand: nothing is retrained for nothing
        for asset in (*DISCOVERY, "mitigated_model", "mitigated_findings"):
            assert _status(s, asset, "set-a") == StaleStatus.FRESH, asset
    finally:
        write_params(s["params"], s["tiny"])
        runner.observe_sources(s["defs"], s["instance"])
    assert _status(s, "control_model", "set-a") == StaleStatus.FRESH


@pytest.fixture(scope="module")
def two_sets(pipeline):
    """Set B dropped into the folder: the sensor registers it and requests its audit."""
    make_validation_set(pipeline["eval_dir"], pipeline["data"] / "validation_sets" / "set-b", offset=N_VAL)
    instance, defs = pipeline["instance"], pipeline["defs"]
    before = {r.storage_id for r in instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("spurious_features"), asset_partitions=["set-a"]),
        limit=10).records}
    context = dg.build_sensor_context(instance=instance, resources={"ravl": pipeline["project"]})
    result = new_validation_sets(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    runner.observe_sources(defs, instance)
    job = defs.resolve_job_def(AUDIT_JOB)
    runs = [job.execute_in_process(instance=instance, partition_key=r.partition_key,
                                   asset_selection=[dg.AssetKey(a) for a in DISCOVERY])
            for r in result.run_requests]
    return {**pipeline, "sensor_result": result, "set_b_runs": runs, "set_a_before": before}


def test_sensor_adds_new_set_and_only_its_partition_runs(two_sets):
    result = two_sets["sensor_result"]
    assert [r.partition_key for r in result.run_requests] == ["set-b"]
    assert [list(r.partition_keys) for r in result.dynamic_partitions_requests] == [["set-b"]]
    runs = two_sets["set_b_runs"]
    assert len(runs) == 1 and runs[0].success
    assert {e.partition for e in runs[0].get_asset_materialization_events()} == {"set-b"}
    instance = two_sets["instance"]
    after = {r.storage_id for r in instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("spurious_features"), asset_partitions=["set-a"]),
        limit=10).records}
    assert after == two_sets["set_a_before"]
    # a second tick sees nothing new
    again = new_validation_sets(dg.build_sensor_context(instance=instance,
                                                         resources={"ravl": two_sets["project"]}))
    assert not again.run_requests


def test_schedule_requests_a_reaudit_of_every_set(two_sets):
    tick = datetime.datetime(2026, 11, 30, 6, 0, tzinfo=datetime.timezone.utc)
    context = dg.build_schedule_context(instance=two_sets["instance"], scheduled_execution_time=tick,
                                        repository_def=two_sets["defs"].get_repository_def())
    requests = weekly_reaudit.evaluate_tick(context).run_requests
    assert sorted(r.partition_key for r in requests) == ["set-a", "set-b"]
    assert weekly_reaudit.job_name == REAUDIT_JOB
    assert len({r.run_key for r in requests}) == 2


def stale_status(defs: dg.Definitions, instance: dg.DagsterInstance, asset: str,
                 partition: str | None = None) -> StaleStatus:
    """FRESH / STALE / MISSING of one asset (partition), as the UI shows it
    (Dagster's own resolver; it has no public API)."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._time import get_current_datetime

    graph = defs.resolve_asset_graph()
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=graph)
    resolver = CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)
    return resolver.get_status(dg.AssetKey(asset), partition)


def _status(s, asset, partition):
    return stale_status(s["defs"], s["instance"], asset, partition)


def test_changed_set_and_changed_params_make_exactly_their_downstream_stale(two_sets):
    s = two_sets
    for part in ("set-a", "set-b"):
        assert _status(s, "spurious_features", part) == StaleStatus.FRESH
    # change one image of set B (content, not just a timestamp)
    set_b = s["data"] / "validation_sets" / "set-b"
    before = dataset_fingerprint(set_b)
    image_path = set_b / read_manifest(set_b).column("path")[0].as_py()
    pixels = np.asarray(Image.open(image_path).convert("RGB")).copy()
    Image.fromarray(255 - pixels).save(image_path)
    assert dataset_fingerprint(set_b) != before
    runner.observe_sources(s["defs"], s["instance"])
    # Dagster marks the direct dependents of the changed source stale ...
    assert _status(s, "region_proposals", "set-b") == StaleStatus.STALE
    for asset in ("region_proposals", "mitigated_findings"):
        assert _status(s, asset, "set-a") == StaleStatus.FRESH
    assert _status(s, "region_embeddings", "set-b") == StaleStatus.FRESH
    # ... and, once they are re-materialized with a new data version, theirs
    runs = runner.materialize(s["defs"], s["instance"], partitions=["set-b"], select=["region_proposals"])
    assert runs[0].success and runs[0].materialized == ["region_proposals"]
    assert _status(s, "region_proposals", "set-b") == StaleStatus.FRESH
    assert _status(s, "region_embeddings", "set-b") == StaleStatus.STALE
    assert _status(s, "region_embeddings", "set-a") == StaleStatus.FRESH

    # a discovery parameter: clustering and findings go stale, embeddings do not
    write_params(s["params"], s["tiny"], discovery={"top_regions": 20, "seed": 1})
    runner.observe_sources(s["defs"], s["instance"])
    for asset in ("region_clusters", "spurious_features", "mitigated_findings"):
        assert _status(s, asset, "set-a") == StaleStatus.STALE
    for asset in ("region_proposals", "region_embeddings", "zero_shot_scores", "mitigation_metrics"):
        assert _status(s, asset, "set-a") == StaleStatus.FRESH


def test_no_called_finding_keeps_the_audited_model(two_sets):
    s = two_sets
    # 50 permutations can never reach q <= 1e-6: every feature is kept but none is called
    write_params(s["params"], s["tiny"], discovery={"top_regions": 20, "permutations": 50, "alpha": 1e-6})
    out = s["data"] / "outputs" / "set-a"
    before = (out / "findings.json").read_bytes()
    runs = runner.materialize(s["defs"], s["instance"], partitions=["set-a"],
                              select=["spurious_features", "mitigated_model"])
    assert runs[0].success, runs[0].lines()
    # the re-audit keeps the findings it replaced and says what changed against them
    assert (out / "previous" / "findings.json").read_bytes() == before
    drift = s["project"].audit("set-a").drift()
    previous = json.loads(before)
    assert drift["previous"]["n_features"] == len(previous["features"])
    # nothing is called now: every finding called before either lost its flag or is gone
    was_called = {f["rank"] for f in previous["features"] if f.get("called")}
    flipped = {c["previous_rank"] for c in drift["changed"] if "called" in c["changed"]}
    gone = {f["rank"] for f in drift["disappeared"] if f["called"]}
    assert flipped | gone == was_called and drift["new_called"] == []
    meta = _latest_metadata(s["instance"], "spurious_features", "set-a")
    assert "Since the previous audit" in meta["changes_since_last_audit"].value
    findings = read_findings(out / "findings.json")
    assert findings.significance["n_permutations"] == 50 and "warning" in findings.significance
    assert not any(f.called for f in findings.features)
    record = json.loads((out / "mitigated_model.json").read_text())
    assert record["trained"] is False and record["model"] == findings.model
    assert ("called significant" in record["reason"]) if findings.features else \
        ("no spurious feature" in record["reason"])


def test_the_closed_loop_trains_a_same_budget_control_and_compares_with_intervals(two_sets):
    s = two_sets
    # without evidence every kept finding counts as called: Stage 2 and its control train
    # one prompt, configured in params.yaml, for every step that scores text
    prompt = ["a photo of the number {}."]
    write_params(s["params"], s["tiny"], discovery={"top_regions": 20, "evidence": False},
                 scores={"templates": prompt})
    runs = runner.materialize(s["defs"], s["instance"], partitions=["set-a"],
                              select=["zero_shot_scores", "region_clusters", "spurious_features", "mitigated_model",
                                      "control_model", "mitigation_metrics", "mitigated_findings",
                                      "evaluation_report"])
    assert runs[0].success, runs[0].lines()
    out = s["data"] / "outputs" / "set-a"
    record = json.loads((out / "mitigated_model.json").read_text())
    assert record["trained"]
    metrics = check_closed_loop(out, read_findings(out / "findings.json"), record)
    meta = _latest_metadata(s["instance"], "mitigation_metrics", "set-a")
    assert meta["groups_from"].value == "annotation"
    assert "images with red square" in meta["answer"].value
    assert "upsampled (control), 2 steps" in meta["metrics"].value
    assert (out / "groups.parquet").is_file()  # the discovered groups, beside the metrics
    assert read_findings(out / "findings.json").templates == prompt
    assert read_findings(out / "findings_mitigated.json").templates == prompt
    assert all(metrics[m]["templates"] == prompt for m in ("audited", "control", "mitigated"))
    twin = json.loads((out / "report" / "report.json").read_text())
    assert json.loads((out / "report" / "summary.json").read_text())["provenance"]["templates"] == prompt
    assert twin["answer"] == metrics["answer"]
    # with the annotation present, each discovered finding's agreement with it is recorded
    assert metrics["discovered_agreement"] and all(0 <= v <= 1 for v in metrics["discovered_agreement"].values())


def test_blocking_accuracy_check_stops_the_report(two_sets):
    s = two_sets
    # demand an impossible gain of 100 points of image accuracy
    write_params(s["params"], s["tiny"], evaluation={"max_accuracy_drop": -1.0})
    report = s["data"] / "outputs" / "set-a" / "report" / "summary.json"
    report_before = report.read_bytes()
    runs = runner.materialize(s["defs"], s["instance"], partitions=["set-a"],
                              select=["mitigation_metrics", "evaluation_report"])
    assert len(runs) == 1 and not runs[0].success
    assert runs[0].materialized == ["mitigation_metrics"]
    assert ("mitigation_metrics:mitigated_accuracy_within_margin", False, "ERROR") in runs[0].checks
    assert report.read_bytes() == report_before  # the previous report is untouched


def test_materialize_command_uses_the_persistent_instance(pipeline, tmp_path, monkeypatch, capsys):
    from ravl_pipeline.cli import main

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAVL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RAVL_PARAMS", str(write_params(tmp_path / "params.yaml", pipeline["tiny"])))
    assert main(["materialize", "--select", "audited_model"]) == 0
    out = capsys.readouterr().out
    assert "materialized audited_model" in out
    # each step printed as it starts and as it ends, with its duration
    assert "  audited_model ...\n" in out and re.search(r"  audited_model done in \d+\.\ds", out)
    assert (tmp_path / "home" / "dagster.yaml").is_file()
    record = json.loads((tmp_path / "data" / "outputs" / "audited_model.json").read_text())
    assert record["model"] == f"local-dir:{pipeline['tiny']['audited']}"
    with dg.DagsterInstance.get() as instance:
        assert instance.get_latest_materialization_event(dg.AssetKey("audited_model")) is not None


def test_one_set_embedded_in_shard_steps_equals_the_set_embedded_at_once(pipeline, tmp_path):
    """compute.shards: 3 runs region_embeddings as plan → three shard steps → merge; the merged
    embeddings are the single-step ones (same rows, same order, to float rounding), and no shard is left."""
    from ravl_pipeline.core.embed import Embeddings

    data = tmp_path / "data"
    shutil.copytree(pipeline["data"] / "validation_sets" / "set-a", data / "validation_sets" / "set-a")
    params = write_params(tmp_path / "params.yaml", pipeline["tiny"], compute={"shards": 3})
    project = RavlProject(data_dir=str(data), params_path=str(params))
    defs = build_definitions(project)
    with dg.instance_for_test() as instance:
        runner.register_validation_sets(defs, instance, ["set-a"])
        runs = runner.materialize(defs, instance, partitions=["set-a"],
                                  select=["audited_model", "region_proposals", "region_embeddings"])
        assert all(r.success for r in runs), [r.lines() for r in runs]
        steps = {e.step_key for e in instance.all_logs(runs[-1].run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)}
        assert {f"region_embeddings.shard[{i}]" for i in range(3)} | {"region_embeddings.merge"} <= steps
        assert _latest_metadata(instance, "region_embeddings", "set-a")["dagster/row_count"].value == 4 * N_VAL
    audit = project.audit("set-a")
    sharded = Embeddings.load(audit.paths.embeddings)
    whole = Embeddings.load(pipeline["project"].audit("set-a").paths.embeddings)
    assert sharded.image_ids == whole.image_ids and np.array_equal(sharded.region_index, whole.region_index)
    np.testing.assert_allclose(sharded.region_emb, whole.region_emb, atol=1e-5)
    assert not audit.paths.embedding_shards.exists()


def test_embed_shard_command_splits_and_merges_a_set(pipeline, tmp_path, monkeypatch, capsys):
    """`ravl embed-shard --shard I/N` anywhere, then `--merge N`: the set's embeddings, shards gone;
    a missing shard is named."""
    from ravl_pipeline.cli import main as ravl
    from ravl_pipeline.core.embed import Embeddings

    data = tmp_path / "data"
    shutil.copytree(pipeline["data"] / "validation_sets" / "set-a", data / "validation_sets" / "set-a")
    (data / "outputs").mkdir(parents=True)
    shutil.copy2(pipeline["data"] / "outputs" / "audited_model.json", data / "outputs" / "audited_model.json")
    monkeypatch.setenv("RAVL_DATA_DIR", str(data))
    monkeypatch.setenv("RAVL_PARAMS", str(pipeline["params"]))
    assert ravl(["embed-shard", "--partition", "set-a", "--shard", "1/2"]) == 0
    assert ravl(["embed-shard", "--partition", "set-a", "--shard", "1/2"]) == 0
    assert "reused" in capsys.readouterr().out  # the same data, model and parameters: not embedded twice
    assert ravl(["embed-shard", "--partition", "set-a", "--merge", "2"]) == 2  # shard 0 is missing
    assert "shard 0 of 2 is missing" in capsys.readouterr().err
    assert ravl(["embed-shard", "--partition", "set-a", "--shard", "0/2"]) == 0
    assert ravl(["embed-shard", "--partition", "set-a", "--merge", "2"]) == 0
    merged = Embeddings.load(data / "outputs" / "set-a" / "embeddings")
    whole = Embeddings.load(pipeline["project"].audit("set-a").paths.embeddings)
    assert merged.image_ids == whole.image_ids
    np.testing.assert_allclose(merged.region_emb, whole.region_emb, atol=1e-5)
    assert not (data / "outputs" / "set-a" / "embedding_shards").exists()
    assert ravl(["embed-shard", "--partition", "set-a"]) == 2  # no shard named, not under torchrun
