"""Validation sets as dynamic partitions: one per dataset directory under
``data/validation_sets/<name>/`` (DESIGN, Dagster and DVC together), and the
shape every per-set asset shares."""
import hashlib
from pathlib import Path

import dagster as dg

from ..io.hashing import dataset_fingerprint

VALIDATION_SETS = "validation_sets"
# Model-heavy steps share one concurrency pool; `dagster.yaml` caps it, so a
# multiprocess run never trains and embeds at once on a small machine.
MODEL_POOL = "ravl_model"
AUDIT_GROUP = "audit"
# The content version of the set a run audits (its fingerprint), on the runs
# of the sensor and of `ravl materialize`, so neither audits a new folder twice.
SET_VERSION_TAG = "ravl/set_version"
MITIGATION_GROUP = "mitigation"

validation_sets = dg.DynamicPartitionsDefinition(name=VALIDATION_SETS)


def audit_asset(**kwargs):
    """``@dg.asset`` of one validation set's audit (partitioned by set)."""
    kwargs.setdefault("group_name", AUDIT_GROUP)
    return dg.asset(partitions_def=validation_sets, **kwargs)


def set_data_version(dataset_dir: Path, *parts: str) -> dg.DataVersion:
    """Data version of an asset read straight from a validation set: its
    content fingerprint with the parameters used. Dagster does not carry a
    partitioned source's observed version into its dependents' versions, so
    without this a changed set would leave them with the same version and
    their own dependents would never go stale."""
    text = "|".join([dataset_fingerprint(dataset_dir), *parts])
    return dg.DataVersion(hashlib.sha256(text.encode()).hexdigest()[:24])
