"""Shared fixtures: tiny random Stable Diffusion checkpoints, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pnp.testing import make_random_model

# The tiny models gain nothing from threads, and on a 2-core machine shared with a test server,
# oversubscribed OpenMP threads make each UNet call many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SD 1.x-layout checkpoint (conv projections) with tiny widths."""
    return make_random_model(tmp_path_factory.mktemp("tiny-sd1"), layout="sd1")


@pytest.fixture(scope="session")
def tiny_sd2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SD 2.x-layout checkpoint (linear projections) with tiny widths."""
    return make_random_model(tmp_path_factory.mktemp("tiny-sd2"), layout="sd2")


@pytest.fixture(scope="session")
def tiny_v_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SD 2.x-layout checkpoint whose scheduler says the UNet predicts v (as SD 2.x 768-v models)."""
    return make_random_model(tmp_path_factory.mktemp("tiny-v"), layout="sd2", prediction_type="v_prediction")
