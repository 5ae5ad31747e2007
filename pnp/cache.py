"""The cache of inversions: per image and inversion settings, the source latents and features, LRU by bytes.

`SourceCache.lookup` and `SourceCache.store` are the whole policy (docs/cost-model.md §2): an entry left by a
float32 retry serves half-precision requests too; an entry with features for fewer steps than a request
injects is widened (the engine extracts features for the longer of both lengths, its latents reused, so that
requests that alternate between them find theirs next time); and an entry is stored only once complete and
finite, so a request that fails or is cancelled half-way never leaves a partial one behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image

from .config import PnPConfig
from .errors import ModelError, NonFiniteError
from .injection import InjectionSteps, SourceFeatures
from .stats import CacheUse

logger = logging.getLogger(__name__)

CACHE_FRACTION_OF_MEMORY = 0.2


def default_cache_bytes(device: torch.device) -> int:
    """`PNP_CACHE_BYTES`, else a fifth of the device's memory (the GPU's, or the machine's on the CPU)."""
    if "PNP_CACHE_BYTES" in os.environ:
        value = os.environ["PNP_CACHE_BYTES"]
        if not value.isdigit():
            raise ModelError(f"PNP_CACHE_BYTES: must be a whole number of bytes, not {value!r}")
        return int(value)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * CACHE_FRACTION_OF_MEMORY)


@dataclass(frozen=True)
class SourceKey:
    """Everything that changes an image's inversion latents and source features."""

    model: str
    dtype: str
    image_digest: str
    width: int
    height: int
    ddim_inversion_steps: int
    num_inference_steps: int
    inversion_prompt: str

    @classmethod
    def of(cls, model: str, dtype: torch.dtype, images: Sequence[Image.Image], config: PnPConfig) -> SourceKey:
        """The key of `images` (an image, or a video's frames, at their working size) inverted by `model` in
        `dtype` as `config` asks."""
        digest = hashlib.sha256()
        for image in images:
            digest.update(image.tobytes())
        return cls(
            model=model,
            dtype=str(dtype),
            image_digest=digest.hexdigest(),
            width=images[0].width,
            height=images[0].height,
            ddim_inversion_steps=config.ddim_inversion_steps,
            num_inference_steps=config.num_inference_steps,
            inversion_prompt=config.inversion_prompt,
        )

    def in_dtype(self, dtype: torch.dtype) -> SourceKey:
        """The same image and settings, inverted in `dtype` (a float32 retry's entry)."""
        return replace(self, dtype=str(dtype))


@dataclass(frozen=True)
class SourceEntry:
    """One image's inversion: its encoded latent z_0, z_src at every sampling timestep (x_T = latents[t_0])
    and its source features."""

    image_latent: torch.Tensor
    latents: dict[int, torch.Tensor]
    features: SourceFeatures

    @property
    def nbytes(self) -> int:
        tensors = [self.image_latent, *self.latents.values()]
        return self.features.nbytes + sum(t.numel() * t.element_size() for t in tensors)

    def is_finite(self) -> bool:
        """Whether every latent and feature is finite (one device synchronisation)."""
        tensors = [self.image_latent, *self.latents.values(), *self.features.features.values()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class SourceCache:
    """Least recently used entries go first once the total exceeds `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[SourceKey, SourceEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: SourceKey) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def items(self) -> list[tuple[SourceKey, SourceEntry]]:
        """The entries, least recently used first (reading them does not count as a use)."""
        return list(self._entries.items())

    def get(self, key: SourceKey) -> SourceEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: SourceKey, entry: SourceEntry) -> None:
        """Store `entry` as the most recent, evicting the least recent ones until the bound holds."""
        self._entries.pop(key, None)
        if entry.nbytes > self.max_bytes:
            logger.info("inversion of %d bytes exceeds the cache bound of %d; not cached", entry.nbytes, self.max_bytes)
            return
        self._entries[key] = entry
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def evict_while(self, condition: Callable[[], bool]) -> None:
        """Drop the least recently used entries one by one while `condition()` holds (it reads the free memory)."""
        while self._entries and condition():
            self._entries.popitem(last=False)

    def retain(self, keys: set[SourceKey]) -> None:
        """Drop every entry but those of `keys` (to free memory for a request that uses them)."""
        for key in [key for key in self._entries if key not in keys]:
            del self._entries[key]

    def lookup(self, key: SourceKey, injection_steps: InjectionSteps) -> CacheLookup:
        """What the cache holds for `key` (or, failing that, its float32 entry) and a request injecting
        `injection_steps`: a hit covers them, a widened entry holds the inversion and fewer steps' features."""
        # A float32 entry, left by the float32 retry of a request whose half-precision run failed, serves
        # half-precision requests too: their own inversion of the image would most likely fail again.
        entry = self.get(key) or self.get(key.in_dtype(torch.float32))
        if entry is None:
            return CacheLookup(key, None, injection_steps)
        return CacheLookup(key, entry, injection_steps.union(entry.features.injection_steps))

    def store(self, key: SourceKey, entry: SourceEntry) -> None:
        """Store a computed entry, unless it holds a NaN or infinity (then `NonFiniteError`): only whole,
        finite entries are kept."""
        if not entry.is_finite():
            raise NonFiniteError("the inversion of the image produced NaN or infinite values")
        self.put(key, entry)


@dataclass(frozen=True)
class CacheLookup:
    """What the cache held for a request when its run began: the key, the entry found (None if none) and the
    injection steps the request's entry must hold features for (the request's, widened to the entry's)."""

    key: SourceKey
    entry: SourceEntry | None
    injection_steps: InjectionSteps

    @property
    def use(self) -> CacheUse:
        if self.entry is None:
            return CacheUse.NEW
        return CacheUse.HIT if self.entry.features.injection_steps == self.injection_steps else CacheUse.WIDENED
