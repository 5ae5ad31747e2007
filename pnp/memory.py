"""A request's peak memory, predicted from the loaded model's configuration (docs/cost-model.md §8), and the
latents per UNet or VAE call that fit the memory a device has free.

The model counts tensor bytes: the weights, the cache, what one request holds (its source features, its
latents, its output pixels) and the activations of one UNet or VAE decoder call, which grow with the
latents the call carries. Kernel workspaces and allocator slack are left to the margin (`usable_bytes`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .injection import ATTENTION_SITES, RESNET_SITE, InjectionSteps
from .models import StableDiffusion, vae_scale_factor

# Left free for what the model does not count: cuDNN's and oneDNN's workspaces, the caching allocator's
# rounding and fragmentation, CUDA's kernels loaded on first use.
MEMORY_MARGIN_BYTES = 1 << 30
MEMORY_MARGIN_FRACTION = 0.1
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

    def feature_bytes(self, size: tuple[int, int], steps: InjectionSteps, halves: int = 1) -> int:
        """The source features a request keeps: n_f steps of the ResNet site, n_a of the attention sites, for
        each of the source's `halves` (2 for a generated source's guided pass)."""
        resnet, attention = self.step_feature_bytes(size)
        kept = steps.feature_injection_steps * resnet + steps.attention_injection_steps * attention
        return halves * kept

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

    def unet_latent_bytes(self, size: tuple[int, int], halves: int = 1) -> int:
        """What one more latent in a UNet call costs: its activations, and one step's features of every site
        that it captures (extraction, generation) or that is laid out for it (a generated source)."""
        resnet, attention = self.step_feature_bytes(size)
        return self.unet_call_bytes(size, 1) + halves * (resnet + attention)

    def request_bytes(self, request: RequestShape, unet_latents: int, vae_latents: int) -> int:
        """What a request holds beside the weights and the cache, at its widest moment: its features (unless
        cached), latents and images, and the larger of one UNet call and one VAE call, each of at most
        `unet_latents` and `vae_latents` latents."""
        held = self.held_bytes(request)
        unet = min(unet_latents, request.unet_call_latents) * self.unet_latent_bytes(request.size, request.halves)
        vae = self.vae_call_bytes(request.size, min(vae_latents, request.images))
        return held + max(unet, vae)

    def held_bytes(self, request: RequestShape) -> int:
        """What a request holds through its calls: its new source features, its latents (z_src at every
        sampling step, the translation's batch and its noise predictions) and its decoded images."""
        features = self.feature_bytes(request.size, request.steps, request.halves) if request.new_source else 0
        latents = self.latent_bytes(request.size, request.sampling_steps + 4 * request.branches)
        return features + latents + self.output_bytes(request.size, request.images)

    def peak_bytes(self, request: RequestShape, unet_latents: int, vae_latents: int, cache_bytes: int = 0) -> int:
        """The device's peak for a request: weights, the cache, and the request's own widest moment."""
        return self.weight_bytes + cache_bytes + self.request_bytes(request, unet_latents, vae_latents)


@dataclass(frozen=True)
class RequestShape:
    """What of a request decides its memory: the working size (W, H), the sampling steps, the injected steps,
    the UNet branches of a translation step (all prompts'), the latents of its largest UNet call were it not
    split, the images it returns, whether its source is generated (two feature halves), and whether its
    features are new (not in the cache)."""

    size: tuple[int, int]
    sampling_steps: int
    steps: InjectionSteps
    branches: int
    unet_call_latents: int
    images: int
    generated: bool
    new_source: bool

    @property
    def halves(self) -> int:
        return 2 if self.generated else 1


def fit_latents(room_bytes: int, bytes_per_latent: int, most: int) -> int:
    """The latents per call that fit `room_bytes`: as many whole latents as fit, at least one (a call of one
    latent is the least a request can make) and at most `most` (more gain no speed)."""
    return max(1, min(most, room_bytes // bytes_per_latent))


def usable_bytes(free_bytes: int) -> int:
    """The part of the free memory that calls may use: less `MEMORY_MARGIN_BYTES` or a tenth, the larger."""
    return free_bytes - max(MEMORY_MARGIN_BYTES, int(MEMORY_MARGIN_FRACTION * free_bytes))


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
