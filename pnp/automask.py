"""Automatic masks from the prompts (docs/algorithm.md §10): where each target prompt changes the model's
noise prediction against the source's description, as DiffEdit finds it (Couairon et al., ICLR 2023,
arXiv 2210.11427, Sec. 3.2).

K seeded noises put the source's clean latent z_0 at one mid timestep t_m; one batched UNet pass predicts
their noise with the source's text S and with every target prompt. D_p, the mean absolute difference
between prompt p's prediction and S's, is thresholded at 1.5 times its mean: the latent mask M_p. Its
pixel mask grows it by one latent position, upsamples it and blurs it over 12 pixels, so that the seam
is a soft ramp over background that the latents kept, and every pixel farther away keeps the source's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import NonFiniteError
from .injection import InjectionUNet
from .progress import progress
from .schedules import NoiseSchedule

logger = logging.getLogger(__name__)

MASK_NOISES = 10
"""K, the seeded noises the differences are averaged over (DiffEdit's num_maps_per_mask)."""
MASK_SCHEDULE_STEPS, MASK_TIMESTEP_INDEX = 50, 25
"""t_m is index 25 of a 50-step schedule, whatever the request's steps (DiffEdit's encode strength 0.5)."""
MASK_THRESHOLD = 1.5
"""M_p = 1 where D_p exceeds this many times its mean (DiffEdit's thresholding ratio 3.0, halved)."""
BLUR_RADIUS, BLUR_WIDTH = 12, 32.0
"""The pixel mask's blur: weights exp(-j^2 / 32) for j = -12 .. 12 along each axis (a Gaussian, sigma 4)."""


@dataclass(frozen=True)
class AutoMasks:
    """Each target prompt's mask: M_p (P, 1, h, w), 1 edits, 0 keeps the source's latents, m_px
    (P, 1, H, W) float32 in [0, 1], with which the output's pixels blend the source's, and mean(D_p)
    (0 where the prompt predicts the same noise as the source's text)."""

    latent_masks: torch.Tensor
    pixel_masks: torch.Tensor
    mean_differences: list[float]

    @property
    def coverage(self) -> list[float]:
        """The fraction of latent positions each prompt's mask edits."""
        return self.latent_masks.mean(dim=(1, 2, 3)).tolist()

    def log_coverage(self, prompts: Sequence[str]) -> None:
        """Log what each prompt's mask edits, and warn of a prompt whose mask edits nothing."""
        for prompt, coverage, mean in zip(prompts, self.coverage, self.mean_differences, strict=True):
            if mean == 0:
                logger.warning(
                    "auto_mask: %r predicts the same noise as the source's description; it edits nothing", prompt
                )
            logger.info("auto_mask: %r edits %.1f%% of the image", prompt, 100 * coverage)


def mask_timestep(schedule: NoiseSchedule) -> int:
    """t_m: the timestep at index 25 of `set_timesteps(50)` (481 for SD 1.x and 2.x configs)."""
    return schedule.sampling_timesteps(MASK_SCHEDULE_STEPS)[MASK_TIMESTEP_INDEX]


@torch.no_grad()
def noise_differences(
    unet: InjectionUNet,
    schedule: NoiseSchedule,
    clean_latent: torch.Tensor,
    texts: torch.Tensor,
    seed: int,
    unet_batch: int,
) -> torch.Tensor:
    """D_p (P, h, w) float32: the mean over K noises and the channels of |ε_p − ε_S| at t_m, for the texts
    E(S), E(T_1), ..., E(T_P) (1 + P rows), from K · (1 + P) UNet evaluations of `clean_latent` z_0
    (1, C, h, w) noised to t_m: z_k = sqrt(ᾱ) z_0 + sqrt(1 − ᾱ) noise_k, the noise seeded on the CPU."""
    timestep = mask_timestep(schedule)
    alpha_bar = schedule.alpha_bar(timestep)
    noise = torch.randn(
        (MASK_NOISES, *clean_latent.shape[1:]), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32
    ).to(clean_latent.device, unet.dtype)
    noised = alpha_bar**0.5 * clean_latent.float() + (1 - alpha_bar) ** 0.5 * noise
    # One batch of every text's K latents, text by text: S's first, then each prompt's.
    latents = noised.repeat(len(texts), 1, 1, 1)
    context = texts.repeat_interleave(MASK_NOISES, dim=0)
    on_device = torch.tensor([timestep], device=clean_latent.device)
    calls = range(0, len(latents), unet_batch)
    outputs = []
    for call in progress(len(calls), "mask"):
        lo = calls[call]
        outputs.append(unet(latents[lo : lo + unet_batch].to(unet.dtype), on_device, context[lo : lo + unet_batch]))
    eps = schedule.epsilon(torch.cat(outputs), latents, alpha_bar).unflatten(0, (len(texts), MASK_NOISES))
    differences = (eps[1:] - eps[:1]).abs().mean(dim=(1, 2))
    if not torch.isfinite(differences).all():
        raise NonFiniteError("the automatic mask's noise predictions hold NaN or infinite values")
    return differences


def threshold(differences: torch.Tensor, vae_scale_factor: int) -> AutoMasks:
    """M_p = 1 where D_p > 1.5 mean(D_p) (a D_p of mean 0 selects nothing), and its pixel mask: M_p grown by
    max_pool2d(3, stride 1, padding 1), upsampled by nearest to the image's size, blurred (docs/algorithm.md §10)."""
    means = differences.mean(dim=(1, 2), keepdim=True)
    latent_masks = (differences > MASK_THRESHOLD * means).float().unsqueeze(1)
    grown = F.max_pool2d(latent_masks, 3, stride=1, padding=1)
    upsampled = F.interpolate(grown, scale_factor=vae_scale_factor, mode="nearest")
    return AutoMasks(latent_masks, _blur(upsampled), means.flatten().tolist())


def _blur(masks: torch.Tensor) -> torch.Tensor:
    """Separable blur of (P, 1, H, W) by exp(-j^2 / 32), j = -12 .. 12, normalised, edges replicated."""
    offsets = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=torch.float32, device=masks.device)
    weights = torch.exp(-(offsets**2) / BLUR_WIDTH)
    weights = weights / weights.sum()
    horizontal = F.conv2d(F.pad(masks, (BLUR_RADIUS, BLUR_RADIUS, 0, 0), mode="replicate"), weights.view(1, 1, 1, -1))
    return F.conv2d(F.pad(horizontal, (0, 0, BLUR_RADIUS, BLUR_RADIUS), mode="replicate"), weights.view(1, 1, -1, 1))
