"""The COCO path end to end with open_clip's real backbones (SPEC §1.2,
§4.3): RN50 and ViT-B-32 at 224 px, random init, weights brought as a file
(safetensors, or a ``torch.save`` state dict read with ``weights_only``), on
a few COCO-style scenes — import → discover → fine-tune → evaluate → report
on the command line, then the Dagster asset graph. Plumbing, not science:
random weights find nothing meaningful, but every step must run on
non-square photos with boxes anywhere."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
import yaml

from ravl_pipeline.cli import dagster_runs as runner
from ravl_pipeline.cli import main
from ravl_pipeline.core.cache import EmbeddingCache
from ravl_pipeline.core.findings import read_findings
from ravl_pipeline.definitions import build_definitions
from ravl_pipeline.defs.resources import RavlProject
from ravl_pipeline.experiments.scenes import ScenesConfig, scene_splits, write_scenes
from ravl_pipeline.io.dataset import load_dataset
from ravl_pipeline.models import load_model

pytestmark = pytest.mark.slow

N = 6  # images per split: an RN50 image and region pass over a photo is about 0.6 CPU-seconds


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """What a user brings: images and COCO instances files."""
    root = tmp_path_factory.mktemp("coco_scenes")
    write_scenes(root, ScenesConfig(classes=["one", "three", "nine"], n_pretrain=3, n_finetune=N, n_val=N,
                                    n_test=N, seed=0))
    return root


def _weights(arch: str, fmt: str, out: Path) -> Path:
    state = {k: v.contiguous() for k, v in load_model(arch, seed=0).model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out / "weights.safetensors"))
        return out / "weights.safetensors"
    torch.save(state, out / "weights.pt")
    return out / "weights.pt"


def _one_feature(findings_path: Path, out: Path) -> Path:
    """The findings with their largest cluster as the one feature. Random
    weights predict the same class for every photo, so no cluster has a class
    gap and Stage 1 keeps none; Stage 2's plumbing on a real backbone still
    needs a cluster of the audited model's regions to treat as spurious."""
    data = json.loads(findings_path.read_text())
    largest = max(data["clusters"], key=lambda c: c["size"])
    data["features"] = [{"rank": 1, "cluster_id": largest["cluster_id"], "score": 1.0, "influence": 1.0,
                         "attribute": data["classes"][0], "per_class": [], "regions": []}]
    path = out / "findings-one-feature.json"
    path.write_text(json.dumps(data))
    return path


def _import(coco: Path, name: str, out: Path) -> Path:
    files = scene_splits(coco)[name]
    args = ["import", "coco", *[str(p) for p, _ in files], "--images", str(coco / name / "images"),
            "--out", str(out), *[a for _, s in files for a in ("--split", s)]]
    assert main(args) == 0
    shutil.copy2(coco / "setting.json", out.parent / "setting.json")  # the caption template and classes
    return out


@pytest.mark.parametrize("arch, fmt", [("RN50", "safetensors"), ("ViT-B-32", "pt")])
def test_coco_audit_with_a_real_backbone(arch, fmt, coco, tmp_path, capsys):
    weights = _weights(arch, fmt, tmp_path)
    data = tmp_path / "data"
    val = _import(coco, "eval", data / "validation_sets" / "scenes")
    finetune = _import(coco, "finetune", data / "finetune")
    findings_path, cache = tmp_path / "findings.json", tmp_path / "cache"
    model = ["--model", arch, "--pretrained", str(weights)]

    # Stage 1 on the command line, every box of every photo embedded
    assert main(["discover", *model, "--data", str(val), "--split", "val", "--proposer", "boxes",
                 "--permutations", "100", "--cache", str(cache), "--out", str(findings_path), "--quiet"]) == 0
    findings = read_findings(findings_path)
    assert findings.pretrained == str(weights) and findings.proposer == "boxes"
    lm = load_model(arch, pretrained=str(weights))
    assert lm.image_size == 224
    ds = load_dataset(val, split="val")
    assert all(ds.image_size(i)[0] != ds.image_size(i)[1] for i in range(len(ds)))
    store = EmbeddingCache(cache)
    emb = store.embed(lm, ds, proposer="boxes", progress=False)
    assert store.stats.misses == 0  # what discovery computed, read back
    assert findings.n_regions == emb.n_regions == sum(len(b) for b in ds.boxes) > 2 * N
    assert np.all(np.isfinite(emb.region_emb))
    np.testing.assert_allclose(np.linalg.norm(emb.region_emb, axis=1), 1.0, atol=1e-4)
    for i in range(len(ds)):
        mine = emb.region_emb[emb.region_image == i]
        gaps = np.abs(mine[:, None] - mine[None]).max(axis=2) + np.eye(len(mine))
        assert gaps.min() > 1e-5  # no two boxes of a photo share a vector

    # Stage 2 (a step of the region-aware loss from the same random init), evaluation, report
    stage2 = findings_path if findings.features else _one_feature(findings_path, tmp_path)
    assert main(["finetune", "--model", arch, "--data", str(finetune), "--out", str(tmp_path / "mitigated"),
                 "--max-steps", "1", "--batch-size", str(N), "--method", "ravl", "--findings", str(stage2),
                 "--features", "all", "--quiet"]) == 0
    meta = json.loads((tmp_path / "mitigated" / "ravl_model.json").read_text())
    assert meta["audited_model"] == arch and meta["findings"]["content"]["pretrained"] == str(weights)
    assert meta["spurious_regions"]["n_regions"] > 2 * N
    metrics_path = tmp_path / "metrics.json"
    assert main(["evaluate", "--model", f"local-dir:{tmp_path / 'mitigated'}", "--data", str(val),
                 "--feature", "red square", "--out", str(metrics_path), "--quiet"]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert metrics["split"] == "test" and metrics["region_overall"] is not None
    report = tmp_path / "report" / "report.html"
    assert main(["report", "--findings", str(findings_path), "--data", str(val), "--out", str(report),
                 "--metrics", f"mitigated={metrics_path}"]) == 0
    assert report.is_file()
    capsys.readouterr()

    # the Dagster asset graph over the same checkpoint and set
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "audited_model": {"source": "checkpoint", "checkpoint": arch, "pretrained": str(weights),
                          "init_model": arch, "train_data": str(finetune)},
        "regions": {"proposer": "boxes"},
        "discovery": {"evidence": False, "top_regions": 10},
        "mitigation": {"method": "upsampled", "max_steps": 1, "batch_size": N},
        "evaluation": {"max_accuracy_drop": 1.0},
    }))
    defs = build_definitions(RavlProject(data_dir=str(data), params_path=str(params)))
    with dg.instance_for_test() as instance:
        runner.register_validation_sets(defs, instance, ["scenes"])
        runs = runner.materialize(defs, instance, partitions=["scenes"])
    assert all(r.success for r in runs), [r.lines() for r in runs]
    out = data / "outputs" / "scenes"
    assert read_findings(out / "findings.json").n_regions == emb.n_regions
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["provenance"]["audited_model"] == arch
    assert "<img" in (out / "report" / "report.html").read_text() or not summary["before"]["n_features"]
