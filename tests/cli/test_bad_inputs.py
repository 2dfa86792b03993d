"""Every entry point against bad input: one table of cases, each run through
``ravl`` in process. Each case asserts the exit status (2: bad input), that
the one-line error names the offending input (file, row, column or flag),
that no traceback is printed, and that no file in the workspace changed or
appeared (bytes compared, hidden files included)."""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ravl_pipeline.cli import main as ravl
from ravl_pipeline.experiments.synth import SynthConfig, make_setting
from ravl_pipeline.io.manifest import write_manifest
from ravl_pipeline.models import CONFIG_NAME, RAVL_META_NAME, WEIGHTS_NAME, load_model, save_model

CLASSES = ["one", "nine"]
EMBED_DIM = 64  # ravl-tiny-rn
QUADRANTS = [[0, 0, 28, 28], [28, 0, 56, 28], [0, 28, 28, 56], [28, 28, 56, 56]]


# --------------------------------------------------------------------------- the workspace

class _Evil:
    """A pickle that would leave a file behind if it were ever executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _findings(ws: Path, **changes) -> dict:
    """Findings that Stage 2 and the report accept: K = 3 clusters, the
    feature's medoid a unit vector of the audited model's width."""
    rng = np.random.default_rng(0)
    medoids = rng.normal(size=(3, EMBED_DIM))
    medoids /= np.linalg.norm(medoids, axis=1, keepdims=True)
    feature = {"rank": 1, "cluster_id": 0, "score": 0.9, "influence": 0.5, "attribute": "nine",
               "per_class": [{"label": "nine", "n_present": 3, "acc_present": 1.0, "n_absent": 1,
                              "acc_absent": 0.0, "gap": 0.45},
                             {"label": "one", "n_present": 2, "acc_present": 0.0, "n_absent": 2,
                              "acc_absent": 1.0, "gap": -0.45}],
               "regions": [{"image_id": "eval-000000", "region_index": 1, "box": QUADRANTS[1], "similarity": 0.9}]}
    data = {"schema_version": 1, "model": f"local-dir:{ws / 'ck'}", "dataset": str(ws / "set" / "eval"),
            "classes": list(CLASSES), "k": 3, "silhouette": 0.3, "proposer": "quadrants", "embedding_mode": "auto",
            "medoids": [0, 1, 2], "medoid_embeddings": medoids.tolist(), "features": [feature]}
    for key, value in changes.items():
        if key.startswith("feature."):
            feature[key.removeprefix("feature.")] = value
        else:
            data[key] = value
    return data


def _dump(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


BAD_FINDINGS = {
    "cluster_out_of_k": {"feature.cluster_id": 7},
    "nan_medoid": None,  # built below: a NaN in the feature's medoid
    "zero_medoid": None,
    "medoid_width": None,  # 32-dimensional medoids for a 64-dimensional model
    "medoid_rows": None,  # 2 medoid vectors for K = 3
    "per_class_string": {"feature.per_class": "nine better than one"},
    "score_string": {"feature.score": "high"},
    "score_nan": {"feature.score": float("nan")},
    "negative_cluster": {"feature.cluster_id": -1},
    "classes_mismatch": {"classes": ["seven", "nine"]},
    "classes_duplicate": {"classes": ["nine", "nine"]},
    "schema_version": {"schema_version": 9},
    "features_not_list": {"features": "none"},
    "box_outside": {"feature.regions": [{"image_id": "eval-000000", "region_index": 0, "box": [0, 0, 560, 56],
                                         "similarity": 0.9}]},
    "unknown_image": {"feature.regions": [{"image_id": "no-such-image", "region_index": 0, "box": QUADRANTS[0],
                                           "similarity": 0.9}]},
    "names_number": {"feature.names": 3},
    "causal_text": {"feature.causal": "flips"},
    "called_text": {"feature.called": "yes"},
    "significance_text": {"significance": "none"},
    "model_moved": {"model": "local-dir:/nonexistent/ravl-audited"},
}


def _bad_findings(ws: Path) -> None:
    for name, changes in BAD_FINDINGS.items():
        data = _findings(ws, **(changes or {}))
        if name == "nan_medoid":
            data["medoid_embeddings"][0][5] = float("nan")
        elif name == "zero_medoid":
            data["medoid_embeddings"][0] = [0.0] * EMBED_DIM
        elif name == "medoid_width":
            data["medoid_embeddings"] = [row[:32] for row in data["medoid_embeddings"]]
        elif name == "medoid_rows":
            data["medoid_embeddings"] = data["medoid_embeddings"][:2]
        # json.dumps writes NaN as the (non-standard) literal other tools also write
        _dump(ws / "bad" / f"{name}.json", data)
    _dump(ws / "bad" / "not_json.json", "{\"features\": [")
    _dump(ws / "bad" / "not_object.json", "[1, 2, 3]")
    _dump(ws / "bad" / "missing_key.json", json.dumps({k: v for k, v in _findings(ws).items() if k != "k"}))


def _datasets(ws: Path) -> None:
    """Small dataset directories, each with one thing wrong."""
    def images(root: Path, n: int = 2) -> list[dict]:
        root.mkdir(parents=True)
        rows = []
        for i in range(n):
            Image.fromarray(np.full((56, 56, 3), 60 * i, np.uint8)).save(root / f"img{i}.png")
            rows.append({"image_id": f"i{i}", "path": f"img{i}.png", "label": CLASSES[i % 2]})
        return rows

    rows = images(ws / "data" / "noboxes", 3)
    table = pa.table({"image_id": [r["image_id"] for r in rows], "path": [r["path"] for r in rows],
                      "label": [r["label"] for r in rows],
                      "region_labels": [["empty"] * 4 for _ in rows]})
    pq.write_table(table, ws / "data" / "noboxes" / "manifest.parquet")

    rows = images(ws / "data" / "linked")
    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(ws / "outside.png")
    (ws / "data" / "linked" / "img1.png").unlink()
    (ws / "data" / "linked" / "img1.png").symlink_to(ws / "outside.png")
    write_manifest(ws / "data" / "linked", rows)

    rows = images(ws / "data" / "missing")
    write_manifest(ws / "data" / "missing", rows)
    (ws / "data" / "missing" / "img1.png").unlink()

    rows = images(ws / "data" / "corrupt")
    (ws / "data" / "corrupt" / "img0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    write_manifest(ws / "data" / "corrupt", rows)

    rows = images(ws / "data" / "badlabel")
    write_manifest(ws / "data" / "badlabel", rows)

    rows = images(ws / "data" / "dupid")
    rows[1]["image_id"] = rows[0]["image_id"]
    pq.write_table(pa.Table.from_pylist(rows), ws / "data" / "dupid" / "manifest.parquet")

    rows = images(ws / "data" / "dotdot")
    rows[1]["path"] = "../outside.png"
    pq.write_table(pa.Table.from_pylist(rows), ws / "data" / "dotdot" / "manifest.parquet")

    rows = images(ws / "data" / "badbox")
    table = pa.Table.from_pylist([dict(r, boxes=[[0, 0, 90, 20]]) for r in rows])
    pq.write_table(table, ws / "data" / "badbox" / "manifest.parquet")

    for name, labels in (("oneclass", ["one", "one"]), ("caselabels", ["one", "One "]),
                         ("longlabels", ["a " * 90 + "one", "a " * 90 + "nine"])):
        rows = images(ws / "data" / name)
        write_manifest(ws / "data" / name, [dict(row, label=label) for row, label in zip(rows, labels)])

    (ws / "data" / "nomanifest").mkdir(parents=True)
    images(ws / "data" / "notparquet")
    (ws / "data" / "notparquet" / "manifest.parquet").write_text("image_id,path\ni0,img0.png\n")


def _models(ws: Path) -> None:
    lm = load_model("ravl-tiny-rn", seed=0)
    save_model(lm, ws / "ck", {"note": "the audited model of the findings"})
    weights = (ws / "ck" / WEIGHTS_NAME).read_bytes()
    for name, change in (("ck_trunc", lambda d: (d / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])),
                         ("ck_garbage", lambda d: (d / WEIGHTS_NAME).write_bytes(b"not safetensors" * 9)),
                         ("ck_badconfig", lambda d: (d / CONFIG_NAME).write_text("{\"model_cfg\": ")),
                         ("ck_badmeta", lambda d: (d / RAVL_META_NAME).write_text("{broken")),
                         ("ck_noweights", lambda d: (d / WEIGHTS_NAME).unlink())):
        shutil.copytree(ws / "ck", ws / name)
        change(ws / name)
    config = json.loads((ws / "ck" / CONFIG_NAME).read_text())
    vit = load_model("ravl-tiny-vit", seed=0).model.state_dict()
    nan = {k: v.clone() for k, v in lm.model.state_dict().items()}
    nan["visual.conv1.weight"][0, 0, 0, 0] = float("nan")
    for name, change in (
            ("ck_nan", lambda d: save_file(nan, d / WEIGHTS_NAME)),
            ("ck_cfgtype", lambda d: (d / CONFIG_NAME).write_text(json.dumps(
                dict(config, model_cfg=dict(config["model_cfg"], vision_cfg=5))))),
            ("ck_otherarch", lambda d: save_file(vit, d / WEIGHTS_NAME))):
        shutil.copytree(ws / "ck", ws / name)
        change(ws / name)
    state = lm.model.state_dict()
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1e-3)}, ws / "pickled.pt")
    torch.save({"state_dict": state, "hook": _Evil(ws / "EXECUTED")}, ws / "evil.pt")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("bad_inputs")
    make_setting(ws / "set", SynthConfig(classes=CLASSES, n_pretrain=4, n_finetune=16, n_val=8, n_test=8, seed=0))
    _models(ws)
    _dump(ws / "findings.json", _findings(ws))
    _bad_findings(ws)
    _datasets(ws)
    metrics = {"image_overall": 0.5, "image_worst_group": 0.25, "region_overall": 0.5, "region_worst_group": 0.25,
               "groups": []}
    _dump(ws / "metrics.json", metrics)
    _dump(ws / "bad" / "metrics_missing.json", {k: v for k, v in metrics.items() if k != "region_overall"})
    _dump(ws / "bad" / "metrics_text.json", dict(metrics, image_overall="good"))
    _dump(ws / "bad" / "provenance_list.json", ["not", "an", "object"])
    _dump(ws / "bad" / "vocab_empty.txt", "# nothing\n\n")
    _dump(ws / "bad" / "deep.json", "[" * 200_000 + "]" * 200_000)
    _dump(ws / "bad" / "vocab_braces.txt", "red {thing}\n")
    _dump(ws / "bad" / "params_tau.yaml", "scores:\n  tau: 0\n")
    _dump(ws / "bad" / "params_template.yaml", "scores:\n  templates: ['a {kind} of {}']\n")
    _dump(ws / "bad" / "params_k_range.yaml", "discovery:\n  k_range: [10, 5]\n")
    _dump(ws / "bad" / "params_seed.yaml", "discovery:\n  seed: -3\n")
    _dump(ws / "bad" / "params_classes.yaml", "labels:\n  classes: one, nine\n")
    _dump(ws / "bad" / "params_templates.yaml", "scores:\n  templates: 'a photo of a {}.'\n")
    _dump(ws / "bad" / "params_tau_tiny.yaml", "scores:\n  tau: 1.0e-45\n")
    _dump(ws / "bad" / "coco.json", {"images": [{"id": 1}], "annotations": [{"image_id": 1}], "categories": []})
    # earlier results of the user, beside which bad commands are run
    _dump(ws / "results" / "findings.json", _findings(ws))
    _dump(ws / "results" / "metrics.json", metrics)
    _dump(ws / "results" / "notes.txt", "my notes\n")
    _dump(ws / "results" / "report.html", "<html>my own page</html>\n")
    (ws / "results" / "subdir").mkdir()
    (ws / "results" / "somefile").write_text("x")
    _special(ws)
    _coco_files(ws)
    return ws


def _coco_files(ws: Path) -> None:
    """COCO instances files over the eval set's first two images, each with
    one thing wrong, and an ImageFolder tree with a corrupt image."""
    def coco(**changes):
        data = {"images": [{"id": i + 1, "file_name": f"eval-00000{i}.png", "width": 56, "height": 56}
                           for i in range(2)],
                "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "nine"}],
                "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [0, 0, 28, 28]},
                                {"id": 11, "image_id": 2, "category_id": 2, "bbox": [28, 28, 20, 20]}]}
        for key, value in changes.items():
            top, _, rest = key.partition(".")
            if not rest:
                data[top] = value
            else:
                index, field = rest.split(".")
                data[top][int(index)][field] = value
        return data

    for name, data in (("coco_nan_bbox", coco(**{"annotations.1.bbox": [28, float("nan"), 20, 20]})),
                       ("coco_negative_size", coco(**{"annotations.1.bbox": [28, 28, -20, 20]})),
                       ("coco_bbox_text", coco(**{"annotations.0.bbox": "0 0 28 28"})),
                       ("coco_same_name", coco(**{"categories.1.name": "one"})),
                       ("coco_annotations_object", coco(annotations={"id": 10})),
                       ("coco_image_not_object", coco(images=[7, 8])),
                       ("coco_file_name_dot", coco(**{"images.1.file_name": "."})),
                       ("coco_missing_image", coco(**{"images.1.file_name": "absent.png"})),
                       ("coco_wrong_size", coco(**{"images.0.width": 560, "images.0.height": 560,
                                                   "annotations.0.bbox": [0, 0, 300, 300]})),
                       ("coco_top_list", [coco()])):
        _dump(ws / "bad" / f"{name}.json", data)
    _dump(ws / "bad" / "coco_corrupt_image.json", coco(**{"images.1.file_name": "corrupt.png"}))
    (ws / "bad" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    for i in range(2):
        shutil.copyfile(ws / "set" / "eval" / "images" / f"eval-00000{i}.png", ws / "bad" / f"eval-00000{i}.png")
    folder = ws / "imagefolder"
    (folder / "one").mkdir(parents=True)
    (folder / "nine").mkdir()
    shutil.copyfile(ws / "set" / "eval" / "images" / "eval-000000.png", folder / "one" / "a.png")
    (folder / "nine" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)


def _special(ws: Path) -> None:
    """Paths that are not regular files: a named pipe, links to a file and
    to a checkpoint folder, a Parquet file that is not the manifest, and a
    dataset whose image is a folder."""
    (ws / "special").mkdir()
    os.mkfifo(ws / "special" / "pipe")
    os.mkfifo(ws / "special" / "pipe.html")
    (ws / "special" / "link.json").symlink_to(ws / "results" / "findings.json")
    (ws / "special" / "cklink").symlink_to(ws / "ck")
    shutil.copyfile(ws / "set" / "eval" / "manifest.parquet", ws / "special" / "other.parquet")
    root = ws / "data" / "imagedir"
    root.mkdir(parents=True)
    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(root / "img0.png")
    (root / "img1.png").mkdir()
    write_manifest(root, [{"image_id": f"i{i}", "path": f"img{i}.png", "label": CLASSES[i]} for i in range(2)])


def snapshot_all(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (hidden ones included) with its bytes or link target."""
    out: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = f"-> {os.readlink(path)}"
        elif path.is_file():
            out[rel] = path.read_bytes()
        else:
            out[rel] = "dir"
    return out


# --------------------------------------------------------------------------- the cases

@dataclass
class Case:
    group: str
    name: str
    argv: list[str]
    needles: tuple[str, ...]  # each must appear in the error (with {ws} filled in)


MODEL = ["--model", "local-dir:{ws}/ck"]
DISCOVER = ["discover", *MODEL, "--data", "{ws}/set/eval", "--split", "val", "--no-evidence",
            "--out", "{ws}/results/new_findings.json"]
EVALUATE = ["evaluate", *MODEL, "--data", "{ws}/set/eval", "--out", "{ws}/results/new_metrics.json"]
FINETUNE = ["finetune", *MODEL, "--data", "{ws}/set/finetune", "--out", "{ws}/new_ck", "--max-steps", "1",
            "--batch-size", "8", "--quiet"]
STAGE2 = [*FINETUNE, "--method", "ravl", "--findings"]
REPORT = ["report", "--findings", "{ws}/findings.json", "--data", "{ws}/set/eval", "--out",
          "{ws}/rep/report.html"]
SYNTH = ["synth", "--out", "{ws}/new_set", "--n-pretrain", "4", "--n-finetune", "4", "--n-val", "4",
         "--n-test", "4"]


def _flag(name: str, argv: list[str], flag: str, value: str) -> Case:
    return Case("numeric and choice flags", name, [*argv, flag, value], (f"argument {flag}", repr(value)))


CASES = [
    # ---- numeric and choice flags: refused by the parser, naming the flag and the value
    _flag("discover-tau-0", DISCOVER, "--tau", "0"),
    _flag("discover-tau-negative", DISCOVER, "--tau", "-0.5"),
    _flag("discover-tau-nan", DISCOVER, "--tau", "nan"),
    _flag("discover-tau-text", DISCOVER, "--tau", "cold"),
    _flag("discover-batch-0", DISCOVER, "--batch-size", "0"),
    _flag("discover-permutations-0", DISCOVER, "--permutations", "0"),
    _flag("discover-alpha-1", DISCOVER, "--alpha", "1"),
    _flag("discover-cluster-workers-0", DISCOVER, "--cluster-workers", "0"),
    _flag("discover-seed-float", DISCOVER, "--seed", "1.5"),
    _flag("finetune-tau-0", FINETUNE, "--tau", "0"),
    _flag("finetune-lam-above-1", FINETUNE, "--lam", "1.5"),
    _flag("finetune-lam-negative", FINETUNE, "--lam", "-0.1"),
    _flag("finetune-batch-0", FINETUNE, "--batch-size", "0"),
    _flag("finetune-lr-0", FINETUNE, "--lr", "0"),
    _flag("finetune-epochs-negative", FINETUNE, "--epochs", "-1"),
    _flag("finetune-max-steps-0", FINETUNE, "--max-steps", "0"),
    _flag("finetune-min-steps-0", FINETUNE, "--min-steps", "0"),
    _flag("evaluate-batch-0", EVALUATE, "--batch-size", "0"),
    _flag("evaluate-min-group-0", EVALUATE, "--min-group-size", "0"),
    _flag("synth-strength-2", SYNTH, "--strength", "2"),
    _flag("synth-n-val-0", SYNTH, "--n-val", "0"),
    _flag("report-top-regions-negative", REPORT, "--top-regions", "-1"),
    _flag("bench-workers-0", ["bench", "discovery", "--out", "{ws}/bench"], "--workers", "0"),
    _flag("discover-tau-underflows", DISCOVER, "--tau", "1e-45"),
    _flag("finetune-tau-underflows", FINETUNE, "--tau", "1e-45"),
    _flag("discover-seed-negative", DISCOVER, "--seed", "-1"),
    _flag("discover-seed-huge", DISCOVER, "--seed", str(2**64)),
    _flag("finetune-seed-huge", FINETUNE, "--seed", str(2**32)),
    Case("numeric and choice flags", "discover-proposer-grid-huge", [*DISCOVER, "--proposer", "grid:100000"],
         ("proposer", "'grid:100000'", "[1, 32]")),
    Case("numeric and choice flags", "params-k-range", ["materialize", "--select", "audited_model"],
         ("params_k_range.yaml", "discovery.k_range", "[10, 5]")),
    Case("numeric and choice flags", "params-seed", ["materialize", "--select", "audited_model"],
         ("params_seed.yaml", "discovery.seed", "-3")),
    Case("templates", "params-templates", ["materialize", "--select", "audited_model"],
         ("params_templates.yaml", "scores.templates", "a list")),
    Case("numeric and choice flags", "params-classes", ["materialize", "--select", "audited_model"],
         ("params_classes.yaml", "labels.classes", "'one, nine'")),
    Case("numeric and choice flags", "params-tau-tiny", ["materialize", "--select", "audited_model"],
         ("params_tau_tiny.yaml", "scores.tau")),
    Case("numeric and choice flags", "discover-mode-unknown", [*DISCOVER, "--mode", "fast"], ("--mode", "'fast'")),
    Case("numeric and choice flags", "finetune-method-unknown", [*FINETUNE, "--method", "magic"],
         ("--method", "'magic'")),
    Case("numeric and choice flags", "discover-proposer-grid-0", [*DISCOVER, "--proposer", "grid:0"],
         ("proposer", "'grid:0'")),
    Case("numeric and choice flags", "discover-classes-empty-name", [*DISCOVER, "--classes", "one,,nine"],
         ("--classes", "'one,,nine'")),
    Case("numeric and choice flags", "finetune-features-unknown",
         [*STAGE2, "{ws}/findings.json", "--features", "most"], ("argument --features", "'most'")),
    Case("numeric and choice flags", "evaluate-split-unknown", [*EVALUATE, "--split", "holdout"],
         ("split", "'holdout'")),
    # ---- templates: refused before the model is loaded
    Case("templates", "discover-unknown-placeholder", [*DISCOVER, "--template", "a {kind} of {}"],
         ("--template", "{kind}")),
    Case("templates", "discover-two-placeholders", [*DISCOVER, "--template", "a {} of {}"], ("--template",)),
    Case("templates", "discover-no-placeholder", [*DISCOVER, "--template", "a photo"], ("--template", "'{}'")),
    Case("templates", "discover-lone-brace", [*DISCOVER, "--template", "a {} photo {"], ("--template",)),
    Case("templates", "evaluate-unknown-placeholder", [*EVALUATE, "--template", "a {kind} of {}"],
         ("--template", "{kind}")),
    Case("templates", "finetune-caption-placeholder", [*FINETUNE, "--caption-template", "a {kind}"],
         ("--caption-template", "{kind}")),
    Case("templates", "params-template", ["materialize", "--select", "audited_model"],
         ("params_template.yaml", "scores.templates[0]")),
    Case("templates", "params-tau", ["materialize", "--select", "audited_model"],
         ("params_tau.yaml", "scores.tau")),
    # ---- output paths: checked before any work; nothing existing replaced
    Case("output paths", "discover-out-is-directory", [*DISCOVER[:-1], "{ws}/results/subdir"],
         ("--out", "results/subdir", "is a directory")),
    Case("output paths", "evaluate-out-is-directory", [*EVALUATE[:-1], "{ws}/results"],
         ("--out", "results", "is a directory")),
    Case("output paths", "discover-out-under-a-file", [*DISCOVER[:-1], "{ws}/results/somefile/f.json"],
         ("--out", "somefile", "not a directory")),
    Case("output paths", "finetune-out-is-unrelated-folder", [*FINETUNE[:5], "--out", "{ws}/results"],
         ("--out", "results", "not a checkpoint")),
    Case("output paths", "finetune-out-is-a-file", [*FINETUNE[:5], "--out", "{ws}/results/notes.txt"],
         ("--out", "notes.txt", "not a directory")),
    Case("output paths", "finetune-history-is-directory", [*FINETUNE, "--history", "{ws}/results"],
         ("--history", "results", "is a directory")),
    Case("output paths", "report-out-is-directory", [*REPORT[:-1], "{ws}/results"], ("--out", "is a directory")),
    Case("output paths", "report-out-is-not-a-report", [*REPORT[:-1], "{ws}/results/report.html"],
         ("--out", "results/report.html", "not a report")),
    Case("output paths", "report-twin-is-not-a-report", [*REPORT[:-1], "{ws}/results/metrics.html"],
         ("--out", "results/metrics.json", "not a report")),
    Case("output paths", "report-out-ends-in-json", [*REPORT[:-1], "{ws}/rep/report.json"], ("--out", ".json")),
    Case("output paths", "synth-out-is-unrelated-folder", [*SYNTH[:2], "{ws}/results", *SYNTH[3:]],
         ("--out", "results", "not a synthetic setting")),
    Case("output paths", "synth-out-is-a-file", [*SYNTH[:2], "{ws}/results/notes.txt", *SYNTH[3:]],
         ("--out", "notes.txt", "not a directory")),
    Case("output paths", "import-out-is-a-file",
         ["import", "imagefolder", "{ws}/set/eval/images", "--out", "{ws}/results/notes.txt"],
         ("--out", "notes.txt", "not a directory")),
    # ---- the output rule: never an input of the same command, a link, a special file, a folder
    Case("output paths", "discover-out-is-the-manifest", [*DISCOVER[:-1], "{ws}/set/eval/manifest.parquet"],
         ("--out", "set/eval/manifest.parquet", "--data")),
    Case("output paths", "discover-out-is-an-image", [*DISCOVER[:-1], "{ws}/set/eval/images/eval-000003.png"],
         ("--out", "eval-000003.png", "--data")),
    Case("output paths", "discover-out-is-a-vocabulary", [*DISCOVER[:-3], "--vocab", "{ws}/bad/vocab_empty.txt",
                                                          "--out", "{ws}/bad/vocab_empty.txt"],
         ("--out", "vocab_empty.txt", "--vocab")),
    Case("output paths", "evaluate-out-is-the-manifest", [*EVALUATE[:-1], "{ws}/set/eval/./manifest.parquet"],
         ("--out", "manifest.parquet", "--data")),
    Case("output paths", "evaluate-out-is-the-weights", [*EVALUATE[:-1], f"{{ws}}/ck/{WEIGHTS_NAME}"],
         ("--out", WEIGHTS_NAME, "--model")),
    Case("output paths", "finetune-history-is-the-findings",
         [*STAGE2, "{ws}/findings.json", "--history", "{ws}/findings.json"], ("--history", "--findings")),
    Case("output paths", "finetune-history-inside-out", [*FINETUNE, "--history", "{ws}/new_ck/history.json"],
         ("--history", "new_ck/history.json", "--out")),
    Case("output paths", "finetune-out-is-the-model", [*FINETUNE[:5], "--out", "{ws}/ck", *FINETUNE[7:]],
         ("--out", "/ck", "--model")),
    Case("output paths", "finetune-out-holds-the-data",
         [*FINETUNE[:5], "--out", "{ws}/set", *FINETUNE[7:]], ("--out", "/set", "--data")),
    Case("output paths", "report-twin-is-the-findings",
         ["report", "--findings", "{ws}/results/findings.json", "--out", "{ws}/results/findings.html"],
         ("twin", "results/findings.json", "--findings")),
    Case("output paths", "discover-out-is-a-named-pipe", [*DISCOVER[:-1], "{ws}/special/pipe"],
         ("--out", "special/pipe", "named pipe")),
    Case("output paths", "report-out-is-a-named-pipe", [*REPORT[:-1], "{ws}/special/pipe.html"],
         ("--out", "pipe.html", "named pipe")),
    Case("output paths", "evaluate-out-is-a-device", [*EVALUATE[:-1], "/dev/null"], ("--out", "/dev/null", "device")),
    Case("output paths", "discover-out-is-a-symlink", [*DISCOVER[:-1], "{ws}/special/link.json"],
         ("--out", "link.json", "symbolic link", "results/findings.json")),
    Case("output paths", "finetune-out-is-a-symlink", [*FINETUNE[:5], "--out", "{ws}/special/cklink", *FINETUNE[7:]],
         ("--out", "cklink", "symbolic link")),
    Case("output paths", "import-out-is-a-symlink",
         ["import", "imagefolder", "{ws}/set/eval/images", "--out", "{ws}/special/cklink"],
         ("--out", "cklink", "symbolic link")),
    Case("output paths", "evaluate-out-ends-in-slash", [*EVALUATE[:-1], "{ws}/results/newdir/"],
         ("--out", "results/newdir/", "names a folder")),
    Case("output paths", "finetune-history-ends-in-slash", [*FINETUNE, "--history", "{ws}/results/hist/"],
         ("--history", "hist/", "names a folder")),
    # ---- inputs that are not regular files: refused, never waited on
    Case("input kinds", "report-findings-is-a-named-pipe", ["report", "--findings", "{ws}/special/pipe", *REPORT[3:]],
         ("--findings", "special/pipe", "named pipe")),
    Case("input kinds", "report-findings-is-a-folder", ["report", "--findings", "{ws}/results/subdir", *REPORT[3:]],
         ("--findings", "results/subdir", "is a folder, expected a file")),
    Case("input kinds", "report-metrics-is-a-named-pipe", [*REPORT, "--metrics", "{ws}/special/pipe"],
         ("--metrics", "special/pipe", "named pipe")),
    Case("input kinds", "report-provenance-is-a-folder", [*REPORT, "--provenance", "{ws}/results"],
         ("--provenance", "is a folder")),
    Case("input kinds", "finetune-findings-is-a-named-pipe", [*STAGE2, "{ws}/special/pipe"],
         ("special/pipe", "named pipe")),
    Case("input kinds", "discover-data-other-parquet", ["discover", *MODEL, "--data", "{ws}/special/other.parquet",
                                                        *DISCOVER[7:]], ("other.parquet", "manifest.parquet")),
    Case("input kinds", "discover-image-is-a-folder", ["discover", *MODEL, "--data", "{ws}/data/imagedir",
                                                       *DISCOVER[7:]],
         ("imagedir/manifest.parquet", "row 1", "is a folder, expected a file")),
    # ---- models and weights
    Case("models", "truncated-safetensors", ["discover", "--model", "local-dir:{ws}/ck_trunc", *DISCOVER[3:]],
         ("ck_trunc/open_clip_model.safetensors",)),
    Case("models", "garbage-safetensors", ["discover", "--model", "local-dir:{ws}/ck_garbage", *DISCOVER[3:]],
         ("ck_garbage/open_clip_model.safetensors",)),
    Case("models", "pickle-pretrained",
         ["discover", "--model", "ravl-tiny-rn", "--pretrained", "{ws}/pickled.pt", *DISCOVER[3:]],
         ("--pretrained", "pickled.pt", "refusing to unpickle", "safetensors")),
    Case("models", "malicious-pickle-pretrained",
         ["evaluate", "--model", "ravl-tiny-rn", "--pretrained", "{ws}/evil.pt", *EVALUATE[3:]],
         ("--pretrained", "evil.pt", "refusing to unpickle")),
    Case("models", "malformed-open-clip-config", ["discover", "--model", "local-dir:{ws}/ck_badconfig",
                                                  *DISCOVER[3:]], ("ck_badconfig/open_clip_config.json", "JSON")),
    Case("models", "malformed-ravl-model-json", ["discover", "--model", "local-dir:{ws}/ck_badmeta", *DISCOVER[3:]],
         ("ck_badmeta/ravl_model.json", "JSON")),
    Case("models", "nan-weights", ["discover", "--model", "local-dir:{ws}/ck_nan", *DISCOVER[3:]],
         ("ck_nan/open_clip_model.safetensors", "'visual.conv1.weight'", "NaN")),
    Case("models", "config-of-wrong-type", ["discover", "--model", "local-dir:{ws}/ck_cfgtype", *DISCOVER[3:]],
         ("ck_cfgtype/open_clip_config.json", "'model_cfg'", "wrong type")),
    Case("models", "weights-of-another-architecture", ["evaluate", "--model", "local-dir:{ws}/ck_otherarch",
                                                       *EVALUATE[3:]],
         ("ck_otherarch/open_clip_model.safetensors", "Missing key(s)", "visual.")),
    Case("models", "checkpoint-without-weights", ["discover", "--model", "local-dir:{ws}/ck_noweights",
                                                  *DISCOVER[3:]], ("ck_noweights", WEIGHTS_NAME)),
    Case("models", "checkpoint-folder-missing", ["discover", "--model", "local-dir:{ws}/nowhere", *DISCOVER[3:]],
         ("nowhere", "no such directory")),
    Case("models", "unknown-model-name", ["discover", "--model", "ravl-huge", *DISCOVER[3:]], ("'ravl-huge'",)),
    Case("models", "unknown-pretrained-tag",
         ["discover", "--model", "ravl-tiny-rn", "--pretrained", "laion-nothing", *DISCOVER[3:]],
         ("'laion-nothing'",)),
    Case("models", "audited-model-other-architecture",
         [*STAGE2, "{ws}/findings.json", "--audited-model", "ravl-tiny-vit"], ("different architecture",)),
    # ---- findings entering Stage 2 (ravl finetune --method ravl)
    *[Case("findings (Stage 2)", f"finetune-{name}", [*STAGE2, f"{{ws}}/bad/{name}.json"],
           (f"bad/{name}.json", *needles))
      for name, needles in (("cluster_out_of_k", ("feature rank 1", "cluster_id 7", "K = 3")),
                            ("nan_medoid", ("medoid_embeddings[0]", "feature rank 1", "non-finite")),
                            ("zero_medoid", ("medoid_embeddings[0]", "zero length")),
                            ("medoid_width", ("32-dimensional", "64")),
                            ("medoid_rows", ("medoid_embeddings", "K = 3")),
                            ("per_class_string", ("rank 1", "'per_class'")),
                            ("score_string", ("rank 1", "'score'")),
                            ("negative_cluster", ("rank 1", "'cluster_id'")),
                            ("classes_mismatch", ("manifest.parquet", "column 'label'", "'one'")),
                            ("classes_duplicate", ("'classes'",)),
                            ("schema_version", ("schema_version 9",)),
                            ("features_not_list", ("'features'",)),
                            ("not_json", ("not valid JSON",)),
                            ("not_object", ("JSON object",)),
                            ("missing_key", ("missing required key", "k")),
                            ("causal_text", ("rank 1", "'causal'", "an object")),
                            ("called_text", ("rank 1", "'called'", "true or false")),
                            ("model_moved", ("key 'model'", "/nonexistent/ravl-audited", "--audited-model")))],
    Case("findings (Stage 2)", "finetune-findings-missing", [*STAGE2, "{ws}/bad/nothing.json"],
         ("bad/nothing.json",)),
    Case("findings (Stage 2)", "finetune-ravl-without-findings", [*FINETUNE, "--method", "ravl"], ("--findings",)),
    # ---- report inputs
    *[Case("report inputs", f"report-{name}", ["report", "--findings", f"{{ws}}/bad/{name}.json", *REPORT[3:]],
           (f"bad/{name}.json", *needles))
      for name, needles in (("per_class_string", ("rank 1", "'per_class'")),
                            ("score_string", ("rank 1", "'score'")),
                            ("score_nan", ("rank 1", "'score'")),
                            ("box_outside", ("feature rank 1", "eval-000000", "outside", "56x56")),
                            ("unknown_image", ("no-such-image",)),
                            ("schema_version", ("schema_version 9",)),
                            ("names_number", ("rank 1", "'names'", "an object")),
                            ("significance_text", ("'significance'", "an object")))],
    Case("report inputs", "report-findings-nested-deep", ["report", "--findings", "{ws}/bad/deep.json", *REPORT[3:]],
         ("bad/deep.json", "nested too deeply")),
    Case("report inputs", "report-metrics-missing-key",
         [*REPORT, "--metrics", "ravl={ws}/bad/metrics_missing.json"], ("metrics_missing.json", "region_overall")),
    Case("report inputs", "report-metrics-not-a-number",
         [*REPORT, "--metrics", "ravl={ws}/bad/metrics_text.json"], ("metrics_text.json", "image_overall")),
    Case("report inputs", "report-metrics-twice",
         [*REPORT, "--metrics", "a={ws}/metrics.json", "--metrics", "a={ws}/metrics.json"], ("--metrics", "'a'")),
    Case("report inputs", "report-provenance-not-an-object", [*REPORT, "--provenance", "{ws}/bad/provenance_list.json"],
         ("provenance_list.json", "JSON object")),
    Case("report inputs", "report-reaudit-bad", [*REPORT, "--reaudit", "{ws}/bad/per_class_string.json"],
         ("per_class_string.json", "'per_class'")),
    # ---- datasets
    Case("datasets", "region-labels-without-boxes", ["discover", *MODEL, "--data", "{ws}/data/noboxes",
                                                     *DISCOVER[7:]], ("noboxes/manifest.parquet", "'boxes'")),
    Case("datasets", "symlink-outside-dataset", ["discover", *MODEL, "--data", "{ws}/data/linked", *DISCOVER[7:]],
         ("linked/manifest.parquet", "row 1", "column 'path'", "symbolic link")),
    Case("datasets", "path-with-dotdot", ["discover", *MODEL, "--data", "{ws}/data/dotdot", *DISCOVER[7:]],
         ("dotdot/manifest.parquet", "row 1", "'..'")),
    Case("datasets", "missing-image", ["discover", *MODEL, "--data", "{ws}/data/missing", *DISCOVER[7:]],
         ("missing/manifest.parquet", "row 1", "does not exist")),
    Case("datasets", "corrupt-image", ["discover", *MODEL, "--data", "{ws}/data/corrupt", *DISCOVER[7:]],
         ("corrupt/manifest.parquet", "row 0", "unreadable")),
    Case("datasets", "label-not-a-class", ["discover", *MODEL, "--data", "{ws}/data/badlabel", "--classes",
                                           "seven,nine", *DISCOVER[7:]], ("badlabel/manifest.parquet", "'one'")),
    Case("datasets", "duplicate-image-id", ["discover", *MODEL, "--data", "{ws}/data/dupid", *DISCOVER[7:]],
         ("dupid/manifest.parquet", "row 1", "duplicate")),
    Case("datasets", "box-outside-image", ["discover", *MODEL, "--data", "{ws}/data/badbox", *DISCOVER[7:]],
         ("badbox/manifest.parquet", "column 'boxes'", "outside")),
    Case("datasets", "single-class", ["discover", *MODEL, "--data", "{ws}/data/oneclass", *DISCOVER[7:]],
         ("oneclass/manifest.parquet", "at least two classes", "'one'")),
    Case("datasets", "evaluate-single-class", ["evaluate", *MODEL, "--data", "{ws}/data/oneclass", "--split", "all",
                                               *EVALUATE[5:]], ("oneclass/manifest.parquet", "at least two classes")),
    Case("datasets", "labels-differ-by-case", ["discover", *MODEL, "--data", "{ws}/data/caselabels", *DISCOVER[7:]],
         ("caselabels/manifest.parquet", "'One '", "'one'", "case or spaces")),
    Case("datasets", "prompts-identical-once-tokenized", ["discover", *MODEL, "--data", "{ws}/data/longlabels",
                                                          *DISCOVER[7:]], ("identical once tokenized", "cut at 16 tokens")),
    Case("datasets", "evaluate-feature-unknown", [*EVALUATE, "--feature", "plaid"],
         ("--feature 'plaid'", "eval/manifest.parquet", "region_labels")),
    Case("datasets", "no-manifest", ["discover", *MODEL, "--data", "{ws}/data/nomanifest", *DISCOVER[7:]],
         ("nomanifest/manifest.parquet",)),
    Case("datasets", "manifest-not-parquet", ["discover", *MODEL, "--data", "{ws}/data/notparquet", *DISCOVER[7:]],
         ("notparquet/manifest.parquet", "unreadable")),
    Case("datasets", "split-without-rows", [*DISCOVER[:5], "--split", "train", *DISCOVER[7:]],
         ("eval/manifest.parquet", "'train'")),
    Case("datasets", "boxes-proposer-without-boxes", ["discover", *MODEL, "--data", "{ws}/data/badlabel",
                                                      "--proposer", "boxes", *DISCOVER[7:]], ("'boxes'",)),
    Case("datasets", "coco-missing-images-flag", ["import", "coco", "{ws}/bad/coco.json", "--out", "{ws}/imported"],
         ("--images",)),
    Case("datasets", "coco-malformed", ["import", "coco", "{ws}/bad/coco.json", "--images", "{ws}/set/eval",
                                        "--out", "{ws}/imported"], ("coco.json",)),
    # ---- imports: every row checked, every image copied, before an earlier dataset is replaced
    *[Case("imports", f"import-{name.replace('_', '-')}",
           ["import", "coco", f"{{ws}}/bad/{name}.json", "--images", images, "--out", out],
           (f"bad/{name}.json", *needles))
      for name, images, out, needles in (
          ("coco_nan_bbox", "{ws}/set/eval/images", "{ws}/set/eval", ("annotation id 11", "'bbox'", "finite")),
          ("coco_negative_size", "{ws}/set/eval/images", "{ws}/set/eval", ("annotation id 11", "negative")),
          ("coco_bbox_text", "{ws}/set/eval/images", "{ws}/set/eval", ("annotation id 10", "'bbox'")),
          ("coco_same_name", "{ws}/set/eval/images", "{ws}/set/eval", ("categories[1]", "two categories named 'one'")),
          ("coco_annotations_object", "{ws}/set/eval/images", "{ws}/set/eval", ("'annotations'", "a list")),
          ("coco_image_not_object", "{ws}/set/eval/images", "{ws}/set/eval", ("images[0]", "JSON object")),
          ("coco_top_list", "{ws}/set/eval/images", "{ws}/set/eval", ("JSON object",)),
          ("coco_file_name_dot", "{ws}/bad", "{ws}/set/finetune", ("images[1]", "'file_name'", "'.'")),
          ("coco_missing_image", "{ws}/bad", "{ws}/set/finetune", ("image id 2", "absent.png", "does not exist")),
          ("coco_corrupt_image", "{ws}/bad", "{ws}/set/finetune", ("image id 2", "corrupt.png", "unreadable")),
          ("coco_wrong_size", "{ws}/bad", "{ws}/set/finetune", ("row 0", "column 'boxes'", "outside")))],
    Case("imports", "import-in-place-box-outside", ["import", "coco", "{ws}/bad/coco_wrong_size.json", "--images",
                                                    "{ws}/set/eval/images", "--out", "{ws}/set/eval"],
         ("set/eval/manifest.parquet", "row 0", "column 'boxes'", "outside")),
    Case("imports", "import-copying-into-unrelated-folder", ["import", "imagefolder", "{ws}/imagefolder", "--out",
                                                             "{ws}/results"], ("results", "not a dataset")),
    Case("imports", "import-imagefolder-corrupt-image", ["import", "imagefolder", "{ws}/imagefolder",
                                                         "--out", "{ws}/set/finetune"],
         ("imagefolder: class 'nine'", "b.png", "unreadable")),
    Case("imports", "import-coco-images-not-a-folder", ["import", "coco", "{ws}/bad/coco_nan_bbox.json",
                                                        "--images", "{ws}/bad/corrupt.png", "--out", "{ws}/imp"],
         ("--images", "corrupt.png", "expected a folder")),
    Case("imports", "import-coco-file-is-a-folder", ["import", "coco", "{ws}/bad", "--images", "{ws}/bad",
                                                     "--out", "{ws}/imp"], ("bad", "is a folder, expected a file")),
    Case("datasets", "imagefolder-not-a-folder", ["import", "imagefolder", "{ws}/nowhere", "--out", "{ws}/imported"],
         ("nowhere",)),
    Case("datasets", "vocabulary-empty", [*DISCOVER[:-3], "--out", "{ws}/results/new.json", "--vocab",
                                          "{ws}/bad/vocab_empty.txt"], ("vocab_empty.txt", "no terms")),
    Case("datasets", "vocabulary-braces", [*DISCOVER[:-3], "--out", "{ws}/results/new.json", "--vocab",
                                           "{ws}/bad/vocab_braces.txt"], ("vocab_braces.txt", "line 1")),
]


def test_the_table_covers_every_group_and_names_are_unique():
    assert len({c.name for c in CASES}) == len(CASES)
    groups = {c.group for c in CASES}
    assert groups == {"numeric and choice flags", "templates", "output paths", "input kinds", "imports", "models",
                      "findings (Stage 2)", "report inputs", "datasets"}


def test_the_readme_counts_the_table_as_it_is():
    """README's reliability section states the number of cases and each group's count."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("## Reliability"):]
    section = section[:section.index("\n## ", 3)]
    prose = " ".join(section.split())
    assert f"runs {len(CASES)} bad inputs" in prose and f"all {len(CASES)} end in a clear error" in prose
    rows = dict(re.findall(r"^\| ([A-Za-z (),0-9]+?) \| (\d+) \|", section, re.M))
    assert {group: int(n) for group, n in rows.items()} == dict(collections.Counter(c.group for c in CASES))


def run_ravl(argv: list[str]) -> int:
    """``ravl argv`` in process: its exit status."""
    return ravl(argv)


def assert_one_clear_line(err: str, command: str) -> None:
    """One error line for ``command`` (warnings may come before it; a list of
    problems may follow it, indented), and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith(f"ravl {command}: error: ")]
    assert len(errors) == 1, err
    assert all(line.startswith(f"ravl {command}: warning: ") for line in lines[:errors[0]]), err
    assert all(line.startswith("  ") for line in lines[errors[0] + 1:]), err
    assert "Traceback" not in err and "internal error" not in err, err


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_ends_in_one_clear_line_and_changes_nothing(case, ws, tmp_path, monkeypatch, capsys):
    if case.name.startswith("params-"):
        monkeypatch.setenv("RAVL_PARAMS", str(ws / "bad" / f"{case.name.replace('-', '_')}.yaml"))
        monkeypatch.setenv("RAVL_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    argv = [a.replace("{ws}", str(ws)) for a in case.argv]
    before = snapshot_all(ws)
    capsys.readouterr()
    rc = run_ravl(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    command = argv[0] if argv[0] != "bench" else "bench discovery"
    assert_one_clear_line(err, command)
    for needle in case.needles:
        assert needle.replace("{ws}", str(ws)) in err, f"{needle!r} not in {err!r}"
    assert snapshot_all(ws) == before  # nothing written, nothing replaced, no temporary left
    assert not (ws / "EXECUTED").exists()  # no pickle was run


# --------------------------------------------------------------------------- beyond the table

def test_report_beside_earlier_results_writes_only_its_own_files(ws, tmp_path, capsys):
    """The report written next to the results it reads leaves them as they
    were, and the same command runs again (its twin is report.json)."""
    results = tmp_path / "results"
    shutil.copytree(ws / "results", results)
    argv = ["report", "--findings", str(results / "findings.json"), "--metrics", f"ravl={results / 'metrics.json'}",
            "--data", str(ws / "set" / "eval"), "--out", str(results / "audit.html")]
    before = snapshot_all(results)
    for _ in range(2):
        assert run_ravl(argv) == 0, capsys.readouterr().err
        after = snapshot_all(results)
        assert {k: v for k, v in after.items() if k in before} == before
        assert set(after) - set(before) == {"audit.html", "audit.json"}
    twin = json.loads((results / "audit.json").read_text())
    assert twin["generator"] == "ravl_pipeline report"
    assert twin["findings"] == json.loads((results / "findings.json").read_text())
    assert twin["metrics"] == {"ravl": json.loads((results / "metrics.json").read_text())}
    assert twin["reaudit"] is None


def test_an_untrained_model_is_named_and_the_same_on_every_run(ws, tmp_path, capsys):
    """``--model ravl-tiny-rn`` has no trained weights: the command says so,
    and ``--seed`` fixes the random network, so two runs agree."""
    out = []
    for run in range(2):
        path = tmp_path / f"f{run}.json"
        argv = ["discover", "--model", "ravl-tiny-rn", "--data", str(ws / "set" / "eval"), "--split", "val",
                "--no-evidence", "--seed", "3", "--out", str(path), "--quiet"]
        assert run_ravl(argv) == 0
        err = capsys.readouterr().err
        assert "ravl discover: warning: --model ravl-tiny-rn without --pretrained has no trained weights" in err
        assert "seeded with 3" in err
        out.append({k: v for k, v in json.loads(path.read_text()).items() if k != "seconds"})
    assert out[0] == out[1]


def test_an_internal_error_is_one_line_and_verbose_shows_the_traceback(monkeypatch, capsys):
    from ravl_pipeline.cli import synth

    def broken(args):
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.setattr(synth, "run", broken)
    assert run_ravl(["synth", "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert err == ("ravl synth: internal error: RuntimeError: a bug (re-run with -v for the traceback)\n")
    assert run_ravl(["-v", "synth", "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith(
        "ravl synth: internal error: RuntimeError: a bug")
    assert run_ravl(["synth", "--out", "unused", "-v"]) == 1  # -v after the command works too
    assert "Traceback" in capsys.readouterr().err


def test_an_asset_fails_on_bad_input_with_one_line(ws, tmp_path, monkeypatch, capsys):
    """In the Dagster graph a user error ends its step as a one-line
    failure, printed by ``ravl materialize`` with exit status 2."""
    data = tmp_path / "data"
    shutil.copytree(ws / "data" / "linked", data / "validation_sets" / "linked", symlinks=True)
    monkeypatch.setenv("RAVL_DATA_DIR", str(data))
    monkeypatch.setenv("RAVL_PARAMS", str(tmp_path / "params.yaml"))  # missing: the defaults
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    rc = run_ravl(["materialize", "--partition", "linked", "--select", "region_proposals"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 2, out
    assert "Traceback" not in captured.err and "Stack Trace" not in captured.err, captured.err
    failed = [line for line in out.splitlines() if "step region_proposals failed:" in line]
    assert len(failed) == 1 and "row 1 (image_id 'i1'), column 'path'" in failed[0], out
    assert "symbolic link" in failed[0] and "Traceback" not in out
    assert not (data / "outputs" / "linked" / "proposals").exists()


@pytest.mark.parametrize("code, hint", [(errno.ENOSPC, "free some space"), (errno.EROFS, "writable file system"),
                                        (errno.ENAMETOOLONG, "shorter name")])
def test_an_os_error_the_user_can_act_on_is_one_line_naming_the_path(ws, tmp_path, monkeypatch, capsys, code, hint):
    """A full disk, a read-only file system or a name too long while an
    import copies its images: exit status 2, one line naming where the
    image was to go and what to do; the earlier dataset is left as it was."""
    out, src = tmp_path / "dataset", tmp_path / "src"
    shutil.copytree(ws / "set" / "eval", out)
    for label, name in (("one", "a.png"), ("nine", "b.png")):
        (src / label).mkdir(parents=True)
        shutil.copyfile(ws / "set" / "eval" / "images" / "eval-000000.png", src / label / name)
    before = snapshot_all(tmp_path)

    def failing(src, dst, *args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(shutil, "copyfile", failing)
    rc = run_ravl(["import", "imagefolder", str(src), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert_one_clear_line(err, "import")
    assert str(out / "images" / "nine" / "b.png") in err and os.strerror(code) in err and hint in err
    assert snapshot_all(tmp_path) == before


def test_a_huge_message_is_cut_to_one_readable_line(tmp_path, capsys):
    """A value of 100,000 characters in a message is cut, saying how much was left out."""
    name = "x" * 100_000
    rc = run_ravl(["discover", "--model", "ravl-tiny-rn", "--data", str(tmp_path), "--out", str(tmp_path / "f.json"),
                   "--classes", f"{name},{name}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert_one_clear_line(err, "discover")
    assert "--classes" in err and "more characters)" in err and len(err) < 2000


def test_warnings_of_libraries_are_the_projects_one_line_warnings(ws, tmp_path, monkeypatch, capsys):
    """A 16-bit image (scaled to 8 bits, not clipped) and PIL's decompression
    bomb warning each end as one ``ravl discover: warning:`` line, once,
    without the library's file and source line."""
    from ravl_pipeline.io import dataset as dataset_module

    root = tmp_path / "wide"
    shutil.copytree(ws / "set" / "eval", root)
    first = root / "images" / "eval-000000.png"
    Image.fromarray((np.asarray(Image.open(first).convert("L")).astype(np.uint16) * 257)).save(first)
    dataset_module._warned_modes.clear()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 56×56 images: above it, below twice it
    argv = ["discover", *[a.replace("{ws}", str(ws)) for a in MODEL], "--data", str(root), "--split", "val",
            "--no-evidence", "--quiet", "--out", str(tmp_path / "f.json")]
    assert run_ravl(argv) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert all(line.startswith("ravl discover: warning: ") for line in lines), lines
    wide = [line for line in lines if "I;16 image" in line]
    bomb = [line for line in lines if "decompression bomb" in line.lower()]
    assert len(wide) == 1 and "eval-000000.png" in wide[0] and len(bomb) == 1, lines
