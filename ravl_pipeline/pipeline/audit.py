"""One validation set's audit on disk: the steps of :mod:`.stages`, each
reading what the step before it wrote and writing its own output atomically.

The Dagster assets call one step each (``ravl materialize``), and ``ravl
demo`` reads the same layout, so the folder layout is defined here once::

    <outputs>/audited_model.json        which model is audited (ModelRecord)
    <outputs>/<set>/proposals/          region boxes
    <outputs>/<set>/embeddings/         image and region embeddings
    <outputs>/<set>/embedding_shards/   shard-I-of-N/ while one set's embedding is split over steps
    <outputs>/<set>/scores/             zero-shot probabilities
    <outputs>/<set>/clusters/           K-medoids assignments and the K sweep
    <outputs>/<set>/findings.json       ranked features with their evidence
    <outputs>/<set>/mitigated_model/    the Stage-2 checkpoint (when trained)
    <outputs>/<set>/mitigated_model.json which model is the mitigated one
    <outputs>/<set>/control_model/      the same-budget control (Upsampled FT), when trained
    <outputs>/<set>/control_model.json  which model is the control
    <outputs>/<set>/groups.parquet      per test image: which mitigated finding it has (discovered groups)
    <outputs>/<set>/metrics.json        audited, control and mitigated model, SPEC §4.2
    <outputs>/<set>/findings_mitigated.json   Stage 1 again on the mitigated model
    <outputs>/<set>/report/             report.html and summary.json
    <outputs>/<set>/audit_summary.json  the headline numbers (DVC metrics: K, called, lead, metrics)
    <outputs>/<set>/previous/           findings.json and metrics.json as they were before the
                                        last materialization replaced them (re-audit drift)

Every output is written to a temporary path and renamed, so a killed step
leaves the previous version intact.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..compute import CPU, Compute, resolve_compute, shard_compute, use_threads
from ..config import CONTROL_METHOD, AuditedModelConfig, InputError, Params, TrainConfig, stage2_config
from ..core.cache import EMBED_VERSION
from ..core.cluster import Clustering
from ..core.drift import findings_drift, metrics_drift
from ..core.embed import Embeddings, merge_embeddings, shard_rows
from ..core.metrics import METRIC_KEYS, Groups, answer_lines
from ..core.findings import Findings, read_findings, write_findings
from ..core.regions import propose_dataset
from ..core.scores import Scores, label_indices
from ..io.dataset import Dataset, induced_pairs, load_dataset
from ..io.files import atomic_dir, atomic_write, read_json, write_bytes_atomic, write_json_atomic
from ..io.hashing import dataset_fingerprint
from ..io.manifest import read_manifest
from ..io.tables import fixed_list
from ..mitigate.assign import model_fingerprint, select_features
from ..mitigate.data import MitigationError
from ..mitigate.methods import get_method
from ..models import LoadedModel, load_model
from ..report.html import write_report
from . import stages

__all__ = ["AuditError", "AuditPaths", "ModelRecord", "Audit", "describe_audited_model", "findings_summary",
           "headline"]


class AuditError(InputError):
    """A step whose inputs are missing or do not fit together; the message says what to re-run."""


@dataclass(frozen=True)
class AuditPaths:
    """Where one validation set's results live."""

    root: Path

    proposals = property(lambda self: self.root / "proposals")
    embeddings = property(lambda self: self.root / "embeddings")
    scores = property(lambda self: self.root / "scores")
    clusters = property(lambda self: self.root / "clusters")
    findings = property(lambda self: self.root / "findings.json")
    mitigated_model = property(lambda self: self.root / "mitigated_model")
    mitigated_record = property(lambda self: self.root / "mitigated_model.json")
    control_model = property(lambda self: self.root / "control_model")
    control_record = property(lambda self: self.root / "control_model.json")
    groups = property(lambda self: self.root / "groups.parquet")
    metrics = property(lambda self: self.root / "metrics.json")
    findings_mitigated = property(lambda self: self.root / "findings_mitigated.json")
    report = property(lambda self: self.root / "report")
    headline = property(lambda self: self.root / "audit_summary.json")
    previous = property(lambda self: self.root / "previous")
    assignment_cache = property(lambda self: self.root / "spurious-regions-cache")
    embedding_shards = property(lambda self: self.root / "embedding_shards")

    def embedding_shard(self, index: int, count: int) -> Path:
        return self.embedding_shards / f"shard-{index:04d}-of-{count:04d}"


@dataclass
class ModelRecord:
    """Which model a step uses (``audited_model.json``, ``mitigated_model.json``)."""

    model: str
    pretrained: str | None = None
    source: str | None = None
    init_model: str | None = None  # what it was fine-tuned from (Stage 2 starts there)
    train_data: str | None = None  # what it was fine-tuned on (Stage 2 trains on it)
    setting: str | None = None  # the synthetic setting it was built on
    architecture: str | None = None
    train: dict | None = None  # its own fine-tuning configuration
    extra: dict = field(default_factory=dict)

    def load(self, compute: Compute = CPU) -> LoadedModel:
        return load_model(self.model, self.pretrained, compute=compute)

    def to_dict(self) -> dict[str, Any]:
        """``model`` and ``pretrained`` always; the other fields when known."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "extra" and (f.name in ("model", "pretrained") or getattr(self, f.name) is not None)}
        return {**out, **self.extra}

    @classmethod
    def read(cls, path: Path) -> "ModelRecord":
        if not path.is_file():
            raise AuditError(f"{path} does not exist: materialize the step that writes it first "
                             "(`ravl materialize --select audited_model` for the audited model)")
        data = read_json(path, AuditError)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def write(self, path: Path) -> Path:
        return write_json_atomic(path, self.to_dict())


def describe_audited_model(cfg: AuditedModelConfig, built: dict | None = None) -> ModelRecord:
    """The record of the audited model: the synthetic default the recipe
    ``built`` (its ``setting``/``pretrained``/``audited`` paths), or the
    checkpoint ``cfg`` names, with what Stage 2 needs to retrain it."""
    if built is not None:
        record = ModelRecord(model=f"local-dir:{built['audited']}", source=cfg.source,
                             init_model=f"local-dir:{built['pretrained']}",
                             train_data=str(Path(built["setting"]) / "finetune"), setting=str(built["setting"]))
    else:
        meta = load_model(cfg.checkpoint, cfg.pretrained).meta
        init = cfg.init_model or (f"local-dir:{meta['pretrained_from']}" if meta.get("pretrained_from") else None)
        if init is None and meta.get("base_model") and not meta.get("pretrained"):
            init = meta["base_model"]  # `ravl finetune` records what it started from (weights of a name: not)
        record = ModelRecord(model=cfg.checkpoint, pretrained=cfg.pretrained, source=cfg.source, init_model=init,
                             train_data=cfg.train_data or meta.get("train_data"))
    lm = record.load()
    record.architecture = lm.architecture
    record.train = lm.meta.get("train")
    steps = (lm.meta.get("history") or {}).get("steps")
    if steps is not None:
        record.extra["steps"] = int(steps)
    return record


def _same_key(found: dict, key: dict, shard: bool = True) -> bool:
    """Whether a shard's recorded key is ``key`` (its seconds aside; with
    ``shard=False`` its own index and rows aside too)."""
    return all(found.get(k) == v for k, v in key.items() if shard or k not in ("index", "rows"))


def has_split(dataset_dir: Path, split: str) -> bool:
    table = read_manifest(dataset_dir)
    return "split" in table.column_names and split in set(table.column("split").to_pylist())


def findings_summary(findings: Findings) -> dict:
    """The headline of a findings record (``summary.json``)."""
    top = findings.features[0] if findings.features else None
    gt = findings.ground_truth or {}
    return {"n_features": len(findings.features), "k": findings.k, "silhouette": findings.silhouette,
            "n_called": len(findings.called) if findings.has_significance else None,
            "image_accuracy": findings.image_accuracy,
            "top_score": top.score if top else None, "top_attribute": top.attribute if top else None,
            "lead_rank": findings.lead_rank,
            "precision_at_10_top": {name: g.get("precision_at_10_top") for name, g in gt.items()},
            "precision_at_10_lead": {name: g.get("precision_at_10_lead") for name, g in gt.items()}}


def headline(findings: Findings, metrics: dict | None) -> dict:
    """The numbers an experiment is compared by (``audit_summary.json``, DVC
    metrics): K, silhouette, findings, called findings, the lead finding and
    the four SPEC §4.2 metrics of the audited model, the same-budget control
    and the model the closed loop ends with (``mitigated``: the audited one
    when nothing was trained, ``mitigated_trained`` says which)."""
    lead = findings.lead()
    out = {"k": findings.k, "silhouette": None if findings.silhouette is None else round(findings.silhouette, 4),
           "n_features": len(findings.features),
           "n_called": len(findings.called),  # 0 when nothing is called (or significance was not computed)
           "lead_rank": lead.rank if lead else None, "lead_attribute": lead.attribute if lead else "none"}
    metrics = metrics or {}
    for model in ("audited", "control", "mitigated"):  # control None: not trained
        out[model] = {k: (metrics.get(model) or {}).get(k) for k in METRIC_KEYS}
    if metrics and metrics.get("mitigated") is None:
        # nothing was trained: the model the closed loop ends with is the audited one (experiments compare it)
        out["mitigated"] = dict(out["audited"])
    out["mitigated_trained"] = bool(metrics.get("mitigated"))
    return out


@dataclass
class Audit:
    """The audit of validation set ``name`` (a dataset directory) with
    ``params``, against the audited model recorded at ``record_path``."""

    name: str
    dataset_dir: Path
    out: Path
    params: Params
    record_path: Path
    # tqdm bars of embedding and training, live in a terminal (not in logs)
    progress: bool = field(default_factory=lambda: sys.stderr.isatty())

    @cached_property
    def paths(self) -> AuditPaths:
        self.out.mkdir(parents=True, exist_ok=True)
        return AuditPaths(self.out)

    @cached_property
    def audited(self) -> ModelRecord:
        return ModelRecord.read(self.record_path)

    @cached_property
    def discovery_split(self) -> str | None:
        """SPEC §4.1: discovery runs on ``val`` when the set has one, else on all rows."""
        return "val" if has_split(self.dataset_dir, "val") else None

    @cached_property
    def evaluation_split(self) -> str | None:
        """SPEC §4.2: metrics on ``test`` when the set has one, else on the discovery rows."""
        return "test" if has_split(self.dataset_dir, "test") else self.discovery_split

    @cached_property
    def data(self) -> Dataset:
        return load_dataset(self.dataset_dir, classes=self.params.labels.classes, split=self.discovery_split,
                            require_labels=True)

    @cached_property
    def evaluation_data(self) -> Dataset:
        """The rows the metrics are measured on (:attr:`evaluation_split`)."""
        return load_dataset(self.dataset_dir, classes=self.params.labels.classes, split=self.evaluation_split,
                            require_labels=True)

    @cached_property
    def classes(self) -> list[str]:
        return stages.classes_for(self.data, self.params.labels)

    @cached_property
    def templates(self) -> list[str]:
        """The audit's one set of prompt templates (:func:`stages.templates_for`):
        ``scores.templates``, else the audited checkpoint's recorded caption
        template, else the set's ``setting.json``, else the default; every
        step that scores text uses it (zero-shot scores, the evidence, the
        metrics of every model, the re-audit)."""
        return stages.templates_for(self.dataset_dir, self.params.scores, self.audited.train)

    @cached_property
    def compute(self) -> Compute:
        """Where this audit's models run (``params.yaml``'s ``compute`` section),
        with torch's threads set for this process (:func:`use_threads`)."""
        use_threads(self.params.compute.threads)
        return resolve_compute(self.params.compute, where="params.yaml: compute.")

    # ------------------------------------------------------------------ Stage 1

    def propose(self) -> pa.Table:
        """Candidate regions of every discovery image (SPEC §1.1)."""
        boxes = propose_dataset(self.data, self.params.regions.proposer)
        table = pa.table({
            "image_id": [i for i, b in zip(self.data.image_ids, boxes) for _ in range(len(b))],
            "region_index": pa.array([j for b in boxes for j in range(len(b))], pa.int64()),
            "box": fixed_list(np.concatenate(boxes) if boxes else np.zeros((0, 4))),
        })
        with atomic_dir(self.paths.proposals) as tmp:
            pq.write_table(table, tmp / "proposals.parquet")
        return table

    def _save_embeddings(self, emb: Embeddings) -> None:
        proposals = self.paths.proposals / "proposals.parquet"
        n_proposals = pq.read_metadata(proposals).num_rows if proposals.is_file() else emb.n_regions
        if n_proposals != emb.n_regions:
            raise AuditError(f"{self.paths.proposals}: {n_proposals} proposals but {emb.n_regions} embedded "
                             "regions; re-materialize region_proposals")
        emb.save(self.paths.embeddings)

    def _shard_key(self, count: int) -> dict:
        """What one embedding shard was made from: the set, the model, the regions and the split."""
        return {"dataset": dataset_fingerprint(self.dataset_dir), "model": self.audited.to_dict(),
                "weights": model_fingerprint(self.audited.model, self.audited.pretrained),
                "embed_version": EMBED_VERSION, "precision": self.compute.precision,
                "regions": dataclasses.asdict(self.params.regions), "split": self.discovery_split,
                "n_images": len(self.data), "shards": count}

    def embed_shard(self, index: int, count: int) -> tuple[Embeddings, float]:
        """Shard ``index`` of ``count`` of the set's embedding (contiguous rows,
        :func:`~ravl_pipeline.core.embed.shard_rows`), written to
        ``embedding_shards/`` for :meth:`merge_shards`; a shard already there
        from the same data, model and parameters is reused (a failed or
        interrupted split run redoes only its missing shards). With several
        CUDA devices and ``device: cuda``, shard ``index`` runs on device
        ``index mod count``. Returns the shard and the seconds it took."""
        rows = shard_rows(len(self.data), count, index)
        folder = self.paths.embedding_shard(index, count)
        key = {**self._shard_key(count), "index": index, "rows": [rows.start, rows.stop]}
        if (folder / "key.json").is_file() and _same_key(read_json(folder / "key.json", AuditError), key):
            return Embeddings.load(folder / "embeddings"), 0.0
        t0 = time.perf_counter()
        compute = shard_compute(self.compute, index)
        emb = stages.embed(self.audited.load(compute), self.data.subset(list(rows)), self.params.regions,
                           progress=self.progress)
        seconds = time.perf_counter() - t0
        with atomic_dir(folder) as tmp:
            emb.save(tmp / "embeddings")
            write_json_atomic(tmp / "key.json", {**key, "seconds": seconds})
        return emb, seconds

    def merge_shards(self, count: int) -> tuple[Embeddings, float]:
        """The set's embeddings from its ``count`` shards, in row order (the
        same rows as one process makes, to float rounding), and the seconds
        the shards took to embed; the shards are removed once the merged
        embeddings are written."""
        key = self._shard_key(count)
        parts, seconds = [], 0.0
        for index in range(count):
            folder = self.paths.embedding_shard(index, count)
            if not (folder / "key.json").is_file():
                raise AuditError(f"{folder}: embedding shard {index} of {count} is missing; run it first "
                                 f"(`ravl embed-shard --partition {self.name} --shard {index}/{count}`)")
            found = read_json(folder / "key.json", AuditError)
            seconds += float(found.get("seconds") or 0.0)
            if not _same_key(found, key, shard=False):
                raise AuditError(f"{folder}: embedding shard {index} was made from other data, model or regions "
                                 "parameters; run it again")
            parts.append(Embeddings.load(folder / "embeddings"))
        emb = merge_embeddings(parts)
        self._save_embeddings(emb)
        shutil.rmtree(self.paths.embedding_shards, ignore_errors=True)
        return emb, seconds

    def score(self) -> tuple[Scores, np.ndarray]:
        """Zero-shot probabilities (SPEC §1.3–1.4) and the images' class indices."""
        emb = Embeddings.load(self.paths.embeddings)
        sc = stages.score(self.audited.load(self.compute), emb, self.classes, self.templates, self.params.scores)
        labels = label_indices(self.data, self.classes)
        sc.save(self.paths.scores, emb.image_ids, labels)
        return sc, labels

    def cluster(self) -> Clustering:
        """K-medoids with K by silhouette (SPEC §2.1)."""
        emb = Embeddings.load(self.paths.embeddings)
        clustering = stages.cluster(emb, len(self.classes), self.params.discovery)
        clustering.save(self.paths.clusters, emb.image_ids, emb.region_image, emb.region_index)
        return clustering

    def find(self) -> Findings:
        """Ranked spurious features with their evidence: ``findings.json`` (SPEC §2.2–2.6, §5)."""
        emb = Embeddings.load(self.paths.embeddings)
        sc = Scores.load(self.paths.scores)
        if sc.classes != self.classes:
            raise AuditError(f"{self.paths.scores} was computed for classes {sc.classes}, not {self.classes}; "
                             "re-materialize zero_shot_scores")
        findings = stages.find(self.audited.load(self.compute), self.data, emb, sc,
                               Clustering.load(self.paths.clusters),
                               self.params.discovery, dataset_name=self.name,
                               batch_size=self.params.regions.batch_size)
        induced = induced_pairs(self.dataset_dir)
        if induced:
            findings.ground_truth = stages.ground_truth(findings, self.data, emb, sc, induced)
        self._keep_previous(self.paths.findings)
        write_findings(findings, self.paths.findings)
        return findings

    def _keep_previous(self, path: Path) -> None:
        """Copy the output about to be replaced to ``previous/`` (what the next
        drift compares against)."""
        if path.is_file():
            write_bytes_atomic(self.paths.previous / path.name, path.read_bytes())

    def drift(self) -> dict | None:
        """What changed since the previous materialization of this set: findings
        matched by medoid similarity, and metric deltas once the metrics of
        both are known (None when there is no previous audit)."""
        prev = self.paths.previous / self.paths.findings.name
        if not prev.is_file() or not self.paths.findings.is_file():
            return None
        drift = findings_drift(read_findings(prev), read_findings(self.paths.findings))
        prev_metrics = self.paths.previous / self.paths.metrics.name
        if prev_metrics.is_file() and self.paths.metrics.is_file():
            drift["metrics"] = metrics_drift(json.loads(prev_metrics.read_text()),
                                             json.loads(self.paths.metrics.read_text()))
        return drift

    # ------------------------------------------------------------------ Stage 2 and the closed loop

    @cached_property
    def stage2_config(self) -> TrainConfig:
        """Stage 2's training configuration: the audited model's own fine-tuning
        (SPEC §3.4) with the non-null values of ``params.mitigation`` on top."""
        # the class texts of the region loss and captions of uncaptioned rows: the audit's one prompt
        return stage2_config(self.audited.train, self.params.mitigation, caption_template=self.templates[0])

    def mitigate(self) -> tuple[ModelRecord, dict]:
        """Stage 2 from the audited model's initialisation on its fine-tuning
        data (SPEC §3): the mitigated model's record and the training history
        (``{}`` when nothing was trained because nothing is to be mitigated)."""
        return self._stage2(self.stage2_config, self.paths.mitigated_model, self.paths.mitigated_record)

    def train_control(self) -> tuple[ModelRecord, dict]:
        """The same-budget control (``mitigation.control``): Upsampled FT,
        RaVL's λ = 1 ablation (SPEC §3.5), from the same initialisation with
        the same data order, sampler and steps as Stage 2, so the metrics
        show what the region-aware loss bought apart from the extra training.
        Its record says why when it is not trained."""
        cfg = dataclasses.replace(self.stage2_config, method=CONTROL_METHOD)
        if get_method(self.stage2_config.method).region_pass:
            # a method that embeds regions trains on the evaluation transform; the control sees the same images
            cfg = dataclasses.replace(cfg, train_transform="none")
        why = None
        if not self.params.mitigation.control:
            why = "the same-budget control is off (params.yaml: mitigation.control: false)"
        elif self.stage2_config.method == CONTROL_METHOD:
            why = f"the mitigation method is {CONTROL_METHOD}, the control itself"
        elif not get_method(self.stage2_config.method).needs_findings:
            why = f"method {self.stage2_config.method!r} uses no findings: there is no group to upsample"
        if why is not None:
            return self._not_trained(self.paths.control_record, why), {}
        return self._stage2(cfg, self.paths.control_model, self.paths.control_record)

    def _not_trained(self, path: Path, reason: str) -> ModelRecord:
        kept = ModelRecord(model=self.audited.model, pretrained=self.audited.pretrained,
                           extra={"trained": False, "reason": reason})
        kept.write(path)
        return kept

    def _stage2(self, cfg: TrainConfig, out: Path, record_path: Path) -> tuple[ModelRecord, dict]:
        record = self.audited
        if not record.init_model or not record.train_data:
            raise AuditError("Stage 2 needs the audited model's initialisation and fine-tuning data: set "
                             "audited_model.init_model and audited_model.train_data in params.yaml")
        findings = read_findings(self.paths.findings)
        chosen = []
        if get_method(cfg.method).needs_findings:
            try:
                chosen = select_features(findings)
            except MitigationError as exc:
                # SPEC §2.6: nothing found, or nothing to mitigate; nothing is trained
                return self._not_trained(record_path, str(exc)), {}
        history = stages.train(record.init_model, record.train_data, out, cfg,
                               findings=findings, findings_path=self.paths.findings, audited_model=record.model,
                               audited_pretrained=record.pretrained, cache_dir=self.paths.assignment_cache,
                               progress=self.progress, compute=self.compute,
                               checkpoint_every=self.params.compute.checkpoint_every,
                               inherited_transform=self.params.mitigation.train_transform is None)
        trained = ModelRecord(model=f"local-dir:{out}",
                              extra={"trained": True, "method": cfg.method,
                                     "feature_ranks": [int(f.rank) for f in chosen], "steps": history["steps"],
                                     "seconds": history.get("seconds")})
        trained.write(record_path)
        return trained, history

    @property
    def mitigated(self) -> ModelRecord:
        return ModelRecord.read(self.paths.mitigated_record)

    @property
    def control(self) -> ModelRecord | None:
        """The control's record (None before the control step has run)."""
        return ModelRecord.read(self.paths.control_record) if self.paths.control_record.is_file() else None

    def discovered_groups(self) -> Groups | None:
        """Groups of the evaluation rows from the mitigated findings (SPEC §5
        ``groups_from: findings``), computed once per test set with the
        audited model and written to ``groups.parquet`` (one row per image,
        a column per finding); None when no finding is to be mitigated."""
        findings = read_findings(self.paths.findings)
        try:
            select_features(findings)
        except MitigationError:
            self.paths.groups.unlink(missing_ok=True)  # an earlier audit's groups are not this one's
            return None
        ds = self.evaluation_data
        groups = stages.discovered_groups(self.audited.load(self.compute), ds, findings,
                                          cache_dir=self.paths.assignment_cache, progress=self.progress)
        table = pa.table({"image_id": list(ds.image_ids), "label": list(ds.labels),
                          **{f["feature"]: pa.array(groups.presence[f["feature"]], pa.bool_())
                             for f in groups.features}})
        atomic_write(self.paths.groups, lambda fh: pq.write_table(table, fh))
        return groups

    def measure(self) -> dict:
        """The four metrics of the audited model and of each trained model
        (the control, the mitigated one) on the test rows (SPEC §4.2), on the
        data's annotated groups or else the discovered ones, with paired
        bootstrap intervals of their differences and every model's steps."""
        trained = {name: rec for name, rec in (("control", self.control), ("mitigated", self.mitigated))
                   if rec is not None and rec.extra.get("trained")}
        models = {"audited": (self.audited.model, self.audited.pretrained),
                  **{name: (rec.model, rec.pretrained) for name, rec in trained.items()}}
        pairs = [(name, "audited") for name in trained] + ([("mitigated", "control")] if len(trained) == 2 else [])
        warnings = []
        if self.evaluation_split != "test":
            warnings.append(f"{self.dataset_dir}: no 'test' split: the metrics are computed on the discovery rows, "
                            "the images Stage 1 found its features on (not held out)")
        discovered = self.discovered_groups()
        result = stages.evaluate_models(models, self.dataset_dir, split=self.evaluation_split,
                                        templates=self.templates,
                                        classes=self.params.labels.classes,
                                        min_group_size=self.params.evaluation.min_group_size,
                                        progress=self.progress, compute=self.compute, discovered=discovered,
                                        pairs=pairs)
        records = {"audited": self.audited, "control": self.control, "mitigated": self.mitigated}
        metrics = {"split": self.evaluation_split, "groups_from": result["audited"]["groups_from"],
                   **{name: result.get(name) for name in ("audited", "control", "mitigated")},
                   "steps": {name: (rec.extra.get("steps") if rec is not None and
                                    (name == "audited" or rec.extra.get("trained")) else None)
                             for name, rec in records.items()},
                   "not_trained": {name: (rec.extra.get("reason") if rec is not None else
                                          f"{name}_model has not been materialized")
                                   for name, rec in records.items()
                                   if name != "audited" and (rec is None or not rec.extra.get("trained"))},
                   "comparisons": result.get("comparisons", {}), "warnings": warnings}
        if discovered is not None and metrics["groups_from"] == "annotation":
            metrics["discovered_agreement"] = self._agreement(discovered)
        if metrics["mitigated"] is not None:
            metrics["image_overall_change"] = (metrics["mitigated"]["image_overall"]
                                               - metrics["audited"]["image_overall"])
        metrics["answer"] = answer_lines(metrics)
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)
        self._keep_previous(self.paths.metrics)
        write_json_atomic(self.paths.metrics, metrics)
        return metrics

    def metrics_by_model(self, metrics: dict | None) -> dict[str, dict] | None:
        """The trained models' metrics by the names the report and the UI
        show, each with its steps: audited, the control, the mitigation
        method (only models that were trained)."""
        if not metrics:
            return None
        steps = metrics.get("steps") or {}
        names = {"audited": "audited", "control": f"{CONTROL_METHOD} (control)",
                 "mitigated": self.stage2_config.method}
        out = {}
        comparisons = metrics.get("comparisons") or {}
        for key, name in names.items():
            if metrics.get(key):
                label = f"{name}, {steps[key]} steps" if steps.get(key) is not None else name
                paired = {f"paired_vs_{other}": comparisons[f"{key}-{other}"] for other in ("audited", "control")
                          if f"{key}-{other}" in comparisons}
                out[label] = {**metrics[key], **paired}
        return out

    def _agreement(self, discovered: Groups) -> dict[str, float | None]:
        """Per discovered finding: the share of annotated evaluation images on
        which its presence agrees with the annotated feature's."""
        ds = self.evaluation_data
        annotated = stages.groups_for(ds, self.dataset_dir)
        known = np.ones(len(ds), bool) if annotated.known is None else annotated.known
        return {f["feature"]: (float((discovered.presence[f["feature"]] == annotated.presence)[known].mean())
                               if known.any() else None) for f in discovered.features}

    @property
    def was_mitigated(self) -> bool:
        """Whether Stage 2 trained a mitigated model (not: nothing to mitigate)."""
        return self.paths.mitigated_record.is_file() and bool(self.mitigated.extra.get("trained"))

    def reaudit(self) -> Findings | None:
        """Stage 1 again, on the mitigated model: what is left after
        mitigation (None, and no re-audit, when nothing was trained: the
        audited model's findings stand)."""
        if not self.was_mitigated:
            return None
        p = self.params
        findings = stages.stage1(self.mitigated.load(self.compute), self.data, self.classes,
                                 templates=self.templates, regions=p.regions,
                                 scores=p.scores, discovery=p.discovery, dataset_name=self.name,
                                 progress=self.progress).findings
        write_findings(findings, self.paths.findings_mitigated)
        return findings

    def report(self, run_id: str | None = None, note: str | None = None) -> dict:
        """``report/summary.json`` and ``report/report.html``: findings before
        and after mitigation with the metrics; returns the summary."""
        before = read_findings(self.paths.findings)
        mitigated = self.was_mitigated
        after = (read_findings(self.paths.findings_mitigated)
                 if mitigated and self.paths.findings_mitigated.is_file() else None)
        metrics = json.loads(self.paths.metrics.read_text()) if self.paths.metrics.is_file() else None
        provenance = {"validation_set": self.name, "run_id": run_id, "audited_model": self.audited.model,
                      "mitigated_model": self.mitigated.model if mitigated else None,
                      "mitigation_method": self.stage2_config.method, "templates": self.templates,
                      **({"note": note} if note else {})}
        drift = self.drift()
        summary = {"validation_set": self.name, "before": findings_summary(before),
                   "after": findings_summary(after) if after is not None else None, "metrics": metrics,
                   "drift": drift, "provenance": {**provenance, "params": self.params.as_dict()}}
        with atomic_dir(self.paths.report) as tmp:
            write_json_atomic(tmp / "summary.json", summary)
            write_report(tmp / "report.html", before, dataset_root=self.dataset_dir,
                         metrics=self.metrics_by_model(metrics), reaudit=after, provenance=provenance, drift=drift,
                         answer=(metrics or {}).get("answer"))
        write_json_atomic(self.paths.headline, headline(before, metrics))
        return summary
