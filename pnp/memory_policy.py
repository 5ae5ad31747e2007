"""How one run of a request uses the device's memory (docs/cost-model.md §7-§9).

`MemoryPolicy.plan` reads what the device has free and, by the memory model, chooses the latents per UNet
call and the images per VAE decoder call, or refuses a request that cannot fit even at one a call; `run`
runs a phase and, after CUDA runs out of memory, frees what the request does not need and runs the phase
again with half the failed call's batch, down to one (tried twice), then explains in the error what would
fit; `leave_room` keeps the cache from taking what the next such request needs.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from .config import INPUTS
from .errors import CallOutOfMemoryError, InputError, ModelError
from .image_io import working_size
from .memory import MemoryModel, RequestShape
from .stats import RunStats

if TYPE_CHECKING:
    from .cache import SourceCache, SourceKey

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Left free for what the model does not count: cuDNN's and oneDNN's workspaces, the caching allocator's
# rounding and fragmentation, CUDA's kernels loaded on first use.
MEMORY_MARGIN_BYTES = 1 << 30
MEMORY_MARGIN_FRACTION = 0.1
# Latent pixels per UNet or VAE call at most: 16 latents at 512x512 (64x64 latents), fewer at larger sizes;
# larger calls gain no speed. Fewer where the free memory holds fewer.
DEFAULT_BATCH_LATENT_PIXELS = 16 * 64 * 64


def batch_latent_pixels_setting() -> int | None:
    """`PNP_BATCH_LATENT_PIXELS`, latent positions per UNet or VAE call whatever the free memory; None unset."""
    value = os.environ.get("PNP_BATCH_LATENT_PIXELS")
    if value is None:
        return None
    if not value.isdigit() or int(value) == 0:
        raise ModelError(f"PNP_BATCH_LATENT_PIXELS: must be a positive whole number of latent positions, not {value!r}")
    return int(value)


def free_bytes(device: torch.device) -> int | None:
    """The memory the device has free for tensors: on CUDA what the driver has free plus what PyTorch's
    allocator holds unused; on the CPU the kernel's MemAvailable. None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            meminfo = Path("/proc/meminfo").read_text()
        except OSError:
            return None
        match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.MULTILINE)
        return int(match.group(1)) * 1024 if match else None
    return None


def usable_bytes(free: int) -> int:
    """The part of the free memory that calls may use: less `MEMORY_MARGIN_BYTES` or a tenth, the larger."""
    return free - max(MEMORY_MARGIN_BYTES, int(MEMORY_MARGIN_FRACTION * free))


def fit_latents(room_bytes: int, bytes_per_latent: int, most: int) -> int:
    """The latents per call that fit `room_bytes`: as many whole latents as fit, at least one (a call of one
    latent is the least a request can make) and at most `most` (more gain no speed)."""
    return max(1, min(most, room_bytes // bytes_per_latent))


@dataclass(frozen=True)
class DeviceMemory:
    """The device a run's calls use: its name, its free bytes for tensors now (None where unknown), and how to
    give back what the run does not need (the cache's other entries, CUDA's cached blocks)."""

    name: str
    free_bytes: Callable[[], int | None]
    release: Callable[[], None]

    @classmethod
    def of(
        cls, device: torch.device, free: Callable[[], int | None], cache: SourceCache, used_keys: set[SourceKey]
    ) -> DeviceMemory:
        """`device`, whose release drops every cache entry but those of `used_keys`, and CUDA's cached blocks."""

        def release() -> None:
            cache.retain(used_keys)
            if device.type == "cuda":
                torch.cuda.empty_cache()

        return cls(str(device), free, release)


@dataclass
class MemoryPolicy:
    """The latents per UNet call (`unet_batch`) and images per VAE decoder call (`vae_batch`) of one run of a
    request of `shape`, by the memory `model` in the run's dtype; out-of-memory retries are counted in `stats`.
    """

    model: MemoryModel
    shape: RequestShape
    device: DeviceMemory
    stats: RunStats
    unet_batch: int
    vae_batch: int
    _retried_one_latent: set[str] = field(default_factory=set, repr=False)

    @classmethod
    def plan(
        cls,
        model: MemoryModel,
        shape: RequestShape,
        device: DeviceMemory,
        stats: RunStats,
        batch_latent_pixels: int | None = None,
    ) -> MemoryPolicy:
        """`batch_latent_pixels` over a latent's positions per call where it is set; else what the free memory,
        less the margin and what the request holds, fits by the model, at most DEFAULT_BATCH_LATENT_PIXELS' worth
        (docs/cost-model.md §8). Where the model needs more than is free even at one latent a call, an `InputError`
        before any UNet work."""
        most = max(1, (batch_latent_pixels or DEFAULT_BATCH_LATENT_PIXELS) // model.latent_positions(shape.size))
        free = None if batch_latent_pixels else device.free_bytes()
        if free is None:
            return cls(model, shape, device, stats, most, most)
        room = usable_bytes(free) - model.held_bytes(shape)
        unet_latent = model.unet_latent_bytes(shape.size, guidance_halves=shape.generated)
        policy = cls(
            model,
            shape,
            device,
            stats,
            unet_batch=fit_latents(room - model.video_step_bytes(shape), unet_latent, most),
            vae_batch=fit_latents(room, model.vae_call_bytes(shape.size, 1), most),
        )
        policy._refuse_what_cannot_fit(free)
        return policy

    def _refuse_what_cannot_fit(self, free: int) -> None:
        """Refuse, before any UNet work, a request that by the model needs more than the device has free even at
        one latent a call with the cache's other entries given back: it could only run out of memory later."""
        needed = self.model.request_bytes(self.shape, 1, 1)
        if needed <= free:
            return
        self.device.release()
        free_now = self.device.free_bytes()
        if free_now is not None and needed > free_now:
            raise self._too_large("unet")

    def run(self, phase: Callable[..., T], *args: object) -> T:
        """`phase(*args)`, run again with smaller calls after each CUDA out-of-memory error: the phase starts
        again, the ones before it stand (docs/cost-model.md §7)."""
        while True:
            try:
                return phase(*args)
            except torch.OutOfMemoryError as error:
                self._shrink(error)

    def _shrink(self, error: torch.OutOfMemoryError) -> None:
        """Give back what the run does not need and halve the batch of the call that failed (a call of one
        latent is tried once more); where one latent did not fit even so, an `InputError` naming image_size."""
        self.device.release()
        if isinstance(error, CallOutOfMemoryError):
            # A call may carry more than the batch (a video's keyframes of one branch go together): halving
            # starts from the smaller, so that the halving reaches one latent and ends.
            call = error.call
            failed = min(error.batch, self.vae_batch if call == "vae" else self.unet_batch)
        else:  # outside a call: the UNet's activations are what the run can shrink
            call, failed = "unet", min(self.unet_batch, self.shape.largest_unet_call)
        if failed <= 1 and call in self._retried_one_latent:
            raise self._too_large(call) from error
        if failed <= 1:
            self._retried_one_latent.add(call)
        batch = max(1, failed // 2)
        if call == "vae":
            self.vae_batch = batch
        else:
            self.unet_batch = batch
        self.stats.memory_retries += 1
        logger.warning("out of memory (%s); again with %d latents per %s call", error, batch, call.upper())

    def _too_large(self, call: str) -> InputError:
        """The error of a request that does not fit at one latent per `call`, naming video_frames for a video
        (its frames are what the keyframe pass must hold at once) and image_size for an image."""
        return InputError("video_frames" if self.shape.keyframes else "image_size", self.does_not_fit(call))

    def does_not_fit(self, call: str) -> str:
        """Why a run out of memory at one latent per `call` failed, and by the model what would fit in what the
        device has free now."""
        width, height = self.shape.size
        per_call = "one latent per UNet call" if call == "unet" else "one image per VAE decoder call"
        request = f"a {width}x{height} working size with {self.shape.prompts} translation_prompts"
        if self.shape.keyframes:
            request = f"a video of {self.shape.frames} frames at {request}"
        message = f"{request} does not fit in the free memory of {self.device.name}, even {per_call}"
        free = self.device.free_bytes()
        if free is None:
            return f"{message}; use {'fewer video_frames or ' if self.shape.keyframes else ''}a smaller image_size"
        needed, usable = self.model.request_bytes(self.shape, 1, 1), usable_bytes(free)
        margin = max(MEMORY_MARGIN_BYTES, int(MEMORY_MARGIN_FRACTION * free))
        return (
            f"{message}: it needs {needed / 2**30:.1f} GiB beside the weights at one latent per call, and "
            f"the device has {free / 2**30:.1f} GiB free, of which {usable / 2**30:.1f} GiB may be used (the rest, "
            f"{margin / 2**30:.1f} GiB, is kept for the kernels' workspaces); {self._what_would_fit(usable)}"
        )

    def _what_would_fit(self, usable: int) -> str:
        """By the model at one latent a call, the largest image_size that fits `usable` bytes (the aspect ratio and
        the prompts as they are) and for a video the most video_frames at its working size. Either makes another
        source, not in the cache: its features and latents are counted."""
        new_source = replace(self.shape, new_source=True)

        def fits(shape: RequestShape) -> bool:
            return self.model.request_bytes(shape, 1, 1) <= usable

        width, height = self.shape.size
        spec = INPUTS["image_size"]
        sizes = [
            image_size
            for image_size in range(spec.minimum, max(width, height), spec.multiple_of)
            if fits(replace(new_source, size=working_size(width, height, image_size)))
        ]
        if not self.shape.keyframes:
            return f"image_size {sizes[-1]} or less would fit" if sizes else "no image_size would fit"
        frames = [count for count in range(1, self.shape.frames) if fits(replace(new_source, frames=count))]
        fewer = f"video_frames {frames[-1]} or fewer would" if frames else "no video_frames would"
        smaller = f"image_size {sizes[-1]} or less would" if sizes else "no smaller image_size would"
        return f"{fewer} fit at this working size, and {smaller} fit all {self.shape.frames} frames"

    def record(self) -> None:
        """Put the batches the run ended with, and what the model gives the request at them, in the stats."""
        self.stats.unet_batch = min(self.unet_batch, self.shape.largest_unet_call)
        self.stats.vae_batch = min(self.vae_batch, self.shape.images)
        self.stats.modelled_bytes = self.model.request_bytes(self.shape, self.unet_batch, self.vae_batch)

    def leave_room(self, cache: SourceCache) -> None:
        """Drop least recently used cache entries while the free memory is less than a request like this one, on
        a new image, needs at one latent per call: the cache never takes what the next request must have."""
        needed = self.model.request_bytes(replace(self.shape, new_source=True), 1, 1)

        def short_of_memory() -> bool:
            free = self.device.free_bytes()
            return free is not None and usable_bytes(free) < needed

        cache.evict_while(short_of_memory)
