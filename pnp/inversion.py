"""DDIM inversion of a real image's latent and the source features of its forward latents
(docs/algorithm.md §3-§4)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from .injection import FeatureInjector, SourceFeatures
from .progress import progress
from .schedules import NoiseSchedule, ddim_step


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

    The noise of step i is predicted on the current latent at the step's own, noisier timestep τ_i.
    The latent stays float32 between steps; the UNet runs in its own dtype.
    """
    timesteps = schedule.inversion_timesteps(num_steps)
    alphas = [schedule.alpha(None)] + [schedule.alpha(t) for t in timesteps]
    z = latent.float()
    kept: dict[int, torch.Tensor] = {}
    # Timesteps as device tensors up front: a Python int would be copied to the device at every call.
    device_timesteps = torch.tensor(timesteps, device=latent.device)
    for i in progress(num_steps, "inversion"):
        output = unet(z.to(unet.dtype), device_timesteps[i], encoder_hidden_states=text_embedding).sample
        z = ddim_step(z, schedule.epsilon(output, z, alphas[i + 1]), alphas[i], alphas[i + 1])
        if timesteps[i] in keep:
            kept[timesteps[i]] = z
    return kept


@torch.no_grad()
def extract_features(
    unet: UNet2DConditionModel,
    injector: FeatureInjector,
    latents: list[torch.Tensor],
    timesteps: list[int],
    text_embedding: torch.Tensor,
    batch_size: int,
    resnet_steps: int,
    attention_steps: int,
) -> SourceFeatures:
    """Source features of `unet(latents[i], timesteps[i], text_embedding)`, several timesteps per UNet call,
    for the first `resnet_steps` steps of the ResNet site and `attention_steps` of the attention ones.

    For a real image `text_embedding` is E(""), whatever conditioned the inversion (docs/algorithm.md §4),
    as in pnp-diffusers and PnP Inversion's benchmark code.
    """
    captures = []
    device_timesteps = torch.tensor(timesteps, device=text_embedding.device)
    for start in range(0, len(latents), batch_size):
        chunk = torch.cat(latents[start : start + batch_size]).to(unet.dtype)
        steps = device_timesteps[start : start + batch_size]
        with injector.capturing() as captured:
            unet(chunk, steps, encoder_hidden_states=text_embedding.expand(len(chunk), -1, -1))
        captures.append(captured)
    # Each step has one source: (steps, 1, ...).
    stacked = {key: torch.cat([c[key] for c in captures]).unsqueeze(1) for key in captures[0]} if captures else {}
    return SourceFeatures.keeping(stacked, resnet_steps, attention_steps)
