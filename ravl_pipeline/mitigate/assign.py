"""Which regions of the fine-tuning images are spurious (SPEC §3.1).

The features to mitigate are chosen from the Stage-1 findings
(:func:`select_features`). Every region of every fine-tuning image is then
embedded with the frozen audited model and assigned to its nearest Stage-1
medoid; regions of a chosen feature's cluster are spurious, and an image with
one belongs to the "feature present" group of its class (SPEC §3.6).
``findings.json`` carries the medoid vectors (``medoid_embeddings``), so no
discovery embeddings need to be kept around. The assignment is cached as
Parquet, keyed by the content of everything it depends on, because it does
not change during training and every method trained on the same data shares
it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..config import DEFAULT_FEATURE_SELECTION, FEATURE_SELECTIONS, RegionsConfig
from ..core.cluster import assign_to_medoids
from ..core.embed import Embeddings, embed_dataset
from ..core.findings import Feature, Findings
from ..io.files import atomic_write
from ..io.hashing import json_sha256, memo_file_sha256
from ..io.tables import fixed_list, matrix
from ..models import WEIGHTS_NAME, LoadedModel
from .data import MitigationError

__all__ = ["select_features", "check_stage2_findings", "medoid_embeddings", "RegionAssignment", "assign_spurious_regions",
           "cached_assignment", "group_ids"]


def select_features(findings: Findings, which: str | int = DEFAULT_FEATURE_SELECTION) -> list[Feature]:
    """The discovered features whose clusters count as spurious (SPEC §3.1, §3.7).

    ``called`` (default): the features Stage 1 calls spurious — those called
    significant where the findings carry significance (else every kept
    feature), less those the masking check does not support (hiding their
    regions undoes none of the errors they go with: they do not cause them,
    so there is nothing in them to unlearn), i.e. :attr:`Feature.actionable`;
    ``significant``: every called feature, supported or not; ``top1`` / an
    integer ``k``: the first / first ``k`` of the ``called`` ones; ``all``:
    every kept cluster (SPEC §3.1); ``rank1``: the top-ranked kept cluster
    whatever its evidence, which is what the reference code mitigates.
    """
    feats = sorted(findings.features, key=lambda f: f.rank)
    where = f"findings for dataset {findings.dataset!r}"
    if not feats:
        raise MitigationError(f"{where} name no spurious feature (empty 'features'): nothing to mitigate; "
                              "train with --method standard or vl-erm")
    if which == "all":
        return feats
    if which == "rank1":
        return feats[:1]
    if findings.has_significance:
        feats = [f for f in feats if f.called]
        if not feats:
            raise MitigationError(f"{where} name no spurious feature that is called significant: nothing to "
                                  "mitigate (use --features all to suppress every kept cluster anyway)")
    if which == "significant":
        return feats
    refuted = [f.rank for f in feats if not f.actionable]
    feats = [f for f in feats if f.actionable]
    if not feats:
        raise MitigationError(f"{where}: the masking check supports no called feature (ranks "
                              f"{', '.join(map(str, refuted))}: hiding their regions fixes none of the errors "
                              "they go with), so nothing is to be mitigated (use --features significant to "
                              "suppress them anyway)")
    if which == "called":
        return feats
    if which == "top1":
        return feats[:1]
    try:
        k = int(which)
    except (TypeError, ValueError):
        raise MitigationError(f"feature selection must be one of {', '.join(FEATURE_SELECTIONS)} or a count, "
                              f"got {which!r}") from None
    if k < 1:
        raise MitigationError(f"feature selection count must be at least 1, got {k}")
    return feats[:k]


def check_stage2_findings(findings: Findings, where: str = "findings", embed_dim: int | None = None) -> None:
    """Refuse findings Stage 2 cannot trust, naming ``where`` (the file) and
    the feature rank: a ``cluster_id`` outside the findings' ``K`` clusters
    (it would mark no region spurious), ``medoid_embeddings`` that are not
    one finite, non-zero vector per cluster (a NaN medoid would mark every
    region spurious) or not of the audited model's width ``embed_dim``."""
    k = findings.k
    for f in findings.features:
        if not 0 <= f.cluster_id < k:
            raise MitigationError(f"{where}: feature rank {f.rank} has cluster_id {f.cluster_id}, outside the "
                                  f"findings' K = {k} clusters (0..{k - 1})")
    if not findings.medoid_embeddings:
        return  # medoid_embeddings() asks for the discovery embeddings instead
    try:
        med = np.asarray(findings.medoid_embeddings, dtype=np.float64)
    except (TypeError, ValueError):
        raise MitigationError(f"{where}: 'medoid_embeddings' must be {k} vectors of equal length") from None
    if med.ndim != 2 or len(med) != k:
        raise MitigationError(f"{where}: 'medoid_embeddings' has shape {list(med.shape)}, expected one vector per "
                              f"cluster (K = {k})")
    ranks = {f.cluster_id: f.rank for f in findings.features}
    for cid, row in enumerate(med):
        what = "a non-finite value" if not np.isfinite(row).all() else "zero length" if not row.any() else None
        if what:
            used = f" (the medoid of feature rank {ranks[cid]})" if cid in ranks else ""
            raise MitigationError(f"{where}: medoid_embeddings[{cid}]{used} has {what}; re-run discovery")
    if embed_dim is not None and med.shape[1] != embed_dim:
        raise MitigationError(f"{where}: medoid_embeddings are {med.shape[1]}-dimensional but the audited model "
                              f"embeds in {embed_dim}: findings from another model?")


def medoid_embeddings(findings: Findings, embeddings: Embeddings | None = None) -> np.ndarray:
    """Medoid vectors ``[K, D]`` of the Stage-1 clustering: from the findings'
    ``medoid_embeddings`` when present, else rows ``medoids`` of the
    discovery ``embeddings``."""
    if findings.medoid_embeddings:
        check_stage2_findings(findings)
        return np.asarray(findings.medoid_embeddings, dtype=np.float32)
    if embeddings is None:
        raise MitigationError("findings have no 'medoid_embeddings'; re-run discovery (it records them) "
                              "or pass the discovery embeddings")
    rows = np.asarray(findings.medoids or [], dtype=np.int64)
    if rows.size == 0 or rows.max() >= embeddings.n_regions:
        raise MitigationError(f"findings medoid rows {rows.tolist()} do not index the given discovery "
                              f"embeddings ({embeddings.n_regions} regions)")
    return embeddings.region_emb[rows]


# --------------------------------------------------------------------------- spurious regions

@dataclass
class RegionAssignment:
    """Per region of the training images: its nearest Stage-1 cluster and
    whether that cluster is a chosen spurious feature (SPEC §3.1)."""

    image_ids: list[str]
    region_image: np.ndarray  # [M] image row
    region_index: np.ndarray  # [M] index within the image
    boxes: np.ndarray  # [M, 4] original pixels
    cluster: np.ndarray  # [M] nearest medoid
    spurious: np.ndarray  # [M] bool

    def image_has_feature(self) -> np.ndarray:
        """Per image: is at least one of its regions spurious?"""
        out = np.zeros(len(self.image_ids), dtype=bool)
        out[self.region_image[self.spurious]] = True
        return out

    def per_image(self, values: np.ndarray) -> list[np.ndarray]:
        counts = np.bincount(self.region_image, minlength=len(self.image_ids))
        return np.split(np.asarray(values), np.cumsum(counts)[:-1])

    def save(self, path: Path) -> Path:
        table = pa.table({
            "image_id": [self.image_ids[i] for i in self.region_image],
            "image_row": pa.array(self.region_image, pa.int64()),
            "region_index": pa.array(self.region_index, pa.int64()),
            "box": fixed_list(self.boxes),
            "cluster": pa.array(self.cluster, pa.int64()),
            "spurious": pa.array(self.spurious, pa.bool_()),
        }).replace_schema_metadata({b"image_ids": json.dumps(self.image_ids).encode()})
        return atomic_write(path, lambda fh: pq.write_table(table, fh))

    @classmethod
    def load(cls, path: Path) -> "RegionAssignment":
        table = pq.read_table(path)
        return cls(
            image_ids=json.loads(table.schema.metadata[b"image_ids"]),
            region_image=table.column("image_row").to_numpy().astype(np.int64),
            region_index=table.column("region_index").to_numpy().astype(np.int64),
            boxes=matrix(table.column("box")),
            cluster=table.column("cluster").to_numpy().astype(np.int64),
            spurious=table.column("spurious").to_numpy(zero_copy_only=False).astype(bool),
        )


def assign_spurious_regions(audited: LoadedModel, ds, findings: Findings,
                            features: str | int = DEFAULT_FEATURE_SELECTION,
                            embeddings: Embeddings | None = None, batch_size: int = RegionsConfig.batch_size,
                            progress: bool = False) -> RegionAssignment:
    """Embed every region of ``ds`` with the frozen audited model and mark
    those nearest to a chosen feature's medoid as spurious (SPEC §3.1)."""
    chosen = {int(f.cluster_id) for f in select_features(findings, features)}
    medoids = medoid_embeddings(findings, embeddings)
    emb = embed_dataset(audited, ds, proposer=findings.proposer or RegionsConfig.proposer,
                        mode=findings.embedding_mode or RegionsConfig.mode, batch_size=batch_size, progress=progress)
    if emb.region_emb.shape[1] != medoids.shape[1]:
        raise MitigationError(f"audited model {audited.name!r} embeds in {emb.region_emb.shape[1]} dimensions "
                              f"but the findings' medoids have {medoids.shape[1]}: findings from another model?")
    cluster = assign_to_medoids(emb.region_emb, medoids) if emb.n_regions else np.zeros(0, np.int64)
    return RegionAssignment(list(ds.image_ids), emb.region_image, emb.region_index, emb.boxes,
                            np.asarray(cluster, dtype=np.int64), np.isin(cluster, sorted(chosen)))


def model_fingerprint(spec: str, pretrained: str | None = None) -> str:
    """Content hash of a local checkpoint's weights, or of a ``pretrained``
    weights file; the name (and pretrained tag) for anything else."""
    if spec.startswith("local-dir:"):
        weights = Path(spec[len("local-dir:"):]) / WEIGHTS_NAME
        if weights.is_file():
            return memo_file_sha256(weights)
    if pretrained is not None:
        return memo_file_sha256(Path(pretrained)) if Path(pretrained).is_file() else f"{spec}|{pretrained}"
    return spec


def cached_assignment(audited: LoadedModel, ds, findings: Findings, cache_dir: str | os.PathLike,
                      features: str | int = DEFAULT_FEATURE_SELECTION, progress: bool = False) -> RegionAssignment:
    """:func:`assign_spurious_regions`, read from ``cache_dir`` when the same
    model weights, manifest rows and findings were assigned before."""
    key = json_sha256({
        "model": model_fingerprint(audited.name, audited.pretrained),
        "manifest": memo_file_sha256(ds.manifest_file),
        "image_ids": ds.image_ids,
        "findings": json_sha256(findings.to_dict()),
        "features": str(features),
        **({"precision": audited.compute.precision} if audited.compute.record() is not None else {}),
    })[:20]
    path = Path(cache_dir) / f"spurious-regions-{key}.parquet"
    if path.is_file():
        return RegionAssignment.load(path)
    assignment = assign_spurious_regions(audited, ds, findings, features, progress=progress)
    assignment.save(path)
    return assignment


def group_ids(labels: np.ndarray | torch.Tensor, presence: np.ndarray) -> torch.Tensor:
    """Group of each image: ``2·label + feature present`` (SPEC §3.6)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return labels * 2 + torch.as_tensor(np.asarray(presence, dtype=bool), dtype=torch.long)
