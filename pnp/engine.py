"""The engine: one request, from its validated config and image to the translated images and their stats.

`PnPEngine.__call__` follows docs/algorithm.md step by step. Before any work it checks the inputs (every
refusal that needs the model) and loads the source (the image and mask at their working size, or the seed
of one to generate). Then a run (a float32 retry is a second one): encode the prompts, prepare the source's
latents and features (a real image's inversion, cached, or a generated image's), prepare the region (a
painted mask, or with auto_mask one per prompt), translate, decode. How many latents each UNet and VAE call
carries, and what happens when memory runs out, is the memory policy's (`pnp.memory_policy`); what the run
cost is recorded in `pnp.stats`. A video goes to `pnp.video` instead, with the same model, schedule and
cache. The Cog predictor, the command line, the web page and the benchmark all drive `PnPEngine`; below it,
the predictor's setup and the benchmark use only the loaded model's switches (device, dtype, compiled,
channels_last) and clear the cache.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import torch
from PIL import Image

from .automask import AutoMasks, noise_differences, threshold
from .cache import CacheLookup, SourceCache, SourceEntry, SourceKey, default_cache_bytes
from .config import INPUTS, PnPConfig
from .errors import InputError
from .image_io import (
    ImageSource,
    decoded_to_pixels,
    image_to_tensor,
    load_image,
    load_mask,
    masks_to_images,
    pixels_to_images,
    prepare_image,
)
from .inversion import extract_features, invert
from .memory import MemoryModel, RequestShape
from .memory_policy import DeviceMemory, MemoryPolicy, batch_latent_pixels_setting, free_bytes
from .models import StableDiffusion, load_model, run_with_float32_retry
from .prompts import PromptEmbeddings, encode_prompts, translation_guidance
from .region import EditRegion
from .schedules import NoiseSchedule
from .source import GeneratedImage, RealImage, Source, SourceLatents
from .stats import VIDEO_PHASES, CacheUse, PhaseTimer, RunStats
from .translation import Denoiser, Guidance, Injection, generate_source, sample
from .video import FrameLists, FrameSink, VideoPipeline
from .video_io import VideoSource

logger = logging.getLogger(__name__)

T = TypeVar("T")

GENERATION_GUIDANCE_SCALE = 5.0


@dataclass(frozen=True)
class LoadedRequest:
    """A request that passed every check, its source loaded: its config, its sampling timesteps
    t_0 > ... > t_{N-1}, and its source."""

    config: PnPConfig
    timesteps: tuple[int, ...]
    source: Source


@dataclass(frozen=True)
class Run:
    """One run of a loaded request (a float32 retry is a second one): what the cache held for a real image
    (None for a generated one), the memory policy planned for it, and the timer of its phases."""

    request: LoadedRequest
    cached: CacheLookup | None
    memory: MemoryPolicy
    timer: PhaseTimer

    @property
    def stats(self) -> RunStats:
        return self.timer.stats


@dataclass
class PnPResult:
    """The output images (a generated source first, then one per prompt), the seed used, the stats, with
    auto_mask each prompt's mask m_px as a grey image (white edits, black keeps the source), and for a video
    each prompt's frames (none where they went to a `frames_to`) and their rate."""

    images: list[Image.Image]
    seed: int | None
    stats: RunStats
    masks: list[Image.Image] = field(default_factory=list)
    videos: list[list[Image.Image]] = field(default_factory=list)
    fps: float | None = None


class PnPEngine:
    """Plug-and-Play image translation, and consistent video edits (`videos`), on one loaded Stable Diffusion
    model.

    `batch_latent_pixels` (else `PNP_BATCH_LATENT_PIXELS`) fixes the latent positions of a UNet or VAE call;
    unset, each run's calls carry what fits the device's free memory by the memory model
    (docs/cost-model.md §8). `free_memory()` tells the bytes the device has free for tensors (by default
    `pnp.memory_policy.free_bytes` of the model's device).
    """

    def __init__(
        self,
        model: StableDiffusion,
        cache_bytes: int | None = None,
        batch_latent_pixels: int | None = None,
        free_memory: Callable[[], int | None] | None = None,
    ):
        self.model = model
        self.schedule = NoiseSchedule.from_config(model.scheduler_config)
        self.cache = SourceCache(default_cache_bytes(model.device) if cache_bytes is None else cache_bytes)
        self.batch_latent_pixels = batch_latent_pixels or batch_latent_pixels_setting()
        self.free_memory = free_memory or partial(free_bytes, model.device)
        self.videos = VideoPipeline(model, self.schedule, self.cache, self._free_bytes, self.batch_latent_pixels)

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        compile: bool | None = None,
        **kwargs,
    ) -> PnPEngine:
        """Load a model (see `pnp.models.load_model` for where it comes from, and `PNP_COMPILE`) and build
        an engine on it."""
        return cls(load_model(model, device, dtype, compile), **kwargs)

    def warm_up(self) -> None:
        """Prepare for serving: run a default request on a grey image, so that a compiled UNet and VAE
        decoder have its graphs (and CUDA its kernels) before the first real request, then compile no
        more. Requests of other shapes (another image size, more prompts, a negative prompt) run eagerly:
        a compilation takes minutes on a GPU, and would stall the request that met the shape first. The
        cache is left as it was."""
        size = INPUTS["image_size"].default
        entries = self.cache.items()
        self(PnPConfig(), Image.new("RGB", (size, size), (128, 128, 128)))
        self.model.stop_compiling()
        self.cache.clear()
        for key, entry in entries:
            self.cache.put(key, entry)

    @property
    def unet_evals(self) -> int:
        """Latents the engine has sent through the UNet so far."""
        return self.model.injection_unet.evals

    @torch.no_grad()
    def __call__(
        self,
        config: PnPConfig,
        image: ImageSource | None = None,
        mask: ImageSource | None = None,
        video: VideoSource | None = None,
        frames_to: FrameSink | None = None,
    ) -> PnPResult:
        """Translate `image` (or, in generation mode, a source generated from `config.generation_prompt`), or
        the frames of `video` (docs/algorithm.md §11: `PnPResult.videos`, or with `frames_to` each prompt's frames
        handed there as they are decoded, `pnp.video_io.Mp4Clips` writing them as MP4s, and none held).

        With a `mask` (real images only), white regions are edited and black ones keep the input exactly
        (docs/algorithm.md §8); with `config.auto_mask` each prompt gets its own mask (§10), returned in
        `PnPResult.masks`. Every input is checked before any UNet evaluation. Non-finite numbers in
        float16 or bfloat16 get the request one more run in float32 before it fails.
        """
        self.check_inputs(config, image, mask, video)
        if video is not None:
            timer = PhaseTimer(RunStats.of(VIDEO_PHASES), self.model.injection_unet, self.model.device)
            sink = frames_to or FrameLists()
            fps = self.videos(config, video, sink, timer)
            videos = sink.videos if isinstance(sink, FrameLists) else []
            return PnPResult(images=[], seed=None, stats=timer.stats, videos=videos, fps=fps)
        timer = PhaseTimer(RunStats(), self.model.injection_unet, self.model.device)
        request = self.load_request(config, image, mask, timer)
        result, memory = run_with_float32_retry(self.model, timer.stats, self._run, request, timer)
        memory.leave_room(self.cache)
        return result

    def _run(self, request: LoadedRequest, timer: PhaseTimer) -> tuple[PnPResult, MemoryPolicy]:
        """One run of a loaded request in the model's current dtype, and its memory policy; § are
        docs/algorithm.md's."""
        run = self.plan_run(request, timer)
        config, source = request.config, request.source
        # 1. Text embeddings: E(""), the source's text, the target prompts, the negative prompt (§1).
        embeddings = encode_prompts(self.model, config)
        # 2. The source's latents and features: a real image's inversion (§3-§4, cached), or a generated
        #    image's (§4).
        source_latents = self.prepare_source(run, embeddings)
        # 3. Where to edit: everywhere, a painted mask (§8), or each prompt's automatic mask (§10).
        region = self.prepare_region(run, source_latents, embeddings)
        # 4. Translation of x_T for every target prompt at once, the source's features injected (§5); with
        #    a mask, the latents outside it kept on the source's trajectory.
        latents = self._phase(run, "translation", self.translate, run, source_latents, embeddings, region)
        # 5. Images: a generated source first, then one per prompt (§7); with a mask, the source's pixels
        #    outside it.
        images = self._phase(run, "decode", self.decode, run, source_latents, latents, region)
        run.memory.record()
        masks = masks_to_images(region.pixel_mask) if config.auto_mask else []
        return PnPResult(images=images, seed=source.seed, stats=run.stats, masks=masks), run.memory

    def check_inputs(
        self,
        config: PnPConfig,
        image: ImageSource | None,
        mask: ImageSource | None,
        video: VideoSource | None = None,
    ) -> None:
        """Every refusal that needs more than the config (which checks its own fields), before any work: the
        UNet's processors, a video with another source or a mask, a mask with auto_mask, the step counts
        against the scheduler, a missing image, and a mask without one."""
        self.model.injection_unet.check_processors()
        if video is not None:
            others = {"input_image": image is not None, "generation_prompt": config.generation_mode}
            others.update(mask=mask is not None, auto_mask=config.auto_mask)
            for name in (name for name, given in others.items() if given):
                raise InputError("input_video", f"cannot be used together with {name}: give one source, unmasked")
        if config.auto_mask and mask is not None:
            raise InputError("auto_mask", "cannot be used together with mask: give a mask or set auto_mask, not both")
        steps_spec = INPUTS["num_inference_steps"]
        self.schedule.check_training_range("num_inference_steps", config.num_inference_steps, steps_spec.minimum)
        if config.generation_mode:
            if mask is not None:
                raise InputError(
                    "mask", "works only with an input_image; in generation mode there is no input image to keep"
                )
            return
        if image is None and video is None:
            raise InputError("input_image", "give an image to edit, or a generation_prompt to generate one")
        spec = INPUTS["ddim_inversion_steps"]
        self.schedule.check_training_range("ddim_inversion_steps", config.ddim_inversion_steps, spec.minimum)
        self.schedule.check_nesting(config.num_inference_steps, config.ddim_inversion_steps, spec.minimum, spec.maximum)

    def load_request(
        self, config: PnPConfig, image: ImageSource | None, mask: ImageSource | None, timer: PhaseTimer
    ) -> LoadedRequest:
        """The checked request with its source: the image read and brought to its working size, with its mask
        and its cache key (timed as "load"; one that cannot be read is refused, naming it), or the seed of
        one to generate (`seed`, else a random one)."""
        timesteps = tuple(self.schedule.sampling_timesteps(config.num_inference_steps))
        source: Source
        if config.generation_mode:
            seed = config.seed if config.seed is not None else secrets.randbits(32)
            source = GeneratedImage(seed, (config.image_size, config.image_size))
        else:
            with timer.phase("load"):
                prepared = prepare_image(load_image(image), config.image_size)
                pixel_mask = None if mask is None else load_mask(mask, prepared.size)
                key = SourceKey.of(self.model.name, self.model.dtype, [prepared], config)
            source = RealImage(prepared, pixel_mask, key, mask_seed=0 if config.seed is None else config.seed)
        timer.stats.seed = source.seed
        timer.stats.mask = "auto" if config.auto_mask else None if source.pixel_mask is None else "painted"
        return LoadedRequest(config, timesteps, source)

    def plan_run(self, request: LoadedRequest, timer: PhaseTimer) -> Run:
        """A run of `request` in the model's current dtype: what the cache holds for its source, and the memory
        policy planned for what that leaves to compute."""
        source = request.source
        cached = None
        if not source.generated:
            cached = self.cache.lookup(source.key.in_dtype(self.model.dtype), request.config.injection_steps)
        timer.stats.cache = None if cached is None else cached.use
        new_source = cached is None or cached.use is not CacheUse.HIT
        shape = RequestShape.of(request.config, source.size, source.generated, new_source)
        used_keys = set() if cached is None else {cached.key, cached.key.in_dtype(torch.float32)}
        device = DeviceMemory.of(self.model.device, self.free_memory, self.cache, used_keys)
        memory = MemoryPolicy.plan(MemoryModel.of(self.model), shape, device, timer.stats, self.batch_latent_pixels)
        return Run(request, cached, memory, timer)

    def _phase(self, run: Run, name: str, step: Callable[..., T], *args: object) -> T:
        """`step(*args)` as the phase `name`: timed, and run again with smaller calls where memory runs out."""
        with run.timer.phase(name):
            return run.memory.run(step, *args)

    def prepare_source(self, run: Run, embeddings: PromptEmbeddings) -> SourceLatents:
        """The source's latents and features: a real image's, from the cache or computed (and then cached),
        or a generated one's."""
        if run.request.source.generated:
            return self._phase(run, "generation", self._generate_source, run, embeddings)
        entry = run.cached.entry
        if run.cached.use is not CacheUse.HIT:
            entry = self._compute_inversion(run, embeddings)
            self.cache.store(run.cached.key, entry)
        return SourceLatents.from_entry(entry, run.request.timesteps)

    def _generate_source(self, run: Run, embeddings: PromptEmbeddings) -> SourceLatents:
        """Sample the source from seeded CPU noise, guided by the generation prompt at scale 5.0, capturing
        its features (docs/algorithm.md §4)."""
        source = run.request.source
        logger.info("seed %d", source.seed)
        noise = source.start_noise(self.model.latent_channels, self.model.vae_scale_factor)
        noise = noise.to(self.model.device, self.model.dtype)
        num_steps = len(run.request.timesteps)
        guidance = Guidance(
            embeddings.unconditional, embeddings.source, None, GENERATION_GUIDANCE_SCALE, (1.0,) * num_steps
        )
        injection_steps = run.request.config.injection_steps
        kept_latents, features = generate_source(self._denoiser(run, guidance), noise, injection_steps)
        return SourceLatents(start_latent=noise, features=features, kept_latents=kept_latents)

    def _compute_inversion(self, run: Run, embeddings: PromptEmbeddings) -> SourceEntry:
        """A real image's cache entry: its latent and inversion (those of a widened entry where there is one)
        and its source features, from the forward latents with E("") (docs/algorithm.md §3-§4)."""
        request, widened = run.request, run.cached.entry
        if widened is None:
            with run.timer.phase("load"):
                image_latent = self.model.encode_image(image_to_tensor(request.source.image)).float()
            inversion_steps, keep = request.config.ddim_inversion_steps, set(request.timesteps)
            unet = self.model.injection_unet
            args = (unet, self.schedule, image_latent, embeddings.source, inversion_steps, keep)
            latents = self._phase(run, "inversion", invert, *args)
        else:
            image_latent, latents = widened.image_latent, widened.latents
        features = self._phase(run, "extraction", self._extract_features, run, latents, embeddings)
        return SourceEntry(image_latent, latents, features)

    def _free_bytes(self) -> int | None:
        return self.free_memory()  # read when called: tests and callers may replace `free_memory`

    def _extract_features(self, run: Run, latents: dict[int, torch.Tensor], embeddings: PromptEmbeddings):
        """The source features of the inversion's forward latents at the first max(n_f, n_a) sampling steps."""
        injection_steps = run.cached.injection_steps
        captured = run.request.timesteps[: injection_steps.capture_steps]
        return extract_features(
            self.model.injection_unet,
            [latents[t] for t in captured],
            list(captured),
            embeddings.unconditional,
            run.memory.unet_batch,
            injection_steps,
        )

    def prepare_region(
        self, run: Run, source_latents: SourceLatents, embeddings: PromptEmbeddings
    ) -> EditRegion | None:
        """Where the prompts edit: everywhere (None), a painted mask's region (docs/algorithm.md §8), or with
        auto_mask each prompt's own region (§10, the "mask" phase)."""
        source = run.request.source
        if run.request.config.auto_mask:
            masks = self._phase(run, "mask", self._auto_masks, run, source_latents, embeddings)
            run.stats.mask_coverage = masks.coverage
            return EditRegion(masks.pixel_masks, masks.latent_masks, source_latents.kept_latents)
        if source.pixel_mask is not None:
            return EditRegion.from_mask(source.pixel_mask, source_latents.kept_latents, self.model.vae_scale_factor)
        return None

    def _auto_masks(self, run: Run, source_latents: SourceLatents, embeddings: PromptEmbeddings) -> AutoMasks:
        """Each prompt's mask against the source's text, from K · (1 + P) UNet evaluations at t_m, the noises
        seeded by the source's `mask_seed`."""
        texts = torch.cat([embeddings.source, embeddings.targets])
        unet, seed = self.model.injection_unet, run.request.source.mask_seed
        differences = noise_differences(
            unet, self.schedule, source_latents.clean_latent, texts, seed, run.memory.unet_batch
        )
        masks = threshold(differences, self.model.vae_scale_factor)
        masks.log_coverage(run.request.config.translation_prompts)
        return masks

    def translate(
        self, run: Run, source_latents: SourceLatents, embeddings: PromptEmbeddings, region: EditRegion | None
    ) -> torch.Tensor:
        """x_T -> the final latents (P, C, h, w), one per target prompt, the source's features injected."""
        config = run.request.config
        guidance = translation_guidance(config, embeddings, len(run.request.timesteps))
        denoiser = self._denoiser(run, guidance, Injection(source_latents.features, config.injection_steps))
        start = source_latents.start_latent.float()
        start = start.expand(guidance.count, *start.shape[1:])
        after_step = region.blend_latents if region is not None else None
        return sample(denoiser, start, self.schedule, run.request.timesteps, "translation", after_step)

    def decode(
        self, run: Run, source_latents: SourceLatents, latents: torch.Tensor, region: EditRegion | None
    ) -> list[Image.Image]:
        """The images of the final latents, a generated source's first; with a mask, the pixels the source
        keeps outside it: the input image's, or the generated source's as it is returned."""
        source = run.request.source
        first = 1 if source.generated else 0
        if source.generated:
            latents = torch.cat([source_latents.clean_latent, latents])
        pixels = decoded_to_pixels(self.model.decode_latents(latents, run.memory.vae_batch))
        if region is not None:
            kept = source.kept_pixels(pixels)
            pixels = torch.cat([pixels[:first], region.blend_pixels(pixels[first:], kept)])
        return pixels_to_images(pixels)

    def _denoiser(self, run: Run, guidance: Guidance, injection: Injection | None = None) -> Denoiser:
        unet, unet_batch = self.model.injection_unet, run.memory.unet_batch
        return Denoiser(unet, self.schedule, run.request.timesteps, guidance, unet_batch, injection)
