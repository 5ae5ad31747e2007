"""The engine: one request, from its validated config and image to the translated images and their stats.

request -> image and latent -> inversion (cached) -> source features (cached) -> translation -> images.
The Cog predictor, the command line and the benchmark all drive `PnPEngine`. Below it, the predictor's
setup and the benchmark use only the loaded model's switches (device, dtype, compiled, channels_last)
and clear the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from .cache import SourceCache, SourceEntry, SourceKey
from .config import INPUTS, PnPConfig
from .errors import InputError, ModelError, NonFiniteError
from .image_io import (
    ImageSource,
    decoded_to_pixels,
    image_to_pixels,
    image_to_tensor,
    load_image,
    load_mask,
    pixels_to_images,
    prepare_image,
)
from .inversion import extract_features, invert
from .models import StableDiffusion, load_model
from .region import EditRegion
from .schedules import NoiseSchedule, negative_prompt_weights
from .translation import Denoiser, Injection, PromptEmbeddings, generate_source, translate

logger = logging.getLogger(__name__)

PHASES = ("load", "inversion", "extraction", "translation", "decode")
GENERATION_GUIDANCE_SCALE = 5.0
# Latent pixels per UNet call: 16 latents at 512x512 (64x64 latents), fewer at larger sizes.
DEFAULT_BATCH_LATENT_PIXELS = 16 * 64 * 64
CACHE_FRACTION_OF_MEMORY = 0.2


@dataclass
class PhaseStats:
    seconds: float = 0.0
    unet_evals: int = 0


@dataclass
class RunStats:
    """Seconds and UNet evaluations (latents through the UNet, counted as they run) per phase.

    After a float32 retry they are both runs' together: what the request cost."""

    phases: dict[str, PhaseStats] = field(default_factory=lambda: {name: PhaseStats() for name in PHASES})
    cache_hit: bool = False
    float32_retry: bool = False

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases.values())

    @property
    def unet_evals(self) -> int:
        return sum(p.unet_evals for p in self.phases.values())

    def summary(self) -> str:
        lines = [f"{name:<12} {p.seconds:8.2f} s {p.unet_evals:6d} UNet evals" for name, p in self.phases.items()]
        notes = [note for note, applies in (("cached inversion", self.cache_hit), ("float32 retry", self.float32_retry)) if applies]
        lines.append(f"{'total':<12} {self.seconds:8.2f} s {self.unet_evals:6d} UNet evals" + (f" ({', '.join(notes)})" if notes else ""))
        return "\n".join(lines)


@dataclass
class PnPResult:
    """The output images (a generated source first, then one per prompt), the seed used and the stats."""

    images: list[Image.Image]
    seed: int | None
    stats: RunStats


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
    """Plug-and-Play image translation on one loaded Stable Diffusion model."""

    def __init__(
        self,
        model: StableDiffusion,
        cache_bytes: int | None = None,
        batch_latent_pixels: int = DEFAULT_BATCH_LATENT_PIXELS,
    ):
        self.model = model
        self.schedule = NoiseSchedule.from_config(model.scheduler_config)
        self.unet = model.sites
        self.cache = SourceCache(default_cache_bytes(model.device) if cache_bytes is None else cache_bytes)
        self.batch_latent_pixels = batch_latent_pixels

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
        return self.unet.evals

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

    def _batch_size(self, width: int, height: int) -> int:
        """Latents per UNet or VAE call at a working size: `batch_latent_pixels` over the latent's pixels."""
        return max(1, self.batch_latent_pixels // ((width // 8) * (height // 8)))

    @torch.no_grad()
    def __call__(
        self,
        config: PnPConfig,
        image: ImageSource | None = None,
        mask: ImageSource | None = None,
    ) -> PnPResult:
        """Translate `image` (or, in generation mode, a source generated from `config.generation_prompt`).

        With a `mask` (real images only), white regions are edited and black ones keep the input exactly
        (docs/algorithm.md §8). Every input is checked before any UNet evaluation. Non-finite numbers in
        float16 or bfloat16 get the request one more run in float32 before it fails.
        """
        stats = RunStats()
        self.unet.check_processors()
        steps_spec = INPUTS["num_inference_steps"]
        self.schedule.check_training_range("num_inference_steps", config.num_inference_steps, steps_spec.minimum)
        prepared = pixel_mask = None
        if config.generation_mode:
            if mask is not None:
                raise InputError("mask", "works only with an input_image; in generation mode there is no input image to keep")
        else:
            if image is None:
                raise InputError("input_image", "give an image to edit, or a generation_prompt to generate one")
            spec = INPUTS["ddim_inversion_steps"]
            self.schedule.check_training_range("ddim_inversion_steps", config.ddim_inversion_steps, spec.minimum)
            self.schedule.check_nesting(
                config.num_inference_steps, config.ddim_inversion_steps, spec.minimum, spec.maximum
            )
            with self._phase(stats, "load"):
                prepared = prepare_image(load_image(image), config.image_size)
                if mask is not None:
                    pixel_mask = load_mask(mask, prepared.size)
        seed = None
        if config.generation_mode:
            seed = config.seed if config.seed is not None else secrets.randbits(32)
        try:
            return self._run(config, prepared, pixel_mask, seed, stats)
        except NonFiniteError as error:
            if self.model.dtype == torch.float32:
                raise
            logger.warning("%s in %s; running the request again in float32", error, self.model.dtype)
            stats.float32_retry = True
            with self.model.in_float32():
                return self._run(config, prepared, pixel_mask, seed, stats)

    def _run(
        self,
        config: PnPConfig,
        prepared: Image.Image | None,
        pixel_mask: torch.Tensor | None,
        seed: int | None,
        stats: RunStats,
    ) -> PnPResult:
        """One run of a checked request (the float32 retry is a second one)."""
        # 1. Timesteps and text embeddings: E(""), the source's prompt, the targets, the negative prompt.
        num_steps = config.num_inference_steps
        timesteps = self.schedule.sampling_timesteps(num_steps)
        resnet_steps, attention_steps = config.feature_injection_steps, config.attention_injection_steps
        negative = config.negative_prompt.strip() != ""
        texts = ["", config.generation_prompt if config.generation_mode else config.inversion_prompt, *config.translation_prompts]
        embeddings = self.model.encode_text(texts + ([config.negative_prompt] if negative else []))
        unconditional, source_text = embeddings[:1], embeddings[1:2]
        batch_size = self._batch_size(*(prepared.size if prepared is not None else (config.image_size,) * 2))

        def make_denoiser(prompts: PromptEmbeddings, scale: float, weights: list[float], injection: Injection | None) -> Denoiser:
            return Denoiser(self.unet, self.schedule, timesteps, prompts, scale, weights, batch_size, injection)

        # 2. The source: generated with its features captured, or a real image's inversion and features.
        region = source_latent = None
        if prepared is None:
            logger.info("seed %d", seed)
            noise = torch.randn(
                (1, 4, config.image_size // 8, config.image_size // 8),
                generator=torch.Generator("cpu").manual_seed(seed),
                dtype=torch.float32,
            ).to(self.model.device, self.model.dtype)
            with self._phase(stats, "extraction"):
                source_denoiser = make_denoiser(
                    PromptEmbeddings(unconditional, targets=source_text), GENERATION_GUIDANCE_SCALE, [1.0] * num_steps, None
                )
                source_latent, source = generate_source(source_denoiser, noise, resnet_steps, attention_steps)
            start = noise
        else:
            entry = self._source_entry(config, prepared, timesteps, source_text, unconditional, batch_size, stats)
            source, start = entry.features, entry.latents[timesteps[0]]
            if pixel_mask is not None:
                kept_latents = [entry.latents[t] for t in timesteps[1:]] + [entry.image_latent]
                region = EditRegion.from_mask(pixel_mask, image_to_pixels(prepared), kept_latents)

        # 3. Translation of x_T for every target prompt at once, with the source's features injected.
        weights = (
            negative_prompt_weights(config.negative_prompt_schedule, config.negative_prompt_alpha, num_steps)
            if negative
            else [1.0] * num_steps
        )
        prompts = PromptEmbeddings(
            unconditional,
            targets=embeddings[2 : 2 + len(config.translation_prompts)],
            negative=embeddings[-1:] if negative else None,
        )
        with self._phase(stats, "translation"):
            injection = Injection(source, resnet_steps, attention_steps)
            translated = translate(make_denoiser(prompts, config.scale, weights, injection), start, region)
        # 4. Images: the generated source first, then one per prompt; with a mask, the input outside it.
        with self._phase(stats, "decode"):
            latents = translated if source_latent is None else torch.cat([source_latent, translated])
            pixels = decoded_to_pixels(self.model.decode_latents(latents, batch_size))
            if region is not None:
                pixels = region.blend_pixels(pixels)
            images = pixels_to_images(pixels)
        return PnPResult(images=images, seed=seed, stats=stats)

    def _source_entry(
        self,
        config: PnPConfig,
        prepared: Image.Image,
        timesteps: list[int],
        inversion_text: torch.Tensor,
        unconditional: torch.Tensor,
        batch_size: int,
        stats: RunStats,
    ) -> SourceEntry:
        """The inversion latents and source features of a real image, from the cache or computed, and
        cached once complete and finite."""
        key = SourceKey(
            model=self.model.name,
            dtype=str(self.model.dtype),
            image_digest=hashlib.sha256(prepared.tobytes()).hexdigest(),
            width=prepared.width,
            height=prepared.height,
            ddim_inversion_steps=config.ddim_inversion_steps,
            num_inference_steps=config.num_inference_steps,
            inversion_prompt=config.inversion_prompt,
        )
        # A float32 entry, left by the float32 retry of a request whose half-precision run failed, serves
        # half-precision requests too: their own inversion of the image would most likely fail again.
        entry = self.cache.get(key) or self.cache.get(replace(key, dtype=str(torch.float32)))
        stats.cache_hit = entry is not None
        resnet_steps, attention_steps = config.feature_injection_steps, config.attention_injection_steps
        if entry is not None and entry.features.covers(resnet_steps, attention_steps):
            return entry
        if entry is None:
            with self._phase(stats, "load"):
                image_latent = self.model.encode_image(image_to_tensor(prepared)).float()
            with self._phase(stats, "inversion"):
                latents = invert(
                    self.unet, self.schedule, image_latent, inversion_text, config.ddim_inversion_steps, set(timesteps)
                )
        else:
            # Features for fewer steps than this request injects are extracted again, in one batched pass,
            # for the longer of both requests' lengths, so that alternating requests find them next time.
            image_latent, latents = entry.image_latent, entry.latents
            resnet_steps = max(resnet_steps, entry.features.resnet_steps)
            attention_steps = max(attention_steps, entry.features.attention_steps)
        steps = max(resnet_steps, attention_steps)
        with self._phase(stats, "extraction"):
            features = extract_features(
                self.unet,
                [latents[t] for t in timesteps[:steps]],
                timesteps[:steps],
                unconditional,
                batch_size,
                resnet_steps,
                attention_steps,
            )
        entry = SourceEntry(image_latent, latents, features)
        if not entry.is_finite():
            raise NonFiniteError("the inversion of the image produced NaN or infinite values")
        self.cache.put(key, entry)
        return entry
