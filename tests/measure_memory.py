"""Measure one UNet call and one VAE decoder call of a model on the CPU, for tests/test_memory_model.py.

    python -m tests.measure_memory MODEL_DIR SIZE [SIZE ...]

Prints one JSON line a call: the working size, the call ("unet" or "vae"), the peak bytes of tensor
storages live at once during the call (what the memory model counts), and the rise of the process's peak
resident size over its size before the call (what the machine gave it). Run it in a fresh process: the
resident size also holds what earlier work left in the allocator.
"""

from __future__ import annotations

import json
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench.run import resident_bytes, start_memory_peak
from pnp.models import load_model


class LiveTensors(TorchDispatchMode):
    """The peak bytes of the tensor storages that the ops inside create and that are alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.references: dict[int, int] = {}
        self.sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._created(tensor)
        return out

    def _created(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.references:  # a new storage, not a view of one
            self.references[key], self.sizes[key] = 0, storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.references[key] += 1
        weakref.finalize(tensor, self._released, key)

    def _released(self, key: int) -> None:
        self.references[key] -= 1
        if self.references[key] == 0:
            del self.references[key]
            self.live -= self.sizes.pop(key)


def measure(call, *args, **kwargs) -> dict[str, int]:
    """Run `call` twice: once for the resident size, then counting live tensors (the counting costs memory)."""
    before = start_memory_peak(torch.device("cpu"))  # VmHWM starts again from VmRSS
    call(*args, **kwargs)
    rise = resident_bytes("VmHWM") - before
    with LiveTensors() as live:
        call(*args, **kwargs)
    return {"tensor_peak_bytes": live.peak, "rss_rise_bytes": rise}


def main(model_dir: str, sizes: list[int]) -> None:
    model = load_model(model_dir, "cpu", "float32", False)
    factor = model.vae_scale_factor
    text = model.encode_text([""])
    with torch.no_grad():
        for size in sizes:
            latent = torch.randn(1, model.latent_channels, size // factor, size // factor)
            unet = measure(model.unet, latent, 10, encoder_hidden_states=text)
            print(json.dumps({"size": size, "call": "unet", **unet}), flush=True)
            vae = measure(model.vae.decode, latent)
            print(json.dumps({"size": size, "call": "vae", **vae}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(size) for size in sys.argv[2:]])
