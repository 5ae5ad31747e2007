"""Video requests (SPEC 7, docs/algorithm.md §11): the frames in at one working size, every frame's DDIM
inversion (cached like an image's), TokenFlow's sampling of every prompt at once (`pnp.tokenflow`), and each
prompt's frames out. `PnPEngine` hands a request with `video` here, with its model, schedule and cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

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
from .tokenflow import VIDEO_KEPT_FEATURES, VideoDenoiser, draw_keyframes, frame_groups
from .translation import sample
from .video_io import VideoSource, load_video

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedVideo:
    """A checked video request: its config, its sampling timesteps, its frames at the working size, their
    rate, and the cache key of their inversion."""

    config: PnPConfig
    timesteps: tuple[int, ...]
    frames: tuple[Image.Image, ...]
    fps: float
    key: SourceKey


class VideoPipeline:
    """Consistent text-driven edits of a video's frames, on one loaded model (SPEC 7)."""

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

    def __call__(
        self, config: PnPConfig, video: VideoSource, timer: PhaseTimer
    ) -> tuple[list[list[Image.Image]], float]:
        """Each prompt's edited frames and their rate. Non-finite numbers in float16 or bfloat16 get the
        request one more run in float32 before it fails."""
        loaded = self.load(config, video, timer)
        videos, memory = run_with_float32_retry(self.model, timer.stats, self._run, loaded, timer)
        memory.leave_room(self.cache)
        return videos, loaded.fps

    def load(self, config: PnPConfig, video: VideoSource, timer: PhaseTimer) -> LoadedVideo:
        """The video's frames at video_fps, at most video_frames, all brought to the first frame's working size
        (timed as "load"; a file that is not a video is refused, naming input_video)."""
        with timer.phase("load"):
            # Brought to the working size as they are decoded: a stream whose resolution changes midway still
            # gives one working size, as SPEC 7.1 asks.
            clip = load_video(video, config.video_frames, config.video_fps, config.image_size)
            frames = tuple(clip.frames)
            key = SourceKey.of(self.model.name, self.model.dtype, frames, config)
        logger.info("video: %d frames at %.3g fps, %dx%d", len(frames), clip.fps, *frames[0].size)
        timesteps = tuple(self.schedule.sampling_timesteps(config.num_inference_steps))
        return LoadedVideo(config, timesteps, frames, clip.fps, key)

    def _run(self, loaded: LoadedVideo, timer: PhaseTimer) -> tuple[list[list[Image.Image]], MemoryPolicy]:
        """One run: the inversion (cached), the sampling, each prompt's frames."""
        cached = self.cache.lookup(loaded.key.in_dtype(self.model.dtype), VIDEO_KEPT_FEATURES)
        timer.stats.cache = cached.use
        memory = self._plan_memory(loaded, cached, timer)
        embeddings = encode_prompts(self.model, loaded.config)
        source_latents = cached.entry.latents if cached.use is CacheUse.HIT else None
        if source_latents is None:
            source_latents = self._invert(loaded, cached, embeddings, memory, timer)
        final = memory.run(self._sample, loaded, source_latents, embeddings, memory, timer)
        with timer.phase("decode"):
            videos = memory.run(self._decode, final, memory)
        memory.record()
        return videos, memory

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
        """Every frame's latent and its DDIM inversion as an image's (SPEC 7.2), stored in the cache:
        z_src at each sampling timestep, (F, C, h, w)."""
        with timer.phase("load"):
            pixels = torch.cat([image_to_tensor(frame) for frame in loaded.frames])
            frame_latents = torch.cat(
                [self.model.encode_image(chunk).float() for chunk in pixels.split(memory.vae_batch)]
            )
        with timer.phase("inversion"):
            latents = memory.run(self._invert_frames, loaded, frame_latents, embeddings, memory)
        no_features = SourceFeatures({}, VIDEO_KEPT_FEATURES, guidance_halves=False)
        self.cache.store(cached.key, SourceEntry(frame_latents, latents, no_features))
        return latents

    def _invert_frames(
        self, loaded: LoadedVideo, frame_latents: torch.Tensor, embeddings: PromptEmbeddings, memory: MemoryPolicy
    ) -> dict[int, torch.Tensor]:
        """The inversion of the frames' latents, `memory.unet_batch` frames a UNet call."""
        unet, steps, keep = self.model.injection_unet, loaded.config.ddim_inversion_steps, set(loaded.timesteps)
        chunks = []
        for chunk in frame_latents.split(memory.unet_batch):
            text = embeddings.source.expand(len(chunk), -1, -1)
            chunks.append(invert(unet, self.schedule, chunk, text, steps, keep))
        return {t: torch.cat([kept[t] for kept in chunks]) for t in keep}

    def _sample(
        self,
        loaded: LoadedVideo,
        source_latents: dict[int, torch.Tensor],
        embeddings: PromptEmbeddings,
        memory: MemoryPolicy,
        timer: PhaseTimer,
    ) -> torch.Tensor:
        """Every prompt's frames from x^f = z_src^f[t_0] to their clean latents (P, F, C, h, w) (SPEC 7.3-7.4),
        `memory.unet_batch` latents a UNet call (a keyframe pass's unit of keyframes may carry more)."""
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
        start = source_latents[timesteps[0]].float()
        start = start.unsqueeze(0).expand(len(config.translation_prompts), *start.shape)
        return sample(denoiser, start, self.schedule, list(timesteps), "video")

    def _decode(self, final: torch.Tensor, memory: MemoryPolicy) -> list[list[Image.Image]]:
        """Each prompt's frames, `memory.vae_batch` a VAE decoder call."""
        return [
            pixels_to_images(decoded_to_pixels(self.model.decode_latents(latents, memory.vae_batch)))
            for latents in final
        ]
