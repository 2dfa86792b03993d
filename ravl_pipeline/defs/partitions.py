"""Validation sets as dynamic partitions: one per dataset directory under
``data/validation_sets/<name>/`` (DESIGN, Dagster and DVC together), and the
shape every per-set asset shares."""
import functools
import hashlib
from pathlib import Path
from typing import Callable

import dagster as dg

from ..config import user_error_message
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
INPUT_ERROR = "ravl/input_error"  # metadata key of a failure caused by bad input

validation_sets = dg.DynamicPartitionsDefinition(name=VALIDATION_SETS)


def failing_cleanly(step: Callable) -> Callable:
    """An asset body whose user errors (bad data, parameters or files) end
    the step as one line — a ``dg.Failure`` with the message naming the
    input — instead of a traceback; internal errors are left as they are."""
    @functools.wraps(step)
    def run(*args, **kwargs):
        try:
            return step(*args, **kwargs)
        except Exception as exc:
            message = user_error_message(exc)
            if message is None:
                raise
            raise dg.Failure(description=message, metadata={INPUT_ERROR: True}, allow_retries=False) from exc
    return run


def audit_asset(**kwargs):
    """``@dg.asset`` of one validation set's audit (partitioned by set),
    with user errors as one-line failures (:func:`failing_cleanly`)."""
    kwargs.setdefault("group_name", AUDIT_GROUP)
    asset = dg.asset(partitions_def=validation_sets, **kwargs)
    return lambda step: asset(failing_cleanly(step))


def set_data_version(dataset_dir: Path, *parts: str) -> dg.DataVersion:
    """Data version of an asset read straight from a validation set: its
    content fingerprint with the parameters used. Dagster does not carry a
    partitioned source's observed version into its dependents' versions, so
    without this a changed set would leave them with the same version and
    their own dependents would never go stale."""
    text = "|".join([dataset_fingerprint(dataset_dir), *parts])
    return dg.DataVersion(hashlib.sha256(text.encode()).hexdigest()[:24])
