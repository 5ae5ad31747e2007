"""Shared fixtures: tiny random Stable Diffusion checkpoints (written once per test session), engines on
them, the Cog predictor set up in-process as a service, the OpenAPI schema file, and log capture.

Plain helpers (the example image, small requests, pixels) are in tests/helpers.py.

The session engines keep their inversion cache from test to test: a test that reads cache entries
makes them with an inversion prompt of its own, and a test that needs an empty cache clears it.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pnp import PnPEngine
from pnp.testing import make_random_model
from tests.helpers import ROOT, SERVICE_CACHE_BYTES

# The tiny models gain nothing from threads, and on a 2-core machine shared with a test server,
# oversubscribed OpenMP threads make each UNet call many times slower.
torch.set_num_threads(1)


# --- models and engines ----------------------------------------------------------------------------------


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


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> PnPEngine:
    """The engine on the tiny SD 1.x model, on the CPU in float32, with the default cache bound."""
    return PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def v_engine(tiny_v_model_dir: Path) -> PnPEngine:
    """The engine on the tiny v-prediction model."""
    return PnPEngine.from_pretrained(str(tiny_v_model_dir), device="cpu")


@pytest.fixture(scope="session")
def bf16_engine(tiny_model_dir: Path) -> PnPEngine:
    """The engine on the tiny SD 1.x model in bfloat16 (non-finite results are retried in float32)."""
    return PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu", dtype="bfloat16")


# --- the service -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """One predictor set up as Cog does (env: PNP_MODEL, PNP_DEVICE, PNP_CACHE_BYTES), with a private temp
    directory so that what the service leaves in it is all ours to inspect.

    `predictor`, the `predict` module (for fresh predictors) and `temp_root`."""
    temp_root = tmp_path_factory.mktemp("service-tmp")
    pnp_logger = logging.getLogger("pnp")
    saved_logging = (list(pnp_logger.handlers), pnp_logger.level, pnp_logger.propagate)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNP_MODEL", str(tiny_model_dir))
        mp.setenv("PNP_DEVICE", "cpu")
        mp.delenv("PNP_DTYPE", raising=False)
        mp.setenv("PNP_CACHE_BYTES", str(SERVICE_CACHE_BYTES))
        mp.setattr(tempfile, "tempdir", str(temp_root))
        import predict

        predictor = predict.Predictor()
        predictor.setup()
        yield SimpleNamespace(predictor=predictor, predict=predict, temp_root=temp_root)
    # setup() sends the pnp logs to stdout and stops their propagation; give other modules theirs back.
    pnp_logger.handlers[:] = saved_logging[0]
    pnp_logger.setLevel(saved_logging[1])
    pnp_logger.propagate = saved_logging[2]


@pytest.fixture
def pnp_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog for the `pnp` loggers, also where the predictor's logging setup keeps them from propagating."""
    logger = logging.getLogger("pnp")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.DEBUG)
    yield caplog
    logger.removeHandler(caplog.handler)


# --- the Cog packaging ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def openapi_schema() -> dict[str, Any]:
    """The schema script/openapi-schema writes to .cog/openapi_schema.json, where Cog's HTTP server reads
    it to validate inputs: written once per session, for the schema tests and the server.

    The script runs in this process (its main(), as `script/openapi-schema` calls it), which saves
    starting an interpreter; tests/test_cog_schema.py runs it once more as a command and compares."""
    script = runpy.run_path(str(ROOT / "script" / "openapi-schema"))
    output = ROOT / ".cog" / "openapi_schema.json"
    cwd = os.getcwd()
    try:
        assert script["main"](["--output", str(output)]) == 0
    finally:  # main() changes to the repository root
        os.chdir(cwd)
    return json.loads(output.read_text())
