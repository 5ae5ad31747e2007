"""Video requests (docs/algorithm.md §11): the frames in at one working size, every frame's DDIM
inversion (cached like an image's), TokenFlow's sampling of every prompt at once (`pnp.tokenflow`), and each
prompt's frames out. `PnPEngine` hands a request with `video` here, with its model, schedule and cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from .cache import CacheLookup, SourceCache, SourceEntry, SourceKey
from .config import PnPConfig
from .image_io import decoded_to_pixels, image_to_tensor, pixels_to_images
from .injection import SourceFeatures
from .inversion import invert
from .memory import MemoryModel, RequestShape
from .memory_policy import DeviceMemory, MemoryPolicy
from .models import StableDiffusion, run_with_float32_retry
from .prompts import PromptEmbeddings, encode_prompts, translation_guidance
from .schedules import NoiseSchedule
from .stats import CacheUse, PhaseTimer
from .tokenflow import VIDEO_KEPT_FEATURES, VideoDenoiser, draw_keyframes, frame_groups, sample_frames
from .video_io import AudioSpan, VideoSource, load_video

logger = logging.getLogger(__name__)


HOST = torch.device("cpu")
"""Where a video's inversion is kept, whatever the device: its z_src at every sampling step are F·N latents (5.9 GB
for a minute at 512 px), and a step needs one window's of them on the device at a time (docs/cost-model.md §9)."""


class FrameSink(Protocol):
    """Where a video request's edited frames go as they are decoded, so that no prompt's frames need be held at
    once: `open` (again after a run that failed part way: start over), then each prompt's frames in order, a few
    at a time."""

    def open(self, prompts: int, fps: float, audio: AudioSpan | None) -> None: ...

    def write(self, prompt: int, frames: Sequence[Image.Image]) -> None: ...


class FrameLists:
    """A `FrameSink` that keeps every prompt's frames (the Python API's `PnPResult.videos`)."""

    def __init__(self) -> None:
        self.videos: list[list[Image.Image]] = []

    def open(self, prompts: int, fps: float, audio: AudioSpan | None) -> None:
        self.videos = [[] for _ in range(prompts)]

    def write(self, prompt: int, frames: Sequence[Image.Image]) -> None:
        self.videos[prompt].extend(frames)


@dataclass(frozen=True)
class LoadedVideo:
    """A checked video request: its config, its sampling timesteps, its frames at the working size, their
    rate, where its sound is, and the cache key of their inversion."""

    config: PnPConfig
    timesteps: tuple[int, ...]
    frames: tuple[Image.Image, ...]
    fps: float
    audio: AudioSpan | None
    key: SourceKey


class VideoPipeline:
    """Consistent text-driven edits of a video's frames, on one loaded model (docs/algorithm.md §11-§12)."""

    def __init__(
        self,
        model: StableDiffusion,
        schedule: NoiseSchedule,
        cache: SourceCache,
        free_memory: Callable[[], int | None],
        batch_latent_pixels: int | None,
    ):
        self.model, self.schedule, self.cache = model, schedule, cache
        self.free_memory, self.batch_latent_pixels = free_memory, batch_latent_pixels

    def __call__(self, config: PnPConfig, video: VideoSource, sink: FrameSink, timer: PhaseTimer) -> float:
        """Each prompt's edited frames, into `sink`; their rate. Non-finite numbers in float16 or bfloat16 get the
        request one more run in float32 before it fails."""
        loaded = self.load(config, video, timer)
        memory = run_with_float32_retry(self.model, timer.stats, self._run, loaded, sink, timer)
        memory.leave_room(self.cache)
        for phase in ("decode", "encode"):
            timer.log(phase)
        return loaded.fps

    def load(self, config: PnPConfig, video: VideoSource, timer: PhaseTimer) -> LoadedVideo:
        """The video's frames at video_fps, at most video_frames, all brought to the first frame's working size
        (timed as "load"; a file that is not a video is refused, naming input_video)."""
        with timer.phase("load"):
            # Brought to the working size as they are decoded: a stream whose resolution changes midway still
            # gives one working size (docs/algorithm.md §11).
            clip = load_video(video, config.video_frames, config.video_fps, config.image_size)
            frames = tuple(clip.frames)
            key = SourceKey.of(self.model.name, self.model.dtype, frames, config)
        sound = "with sound" if clip.audio is not None else "silent"
        logger.info("video: %d frames at %.3g fps, %dx%d, %s", len(frames), clip.fps, *frames[0].size, sound)
        timesteps = tuple(self.schedule.sampling_timesteps(config.num_inference_steps))
        return LoadedVideo(config, timesteps, frames, clip.fps, clip.audio, key)

    def _run(self, loaded: LoadedVideo, sink: FrameSink, timer: PhaseTimer) -> MemoryPolicy:
        """One run: the inversion (cached), the sampling, each prompt's frames into `sink`."""
        cached = self.cache.lookup(loaded.key.in_dtype(self.model.dtype), VIDEO_KEPT_FEATURES)
        timer.stats.cache = cached.use
        memory = self._plan_memory(loaded, cached, timer)
        embeddings = encode_prompts(self.model, loaded.config)
        source_latents = cached.entry.latents if cached.use is CacheUse.HIT else None
        if source_latents is None:
            source_latents = self._invert(loaded, cached, embeddings, memory, timer)
        final = memory.run(self._sample, loaded, source_latents, embeddings, memory, timer)
        memory.run(self._decode, final, loaded, sink, memory, timer)
        memory.record()
        return memory

    def _plan_memory(self, loaded: LoadedVideo, cached: CacheLookup, timer: PhaseTimer) -> MemoryPolicy:
        """The latents per UNet call and images per decoder call by the memory model of the video's frames
        (docs/cost-model.md §9); a video that cannot fit is refused here, before its inversion."""
        new_source = cached.use is not CacheUse.HIT
        shape = RequestShape.of_video(loaded.config, loaded.frames[0].size, len(loaded.frames), new_source)
        used = {cached.key, cached.key.in_dtype(torch.float32)}
        device = DeviceMemory.of(self.model.device, self.free_memory, self.cache, used)
        return MemoryPolicy.plan(MemoryModel.of(self.model), shape, device, timer.stats, self.batch_latent_pixels)

    def _invert(
        self,
        loaded: LoadedVideo,
        cached: CacheLookup,
        embeddings: PromptEmbeddings,
        memory: MemoryPolicy,
        timer: PhaseTimer,
    ) -> dict[int, torch.Tensor]:
        """Every frame's latent and its DDIM inversion as an image's (docs/algorithm.md §11), stored in the cache:
        z_src at each sampling timestep, (F, C, h, w), kept in the host's memory (docs/cost-model.md §9)."""
        with timer.phase("load"):
            frame_latents = torch.cat(
                [
                    self.model.encode_image(torch.cat([image_to_tensor(frame) for frame in chunk])).float().to(HOST)
                    for chunk in _chunks(loaded.frames, memory.vae_batch)
                ]
            )
        with timer.phase("inversion"):
            latents = memory.run(self._invert_frames, loaded, frame_latents, embeddings, memory)
        no_features = SourceFeatures({}, VIDEO_KEPT_FEATURES, guidance_halves=False)
        self.cache.store(cached.key, SourceEntry(frame_latents, latents, no_features))
        return latents

    def _invert_frames(
        self, loaded: LoadedVideo, frame_latents: torch.Tensor, embeddings: PromptEmbeddings, memory: MemoryPolicy
    ) -> dict[int, torch.Tensor]:
        """The inversion of the frames' latents, `memory.unet_batch` frames a UNet call, each call's z_src written
        into the host's tensors as it comes."""
        unet, steps, keep = self.model.injection_unet, loaded.config.ddim_inversion_steps, set(loaded.timesteps)
        latents, frames = {t: torch.empty_like(frame_latents) for t in keep}, len(frame_latents)
        for first in range(0, frames, memory.unet_batch):
            last = min(first + memory.unet_batch, frames)
            text = embeddings.source.expand(last - first, -1, -1)
            device_latents = frame_latents[first:last].to(self.model.device)
            for t, kept in invert(unet, self.schedule, device_latents, text, steps, keep).items():
                latents[t][first:last] = kept
        return latents

    def _sample(
        self,
        loaded: LoadedVideo,
        source_latents: dict[int, torch.Tensor],
        embeddings: PromptEmbeddings,
        memory: MemoryPolicy,
        timer: PhaseTimer,
    ) -> torch.Tensor:
        """Every prompt's frames from x^f = z_src^f[t_0] to their clean latents (P, F, C, h, w) on the device
        (docs/algorithm.md §11-§12), `memory.unet_batch` latents a UNet call (a keyframe pass's unit of keyframes
        may carry more)."""
        config, timesteps = loaded.config, loaded.timesteps
        groups = frame_groups(len(loaded.frames), config.keyframe_interval)
        seed = 0 if config.seed is None else config.seed
        denoiser = VideoDenoiser(
            unet=self.model.injection_unet,
            schedule=self.schedule,
            timesteps=timesteps,
            guidance=translation_guidance(config, embeddings, len(timesteps)),
            injection_steps=config.injection_steps,
            source_latents=[source_latents[t] for t in timesteps],
            groups=groups,
            keyframes=draw_keyframes(groups, config.keyframe_interval, seed, len(timesteps)),
            timer=timer,
            unet_batch=memory.unet_batch,
        )
        start = source_latents[timesteps[0]].to(self.model.device, torch.float32)
        # A tensor of its own: the frames take their steps in place.
        start = start.unsqueeze(0).repeat(len(config.translation_prompts), *[1] * start.dim())
        return sample_frames(denoiser, start, self.schedule, timesteps)

    def _decode(
        self, final: torch.Tensor, loaded: LoadedVideo, sink: FrameSink, memory: MemoryPolicy, timer: PhaseTimer
    ) -> None:
        """Each prompt's frames, `memory.vae_batch` a VAE decoder call, handed to `sink` as they are decoded (the
        phases "decode" and "encode")."""
        sink.open(len(final), loaded.fps, loaded.audio)
        for prompt, latents in enumerate(final):
            for chunk in latents.split(memory.vae_batch):
                with timer.phase("decode", log=False):
                    frames = pixels_to_images(decoded_to_pixels(self.model.decode_latents(chunk, memory.vae_batch)))
                with timer.phase("encode", log=False):
                    sink.write(prompt, frames)


def _chunks(frames: Sequence[Image.Image], size: int) -> list[Sequence[Image.Image]]:
    return [frames[start : start + size] for start in range(0, len(frames), size)]
