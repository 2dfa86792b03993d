"""Pieces of the pipeline that need no model: params, fingerprints, checks'
logic, the instance folder, and the shape of the definitions."""
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ravl_pipeline.config import (MASK_FILL_CHOICES, PARAMS_NAME, SECTIONS, Params, ParamsError, load_params,
                                  section_version)
from ravl_pipeline.core.evidence.fills import FILLS
from ravl_pipeline.core.findings import Findings
from ravl_pipeline.defs.resources import list_validation_sets
from ravl_pipeline.io.files import atomic_dir
from ravl_pipeline.io.hashing import dataset_fingerprint
from ravl_pipeline.io.manifest import write_manifest

REPO = Path(__file__).resolve().parents[2]


def test_params_defaults_overlay_and_section_versions(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("discovery:\n  seed: 3\n")
    params = load_params(path)
    assert params.discovery.seed == 3
    assert params.discovery.influence_threshold == 0.25  # default kept
    defaults = load_params(tmp_path / "missing.yaml")
    assert section_version(params, "discovery") != section_version(defaults, "discovery")
    assert section_version(params, "regions") == section_version(defaults, "regions")
    # the control is observed apart from the rest of its section: switching it leaves Stage 2's version alone
    path.write_text("mitigation:\n  control: false\n")
    off = load_params(path)
    assert section_version(off, "mitigation") == section_version(defaults, "mitigation")
    assert section_version(off, "control") != section_version(defaults, "control")


@pytest.mark.parametrize("text, needle", [
    ("discovery:\n  sede: 1\n", "discovery.sede"),
    ("clustering:\n  k: 3\n", "unknown section 'clustering'"),
    ("discovery:\n  influence_threshold: 2\n", "discovery.influence_threshold"),
    ("audited_model:\n  source: checkpoint\n", "audited_model.checkpoint"),
    ("discovery: [1, 2\n", "not valid YAML"),
    ("discovery:\n  evidence: yes please\n", "discovery.evidence"),
    ("discovery:\n  permutations: 0\n", "discovery.permutations"),
    ("discovery:\n  cluster_workers: 0\n", "discovery.cluster_workers"),
    ("discovery:\n  alpha: 1.5\n", "discovery.alpha"),
    ("discovery:\n  mask_fill: grey\n", "discovery.mask_fill"),
    ("mitigation:\n  min_steps: 0\n", "mitigation.min_steps"),
    ("mitigation:\n  control: sometimes\n", "mitigation.control"),
    ("discovery:\n  mask_control: nearby\n", "discovery.mask_control"),
    ("mitigation:\n  min_steps: 2.5\n", "mitigation.min_steps"),
])
def test_bad_params_name_the_file_and_key(tmp_path, text, needle):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert str(path) in str(err.value) and needle in str(err.value)


@pytest.mark.parametrize("section", SECTIONS)
def test_the_shipped_params_file_lists_every_key_at_its_default(section):
    # params.yaml is where users look for a knob; it must not drift from the
    # defaults the library and the flags use when no params.yaml is given
    shipped = yaml.safe_load((REPO / PARAMS_NAME).read_text())[section]
    assert shipped == dataclasses.asdict(getattr(Params(), section))


@pytest.mark.parametrize("fill", MASK_FILL_CHOICES)
def test_every_mask_fill_params_accept_is_one_the_masking_check_knows(tmp_path, fill):
    path = tmp_path / "params.yaml"
    path.write_text(f"discovery:\n  mask_fill: {fill}\n")
    assert load_params(path).discovery.mask_fill == fill
    assert fill == "auto" or fill in FILLS


def _tiny_set(root, n=3):
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / f"images/{i}.png")
        rows.append({"image_id": f"i{i}", "path": f"images/{i}.png", "label": "one" if i % 2 else "two"})
    write_manifest(root, rows)
    return root


def test_fingerprint_follows_content_not_timestamps(tmp_path):
    root = _tiny_set(tmp_path / "set")
    first = dataset_fingerprint(root)
    os.utime(root / "images/0.png", (1, 1))
    assert dataset_fingerprint(root) == first
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(root / "images/0.png")
    assert dataset_fingerprint(root) != first


def test_fingerprint_prefers_the_dvc_md5(tmp_path):
    root = _tiny_set(tmp_path / "set")
    (tmp_path / "set.dvc").write_text("outs:\n- md5: abc123.dir\n  path: set\n")
    assert dataset_fingerprint(root) == "dvc-abc123.dir"


def test_only_directories_with_a_manifest_are_validation_sets(tmp_path):
    _tiny_set(tmp_path / "b-set")
    _tiny_set(tmp_path / "a-set")
    (tmp_path / "empty").mkdir()
    (tmp_path / ".hidden").mkdir()
    assert list_validation_sets(tmp_path) == ["a-set", "b-set"]


def test_atomic_dir_keeps_the_previous_output_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _feature(rank, score, gaps, sims, influence=0.5, attribute="nine"):
    return {"rank": rank, "cluster_id": rank, "score": score, "influence": influence, "attribute": attribute,
            "per_class": [{"label": lab, "gap": g} for lab, g in gaps],
            "regions": [{"similarity": s} for s in sims]}


def _findings(features):
    return Findings.from_dict({"model": "m", "dataset": "d", "classes": ["one", "nine"], "k": 4,
                               "silhouette": 0.1, "influence_threshold": 0.25, "features": features})


def test_findings_problems_accepts_consistent_findings_and_names_each_fault():
    good = _findings([
        _feature(1, 0.5, [("nine", 0.3), ("one", -0.2)], [1.0, 0.9]),
        _feature(2, 0.3, [("nine", 0.1), ("one", -0.2)], [1.0, 0.5]),
    ])
    assert good.problems() == []
    bad = _findings([
        _feature(1, 0.3, [("nine", 0.1), ("one", -0.2)], [0.5, 1.0], influence=0.1, attribute="seven"),
        _feature(3, 0.5, [("nine", 0.3), ("one", 0.1)], [1.0]),  # |gaps| sum to 0.4
    ])
    problems = bad.problems()
    assert "ranks are not 1..n" in problems
    assert "features are not sorted by score G_c, descending" in problems
    assert "feature rank 1: attribute 'seven' is not a class" in problems
    assert "feature rank 1: regions are not sorted by similarity to the medoid" in problems
    assert "feature rank 1: influence below the threshold (SPEC §2.4)" in problems
    assert "feature rank 3: needs a positive and a negative per-class gap (SPEC §2.4)" in problems
    assert "feature rank 3: score is not the sum of |gap| (SPEC §2.2)" in problems


def test_ensure_dagster_home_creates_the_instance_folder(tmp_path, monkeypatch):
    from ravl_pipeline.cli.dagster_runs import ensure_dagster_home

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    home = ensure_dagster_home()
    assert home == tmp_path / "home"
    assert "default_limit: 1" in (home / "dagster.yaml").read_text()


def test_definitions_load_with_every_piece():
    import dagster as dg

    from ravl_pipeline.definitions import build_definitions

    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"audited_model", "spurious_features", "evaluation_report", "validation_set",
            "params_discovery"} <= keys
    assert {c.name for c in graph.asset_check_keys} == {
        "embeddings_finite_and_normalised", "findings_well_formed", "audited_model_validity",
        "no_new_called_finding", "mitigated_accuracy_within_margin"}
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        assert node.code_version, key
        assert node.kinds, key
    assert defs.resolve_schedule_def("weekly_reaudit").cron_schedule == "0 6 * * 1"
    assert isinstance(defs.resolve_sensor_def("new_validation_sets"), dg.SensorDefinition)
    for name in ("region_embeddings", "mitigated_model", "zero_shot_scores"):
        assert set(graph.get(dg.AssetKey(name)).pools) == {"ravl_model"}
    assert not graph.get(dg.AssetKey("region_clusters")).pools


def test_the_executor_is_chosen_by_the_environment(monkeypatch):
    import pytest

    from ravl_pipeline.definitions import build_definitions

    monkeypatch.delenv("RAVL_EXECUTOR", raising=False)
    assert build_definitions().resolve_job_def("audit_validation_set").executor_def.name == "in_process"
    monkeypatch.setenv("RAVL_EXECUTOR", "multiprocess")
    assert build_definitions().resolve_job_def("audit_validation_set").executor_def.name == "multiprocess"
    monkeypatch.setenv("RAVL_EXECUTOR", "celery")
    monkeypatch.setenv("RAVL_CELERY_BROKER", "redis://127.0.0.1:6399/0")
    job = build_definitions().resolve_job_def("audit_validation_set")
    assert job.executor_def.name == "celery"
    monkeypatch.setenv("RAVL_EXECUTOR", "in_process")
    assert build_definitions().resolve_job_def("audit_validation_set").executor_def.name == "in_process"
    monkeypatch.setenv("RAVL_EXECUTOR", "k8s")
    with pytest.raises(ValueError, match="RAVL_EXECUTOR='k8s'"):
        build_definitions()


def test_the_reaudit_cadence_comes_from_the_environment(monkeypatch):
    import importlib

    from ravl_pipeline.defs import schedules

    monkeypatch.setenv("RAVL_REAUDIT_CRON", "* * * * *")
    try:
        assert importlib.reload(schedules).weekly_reaudit.cron_schedule == "* * * * *"
    finally:
        monkeypatch.delenv("RAVL_REAUDIT_CRON")
        importlib.reload(schedules)


def test_a_partition_alone_does_not_rebuild_the_audited_model(tmp_path):
    import dagster as dg

    from ravl_pipeline.cli.dagster_runs import plan_keys
    from ravl_pipeline.definitions import build_definitions
    from ravl_pipeline.defs.resources import RavlProject

    project = RavlProject(data_dir=str(tmp_path / "data"), params_path=str(tmp_path / "params.yaml"))
    defs = build_definitions(project)
    model = dg.AssetKey("audited_model")
    # never built: the partition's run needs it
    assert model in plan_keys(defs, ["set-a"], None)[0]
    project.audited_record_path.parent.mkdir(parents=True)
    project.audited_record_path.write_text("{}")
    unpartitioned, partitioned = plan_keys(defs, ["set-a"], None)
    assert unpartitioned == set() and dg.AssetKey("spurious_features") in partitioned
    assert plan_keys(defs, ["set-a"], ["audited_model"])[0] == {model}  # asked for
    assert model in plan_keys(defs, None, None)[0]  # everything


def test_the_sensor_and_the_cli_never_audit_a_new_folder_twice(tmp_path):
    import shutil
    import uuid

    import dagster as dg

    from ravl_pipeline.cli.dagster_runs import sensor_audit_of
    from ravl_pipeline.defs.jobs import AUDIT_JOB
    from ravl_pipeline.defs.partitions import SET_VERSION_TAG
    from ravl_pipeline.defs.resources import RavlProject
    from ravl_pipeline.defs.sensors import new_validation_sets
    from ravl_pipeline.io.hashing import dataset_fingerprint
    from tests.tiny_project import make_tiny_project

    env = make_tiny_project(tmp_path, n_val=10, n_test=10, validation_set="new")
    project = RavlProject(data_dir=env["RAVL_DATA_DIR"], params_path=env["RAVL_PARAMS"])
    version = dataset_fingerprint(project.validation_root / "new")
    with dg.instance_for_test() as instance:
        (request,) = new_validation_sets(dg.build_sensor_context(instance=instance,
                                                                 resources={"ravl": project})).run_requests
        assert request.partition_key == "new" and request.tags[SET_VERSION_TAG] == version
        # the daemon launches it: `ravl materialize --partition new` follows that run instead
        run = dg.DagsterRun(job_name=AUDIT_JOB, run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED,
                            tags={**request.tags, "dagster/partition": "new",
                                  "dagster/sensor_name": "new_validation_sets"})
        instance.add_run(run)
        assert sensor_audit_of(instance, "new", version).run_id == run.run_id
        assert sensor_audit_of(instance, "new", "another content") is None
        # a folder the CLI already launched a run for is not the sensor's to audit
        shutil.copytree(project.validation_root / "new", project.validation_root / "cli-set")
        instance.add_run(dg.DagsterRun(job_name=AUDIT_JOB, run_id=str(uuid.uuid4()),
                                       status=dg.DagsterRunStatus.STARTED, tags={"dagster/partition": "cli-set"}))
        again = new_validation_sets(dg.build_sensor_context(instance=instance, resources={"ravl": project}))
        assert not again.run_requests
