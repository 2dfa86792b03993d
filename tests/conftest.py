"""Shared fixtures: one tiny audited model per test session.

Training it takes about a minute on 2 cores; every test that needs a real
audited model (discovery end to end, mitigation, the pipeline) shares it.
"""
from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
logging.getLogger().setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_setting(tmp_path_factory):
    """Paths of the reduced default setting: ``setting``, ``pretrained``, ``audited``."""
    from ravl_pipeline.experiments.recipe import DEFAULT_RECIPE, build_audited_model

    root = tmp_path_factory.mktemp("tiny_setting")
    return build_audited_model(root, DEFAULT_RECIPE.small())


@pytest.fixture(scope="session")
def clip_setting(tmp_path_factory):
    """The reduced default setting with the second model family: the tiny
    ResNet with CLIP's standard normalisation (``ravl-tiny-rn-clip``)."""
    from dataclasses import replace

    from ravl_pipeline.experiments.recipe import DEFAULT_RECIPE, build_audited_model

    root = tmp_path_factory.mktemp("clip_setting")
    return build_audited_model(root, replace(DEFAULT_RECIPE.small(), base_model="ravl-tiny-rn-clip"))
