"""The test suite: offline, CPU only, on tiny random models with Stable Diffusion's layout."""

import os
from pathlib import Path

# The tests' own temporary tree in the checkout (pyproject.toml's --basetemp), not the system's temp
# directory, also for the caches of the libraries below. This package is imported before conftest.py
# imports them, and the servers the tests start inherit the environment.
TEMP_TREE = Path(__file__).resolve().parent.parent / ".pytest-tmp"
# torch makes torch.compile's cache directory as soon as torch._dynamo is imported (diffusers does), and
# the compile test fills it.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(TEMP_TREE / "torchinductor"))
# Gradio (the web page's tests) reads its cache directory once, when it is imported.
os.environ.setdefault("GRADIO_TEMP_DIR", str(TEMP_TREE / "gradio"))
