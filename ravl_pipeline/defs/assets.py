"""The asset graph, one asset per step of the reading path (DESIGN):

audited_model → region_proposals → region_embeddings → zero_shot_scores →
region_clusters → spurious_features → mitigated_model → mitigation_metrics,
mitigated_findings (the mitigated model audited again) → evaluation_report.

Every asset is a thin wrapper over ``ravl_pipeline.ml``: it reads the files
its upstream wrote under ``data/outputs/<validation set>/``, calls the
library, writes its own files atomically (temp + rename, so a killed run
leaves the previous materialization intact) and reports UI metadata.
Assets return :class:`~dagster.MaterializeResult`; nothing goes through an
IO manager, so nothing is ever pickled.
"""

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..ml import audit, discover as disc
from ..ml.data import load_dataset, read_manifest, write_json_atomic
from ..ml.embed import Embeddings, embed_dataset
from ..ml.models import load_model
from ..ml.recipe import DEFAULT_RECIPE, build_audited_model
from ..ml.regions import propose_dataset
from . import metadata as meta
from .partitions import validation_sets
from .project import RavlProject, atomic_dir, dataset_fingerprint
from .sources import (params_audited_model, params_discovery, params_evaluation, params_labels,
                      params_mitigation, params_regions, params_scores, validation_set)

# Model-heavy steps share one concurrency pool; `dagster.yaml` caps it, so a
# multiprocess run never trains and embeds at once on a small machine.
MODEL_POOL = "ravl_model"
AUDIT_GROUP = "audit"
MITIGATION_GROUP = "mitigation"


def _recipe_version() -> str:
    text = json.dumps([DEFAULT_RECIPE.to_dict(), DEFAULT_RECIPE.small().to_dict()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- helpers

def audited_record(ravl: RavlProject) -> dict[str, Any]:
    path = ravl.audited_record_path
    if not path.is_file():
        raise dg.Failure(f"{path} does not exist: materialize the `audited_model` asset first "
                         "(`ravl materialize --select audited_model`)")
    return json.loads(path.read_text())


def has_split(dataset_dir: Path, split: str) -> bool:
    table = read_manifest(dataset_dir)
    return "split" in table.column_names and split in set(table.column("split").to_pylist())


def discovery_split(dataset_dir: Path) -> str | None:
    """SPEC §4.1: discovery runs on ``val`` when the set has one, else on all rows."""
    return "val" if has_split(dataset_dir, "val") else None


def evaluation_split(dataset_dir: Path) -> str | None:
    """SPEC §4.2: metrics on ``test`` when the set has one, else on the discovery rows."""
    return "test" if has_split(dataset_dir, "test") else discovery_split(dataset_dir)


def discovery_data(ravl: RavlProject, partition: str):
    """The partition's discovery rows and the class list (``labels.classes`` or the data's)."""
    root = ravl.validation_set_dir(partition)
    classes = ravl.params()["labels"]["classes"]
    ds = load_dataset(root, classes=classes, split=discovery_split(root), require_labels=True)
    return ds, list(classes or ds.classes())


def templates_for(ravl: RavlProject, dataset_dir: Path) -> list[str]:
    return list(ravl.params()["scores"]["templates"] or audit.dataset_templates(dataset_dir))


def _fixed(arr: np.ndarray) -> pa.FixedSizeListArray:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])


def _matrix(col) -> np.ndarray:
    col = col.combine_chunks()
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, col.type.list_size)


def read_scores(out: Path) -> audit.Scores:
    info = json.loads((out / "scores" / "scores.json").read_text())
    images = pq.read_table(out / "scores" / "images.parquet")
    regions = pq.read_table(out / "scores" / "regions.parquet")
    return audit.Scores(info["classes"], _matrix(images.column("probs")), _matrix(regions.column("probs")))


def read_clustering(out: Path) -> disc.Clustering:
    info = json.loads((out / "clusters" / "clustering.json").read_text())
    labels = pq.read_table(out / "clusters" / "assignments.parquet").column("cluster").to_numpy()
    return disc.Clustering(k=info["k"], silhouette=info["silhouette"] if info["silhouette"] is not None
                           else float("nan"), labels=labels.astype(np.int64),
                           medoids=np.asarray(info["medoids"], np.int64), sweep=info["sweep"],
                           sampled=info["sampled"], n_sample=info["n_sample"])


def set_data_version(dataset_dir: Path, *parts: str) -> dg.DataVersion:
    """Data version of an asset read straight from a validation set: its
    content fingerprint with the parameters used. Dagster does not carry a
    partitioned source's observed version into its dependents' versions, so
    without this a changed set would leave them with the same version and
    their own dependents would never go stale."""
    text = "|".join([dataset_fingerprint(dataset_dir), *parts])
    return dg.DataVersion(hashlib.sha256(text.encode()).hexdigest()[:24])


def induced_pairs(dataset_dir: Path) -> list[tuple[str, str]]:
    """(feature, class) pairs a synthetic setting induced; [] for user data."""
    setting = audit.dataset_setting(dataset_dir)
    if not setting:
        return []
    cfg = setting.get("config", {})
    feats = cfg.get("features", [])
    classes = setting.get("correlated_classes") or [cfg.get("correlated_class")] * len(feats)
    return [(f["name"], c) for f, c in zip(feats, classes)]


# --------------------------------------------------------------------------- the audited model

@dg.asset(deps=[params_audited_model], kinds={"pytorch", "open_clip"}, group_name=AUDIT_GROUP,
          code_version=f"1-{_recipe_version()}", pool=MODEL_POOL,
          description="The fine-tuned CLIP model under audit: the built-in synthetic default "
                      "(recipe) or an existing checkpoint named in params.yaml.")
def audited_model(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    p = ravl.params()["audited_model"]
    if p["source"] == "synthetic-default":
        recipe = DEFAULT_RECIPE.small() if p["recipe"] == "small" else DEFAULT_RECIPE
        paths = build_audited_model(ravl.default_setting_dir, recipe)
        record = {"source": p["source"], "model": f"local-dir:{paths['audited']}", "pretrained": None,
                  "init_model": f"local-dir:{paths['pretrained']}",
                  "train_data": str(paths["setting"] / "finetune"), "setting": str(paths["setting"])}
    else:
        lm = load_model(p["checkpoint"], p["pretrained"])
        init = p["init_model"] or (f"local-dir:{lm.meta['pretrained_from']}" if lm.meta.get("pretrained_from")
                                   else None)
        record = {"source": p["source"], "model": p["checkpoint"], "pretrained": p["pretrained"],
                  "init_model": init, "train_data": p["train_data"] or lm.meta.get("train_data")}
    lm = load_model(record["model"], record["pretrained"])
    record["architecture"] = lm.architecture
    record["train"] = lm.meta.get("train")
    write_json_atomic(ravl.audited_record_path, record)
    n_params = sum(p.numel() for p in lm.model.parameters())
    context.log.info(f"audited model: {record['model']}")
    return dg.MaterializeResult(metadata={
        "model": record["model"], "architecture": lm.architecture, "parameters": n_params,
        "init_model": str(record["init_model"]), "train_data": str(record["train_data"]),
        "record": dg.MetadataValue.path(str(ravl.audited_record_path)),
    })


# --------------------------------------------------------------------------- Stage 1, per validation set

def _partitioned(**kwargs):
    kwargs.setdefault("group_name", AUDIT_GROUP)
    return dg.asset(partitions_def=validation_sets, **kwargs)


@_partitioned(deps=[validation_set, params_regions], kinds={"parquet"}, code_version="1",
              description="Candidate regions of every discovery image (SPEC §1.1).")
def region_proposals(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    ds, _ = discovery_data(ravl, context.partition_key)
    proposer = ravl.params()["regions"]["proposer"]
    boxes = propose_dataset(ds, proposer)
    table = pa.table({
        "image_id": [i for i, b in zip(ds.image_ids, boxes) for _ in range(len(b))],
        "region_index": pa.array([j for b in boxes for j in range(len(b))], pa.int64()),
        "box": _fixed(np.concatenate(boxes) if boxes else np.zeros((0, 4))),
    })
    out = ravl.output_dir(context.partition_key)
    with atomic_dir(out / "proposals") as tmp:
        pq.write_table(table, tmp / "proposals.parquet")
    return dg.MaterializeResult(data_version=set_data_version(ds.root, proposer), metadata={
        "dagster/row_count": table.num_rows, "images": len(ds), "proposer": proposer,
        "path": dg.MetadataValue.path(str(out / "proposals" / "proposals.parquet"))})


@_partitioned(deps=[region_proposals, audited_model, params_regions], kinds={"pytorch", "parquet"},
              code_version="1", pool=MODEL_POOL,
              description="L2-normalised image and region embeddings, one backbone pass per image (SPEC §1.2).")
def region_embeddings(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    ds, _ = discovery_data(ravl, context.partition_key)
    p = ravl.params()["regions"]
    out = ravl.output_dir(context.partition_key)
    record = audited_record(ravl)
    lm = load_model(record["model"], record["pretrained"])
    t0 = time.perf_counter()
    emb = embed_dataset(lm, ds, proposer=p["proposer"], mode=p["mode"], batch_size=p["batch_size"],
                        progress=False)
    seconds = time.perf_counter() - t0
    proposals = pq.read_table(out / "proposals" / "proposals.parquet")
    if proposals.num_rows != emb.n_regions:
        raise dg.Failure(f"{out / 'proposals'}: {proposals.num_rows} proposals but {emb.n_regions} "
                         "embedded regions; re-materialize region_proposals")
    emb.save(out / "embeddings")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": emb.n_regions, "images": len(emb.image_ids), "dim": int(emb.region_emb.shape[1]),
        "mode": emb.mode, "seconds": round(seconds, 2),
        "path": dg.MetadataValue.path(str(out / "embeddings"))})


@_partitioned(deps=[region_embeddings, audited_model, params_scores, params_labels], kinds={"parquet"},
              code_version="1", pool=MODEL_POOL,
              description="Zero-shot class probabilities of images and regions (SPEC §1.3–1.4).")
def zero_shot_scores(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    ds, classes = discovery_data(ravl, context.partition_key)
    out = ravl.output_dir(context.partition_key)
    record = audited_record(ravl)
    lm = load_model(record["model"], record["pretrained"])
    emb = Embeddings.load(out / "embeddings")
    templates = templates_for(ravl, ds.root)
    tau = ravl.params()["scores"]["tau"]
    sc = audit.score(lm, emb, classes, templates, tau)
    labels = audit.label_indices(ds, classes)
    with atomic_dir(out / "scores") as tmp:
        pq.write_table(pa.table({"image_id": emb.image_ids, "label": pa.array(labels, pa.int64()),
                                 "pred": pa.array(sc.image_pred, pa.int64()), "probs": _fixed(sc.image_probs)}),
                       tmp / "images.parquet")
        pq.write_table(pa.table({"probs": _fixed(sc.region_probs)}), tmp / "regions.parquet")
        write_json_atomic(tmp / "scores.json", {"classes": classes, "templates": templates, "tau": tau})
    accuracy = float((sc.image_pred == labels).mean())
    per_class = ["| class | n | zero-shot accuracy |", "|---|---:|---:|"]
    for k, name in enumerate(classes):
        mask = labels == k
        per_class.append(f"| {name} | {int(mask.sum())} | {float((sc.image_pred[mask] == k).mean()) if mask.any() else 0:.3f} |")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": int(len(sc.region_probs)), "image_accuracy": accuracy, "tau": tau,
        "templates": dg.MetadataValue.json(templates), "per_class": meta.md("\n".join(per_class)),
        "path": dg.MetadataValue.path(str(out / "scores"))})


@_partitioned(deps=[region_embeddings, params_discovery, params_labels], kinds={"parquet"}, code_version="1",
              description="K-medoids over cosine distance, K chosen by silhouette over [2|Y|, 5|Y|) (SPEC §2.1).")
def region_clusters(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    _, classes = discovery_data(ravl, context.partition_key)
    p = ravl.params()["discovery"]
    out = ravl.output_dir(context.partition_key)
    emb = Embeddings.load(out / "embeddings")
    cl = disc.cluster_regions(emb.region_emb, len(classes), seed=p["seed"], k_range=p["k_range"],
                              max_regions=p["max_regions"], workers=p["cluster_workers"])
    silhouette = None if np.isnan(cl.silhouette) else float(cl.silhouette)
    with atomic_dir(out / "clusters") as tmp:
        pq.write_table(pa.table({"image_id": [emb.image_ids[i] for i in emb.region_image],
                                 "region_index": pa.array(emb.region_index, pa.int64()),
                                 "cluster": pa.array(cl.labels, pa.int64())}), tmp / "assignments.parquet")
        write_json_atomic(tmp / "clustering.json", {
            "k": cl.k, "silhouette": silhouette, "medoids": [int(m) for m in cl.medoids],
            "sweep": [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in s.items()}
                      for s in cl.sweep],
            "sampled": cl.sampled, "n_sample": cl.n_sample, "seed": p["seed"]})
    return dg.MaterializeResult(metadata={
        "dagster/row_count": int(len(cl.labels)), "k": cl.k, "silhouette": silhouette if silhouette is not None else -1.0,
        "sampled": cl.sampled, "k_sweep": meta.md(meta.k_sweep_table(cl.sweep)),
        "path": dg.MetadataValue.path(str(out / "clusters"))})


@_partitioned(deps=[region_clusters, zero_shot_scores, audited_model, params_discovery], kinds={"json"},
              code_version="3", pool=MODEL_POOL,
              description="Ranked spurious region features with their evidence (permutation p- and "
                          "BH q-values, the masking check, model-derived names): findings.json "
                          "(SPEC §2.2–2.6, §5).")
def spurious_features(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    partition = context.partition_key
    ds, classes = discovery_data(ravl, partition)
    p = ravl.params()["discovery"]
    out = ravl.output_dir(partition)
    emb = Embeddings.load(out / "embeddings")
    sc = read_scores(out)
    if sc.classes != classes:
        raise dg.Failure(f"{out / 'scores'} was computed for classes {sc.classes}, not {classes}; "
                         "re-materialize zero_shot_scores")
    labels = audit.label_indices(ds, classes)
    findings = disc.discover(
        emb.region_emb, emb.region_image, emb.region_index, sc.region_probs, labels, sc.image_pred, classes,
        boxes=emb.boxes, image_ids=emb.image_ids, region_labels=_flat_region_labels(ds, emb),
        seed=p["seed"], influence_threshold=p["influence_threshold"], top_regions=p["top_regions"],
        clustering=read_clustering(out), model=audited_record(ravl)["model"], dataset=partition)
    findings.update({"embedding_mode": emb.mode, "proposer": emb.proposer,
                     "templates": json.loads((out / "scores" / "scores.json").read_text())["templates"],
                     "image_accuracy": float((sc.image_pred == labels).mean()),
                     # Stage 2 assigns training regions to these vectors (SPEC §3.1), as
                     # audit.run_discovery records them
                     "medoid_embeddings": [[float(v) for v in emb.region_emb[m]] for m in findings["medoids"]]})
    if p["evidence"]:
        record = audited_record(ravl)
        lm = load_model(record["model"], record["pretrained"])
        audit.add_evidence(findings, lm, ds, emb, sc, labels, read_clustering(out).labels,
                           templates=findings["templates"], tau=ravl.params()["scores"]["tau"], seed=p["seed"],
                           permutations=p["permutations"], alpha=p["alpha"], mask_fill=p["mask_fill"],
                           batch_size=ravl.params()["regions"]["batch_size"])
    induced = induced_pairs(ds.root)
    if induced:
        findings["ground_truth"] = audit.ground_truth_summary(findings, ds, emb, sc, classes, induced)
    disc.write_findings(findings, out / "findings.json")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(findings["features"]), "k": findings["k"],
        "silhouette": findings["silhouette"] if findings["silhouette"] is not None else -1.0,
        "top_attribute": findings["features"][0]["attribute"] if findings["features"] else "none",
        "called": sum(bool(f.get("called")) for f in findings["features"]) if p["evidence"] else -1,
        "lead_rank": findings.get("lead_rank") or -1,
        "findings": meta.md(meta.findings_table(findings)),
        "top_regions": meta.md(meta.region_grid_markdown(ds.root, findings)),
        "path": dg.MetadataValue.path(str(out / "findings.json"))})


def _flat_region_labels(ds, emb: Embeddings) -> list[str] | None:
    from ..ml.regions import region_labels_for

    gt = region_labels_for(ds, emb.proposer)
    return None if gt is None else [lab for labs in gt for lab in labs]


# --------------------------------------------------------------------------- Stage 2 and the closed loop

def _mitigation_config(ravl: RavlProject, record: dict):
    """The audited model's own fine-tuning configuration (same data, same
    budget: SPEC §3.6) with the mitigation section's non-null values on top."""
    from dataclasses import fields

    from ..ml.train import TrainConfig

    base = {k: v for k, v in (record.get("train") or {}).items() if k in {f.name for f in fields(TrainConfig)}}
    overrides = {k: v for k, v in ravl.params()["mitigation"].items() if v is not None}
    return TrainConfig(**{**base, **overrides})


@_partitioned(deps=[spurious_features, audited_model, params_mitigation], kinds={"pytorch", "open_clip"},
              code_version="2", pool=MODEL_POOL, group_name=MITIGATION_GROUP,
              description="A model trained from the audited model's initialisation with the region-aware "
                          "loss on its fine-tuning data (SPEC §3).")
def mitigated_model(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    from ..ml import mitigate

    record = audited_record(ravl)
    if not record.get("init_model") or not record.get("train_data"):
        raise dg.Failure("Stage 2 needs the audited model's initialisation and fine-tuning data: set "
                         "audited_model.init_model and audited_model.train_data in params.yaml")
    out = ravl.output_dir(context.partition_key)
    findings = disc.read_findings(out / "findings.json")
    cfg = _mitigation_config(ravl, record)
    chosen = []
    if cfg.method in mitigate.FINDINGS_METHODS:
        try:
            chosen = mitigate.select_features(findings)
        except mitigate.MitigationError as exc:
            # SPEC §2.6: nothing found, or nothing called significant; there is
            # nothing to mitigate, so the audited model stands as its own mitigated model
            write_json_atomic(out / "mitigated_model.json", {
                "model": record["model"], "pretrained": record["pretrained"], "trained": False,
                "reason": str(exc)})
            return dg.MaterializeResult(metadata={"model": record["model"], "trained": False,
                                                  "reason": f"{exc}; the audited model is kept"})
    history = mitigate.train_mitigated(record["init_model"], record["train_data"], findings, record["model"],
                                       out / "mitigated_model", cfg, findings_path=out / "findings.json")
    write_json_atomic(out / "mitigated_model.json", {
        "model": f"local-dir:{out / 'mitigated_model'}", "pretrained": None, "trained": True,
        "method": cfg.method, "feature_ranks": [int(f["rank"]) for f in chosen]})
    losses = history.get("losses") or []
    return dg.MaterializeResult(metadata={
        "model": f"local-dir:{out / 'mitigated_model'}", "trained": True, "method": cfg.method,
        "steps": history.get("steps", 0),
        "first_loss": float(losses[0]) if losses else -1.0, "last_loss": float(losses[-1]) if losses else -1.0,
        "spurious_features_used": len(chosen),
        "feature_ranks": ", ".join(str(f["rank"]) for f in chosen) or "none",
        "train_config": dg.MetadataValue.json(cfg.to_dict()),
        "path": dg.MetadataValue.path(str(out / "mitigated_model"))})


def mitigated_record(out: Path) -> dict:
    return json.loads((out / "mitigated_model.json").read_text())


@_partitioned(deps=[mitigated_model, audited_model, params_evaluation], kinds={"json"}, code_version="1",
              pool=MODEL_POOL, group_name=MITIGATION_GROUP,
              description="Image/region overall and worst-group accuracy of the audited and the mitigated "
                          "model on the set's test rows (SPEC §4.2).")
def mitigation_metrics(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    from ..ml.evaluate import evaluate_model

    root = ravl.validation_set_dir(context.partition_key)
    out = ravl.output_dir(context.partition_key)
    split = evaluation_split(root)
    classes = ravl.params()["labels"]["classes"]
    record = audited_record(ravl)
    # groups: (class, induced feature present) where the set has ground truth (SPEC §4.2)
    metrics = {
        "split": split,
        "audited": evaluate_model(record["model"], root, split=split, classes=classes,
                                  pretrained=record["pretrained"]),
        "mitigated": evaluate_model(mitigated_record(out)["model"], root, split=split, classes=classes,
                                    pretrained=mitigated_record(out)["pretrained"]),
    }
    metrics["image_overall_change"] = metrics["mitigated"]["image_overall"] - metrics["audited"]["image_overall"]
    write_json_atomic(out / "metrics.json", metrics)
    return dg.MaterializeResult(metadata={
        "image_overall_change": metrics["image_overall_change"],
        "metrics": meta.md(meta.metrics_table({"audited": metrics["audited"], "mitigated": metrics["mitigated"]})),
        "path": dg.MetadataValue.path(str(out / "metrics.json"))})


@_partitioned(deps=[mitigated_model, validation_set, params_regions, params_scores, params_labels,
                    params_discovery], kinds={"json"}, code_version="2", pool=MODEL_POOL,
              group_name=MITIGATION_GROUP,
              description="Stage 1 run again on the mitigated model: the findings after mitigation.")
def mitigated_findings(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    partition = context.partition_key
    ds, classes = discovery_data(ravl, partition)
    params = ravl.params()
    out = ravl.output_dir(partition)
    mitigated = mitigated_record(out)
    lm = load_model(mitigated["model"], mitigated["pretrained"])
    findings, emb, sc = audit.run_discovery(
        lm, ds, classes, templates=templates_for(ravl, ds.root), proposer=params["regions"]["proposer"],
        mode=params["regions"]["mode"], tau=params["scores"]["tau"], seed=params["discovery"]["seed"],
        batch_size=params["regions"]["batch_size"], progress=False,
        top_regions=params["discovery"]["top_regions"], max_regions=params["discovery"]["max_regions"],
        dataset_name=partition, evidence=params["discovery"]["evidence"],
        permutations=params["discovery"]["permutations"], alpha=params["discovery"]["alpha"],
        mask_fill=params["discovery"]["mask_fill"],
        influence_threshold=params["discovery"]["influence_threshold"], k_range=params["discovery"]["k_range"],
        cluster_workers=params["discovery"]["cluster_workers"])
    induced = induced_pairs(ds.root)
    if induced:
        findings["ground_truth"] = audit.ground_truth_summary(findings, ds, emb, sc, classes, induced)
    disc.write_findings(findings, out / "findings_mitigated.json")
    return dg.MaterializeResult(data_version=set_data_version(ds.root, json.dumps(params, sort_keys=True),
                                                              mitigated["model"]), metadata={
        "dagster/row_count": len(findings["features"]), "k": findings["k"],
        "findings": meta.md(meta.findings_table(findings)),
        "top_regions": meta.md(meta.region_grid_markdown(ds.root, findings)),
        "path": dg.MetadataValue.path(str(out / "findings_mitigated.json"))})


def _feature_summary(findings: dict) -> dict:
    top = findings["features"][0] if findings["features"] else None
    gt = findings.get("ground_truth") or {}
    called = [f for f in findings["features"] if f.get("called")]
    return {"n_features": len(findings["features"]), "k": findings["k"], "silhouette": findings["silhouette"],
            "n_called": len(called) if any("called" in f for f in findings["features"]) else None,
            "image_accuracy": findings.get("image_accuracy"),
            "top_score": top["score"] if top else None, "top_attribute": top["attribute"] if top else None,
            "lead_rank": findings.get("lead_rank"),
            "precision_at_10_top": {name: g.get("precision_at_10_top") for name, g in gt.items()},
            "precision_at_10_lead": {name: g.get("precision_at_10_lead") for name, g in gt.items()}}


@_partitioned(deps=[spurious_features, mitigated_findings, mitigation_metrics], kinds={"html", "json"},
              code_version="2", group_name=MITIGATION_GROUP,
              description="Findings before and after mitigation with the metrics: summary.json and, when "
                          "the report module is installed, report.html.")
def evaluation_report(context: dg.AssetExecutionContext, ravl: RavlProject) -> dg.MaterializeResult:
    partition = context.partition_key
    out = ravl.output_dir(partition)
    before = disc.read_findings(out / "findings.json")
    after = disc.read_findings(out / "findings_mitigated.json")
    metrics = json.loads((out / "metrics.json").read_text())
    provenance = {"validation_set": partition, "run_id": context.run.run_id,
                  "audited_model": audited_record(ravl)["model"],
                  "mitigated_model": mitigated_record(out)["model"],
                  "mitigation_method": _mitigation_config(ravl, audited_record(ravl)).method,
                  "params": ravl.params()}
    summary = {"validation_set": partition, "before": _feature_summary(before), "after": _feature_summary(after),
               "metrics": metrics, "provenance": provenance}
    report_dir = out / "report"
    html_path = None
    with atomic_dir(report_dir) as tmp:
        write_json_atomic(tmp / "summary.json", summary)
        html = _write_html(tmp / "report.html", before, ravl.validation_set_dir(partition), metrics, after,
                           provenance, context)
        html_path = report_dir / "report.html" if html else None
    rows = ["| | before | after |", "|---|---:|---:|"]
    for key in ("n_features", "top_score", "image_accuracy"):
        rows.append(f"| {key} | {summary['before'][key]} | {summary['after'][key]} |")
    md_metrics = meta.metrics_table({"audited": metrics["audited"], "mitigated": metrics["mitigated"]})
    result_meta = {"before_after": meta.md("\n".join(rows)), "metrics": meta.md(md_metrics),
                   "summary": dg.MetadataValue.path(str(report_dir / "summary.json"))}
    if html_path is not None:
        result_meta["report"] = dg.MetadataValue.path(str(html_path))
    return dg.MaterializeResult(metadata=result_meta)


def _write_html(path: Path, findings, dataset_root, metrics, reaudit, provenance, context) -> bool:
    try:
        from ..ml.report import write_report
    except ImportError:
        context.log.info("ravl_pipeline.ml.report is not available; wrote summary.json only")
        return False
    method = provenance.get("mitigation_method", "mitigated")
    write_report(path, findings, dataset_root=dataset_root,
                 metrics={"audited": metrics["audited"], method: metrics["mitigated"]},
                 reaudit=reaudit, provenance={k: v for k, v in provenance.items() if k != "params"})
    return True


PARTITIONED_ASSETS = [region_proposals, region_embeddings, zero_shot_scores, region_clusters,
                      spurious_features, mitigated_model, mitigation_metrics, mitigated_findings,
                      evaluation_report]
DISCOVERY_ASSETS = [region_proposals, region_embeddings, zero_shot_scores, region_clusters, spurious_features]
