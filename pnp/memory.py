"""A request's peak memory, predicted from the loaded model's configuration (docs/cost-model.md §8-§9).

The model counts tensor bytes: the weights, the cache, what one request holds (its source features, its
latents, its output pixels; a video's keyframe outputs and nearest-neighbour search) and the activations of
one UNet or VAE decoder call, which grow with the latents the call carries. Kernel workspaces and allocator
slack are left to the margin that `pnp.memory_policy` keeps free.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from .automask import MASK_NOISES
from .config import PnPConfig
from .injection import ATTENTION_SITES, RESNET_SITE, InjectionSteps
from .models import StableDiffusion, vae_scale_factor
from .tokenflow import SIMILARITY_CHUNK_SCORES, VIDEO_KEPT_FEATURES, window_layout

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


def _self_attention_layers(unet_config: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
    """(level, channels) of every self-attention layer (attn1) of a UNet of this diffusers configuration, level 0
    the top: each cross-attention down block's `layers_per_block` transformers, the middle block's one, each
    cross-attention up block's `layers_per_block + 1`, each transformer `transformer_layers_per_block` deep."""
    channels, layers = tuple(unet_config["block_out_channels"]), unet_config["layers_per_block"]
    levels = len(channels)
    depth = unet_config.get("transformer_layers_per_block", 1)
    depths = (depth,) * levels if isinstance(depth, int) else tuple(depth)
    found = []
    for level, block in enumerate(unet_config["down_block_types"]):
        if "CrossAttn" in block:
            found += [(level, channels[level])] * layers * depths[level]
    if "CrossAttn" in (unet_config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        found += [(levels - 1, channels[-1])] * depths[-1]
    for index, block in enumerate(unet_config["up_block_types"]):
        level = levels - 1 - index
        if "CrossAttn" in block:
            found += [(level, channels[level])] * (layers + 1) * depths[level]
    return tuple(found)


@dataclass(frozen=True)
class MemoryModel:
    """The bytes a request of one model, in one dtype, holds and needs for each call.

    `unet_channels` and `unet_layers` are the UNet's `block_out_channels` and `layers_per_block`, `vae_channels`
    the VAE's `block_out_channels` (its decoder runs them in reverse), `value_bytes` the size of one value in
    the model's dtype, `self_attention_layers` the (level, channels) of each attn1, `host_device` whether the
    device is the host's memory (the CPU), where what a video keeps on the host counts too.
    """

    weight_bytes: int
    value_bytes: int
    latent_channels: int
    vae_scale_factor: int
    unet_channels: tuple[int, ...]
    unet_layers: int
    vae_channels: tuple[int, ...]
    self_attention_layers: tuple[tuple[int, int], ...]
    host_device: bool = False

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
            self_attention_layers=_self_attention_layers(unet_config),
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
        memory = cls.from_configs(model.unet.config, model.vae.config, model.dtype, weight_bytes)
        return replace(memory, host_device=model.device.type == "cpu")

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
        """What a request holds beside the weights and the cache, at its widest moment: what it holds through its
        calls, and the largest of a sampling step (one UNet call of `unet_batch` latents, a video's keyframes of
        one branch together, with what a video's step keeps), a new video's inversion call and one VAE decoder
        call of at most `vae_batch` images (with a video's decoded frames: they are handed on a call at a time)."""
        unet_latent = self.unet_latent_bytes(shape.size, guidance_halves=shape.generated)
        unet = shape.unet_call_latents(unet_batch) * unet_latent + self.video_step_bytes(shape)
        decoded = min(vae_batch, shape.images)
        vae = self.vae_call_bytes(shape.size, decoded)
        if shape.keyframe_interval:
            vae += self.output_bytes(shape.size, decoded)
            unet = max(unet, self.inversion_call_bytes(shape, unet_batch))
        return self.held_bytes(shape) + max(unet, vae)

    def held_bytes(self, shape: RequestShape) -> int:
        """What a request holds through its calls. An image: a new source's features and z_src at every sampling
        step (a cached source's are in the cache), its translation batch and noise predictions, and its decoded
        images. A video: every frame's latent of every prompt, the largest window's z_src, one group's noise
        predictions (docs/cost-model.md §9); on the CPU also a new video's inversion, which is kept on the host."""
        if shape.keyframe_interval:
            window_groups, _ = _window_sizes(shape.keyframes)
            window_frames = min(shape.frames, window_groups * shape.keyframe_interval)
            group_latents = (shape.branches + 2 * shape.prompts) * min(shape.frames, shape.keyframe_interval)
            latents = shape.prompts * shape.frames + window_frames + group_latents
            if self.host_device and shape.new_source:
                latents += self.inversion_latents(shape)
            return self.latent_bytes(shape.size, latents)
        features, source_steps = 0, 0
        if shape.new_source:
            features = self.feature_bytes(shape.size, shape.injection_steps, guidance_halves=shape.generated)
            source_steps = shape.sampling_steps
        latents = self.latent_bytes(shape.size, shape.frames * (source_steps + 4 * shape.branches))
        return features + latents + self.output_bytes(shape.size, shape.images)

    @staticmethod
    def inversion_latents(shape: RequestShape) -> int:
        """A video's inversion, its cache entry: every frame's latent and its z_src at every sampling step."""
        return shape.frames * (shape.sampling_steps + 1)

    def inversion_call_bytes(self, shape: RequestShape, unet_batch: int) -> int:
        """A new video's inversion call: its frames' activations and their z_src at every sampling step, on the
        device until the call's frames are done; 0 for a cached video."""
        if not shape.new_source:
            return 0
        frames = min(unet_batch, shape.frames)
        return frames * self.unet_latent_bytes(shape.size) + self.latent_bytes(
            shape.size, frames * shape.sampling_steps
        )

    def host_bytes(self, shape: RequestShape, vae_batch: int) -> int:
        """What a video keeps in the host's memory (docs/cost-model.md §9): its frames at the working size, its
        inversion (the cache entry, new or cached), and one decoder call's frames on their way to the MP4s (as
        8-bit pixels and as the images made of them)."""
        width, height = shape.size
        frames = shape.frames * RGB * width * height
        decoded = 2 * min(vae_batch, shape.frames) * RGB * width * height
        return frames + self.latent_bytes(shape.size, self.inversion_latents(shape)) + decoded

    def video_step_bytes(self, shape: RequestShape) -> int:
        """What a video's sampling step holds beside its UNet calls (docs/cost-model.md §9): the largest window's
        keyframe pass's kept attn1 inputs and outputs and its captured source features, with more than one window
        the anchors' and the previous window's kept keys and values, and the nearest-neighbour search; 0 for an
        image."""
        if not shape.keyframes:
            return 0
        window_groups, anchors = _window_sizes(shape.keyframes)
        keyframes = self.keyframe_bytes(shape.size, window_groups, shape.branches)
        return keyframes + self.window_bytes(shape, anchors) + self.similarity_bytes(shape)

    def window_bytes(self, shape: RequestShape, anchors: int) -> int:
        """With several windows (docs/algorithm.md §12), for every attn1 and target branch: the A anchors' keys and
        values, the window's last keyframe's (for the next window), and the previous window's last keyframe's S_k,
        A_k, keys and values; 0 with one window. The keys a window's call gathers from them are one layer's at a
        time, within the call's activations."""
        if not anchors:
            return 0
        values = self.self_attention_values(shape.size) * self.value_bytes
        key_values = 2 * shape.branches * values
        previous = (2 + shape.branches) * values + key_values
        return (anchors + 1) * key_values + previous

    def self_attention_values(self, size: tuple[int, int]) -> int:
        """The values of one frame's inputs (or outputs) of every attn1 together: the sum of C · n / 4^level."""
        positions = self.latent_positions(size)
        return sum(channels * (positions // 4**level) for level, channels in self.self_attention_layers)

    def keyframe_bytes(self, size: tuple[int, int], keyframes: int, branches: int) -> int:
        """What a video step keeps from its keyframe pass: for every attn1, the keyframes' source inputs S_k and
        attn1 outputs A_k of the source and of each target branch (for the group passes, docs/algorithm.md §11), and the
        keyframes' captured source features (for the pass's target calls)."""
        kept = (2 + branches) * self.self_attention_values(size) * self.value_bytes
        return keyframes * (kept + sum(self.step_feature_bytes(size)))

    def similarity_bytes(self, shape: RequestShape) -> int:
        """A video's nearest-neighbour search at the top level, where it is widest: the cosine similarities of a
        group pass call's rows, at most SIMILARITY_CHUNK_SCORES at once, and one keyframe's tokens normalised,
        in float32 (the rows' own normalised tokens are within the call's activations: attn1 is not computed)."""
        positions = self.latent_positions(shape.size)
        rows = min(shape.frames, shape.keyframe_interval) * positions
        scores = min(SIMILARITY_CHUNK_SCORES, rows * positions)
        return (scores + positions * self.unet_channels[0]) * FLOAT32_BYTES

    def peak_bytes(self, shape: RequestShape, unet_batch: int, vae_batch: int, cache_bytes: int = 0) -> int:
        """The device's peak for a request: weights, the cache, and the request's own widest moment."""
        return self.weight_bytes + cache_bytes + self.request_bytes(shape, unet_batch, vae_batch)


def _window_sizes(groups: int) -> tuple[int, int]:
    """The groups of a video's largest window and its anchors (docs/algorithm.md §12), for `groups` groups."""
    windows, anchors = window_layout(groups)
    return max(map(len, windows)), len(anchors)


def _sampling_branches(config: PnPConfig) -> int:
    """The target branches of a sampling step, all prompts': unconditional and conditional, and the negative
    prompt's where one is given (at its most: its schedule may drop it at some steps)."""
    return len(config.translation_prompts) * (3 if config.negative_prompt.strip() else 2)


@dataclass(frozen=True)
class RequestShape:
    """What of a request decides its memory: the working size (W, H), the sampling steps, the injected steps whose
    source features it keeps, the UNet branches of a sampling step (all prompts'), the latents of its largest
    UNet call were it not split, its translation prompts, whether its source is generated (its features kept for
    both guidance halves, its image returned first), whether its source is new (not in the cache), and for a
    video its frames and keyframe_interval (an image: 1 frame, interval 0)."""

    size: tuple[int, int]
    sampling_steps: int
    injection_steps: InjectionSteps
    branches: int
    largest_unet_call: int
    prompts: int
    generated: bool
    new_source: bool
    frames: int = 1
    keyframe_interval: int = 0

    @classmethod
    def of(cls, config: PnPConfig, size: tuple[int, int], generated: bool, new_source: bool) -> RequestShape:
        """The shape of an image request of `config` at working size `size`: its UNet calls are a translation
        step's branches, a generation step's two halves, the extraction's captured steps (features not cached),
        and auto_mask's K · (1 + P) noises."""
        prompts, branches = len(config.translation_prompts), _sampling_branches(config)
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

    @classmethod
    def of_video(cls, config: PnPConfig, size: tuple[int, int], frames: int, new_source: bool) -> RequestShape:
        """The shape of a video request of `frames` frames: its UNet calls are the inversion's frames (not
        cached), a keyframe pass's branches of G keyframes and a group pass's of B frames; it keeps no source
        features (docs/algorithm.md §11: the source branch runs at every step)."""
        prompts, branches = len(config.translation_prompts), _sampling_branches(config)
        keyframes = max(_window_sizes(math.ceil(frames / config.keyframe_interval)))
        group = min(frames, config.keyframe_interval)
        return cls(
            size=size,
            sampling_steps=config.num_inference_steps,
            injection_steps=VIDEO_KEPT_FEATURES,
            branches=branches,
            largest_unet_call=max(branches * max(keyframes, group), frames if new_source else 0),
            prompts=prompts,
            generated=False,
            new_source=new_source,
            frames=frames,
            keyframe_interval=config.keyframe_interval,
        )

    @property
    def keyframes(self) -> int:
        """A video's keyframes a step, G = ceil(F / B); 0 for an image."""
        return math.ceil(self.frames / self.keyframe_interval) if self.keyframe_interval else 0

    @property
    def pass_keyframes(self) -> int:
        """The most keyframes of one branch in one UNet call: a window's, or the anchors' (docs/algorithm.md §12)."""
        return max(_window_sizes(self.keyframes)) if self.keyframes else 0

    @property
    def images(self) -> int:
        """The images decoded together: a generated source's and one per prompt; a video's frames of one prompt."""
        return self.frames if self.keyframe_interval else self.prompts + self.generated

    def unet_call_latents(self, unet_batch: int) -> int:
        """The latents of the request's largest UNet call at `unet_batch`: at most the unsplit call, at least a
        video's keyframes (one branch's keyframes attend to each other, so they share a call)."""
        return min(max(unet_batch, self.pass_keyframes), self.largest_unet_call)
