"""Region editing with a mask (docs/algorithm.md §8): the source is kept outside the edit region, in latents
and in pixels.

After every DDIM step the latents outside the mask are put back on the source's own trajectory, the
inversion's latents (the blend of Blended Latent Diffusion, Avrahami et al. 2023, arXiv 2206.02779,
with DiffEdit's inverted latents, Couairon et al. 2022, arXiv 2210.11427); after decoding, the pixels
are blended with the input image at full resolution, so outside the mask the output equals the input
exactly, and an all-white mask changes nothing. Neither blend costs a UNet evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class EditRegion:
    """Where to edit, and what is kept outside: m_px and the source's pixels at the working resolution,
    m = avg_pool2d(m_px, f) (f: the VAE's scale factor) and the source's latent after each sampling step
    at the latent one."""

    pixel_mask: torch.Tensor  # (1, 1, H, W) float32: 1 edits, 0 keeps
    latent_mask: torch.Tensor  # (1, 1, H / f, W / f)
    source_pixels: torch.Tensor  # (1, 3, H, W) float32 in [0, 1]
    source_latents: tuple[torch.Tensor, ...]  # after step i: the source's latent at t_{i+1}, its clean one last

    @classmethod
    def from_mask(
        cls,
        pixel_mask: torch.Tensor,
        source_pixels: torch.Tensor,
        source_latents: tuple[torch.Tensor, ...],
        vae_scale_factor: int,
    ) -> EditRegion:
        """The region of `pixel_mask` on the device of `source_latents`; each latent position covers
        `vae_scale_factor` x `vae_scale_factor` pixels."""
        device = source_latents[0].device
        pixel_mask = pixel_mask.to(device)
        return cls(
            pixel_mask=pixel_mask,
            latent_mask=F.avg_pool2d(pixel_mask, vae_scale_factor),
            source_pixels=source_pixels.to(device),
            source_latents=source_latents,
        )

    def blend_latents(self, edited: torch.Tensor, step: int) -> torch.Tensor:
        """x = m x + (1 − m) z_next after sampling step `step`: edited inside the region, the source's outside."""
        return self.latent_mask * edited + (1 - self.latent_mask) * self.source_latents[step]

    def blend_pixels(self, edited: torch.Tensor) -> torch.Tensor:
        """y = m_px y + (1 − m_px) x_in: the edited pixels in [0, 1] inside the region, the source's outside."""
        return self.pixel_mask * edited + (1 - self.pixel_mask) * self.source_pixels
