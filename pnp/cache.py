"""The cache of inversions: per image and inversion settings, the source latents and features, LRU by bytes.

An entry is put only once complete, so a request that fails or is cancelled half-way never leaves a
partial one behind; a request that injects more steps of features than an entry holds replaces it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .injection import SourceFeatures

logger = logging.getLogger(__name__)


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
