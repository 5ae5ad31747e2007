"""The source image of a request, as translation and decoding use it: a real image's inversion, or an
image generated from the generation prompt (docs/algorithm.md §3-§4).

Both carry the start latent x_T of every translation and the features injected into it. A real image
and a generated source also carry what a mask keeps to (docs/algorithm.md §8, §10): the source's latents
along its trajectory; a real image also its pixels. A generated source's clean latent is decoded and
returned first, and those are the pixels it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .cache import SourceEntry
from .image_io import image_to_pixels
from .injection import SourceFeatures


@dataclass(frozen=True)
class Source:
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


@dataclass(frozen=True)
class RealSource(Source):
    """A real image: x_T = z_src[t_0] of its inversion, which also gives the latents a mask keeps to
    (z_src[t_{i+1}], and the image's encoded latent z_0 last), and the image at its working size."""

    image: Image.Image

    @classmethod
    def from_entry(cls, entry: SourceEntry, timesteps: list[int], image: Image.Image) -> RealSource:
        """The source of `image`'s inversion `entry` at the sampling `timesteps` t_0 > ... > t_{N-1}."""
        return cls(
            start_latent=entry.latents[timesteps[0]],
            features=entry.features,
            kept_latents=(*(entry.latents[t] for t in timesteps[1:]), entry.image_latent),
            image=image,
        )

    @property
    def pixels(self) -> torch.Tensor:
        """The pixels a mask keeps: the image's, (1, 3, H, W) float32 in [0, 1]."""
        return image_to_pixels(self.image)


@dataclass(frozen=True)
class GeneratedSource(Source):
    """A source generated from seeded noise x_T: its latents are those of the generation pass, and its
    clean latent is decoded and returned first."""

    seed: int
