"""Region editing with a mask (docs/algorithm.md §8, §10): the source is kept outside the edit region, in
latents and in pixels.

After every DDIM step the latents outside the mask are put back on the source's own trajectory, the
inversion's latents (the blend of Blended Latent Diffusion, Avrahami et al. 2023, arXiv 2206.02779,
with DiffEdit's inverted latents, Couairon et al. 2022, arXiv 2210.11427); after decoding, the pixels
are blended with the source's at full resolution, so where the pixel mask is 0 the output equals the
source exactly, and an all-white mask changes nothing. Neither blend costs a UNet evaluation. A painted
mask is one region for every prompt; automatic masks (`pnp.automask`) are one per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class EditRegion:
    """Where to edit, and the latents kept outside: m_px at the working resolution, m at the latent one
    (each one mask for every prompt, or one per prompt), and the source's latent after each sampling step."""

    pixel_mask: torch.Tensor  # (1 or P, 1, H, W) float32: 1 edits, 0 keeps
    latent_mask: torch.Tensor  # (1 or P, 1, H / f, W / f), f the VAE's scale factor
    kept_latents: tuple[torch.Tensor, ...]  # after step i: the source's latent at t_{i+1}, its clean one last

    @classmethod
    def from_mask(
        cls, pixel_mask: torch.Tensor, kept_latents: tuple[torch.Tensor, ...], vae_scale_factor: int
    ) -> EditRegion:
        """The region of a painted mask m_px (1, 1, H, W): m = avg_pool2d(m_px, f), on the device of
        `kept_latents`."""
        pixel_mask = pixel_mask.to(kept_latents[0].device)
        return cls(pixel_mask, F.avg_pool2d(pixel_mask, vae_scale_factor), kept_latents)

    def blend_latents(self, edited: torch.Tensor, step: int) -> torch.Tensor:
        """x = m x + (1 − m) z_next after sampling step `step`: edited inside the region, the source's outside."""
        return self.latent_mask * edited + (1 - self.latent_mask) * self.kept_latents[step]

    def blend_pixels(self, edited: torch.Tensor, source_pixels: torch.Tensor) -> torch.Tensor:
        """y = m_px y + (1 − m_px) x_in: the edited pixels in [0, 1] inside the region, the source's
        (1, 3, H, W) outside."""
        return self.pixel_mask * edited + (1 - self.pixel_mask) * source_pixels.to(edited.device)
