"""Shared fixtures: one tiny audited model per test session.

Training it takes about a minute on 2 cores; every test that needs a real
audited model (discovery end to end, mitigation, the pipeline) shares it.
Under pytest-xdist (``make test`` runs two workers) the workers share it
too: the first to need it builds it under a file lock, the others wait and
reuse it; each worker then gets its share of the cores.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from filelock import FileLock

os.environ.setdefault("TQDM_DISABLE", "1")
logging.getLogger().setLevel(logging.ERROR)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:  # before torch is imported, and inherited by the commands the tests start
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))


def _shared_model(tmp_path_factory, name: str, recipe) -> dict[str, Path]:
    """``build_audited_model`` once per session, whatever the worker count."""
    from ravl_pipeline.experiments.recipe import build_audited_model

    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build_audited_model(tmp_path_factory.mktemp(name), recipe)
    root = tmp_path_factory.getbasetemp().parent / name  # the workers' common folder
    with FileLock(f"{root}.lock"):
        return build_audited_model(root, recipe)


@pytest.fixture(scope="session")
def tiny_setting(tmp_path_factory):
    """Paths of the reduced default setting: ``setting``, ``pretrained``, ``audited``."""
    from ravl_pipeline.experiments.recipe import DEFAULT_RECIPE

    return _shared_model(tmp_path_factory, "tiny_setting", DEFAULT_RECIPE.small())


@pytest.fixture(scope="session")
def clip_setting(tmp_path_factory):
    """The reduced default setting with the second model family: the tiny
    ResNet with CLIP's standard normalisation (``ravl-tiny-rn-clip``)."""
    from dataclasses import replace

    from ravl_pipeline.experiments.recipe import DEFAULT_RECIPE

    return _shared_model(tmp_path_factory, "clip_setting", replace(DEFAULT_RECIPE.small(), base_model="ravl-tiny-rn-clip"))
