"""A request's peak memory, predicted from the loaded model's configuration (docs/cost-model.md §8).

The model counts tensor bytes: the weights, the cache, what one request holds (its source features, its
latents, its output pixels) and the activations of one UNet or VAE decoder call, which grow with the
latents the call carries. Kernel workspaces and allocator slack are left to the margin that
`pnp.memory_policy` keeps free.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .automask import MASK_NOISES
from .config import PnPConfig
from .injection import ATTENTION_SITES, RESNET_SITE, InjectionSteps
from .models import StableDiffusion, vae_scale_factor

# A transformer block's feed-forward (GEGLU, 4x wider) holds its input (1 width), the projection (8), the
# gate's GELU (4) and the product (4), beside the block's and the transformer's residuals (2 + 1).
FEED_FORWARD_WIDTHS = 20
# A VAE decoder ResNet block holds its input and, at once, either the GroupNorm's output and its SiLU
# (3 input widths) or its second convolution, the shortcut, their sum and the sum scaled (input + 4 output).
VAE_RESNET_INPUT_WIDTHS = 3
VAE_RESNET_OUTPUT_WIDTHS = 4
FLOAT32_BYTES = 4
RGB = 3


def _up_block(site: str) -> int:
    """The index j of the `up_blocks.j` a feature site lies in."""
    match = re.match(r"up_blocks\.(\d+)\.", site)
    if match is None:
        raise ValueError(f"{site!r} is not in the UNet's up_blocks")
    return int(match.group(1))


@dataclass(frozen=True)
class MemoryModel:
    """The bytes a request of one model, in one dtype, holds and needs for each call.

    `unet_channels` and `unet_layers` are the UNet's `block_out_channels` and `layers_per_block`, `vae_channels`
    the VAE's `block_out_channels` (its decoder runs them in reverse), `value_bytes` the size of one value in
    the model's dtype.
    """

    weight_bytes: int
    value_bytes: int
    latent_channels: int
    vae_scale_factor: int
    unet_channels: tuple[int, ...]
    unet_layers: int
    vae_channels: tuple[int, ...]

    @classmethod
    def from_configs(
        cls, unet_config: Mapping[str, Any], vae_config: Mapping[str, Any], dtype: torch.dtype, weight_bytes: int
    ) -> MemoryModel:
        """The model of a UNet and VAE of these diffusers configurations in `dtype`."""
        vae_channels = tuple(vae_config["block_out_channels"])
        return cls(
            weight_bytes=weight_bytes,
            value_bytes=torch.empty((), dtype=dtype).element_size(),
            latent_channels=unet_config["in_channels"],
            vae_scale_factor=vae_scale_factor(vae_config),
            unet_channels=tuple(unet_config["block_out_channels"]),
            unet_layers=unet_config["layers_per_block"],
            vae_channels=vae_channels,
        )

    @classmethod
    def of(cls, model: StableDiffusion) -> MemoryModel:
        """The model of a loaded Stable Diffusion: its weights (UNet, VAE, text encoder) counted as loaded."""
        modules = (model.unet, model.vae, model.text_encoder)
        weight_bytes = sum(
            tensor.numel() * tensor.element_size()
            for module in modules
            for tensor in [*module.parameters(), *module.buffers()]
        )
        return cls.from_configs(model.unet.config, model.vae.config, model.dtype, weight_bytes)

    def latent_positions(self, size: tuple[int, int]) -> int:
        """Latent positions n = (W / f)(H / f) at a working size (W, H)."""
        width, height = size
        return (width // self.vae_scale_factor) * (height // self.vae_scale_factor)

    def _up_block_site(self, site: str, positions: int) -> tuple[int, int]:
        """(channels, positions) of the activations of a site in `up_blocks.j`: the UNet's widths in reverse,
        a quarter of the positions for each level below the top."""
        block = _up_block(site)
        levels = len(self.unet_channels)
        return self.unet_channels[levels - 1 - block], positions // 4 ** (levels - 1 - block)

    def step_feature_bytes(self, size: tuple[int, int]) -> tuple[int, int]:
        """One sampling step's source features of one source at a working size: (the ResNet site's, the
        attention sites' q and k), in bytes (docs/cost-model.md §5)."""
        positions = self.latent_positions(size)
        channels, resnet_positions = self._up_block_site(RESNET_SITE, positions)
        attention = sum(math.prod(self._up_block_site(site, positions)) for site in ATTENTION_SITES)
        return channels * resnet_positions * self.value_bytes, 2 * attention * self.value_bytes

    def feature_bytes(
        self, size: tuple[int, int], injection_steps: InjectionSteps, guidance_halves: bool = False
    ) -> int:
        """The source features a request keeps: n_f steps of the ResNet site, n_a of the attention sites, twice
        with `guidance_halves` (a generated source's guided pass keeps both halves)."""
        resnet, attention = self.step_feature_bytes(size)
        kept = injection_steps.feature_injection_steps * resnet + injection_steps.attention_injection_steps * attention
        return (2 if guidance_halves else 1) * kept

    def latent_bytes(self, size: tuple[int, int], latents: int) -> int:
        """`latents` float32 latents (C, h, w), as the loops keep them."""
        return latents * self.latent_channels * self.latent_positions(size) * FLOAT32_BYTES

    def unet_call_bytes(self, size: tuple[int, int], latents: int) -> int:
        """Activations of one UNet call of `latents` latents: the skip connections that the down blocks keep for
        the up blocks (conv_in, then each block's ResNet outputs and its downsampled output), and the widest
        moment, the feed-forward of a transformer block at the top level."""
        positions = self.latent_positions(size)
        levels = len(self.unet_channels)
        skips = self.unet_channels[0] * positions
        for level, channels in enumerate(self.unet_channels):
            at_level = positions // 4**level
            skips += self.unet_layers * channels * at_level
            if level < levels - 1:
                skips += channels * at_level // 4
        feed_forward = FEED_FORWARD_WIDTHS * self.unet_channels[0] * positions
        return latents * (skips + feed_forward) * self.value_bytes

    def vae_call_bytes(self, size: tuple[int, int], latents: int) -> int:
        """Activations of one VAE decoder call of `latents` latents: the widest ResNet block, the first of each
        level, whose input is the level below upsampled (the latent's own width at the bottom)."""
        width, height = size
        reverse = self.vae_channels[::-1]
        widest = 0
        for level, channels in enumerate(reverse):
            pixels = width * height // 4 ** (len(reverse) - 1 - level)
            inputs = reverse[max(level - 1, 0)]
            held = max(VAE_RESNET_INPUT_WIDTHS * inputs, inputs + VAE_RESNET_OUTPUT_WIDTHS * channels)
            widest = max(widest, held * pixels)
        return latents * widest * self.value_bytes

    def output_bytes(self, size: tuple[int, int], images: int) -> int:
        """The decoded images, in the model's dtype and as float32 pixels."""
        width, height = size
        return images * RGB * width * height * (self.value_bytes + FLOAT32_BYTES)

    def unet_latent_bytes(self, size: tuple[int, int], guidance_halves: bool = False) -> int:
        """What one more latent in a UNet call costs: its activations, and one step's features of every site
        that it captures (extraction, generation) or that is laid out for it (a generated source)."""
        resnet, attention = self.step_feature_bytes(size)
        return self.unet_call_bytes(size, 1) + (2 if guidance_halves else 1) * (resnet + attention)

    def request_bytes(self, shape: RequestShape, unet_batch: int, vae_batch: int) -> int:
        """What a request holds beside the weights and the cache, at its widest moment: its features (unless
        cached), latents and images, and the larger of one UNet call of at most `unet_batch` latents and one VAE
        decoder call of at most `vae_batch` images."""
        unet_latent = self.unet_latent_bytes(shape.size, guidance_halves=shape.generated)
        unet = min(unet_batch, shape.largest_unet_call) * unet_latent
        vae = self.vae_call_bytes(shape.size, min(vae_batch, shape.images))
        return self.held_bytes(shape) + max(unet, vae)

    def held_bytes(self, shape: RequestShape) -> int:
        """What a request holds through its calls: its new source features, its latents (z_src at every
        sampling step, the translation's batch and its noise predictions) and its decoded images."""
        features = (
            self.feature_bytes(shape.size, shape.injection_steps, guidance_halves=shape.generated)
            if shape.new_source
            else 0
        )
        latents = self.latent_bytes(shape.size, shape.sampling_steps + 4 * shape.branches)
        return features + latents + self.output_bytes(shape.size, shape.images)

    def peak_bytes(self, shape: RequestShape, unet_batch: int, vae_batch: int, cache_bytes: int = 0) -> int:
        """The device's peak for a request: weights, the cache, and the request's own widest moment."""
        return self.weight_bytes + cache_bytes + self.request_bytes(shape, unet_batch, vae_batch)


@dataclass(frozen=True)
class RequestShape:
    """What of a request decides its memory: the working size (W, H), the sampling steps, the injected steps,
    the UNet branches of a translation step (all prompts'), the latents of its largest UNet call were it not
    split, its translation prompts, whether its source is generated (its features kept for both guidance
    halves, its image returned first), and whether its features are new (not in the cache)."""

    size: tuple[int, int]
    sampling_steps: int
    injection_steps: InjectionSteps
    branches: int
    largest_unet_call: int
    prompts: int
    generated: bool
    new_source: bool

    @classmethod
    def of(cls, config: PnPConfig, size: tuple[int, int], generated: bool, new_source: bool) -> RequestShape:
        """The shape of a request of `config` at working size `size`: its UNet calls are a translation step's
        branches, a generation step's two halves, the extraction's captured steps (features not cached),
        and auto_mask's K · (1 + P) noises."""
        prompts = len(config.translation_prompts)
        branches = prompts * (3 if config.negative_prompt.strip() else 2)
        calls = [branches, 2 if generated else 0, config.injection_steps.capture_steps if new_source else 0]
        if config.auto_mask:
            calls.append(MASK_NOISES * (1 + prompts))
        return cls(
            size=size,
            sampling_steps=config.num_inference_steps,
            injection_steps=config.injection_steps,
            branches=branches,
            largest_unet_call=max(calls),
            prompts=prompts,
            generated=generated,
            new_source=new_source,
        )

    @property
    def images(self) -> int:
        """The images the request returns: a generated source's first, then one per prompt."""
        return self.prompts + self.generated
