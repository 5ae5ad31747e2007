"""Shared fixtures: tiny random Stable Diffusion checkpoints, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pnp.testing import make_random_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SD 1.x-layout checkpoint (conv projections) with tiny widths."""
    return make_random_model(tmp_path_factory.mktemp("tiny-sd1"), layout="sd1")


@pytest.fixture(scope="session")
def tiny_sd2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SD 2.x-layout checkpoint (linear projections) with tiny widths."""
    return make_random_model(tmp_path_factory.mktemp("tiny-sd2"), layout="sd2")
