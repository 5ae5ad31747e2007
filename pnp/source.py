"""The source of a request (docs/algorithm.md §3-§4, §8): what it loaded, and what translation starts from.

A `Source` is what the request gives: a real image (`RealImage`: the input image at its working size, its
painted mask, its cache key) or seeded noise to generate one from (`GeneratedImage`). The engine's steps
ask it what they need (its size, whether it is generated, its seed, the pixels a mask keeps) rather than
its type. `SourceLatents` is what either becomes: the start latent x_T of every translation, the features
injected into it, and the latents along its trajectory that a mask keeps to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .cache import SourceEntry, SourceKey
from .image_io import image_to_pixels
from .injection import SourceFeatures


class Source:
    """A request's source: `generated` (its image is decoded and returned first), its working `size` (W, H),
    the `seed` reported for it (a generated source's, else None), `mask_seed` for auto_mask's noises, and the
    painted mask m_px (1, 1, H, W), if any."""

    generated: bool
    size: tuple[int, int]
    seed: int | None
    mask_seed: int
    pixel_mask: torch.Tensor | None

    def kept_pixels(self, decoded: torch.Tensor) -> torch.Tensor:
        """The pixels (1, 3, H, W) in [0, 1] that a mask keeps outside it, given the decoded images."""
        raise NotImplementedError


@dataclass(frozen=True)
class RealImage(Source):
    """An input image at its working size, its painted mask, its inversion's cache key, and the request's seed
    for auto_mask's noises (0 when unset)."""

    image: Image.Image
    pixel_mask: torch.Tensor | None
    key: SourceKey
    mask_seed: int
    generated = False
    seed = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def kept_pixels(self, decoded: torch.Tensor) -> torch.Tensor:
        """The input image's pixels."""
        return image_to_pixels(self.image)


@dataclass(frozen=True)
class GeneratedImage(Source):
    """A source to generate from the noise of `seed`, at `size` (image_size square)."""

    seed: int
    size: tuple[int, int]
    generated = True
    pixel_mask = None

    @property
    def mask_seed(self) -> int:
        return self.seed

    def start_noise(self, latent_channels: int, vae_scale_factor: int) -> torch.Tensor:
        """x_T (1, C, h, w) float32, drawn on the CPU from `seed`, so that a seed gives the same source on any
        device."""
        width, height = self.size
        shape = (1, latent_channels, height // vae_scale_factor, width // vae_scale_factor)
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(self.seed), dtype=torch.float32)

    def kept_pixels(self, decoded: torch.Tensor) -> torch.Tensor:
        """The generated source's pixels as it is returned: the first decoded image, rounded to 8 bits."""
        return torch.round(255 * decoded[:1]) / 255


@dataclass(frozen=True)
class SourceLatents:
    """x_T (1, C, h, w), where every translation starts, the features injected into it, and the latents a
    mask keeps to: after sampling step i, the source's latent at t_{i+1}, and its clean latent after the
    last step."""

    start_latent: torch.Tensor
    features: SourceFeatures
    kept_latents: tuple[torch.Tensor, ...]

    @property
    def clean_latent(self) -> torch.Tensor:
        """z_0: the source's latent without noise."""
        return self.kept_latents[-1]

    @classmethod
    def from_entry(cls, entry: SourceEntry, timesteps: list[int]) -> SourceLatents:
        """A real image's, from its inversion `entry` at the sampling `timesteps` t_0 > ... > t_{N-1}:
        x_T = z_src[t_0], then z_src[t_{i+1}] and the image's encoded latent z_0 last."""
        return cls(
            start_latent=entry.latents[timesteps[0]],
            features=entry.features,
            kept_latents=(*(entry.latents[t] for t in timesteps[1:]), entry.image_latent),
        )
