"""The engine: one request, from its validated config and image to the translated images and their stats.

`PnPEngine.__call__` follows docs/algorithm.md step by step: check the inputs (every refusal, before any
UNet work), encode the prompts, prepare the source (a real image's inversion and features, cached, or a
generated image and its features), prepare the region (a painted mask, or with auto_mask one per
prompt), translate, decode. The Cog predictor, the command line and the
benchmark all drive `PnPEngine`. Below it, the predictor's setup and the benchmark use only the loaded
model's switches (device, dtype, compiled, channels_last) and clear the cache.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TypeVar

import torch
from PIL import Image

from .automask import MASK_NOISES, AutoMasks, noise_differences, threshold
from .cache import SourceCache, SourceEntry, SourceKey
from .config import INPUTS, PnPConfig
from .errors import InputError, ModelError, NonFiniteError
from .image_io import (
    ImageSource,
    decoded_to_pixels,
    image_to_tensor,
    load_image,
    load_mask,
    masks_to_images,
    pixels_to_images,
    prepare_image,
    working_size,
)
from .injection import InjectionSteps
from .inversion import extract_features, invert
from .memory import MemoryModel, RequestShape, fit_latents, free_bytes, usable_bytes
from .models import StableDiffusion, load_model
from .region import EditRegion
from .schedules import NoiseSchedule, negative_prompt_weights
from .source import GeneratedSource, RealSource, Source
from .translation import Denoiser, Guidance, Injection, generate_source, sample

logger = logging.getLogger(__name__)

T = TypeVar("T")

PHASES = ("load", "inversion", "extraction", "generation", "mask", "translation", "decode")
GENERATION_GUIDANCE_SCALE = 5.0
# Latent pixels per UNet or VAE call at most: 16 latents at 512x512 (64x64 latents), fewer at larger sizes;
# larger calls gain no speed. Fewer where the free memory holds fewer (docs/cost-model.md §8).
DEFAULT_BATCH_LATENT_PIXELS = 16 * 64 * 64
CACHE_FRACTION_OF_MEMORY = 0.2


@dataclass
class PhaseStats:
    seconds: float = 0.0
    unet_evals: int = 0


@dataclass
class RunStats:
    """Seconds and UNet evaluations (latents through the UNet, counted as they run) per phase.

    After a float32 retry they are both runs' together, and after out-of-memory retries every attempt's:
    what the request cost. With auto_mask,
    `mask_coverage` is each prompt's fraction of latent positions its mask edits. `modelled_bytes` is what
    the memory model (docs/cost-model.md §8) gives the request beside the weights and the cache, at the
    latents per UNet and VAE call it ran with at the end."""

    phases: dict[str, PhaseStats] = field(default_factory=lambda: {name: PhaseStats() for name in PHASES})
    cache_hit: bool = False
    float32_retry: bool = False
    memory_retries: int = 0
    mask_coverage: list[float] = field(default_factory=list)
    unet_latents_per_call: int = 0
    vae_latents_per_call: int = 0
    modelled_bytes: int = 0

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases.values())

    @property
    def unet_evals(self) -> int:
        return sum(p.unet_evals for p in self.phases.values())

    def summary(self) -> str:
        lines = [f"{name:<12} {p.seconds:8.2f} s {p.unet_evals:6d} UNet evals" for name, p in self.phases.items()]
        notes = [
            note
            for note, applies in (
                ("cached inversion", self.cache_hit),
                ("float32 retry", self.float32_retry),
                (f"{self.memory_retries} out-of-memory retries", self.memory_retries),
            )
            if applies
        ]
        lines.append(
            f"{'memory':<12} {self.modelled_bytes / 2**20:8.0f} MiB by the memory model, beside the weights and "
            f"the cache; {self.unet_latents_per_call} latents per UNet call, {self.vae_latents_per_call} per VAE call"
        )
        lines.append(
            f"{'total':<12} {self.seconds:8.2f} s {self.unet_evals:6d} UNet evals"
            + (f" ({', '.join(notes)})" if notes else "")
        )
        if self.mask_coverage:
            lines.append("mask coverage " + " ".join(f"{coverage:.1%}" for coverage in self.mask_coverage))
        return "\n".join(lines)


@dataclass(frozen=True)
class PromptEmbeddings:
    """The text embeddings of a request (docs/algorithm.md §1): E(""), the source's text (the inversion
    prompt, or in generation mode the generation prompt), one per target prompt, and the negative
    prompt's (None without one); each (rows, 77, d)."""

    unconditional: torch.Tensor
    source: torch.Tensor
    targets: torch.Tensor
    negative: torch.Tensor | None


@dataclass(frozen=True)
class InputImage:
    """A real source: the input image at its working size and, with a mask, its m_px (1, 1, H, W)."""

    image: Image.Image
    pixel_mask: torch.Tensor | None


@dataclass(frozen=True)
class SeededNoise:
    """A source to generate, from the noise of this seed."""

    seed: int


@dataclass
class CallBudget:
    """How many latents one UNet call and one VAE decoder call of a request may carry: what fits the free
    memory by the memory model, at most `batch_latent_pixels` over a latent's positions (docs/cost-model.md
    §8), halved after each out-of-memory error (§7). `retried_one_latent` names the calls ("unet", "vae")
    whose one-latent call has had its second try."""

    unet_latents: int
    vae_latents: int
    retried_one_latent: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed every check: its config, its sampling timesteps t_0 > ... > t_{N-1}, where its
    source comes from, and its latents per call."""

    config: PnPConfig
    timesteps: list[int]
    source: InputImage | SeededNoise
    budget: CallBudget

    @property
    def size(self) -> tuple[int, int]:
        """The working size (W, H): the input image's, or image_size square for a generated source."""
        if isinstance(self.source, InputImage):
            return self.source.image.size
        return self.config.image_size, self.config.image_size


@dataclass
class PnPResult:
    """The output images (a generated source first, then one per prompt), the seed used, the stats, and
    with auto_mask each prompt's mask m_px as a grey image (white edits, black keeps the source)."""

    images: list[Image.Image]
    seed: int | None
    stats: RunStats
    masks: list[Image.Image] = field(default_factory=list)


def batch_latent_pixels_setting() -> int | None:
    """`PNP_BATCH_LATENT_PIXELS`, latent positions per UNet or VAE call whatever the free memory; None unset."""
    value = os.environ.get("PNP_BATCH_LATENT_PIXELS")
    if value is None:
        return None
    if not value.isdigit() or int(value) == 0:
        raise ModelError(f"PNP_BATCH_LATENT_PIXELS: must be a positive whole number of latent positions, not {value!r}")
    return int(value)


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


class PnPEngine:
    """Plug-and-Play image translation on one loaded Stable Diffusion model.

    `batch_latent_pixels` (else `PNP_BATCH_LATENT_PIXELS`) fixes the latent positions of a UNet or VAE call;
    unset, each request's calls carry what fits the device's free memory by the memory model, up to
    DEFAULT_BATCH_LATENT_PIXELS (docs/cost-model.md §8).
    """

    def __init__(
        self,
        model: StableDiffusion,
        cache_bytes: int | None = None,
        batch_latent_pixels: int | None = None,
    ):
        self.model = model
        self.schedule = NoiseSchedule.from_config(model.scheduler_config)
        self.cache = SourceCache(default_cache_bytes(model.device) if cache_bytes is None else cache_bytes)
        self.batch_latent_pixels = batch_latent_pixels or batch_latent_pixels_setting()
        self.memory = MemoryModel.of(model)

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
    ) -> PnPResult:
        """Translate `image` (or, in generation mode, a source generated from `config.generation_prompt`).

        With a `mask` (real images only), white regions are edited and black ones keep the input exactly
        (docs/algorithm.md §8); with `config.auto_mask` each prompt gets its own mask (§10), returned in
        `PnPResult.masks`. Every input is checked before any UNet evaluation. Non-finite numbers in
        float16 or bfloat16 get the request one more run in float32 before it fails.
        """
        stats = RunStats()
        request = self.check_inputs(config, image, mask, stats)
        try:
            result = self._run(request, stats)
        except NonFiniteError as error:
            if self.model.dtype == torch.float32:
                raise
            logger.warning("%s in %s; running the request again in float32", error, self.model.dtype)
            stats.float32_retry = True
            with self.model.in_float32():
                result = self._run(request, stats)
        self._leave_room_for(request)
        return result

    def _run(self, request: CheckedRequest, stats: RunStats) -> PnPResult:
        """One run of a checked request (the float32 retry is a second one); § are docs/algorithm.md's."""
        # 1. Text embeddings: E(""), the source's text, the target prompts, the negative prompt (§1).
        embeddings = self.encode_prompts(request.config)
        # 2. The source: a real image's inversion and features (§3-§4, cached), or a generated image and
        #    its features (§4).
        source = self.prepare_source(request, embeddings, stats)
        # 3. Where to edit: everywhere, a painted mask (§8), or each prompt's automatic mask (§10).
        region = self.prepare_region(request, source, embeddings, stats)
        # 4. Translation of x_T for every target prompt at once, the source's features injected (§5); with
        #    a mask, the latents outside it kept on the source's trajectory.
        with self._phase(stats, "translation"):
            latents = self._fitting_memory(request, stats, lambda: self.translate(request, source, embeddings, region))
        # 5. Images: a generated source first, then one per prompt (§7); with a mask, the source's pixels
        #    outside it.
        with self._phase(stats, "decode"):
            images = self._fitting_memory(
                request, stats, lambda: self.decode(request, source, latents, region), call="vae"
            )
        seed = source.seed if isinstance(source, GeneratedSource) else None
        masks = masks_to_images(region.pixel_mask) if request.config.auto_mask else []
        self._record_memory(request, stats)
        return PnPResult(images=images, seed=seed, stats=stats, masks=masks)

    def check_inputs(
        self, config: PnPConfig, image: ImageSource | None, mask: ImageSource | None, stats: RunStats
    ) -> CheckedRequest:
        """Every refusal that needs more than the config (which checks its own fields), before any UNet
        evaluation: the UNet's processors, a mask with auto_mask, the step counts against the scheduler, a
        missing image, a mask without one, and an image or mask that cannot be read (timed as "load")."""
        self.model.injection_unet.check_processors()
        if config.auto_mask and mask is not None:
            raise InputError("auto_mask", "cannot be used together with mask: give a mask or set auto_mask, not both")
        steps_spec = INPUTS["num_inference_steps"]
        self.schedule.check_training_range("num_inference_steps", config.num_inference_steps, steps_spec.minimum)
        timesteps = self.schedule.sampling_timesteps(config.num_inference_steps)
        if config.generation_mode:
            if mask is not None:
                raise InputError(
                    "mask", "works only with an input_image; in generation mode there is no input image to keep"
                )
            seed = config.seed if config.seed is not None else secrets.randbits(32)
            size = (config.image_size, config.image_size)
            budget = self._call_budget(self._shape(config, size, generated=True, new_source=True))
            return CheckedRequest(config, timesteps, SeededNoise(seed), budget)
        if image is None:
            raise InputError("input_image", "give an image to edit, or a generation_prompt to generate one")
        spec = INPUTS["ddim_inversion_steps"]
        self.schedule.check_training_range("ddim_inversion_steps", config.ddim_inversion_steps, spec.minimum)
        self.schedule.check_nesting(config.num_inference_steps, config.ddim_inversion_steps, spec.minimum, spec.maximum)
        with self._phase(stats, "load"):
            prepared = prepare_image(load_image(image), config.image_size)
            pixel_mask = None if mask is None else load_mask(mask, prepared.size)
        source = InputImage(prepared, pixel_mask)
        cached = self._cache_key(source, config) in self.cache
        budget = self._call_budget(self._shape(config, prepared.size, generated=False, new_source=not cached))
        return CheckedRequest(config, timesteps, source, budget)

    def encode_prompts(self, config: PnPConfig) -> PromptEmbeddings:
        """The request's text embeddings, from one text-encoder call."""
        source_text = config.generation_prompt if config.generation_mode else config.inversion_prompt
        negative = [config.negative_prompt] if config.negative_prompt.strip() else []
        embeddings = self.model.encode_text(["", source_text, *config.translation_prompts, *negative])
        targets_end = 2 + len(config.translation_prompts)
        return PromptEmbeddings(
            unconditional=embeddings[:1],
            source=embeddings[1:2],
            targets=embeddings[2:targets_end],
            negative=embeddings[targets_end:] if negative else None,
        )

    def prepare_source(self, request: CheckedRequest, embeddings: PromptEmbeddings, stats: RunStats) -> Source:
        """The source of the translation: a real image's, from the cache or computed, or a generated one."""
        if isinstance(request.source, SeededNoise):
            with self._phase(stats, "generation"):
                return self._fitting_memory(request, stats, lambda: self._generate_source(request, embeddings))
        compute = partial(self._compute_inversion, request, embeddings, stats)
        key = self._cache_key(request.source, request.config)
        entry, stats.cache_hit = self.cache.get_or_compute(key, request.config.injection_steps, compute)
        return RealSource.from_entry(entry, request.timesteps, request.source.image)

    def _cache_key(self, source: InputImage, config: PnPConfig) -> SourceKey:
        return SourceKey.of(self.model.name, self.model.dtype, source.image, config)

    def _generate_source(self, request: CheckedRequest, embeddings: PromptEmbeddings) -> GeneratedSource:
        """Sample the source from seeded CPU noise, guided by the generation prompt at scale 5.0, capturing
        its features (docs/algorithm.md §4)."""
        seed = request.source.seed
        logger.info("seed %d", seed)
        width, height = request.size
        factor = self.model.vae_scale_factor
        noise = torch.randn(
            (1, self.model.latent_channels, height // factor, width // factor),
            generator=torch.Generator("cpu").manual_seed(seed),
            dtype=torch.float32,
        ).to(self.model.device, self.model.dtype)
        steps = len(request.timesteps)
        guidance = Guidance(
            embeddings.unconditional, embeddings.source, None, GENERATION_GUIDANCE_SCALE, (1.0,) * steps
        )
        latents, features = generate_source(self._denoiser(request, guidance), noise, request.config.injection_steps)
        return GeneratedSource(start_latent=noise, features=features, kept_latents=latents, seed=seed)

    def _compute_inversion(
        self,
        request: CheckedRequest,
        embeddings: PromptEmbeddings,
        stats: RunStats,
        partial_entry: SourceEntry | None,
        steps: InjectionSteps,
    ) -> SourceEntry:
        """A real image's cache entry: its latent and inversion (those of `partial_entry` where given) and
        its source features for `steps`, from the forward latents with E("") (docs/algorithm.md §3-§4)."""
        unet = self.model.injection_unet
        if partial_entry is None:
            with self._phase(stats, "load"):
                image_latent = self.model.encode_image(image_to_tensor(request.source.image)).float()
            with self._phase(stats, "inversion"):
                inversion_steps, keep = request.config.ddim_inversion_steps, set(request.timesteps)
                latents = self._fitting_memory(
                    request,
                    stats,
                    lambda: invert(unet, self.schedule, image_latent, embeddings.source, inversion_steps, keep),
                )
        else:
            image_latent, latents = partial_entry.image_latent, partial_entry.latents
        captured = request.timesteps[: steps.capture_steps]
        with self._phase(stats, "extraction"):
            features = self._fitting_memory(
                request,
                stats,
                lambda: extract_features(
                    unet,
                    [latents[t] for t in captured],
                    captured,
                    embeddings.unconditional,
                    request.budget.unet_latents,
                    steps,
                ),
            )
        return SourceEntry(image_latent, latents, features)

    def prepare_region(
        self, request: CheckedRequest, source: Source, embeddings: PromptEmbeddings, stats: RunStats
    ) -> EditRegion | None:
        """Where the prompts edit: everywhere (None), a painted mask's region (docs/algorithm.md §8), or with
        auto_mask each prompt's own region (§10, the "mask" phase)."""
        if request.config.auto_mask:
            with self._phase(stats, "mask"):
                masks = self._fitting_memory(request, stats, lambda: self._auto_masks(request, source, embeddings))
            stats.mask_coverage = masks.coverage
            return EditRegion(masks.pixel_masks, masks.latent_masks, source.kept_latents)
        if isinstance(request.source, InputImage) and request.source.pixel_mask is not None:
            return EditRegion.from_mask(request.source.pixel_mask, source.kept_latents, self.model.vae_scale_factor)
        return None

    def _auto_masks(self, request: CheckedRequest, source: Source, embeddings: PromptEmbeddings) -> AutoMasks:
        """Each prompt's mask against the source's text, from K · (1 + P) UNet evaluations at t_m; the noises'
        seed is the generation seed, or for a real image `seed` (0 when unset)."""
        if isinstance(request.source, SeededNoise):
            seed = request.source.seed
        else:
            seed = 0 if request.config.seed is None else request.config.seed
        texts = torch.cat([embeddings.source, embeddings.targets])
        unet, batch_size = self.model.injection_unet, request.budget.unet_latents
        differences = noise_differences(unet, self.schedule, source.clean_latent, texts, seed, batch_size)
        masks = threshold(differences, self.model.vae_scale_factor)
        prompts = request.config.translation_prompts
        for prompt, coverage, mean in zip(prompts, masks.coverage, masks.mean_differences, strict=True):
            if mean == 0:
                logger.warning(
                    "auto_mask: %r predicts the same noise as the source's description; it edits nothing", prompt
                )
            logger.info("auto_mask: %r edits %.1f%% of the image", prompt, 100 * coverage)
        return masks

    def translate(
        self, request: CheckedRequest, source: Source, embeddings: PromptEmbeddings, region: EditRegion | None
    ) -> torch.Tensor:
        """x_T -> the final latents (P, C, h, w), one per target prompt, the source's features injected."""
        config = request.config
        num_steps = len(request.timesteps)
        weights = (
            negative_prompt_weights(config.negative_prompt_schedule, config.negative_prompt_alpha, num_steps)
            if embeddings.negative is not None
            else [1.0] * num_steps
        )
        guidance = Guidance(
            embeddings.unconditional, embeddings.targets, embeddings.negative, config.scale, tuple(weights)
        )
        denoiser = self._denoiser(request, guidance, Injection(source.features, config.injection_steps))
        start = source.start_latent.float().expand(guidance.count, *source.start_latent.shape[1:])
        after_step = region.blend_latents if region is not None else None
        return sample(denoiser, start, self.schedule, request.timesteps, "translation", after_step)

    def decode(
        self, request: CheckedRequest, source: Source, latents: torch.Tensor, region: EditRegion | None
    ) -> list[Image.Image]:
        """The images of the final latents, a generated source's first; with a mask, the source's pixels
        outside it: the input image's, or the generated source's as it is returned (rounded to 8 bits)."""
        first = 1 if isinstance(source, GeneratedSource) else 0
        if first:
            latents = torch.cat([source.clean_latent, latents])
        pixels = decoded_to_pixels(self.model.decode_latents(latents, request.budget.vae_latents))
        if region is not None:
            kept = source.pixels if isinstance(source, RealSource) else torch.round(255 * pixels[:1]) / 255
            pixels = torch.cat([pixels[:first], region.blend_pixels(pixels[first:], kept)])
        return pixels_to_images(pixels)

    def _fitting_memory(self, request: CheckedRequest, stats: RunStats, run: Callable[[], T], call: str = "unet") -> T:
        """`run()`, and after each CUDA out-of-memory error `run()` again, with the memory the request does not
        need freed and half as many latents per `call` ("unet" or "vae"), down to one (docs/cost-model.md §7):
        the phase starts again, the ones before it stand."""
        while True:
            try:
                return run()
            except torch.OutOfMemoryError as error:
                self._free_memory(request, stats, error, call)

    def _free_memory(self, request: CheckedRequest, stats: RunStats, error: torch.OutOfMemoryError, call: str) -> None:
        """Drop the cache entries the request does not use and CUDA's cached blocks, then halve the latents
        per call (a call of one latent is tried once more), counted in the stats; where one latent per call
        did not fit even so, an `InputError` naming the working size and the prompts, and what would fit."""
        self.cache.retain(self._used_keys(request))
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        budget = request.budget
        # The call that failed carried at most this many latents: halving it is what can help.
        if call == "vae":
            failed = min(budget.vae_latents, self._request_shape(request).images)
        else:
            failed = min(budget.unet_latents, self.model.injection_unet.last_call_latents or budget.unet_latents)
        if failed <= 1 and call in budget.retried_one_latent:
            raise InputError("image_size", self._does_not_fit(request, call)) from error
        if failed <= 1:  # one latent per call gets one more try, with the memory given back
            budget.retried_one_latent.add(call)
        latents = max(1, failed // 2)
        if call == "vae":
            budget.vae_latents = latents
        else:
            budget.unet_latents = latents
        stats.memory_retries += 1
        logger.warning("out of memory (%s); again with %d latents per %s call", error, latents, call.upper())

    def _does_not_fit(self, request: CheckedRequest, call: str) -> str:
        """Why a request that ran out of memory at one latent per `call` failed, and by the memory model what
        would fit in what the device has free now."""
        width, height = request.size
        prompts = len(request.config.translation_prompts)
        per_call = "one latent per UNet call" if call == "unet" else "one image per VAE decoder call"
        message = (
            f"a {width}x{height} working size with {prompts} translation_prompts does not fit in the free memory "
            f"of {self.model.device}, even {per_call}"
        )
        free = free_bytes(self.model.device)
        if free is None:
            return message + "; use a smaller image_size"
        shape = self._request_shape(request)
        needed, usable = self.memory.request_bytes(shape, 1, 1), usable_bytes(free)
        spec = INPUTS["image_size"]
        fitting = [
            image_size
            for image_size in range(spec.minimum, max(width, height), spec.multiple_of)
            if self.memory.request_bytes(replace(shape, size=working_size(width, height, image_size)), 1, 1) <= usable
        ]
        advice = f"image_size {fitting[-1]} or less would" if fitting else "no image_size would"
        return (
            f"{message}: by the memory model (docs/cost-model.md §8) it needs {needed / 2**30:.1f} GiB beside the "
            f"weights, and the device has {free / 2**30:.1f} GiB free, {usable / 2**30:.1f} GiB after the margin; "
            f"{advice} fit"
        )

    def _used_keys(self, request: CheckedRequest) -> set[SourceKey]:
        """The cache keys a request may read: its image's, and that of the image's float32 entry."""
        if not isinstance(request.source, InputImage):
            return set()
        key = self._cache_key(request.source, request.config)
        return {key, replace(key, dtype=str(torch.float32))}

    def _denoiser(self, request: CheckedRequest, guidance: Guidance, injection: Injection | None = None) -> Denoiser:
        unet, batch_size = self.model.injection_unet, request.budget.unet_latents
        return Denoiser(unet, self.schedule, request.timesteps, guidance, batch_size, injection)

    def _shape(self, config: PnPConfig, size: tuple[int, int], generated: bool, new_source: bool) -> RequestShape:
        """What of a request at working size `size` decides its memory (docs/cost-model.md §8)."""
        prompts = len(config.translation_prompts)
        branches = prompts * (3 if config.negative_prompt.strip() else 2)
        calls = [branches, 2 if generated else 0, config.injection_steps.capture_steps if new_source else 0]
        if config.auto_mask:
            calls.append(MASK_NOISES * (1 + prompts))
        return RequestShape(
            size=size,
            sampling_steps=config.num_inference_steps,
            steps=config.injection_steps,
            branches=branches,
            unet_call_latents=max(calls),
            images=prompts + generated,
            generated=generated,
            new_source=new_source,
        )

    def _request_shape(self, request: CheckedRequest, new_source: bool = True) -> RequestShape:
        """The memory shape of a checked request; by default as on a new image (nothing cached)."""
        return self._shape(request.config, request.size, isinstance(request.source, SeededNoise), new_source)

    def _call_budget(self, shape: RequestShape) -> CallBudget:
        """Latents per UNet and VAE call: `batch_latent_pixels` over a latent's positions where it is set; else
        what the device's free memory, less the margin and what the request holds, fits by the memory model,
        at most DEFAULT_BATCH_LATENT_PIXELS' worth."""
        positions = self.memory.latent_positions(shape.size)
        most = max(1, (self.batch_latent_pixels or DEFAULT_BATCH_LATENT_PIXELS) // positions)
        free = None if self.batch_latent_pixels else free_bytes(self.model.device)
        if free is None:
            return CallBudget(most, most)
        room = usable_bytes(free) - self.memory.held_bytes(shape)
        return CallBudget(
            unet_latents=fit_latents(room, self.memory.unet_latent_bytes(shape.size, shape.halves), most),
            vae_latents=fit_latents(room, self.memory.vae_call_bytes(shape.size, 1), most),
        )

    def _record_memory(self, request: CheckedRequest, stats: RunStats) -> None:
        """The latents per call the request ended with, and what the memory model gives it at them."""
        budget = request.budget
        shape = self._request_shape(request, new_source=not stats.cache_hit)
        stats.unet_latents_per_call = min(budget.unet_latents, shape.unet_call_latents)
        stats.vae_latents_per_call = min(budget.vae_latents, shape.images)
        stats.modelled_bytes = self.memory.request_bytes(shape, budget.unet_latents, budget.vae_latents)

    def _leave_room_for(self, request: CheckedRequest) -> None:
        """Drop least recently used cache entries while the free memory is less than a request like this one, on
        a new image, needs at one latent per call: the cache never takes what the next request must have."""
        needed = self.memory.request_bytes(self._request_shape(request), 1, 1)

        def short_of_memory() -> bool:
            free = free_bytes(self.model.device)
            return free is not None and usable_bytes(free) < needed

        self.cache.evict_while(short_of_memory)

    @contextmanager
    def _phase(self, stats: RunStats, name: str) -> Iterator[None]:
        logger.info("%s ...", name)
        start, evals = time.perf_counter(), self.unet_evals
        try:
            yield
        finally:
            if self.model.device.type == "cuda":
                torch.cuda.synchronize(self.model.device)
            phase = stats.phases[name]
            phase.seconds += time.perf_counter() - start
            phase.unet_evals += self.unet_evals - evals
            logger.info("%s done: %.2f s, %d UNet evals", name, phase.seconds, phase.unet_evals)
