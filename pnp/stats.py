"""What a request cost and did: seconds and UNet evaluations per phase, where its source came from, its masks,
its memory and its retries; timed by `PhaseTimer` (a video's encoding too, as its frames are decoded), and
rendered once for people (`notes`, used by the logs' `summary` and the web page's `headline`) and once as data
(`metrics`, Cog's metrics).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)

PHASES = ("load", "inversion", "extraction", "generation", "mask", "translation", "decode")
# "anchors" is a long video's anchor passes (docs/algorithm.md §12); "encode" the frames handed to where they go as
# they are decoded (the front ends' MP4s, or the Python API's lists).
VIDEO_PHASES = ("load", "inversion", "anchors", "keyframes", "groups", "decode", "encode")


class CacheUse(StrEnum):
    """What a real image's request found in the inversion cache (docs/cost-model.md §2)."""

    NEW = "new"  # nothing: inverted and its features extracted
    HIT = "hit"  # its inversion and every feature step it injects
    WIDENED = "widened"  # its inversion, but features for fewer steps: extracted again for more


@dataclass
class PhaseStats:
    seconds: float = 0.0
    unet_evals: int = 0


@dataclass
class RunStats:
    """Seconds and UNet evaluations (latents through the UNet, counted as they run) per phase, and what the
    request did.

    After a float32 retry the phases hold both runs' figures, and after out-of-memory retries every
    attempt's: what the request cost. `cache` is None for a generated source, whose `seed` is kept;
    `mask` is "painted", "auto" (with `mask_coverage`, each prompt's fraction of latent positions its mask
    edits) or None. `unet_batch` and `vae_batch` are the latents per UNet call and the images per VAE decoder
    call the request ended with, and `modelled_bytes` what the memory model (docs/cost-model.md §8) gives
    the request at them, beside the weights and the cache.
    """

    phases: dict[str, PhaseStats] = field(default_factory=lambda: {name: PhaseStats() for name in PHASES})
    cache: CacheUse | None = None
    seed: int | None = None
    mask: str | None = None
    mask_coverage: list[float] = field(default_factory=list)
    float32_retry: bool = False
    memory_retries: int = 0
    unet_batch: int = 0
    vae_batch: int = 0
    modelled_bytes: int = 0

    @classmethod
    def of(cls, phases: tuple[str, ...]) -> RunStats:
        """Stats of a request whose phases are `phases` (a video's: VIDEO_PHASES)."""
        return cls(phases={name: PhaseStats() for name in phases})

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases.values())

    @property
    def unet_evals(self) -> int:
        return sum(p.unet_evals for p in self.phases.values())

    @property
    def cache_hit(self) -> bool:
        """Whether the inversion and all the features the request injects came from the cache."""
        return self.cache is CacheUse.HIT

    def notes(self) -> list[str]:
        """What the request did, a phrase each: its source, its mask, and its retries."""
        sources = {
            None: f"generated source, seed {self.seed}",
            CacheUse.NEW: "inversion computed",
            CacheUse.HIT: "inversion from the cache",
            CacheUse.WIDENED: "inversion from the cache, features extracted for more steps",
        }
        notes = [sources[self.cache]]
        if self.mask == "painted":
            notes.append("painted mask")
        if self.mask == "auto":
            notes.append("auto_mask coverage " + ", ".join(f"{coverage:.1%}" for coverage in self.mask_coverage))
        if self.float32_retry:
            notes.append("float32 retry")
        if self.memory_retries:
            notes.append(f"{self.memory_retries} out-of-memory retries")
        return notes

    def summary(self) -> str:
        """The logs' table: each phase, the memory, and the total with the notes."""
        lines = [f"{name:<12} {p.seconds:8.2f} s {p.unet_evals:6d} UNet evals" for name, p in self.phases.items()]
        lines.append(
            f"{'memory':<12} {self.modelled_bytes / 2**20:8.0f} MiB by the memory model, beside the weights and "
            f"the cache; {self.unet_batch} latents per UNet call, {self.vae_batch} per VAE call"
        )
        lines.append(f"{'total':<12} {self.seconds:8.2f} s {self.unet_evals:6d} UNet evals ({'; '.join(self.notes())})")
        return "\n".join(lines)

    def headline(self) -> str:
        """One line: the seconds, the UNet evaluations and the notes (the web page's status)."""
        return " · ".join([f"{self.seconds:.2f} s", f"{self.unet_evals} UNet evaluations", *self.notes()])

    def metrics(self) -> dict[str, Any]:
        """The figures as Cog's prediction metrics: names to JSON values. `cache` is left out for a generated
        source (Cog refuses a metric of None) and `mask_coverage` without auto_mask."""
        metrics: dict[str, Any] = {
            "unet_evals": self.unet_evals,
            "cache_hit": self.cache_hit,
            "float32_retry": self.float32_retry,
            "memory_retries": self.memory_retries,
            "memory": {
                "modelled_mib": round(self.modelled_bytes / 2**20, 1),
                "unet_batch": self.unet_batch,
                "vae_batch": self.vae_batch,
            },
            "phases": {
                name: {"seconds": round(phase.seconds, 4), "unet_evals": phase.unet_evals}
                for name, phase in self.phases.items()
            },
        }
        if self.cache is not None:
            metrics["cache"] = self.cache.value
        if self.mask == "auto":
            metrics["mask_coverage"] = self.mask_coverage
        return metrics


class CountsEvals(Protocol):
    evals: int
    """Latents evaluated so far."""


@dataclass(frozen=True)
class PhaseTimer:
    """Adds each phase's seconds and the UNet evaluations `unet` counted in it to `stats`, after waiting for
    `device`, so that a phase's seconds include the work it queued."""

    stats: RunStats
    unet: CountsEvals
    device: torch.device

    @contextmanager
    def phase(self, name: str, log: bool = True) -> Iterator[None]:
        """Time the block as (part of) the phase `name`, logged unless `log` is false (a video's passes)."""
        if log:
            logger.info("%s ...", name)
        start, evals = time.perf_counter(), self.unet.evals
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            phase = self.stats.phases[name]
            phase.seconds += time.perf_counter() - start
            phase.unet_evals += self.unet.evals - evals
            if log:
                self.log(name)

    def log(self, name: str) -> None:
        """Log the phase `name`'s seconds and UNet evaluations so far (a phase timed in parts, once at its end)."""
        phase = self.stats.phases[name]
        logger.info("%s done: %.2f s, %d UNet evals", name, phase.seconds, phase.unet_evals)
