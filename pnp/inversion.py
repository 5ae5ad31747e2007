"""DDIM inversion of a real image's latent and the source features of its forward latents
(docs/algorithm.md §3-§4)."""

from __future__ import annotations

import logging

import torch
from diffusers import UNet2DConditionModel

from .injection import FeatureInjector, SourceFeatures
from .schedules import NoiseSchedule

logger = logging.getLogger(__name__)


@torch.no_grad()
def invert(
    unet: UNet2DConditionModel,
    schedule: NoiseSchedule,
    latent: torch.Tensor,
    text_embedding: torch.Tensor,
    num_steps: int,
    keep: set[int],
) -> dict[int, torch.Tensor]:
    """Run DDIM backwards from `latent` (1, 4, h, w) to noise; return z_src[τ] for each τ in `keep`.

    The latent stays float32 between steps; the UNet runs in its own dtype.
    """
    timesteps = schedule.inversion_timesteps(num_steps)
    z = latent.float()
    kept: dict[int, torch.Tensor] = {}
    # Timesteps as device tensors up front: a Python int would be copied to the device at every call.
    device_timesteps = torch.tensor(timesteps, device=latent.device)
    for i, timestep in enumerate(timesteps):
        alpha = schedule.alpha(timestep)
        alpha_prev = schedule.alpha(timesteps[i - 1] if i > 0 else None)
        output = unet(z.to(unet.dtype), device_timesteps[i], encoder_hidden_states=text_embedding).sample
        eps = schedule.epsilon(output, z, alpha)
        z = alpha**0.5 * (z - (1 - alpha_prev) ** 0.5 * eps) / alpha_prev**0.5 + (1 - alpha) ** 0.5 * eps
        if timestep in keep:
            kept[timestep] = z
        if (i + 1) % 100 == 0:
            logger.info("inversion step %d/%d", i + 1, num_steps)
    return kept


@torch.no_grad()
def extract_features(
    unet: UNet2DConditionModel,
    injector: FeatureInjector,
    latents: list[torch.Tensor],
    timesteps: list[int],
    text_embedding: torch.Tensor,
    batch_size: int,
) -> SourceFeatures:
    """Source features of `unet(latents[i], timesteps[i], text_embedding)`, several timesteps per UNet call.

    For a real image `text_embedding` is E(""), whatever conditioned the inversion (docs/algorithm.md §4), as in
    pnp-diffusers and PnP Inversion's benchmark code.
    """
    captures = []
    device_timesteps = torch.tensor(timesteps, device=text_embedding.device)
    for start in range(0, len(latents), batch_size):
        chunk = torch.cat(latents[start : start + batch_size]).to(unet.dtype)
        steps = device_timesteps[start : start + batch_size]
        with injector.capturing() as captured:
            unet(chunk, steps, encoder_hidden_states=text_embedding.expand(len(chunk), -1, -1))
        captures.append(captured)
    # Each step is one source: (steps, 1, ...).
    return SourceFeatures({key: torch.cat([c[key] for c in captures]).unsqueeze(1) for key in captures[0]} if captures else {})
