"""The test suite: offline, CPU only, on tiny random models with Stable Diffusion's layout."""

import os
from pathlib import Path

# torch makes torch.compile's cache directory (/tmp/torchinductor_<user>) as soon as torch._dynamo is
# imported, which diffusers does: it, and what the compile test caches there, go to the tests' own
# temporary tree in the checkout (pyproject.toml's --basetemp), not the system's temp directory. This
# package is imported before conftest.py imports torch; the Cog server the HTTP tests start inherits it.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".pytest-tmp" / "torchinductor")
)
