"""DDIM inversion of a real image's latent and the source features of its forward latents
(docs/algorithm.md §3-§4)."""

from __future__ import annotations

import torch

from .injection import FeatureRecorder, InjectionSteps, InjectionUNet, SourceFeatures
from .progress import progress
from .schedules import NoiseSchedule, ddim_step, device_timesteps


@torch.no_grad()
def invert(
    unet: InjectionUNet,
    schedule: NoiseSchedule,
    latent: torch.Tensor,
    text_embedding: torch.Tensor,
    num_steps: int,
    keep: set[int],
) -> dict[int, torch.Tensor]:
    """Run DDIM backwards from `latent` (1, C, h, w) to noise; return z_src[τ] for each τ in `keep`.

    The noise of step i is predicted on the current latent at the step's own, noisier timestep τ_i.
    The latent stays float32 between steps; the UNet runs in its own dtype.
    """
    timesteps = schedule.inversion_timesteps(num_steps)
    alpha_bars = [schedule.alpha_bar(None)] + [schedule.alpha_bar(t) for t in timesteps]
    z = latent.float()
    kept: dict[int, torch.Tensor] = {}
    on_device = device_timesteps(timesteps, latent.device)
    for i in progress(num_steps, "inversion"):
        output = unet(z.to(unet.dtype), on_device[i], text_embedding)
        z = ddim_step(z, schedule.epsilon(output, z, alpha_bars[i + 1]), alpha_bars[i], alpha_bars[i + 1])
        if timesteps[i] in keep:
            kept[timesteps[i]] = z
    return kept


@torch.no_grad()
def extract_features(
    unet: InjectionUNet,
    latents: list[torch.Tensor],
    timesteps: list[int],
    text_embedding: torch.Tensor,
    unet_batch: int,
    injection_steps: InjectionSteps,
) -> SourceFeatures:
    """Source features of `unet(latents[i], timesteps[i], text_embedding)`, several timesteps per UNet call,
    for the first n_f steps of the ResNet site and n_a of the attention ones (`injection_steps`); `unet_batch`
    latents a call.

    For a real image `text_embedding` is E(""), whatever conditioned the inversion (docs/algorithm.md §4),
    as in pnp-diffusers and PnP Inversion's benchmark code.
    """
    recorder = FeatureRecorder(injection_steps, guidance_halves=False)
    chunked_timesteps = device_timesteps(timesteps, text_embedding.device, unet_batch)
    for start in range(0, len(latents), unet_batch):
        chunk = torch.cat(latents[start : start + unet_batch]).to(unet.dtype)
        with unet.capturing() as captured:
            unet(chunk, chunked_timesteps[start // unet_batch], text_embedding.expand(len(chunk), -1, -1))
        recorder.record(start, captured)
    return recorder.features()
