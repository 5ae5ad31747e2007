"""Guided DDIM sampling with feature injection (docs/algorithm.md §5): the translation, and the generated source.

One loop serves both: the translation injects source features into every branch of every prompt,
and the generation of a source image captures its own features instead. Each step evaluates, for
all prompts at once, the branches that can change the result: unconditional (unless its weight is
0), negative (only with a negative prompt and a weight below 1) and conditional, batched into as few
UNet calls as `batch_size` allows.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

from .injection import FeatureInjector, SourceFeatures
from .region import EditRegion
from .schedules import NoiseSchedule

logger = logging.getLogger(__name__)

UNCONDITIONAL, NEGATIVE, CONDITIONAL = "unconditional", "negative", "conditional"


@dataclass(frozen=True)
class Prompts:
    """Text embeddings of one request: E(""), E(p) for each target prompt, E(negative_prompt) or None."""

    unconditional: torch.Tensor
    targets: torch.Tensor
    negative: torch.Tensor | None = None


@dataclass(frozen=True)
class Injection:
    """Source features and how long to inject them: ResNet at steps i < n_f, attention at i < n_a."""

    source: SourceFeatures
    feature_injection_steps: int
    attention_injection_steps: int

    def source_index(self, branch: str) -> int:
        """Which source feeds a branch: a generated source's conditional half feeds the conditional one."""
        sources = next(iter(self.source.features.values())).shape[1]
        return 1 if sources == 2 and branch == CONDITIONAL else 0


def _branches(negative_weight: float, has_negative: bool) -> list[str]:
    branches = [] if has_negative and negative_weight == 0 else [UNCONDITIONAL]
    if has_negative and negative_weight != 1:
        branches.append(NEGATIVE)
    return branches + [CONDITIONAL]


def _step_features(
    injection: Injection | None, step: int, branches: list[str], count: int
) -> dict[str, torch.Tensor]:
    """The injected features of one step, one row per (branch, prompt) in the batch's order."""
    if injection is None:
        return {}
    features = injection.source.at_step(step, injection.feature_injection_steps, injection.attention_injection_steps)
    return {
        key: torch.cat(
            [sources[injection.source_index(b)].unsqueeze(0).expand(count, *sources.shape[1:]) for b in branches]
        )
        for key, sources in features.items()
    }


@torch.no_grad()
def sample(
    unet: UNet2DConditionModel,
    injector: FeatureInjector,
    schedule: NoiseSchedule,
    start: torch.Tensor,
    timesteps: list[int],
    prompts: Prompts,
    scale: float,
    negative_weights: list[float],
    batch_size: int,
    injection: Injection | None = None,
    capture_steps: int = 0,
    region: EditRegion | None = None,
) -> tuple[torch.Tensor, SourceFeatures]:
    """Denoise `start` (1, 4, h, w) once per target prompt; return the final latents (P, 4, h, w) and
    the features captured at steps i < `capture_steps` (each step's rows in branch order). With a
    `region`, the latents outside it follow the source's after every step (docs/algorithm.md §8)."""
    count = prompts.targets.shape[0]
    x = start.float().expand(count, *start.shape[1:])
    embeddings = {
        UNCONDITIONAL: prompts.unconditional.expand(count, -1, -1),
        NEGATIVE: prompts.negative.expand(count, -1, -1) if prompts.negative is not None else None,
        CONDITIONAL: prompts.targets,
    }
    captures = []
    # Timesteps as device tensors up front: a Python int would be copied to the device at every call.
    device_timesteps = torch.tensor(timesteps, device=start.device)
    for i, timestep in enumerate(timesteps):
        branches = _branches(negative_weights[i], prompts.negative is not None)
        latents = x.repeat(len(branches), 1, 1, 1).to(unet.dtype)
        context = torch.cat([embeddings[b] for b in branches])
        features = _step_features(injection, i, branches, count)
        outputs = []
        with injector.capturing() if i < capture_steps else nullcontext({}) as captured:
            for lo in range(0, len(latents), batch_size):
                hi = lo + batch_size
                with injector.injecting({key: value[lo:hi] for key, value in features.items()}):
                    outputs.append(unet(latents[lo:hi], device_timesteps[i], encoder_hidden_states=context[lo:hi]).sample)
        if i < capture_steps:
            captures.append(captured)
        alpha = schedule.alpha(timestep)
        alpha_next = schedule.alpha(timesteps[i + 1] if i + 1 < len(timesteps) else None)
        eps_by_branch = {b: schedule.epsilon(out, x, alpha) for b, out in zip(branches, torch.cat(outputs).split(count))}
        eps = _guided_noise(eps_by_branch, negative_weights[i], scale)
        x0 = (x - (1 - alpha) ** 0.5 * eps) / alpha**0.5
        x = alpha_next**0.5 * x0 + (1 - alpha_next) ** 0.5 * eps
        if region is not None:
            x = region.blend_latents(x, i)
        if (i + 1) % 10 == 0 or i + 1 == len(timesteps):
            logger.info("sampling step %d/%d", i + 1, len(timesteps))
    return x, SourceFeatures.stack(captures)


def _guided_noise(eps: dict[str, torch.Tensor], negative_weight: float, scale: float) -> torch.Tensor:
    """ε = ε_u~ + scale (ε_c − ε_u~), with ε_u~ = a ε_u + (1 − a) ε_n (docs/algorithm.md §5)."""
    if UNCONDITIONAL in eps and NEGATIVE in eps:
        unconditional = negative_weight * eps[UNCONDITIONAL] + (1 - negative_weight) * eps[NEGATIVE]
    else:
        unconditional = eps.get(UNCONDITIONAL, eps.get(NEGATIVE))
    return unconditional + scale * (eps[CONDITIONAL] - unconditional)
