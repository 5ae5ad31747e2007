"""Guided DDIM sampling with feature injection (docs/algorithm.md §5): a denoiser and a short step loop.

`Guidance` is classifier-free guidance: the branches' texts and how their noise is combined. `Denoiser`
turns the latents of a step into the guided noise of that step, with that step's source features
injected. `sample` is the step loop around it: denoise, DDIM update, then an optional step function (a
mask's blend of the latents). `generate_source` runs it to generate a source image and captures that
image's features and latents on the way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .injection import FeatureRecorder, InjectionSteps, InjectionUNet, SourceFeatures
from .progress import progress
from .schedules import NoiseSchedule, ddim_step, device_timesteps

UNCONDITIONAL, NEGATIVE, CONDITIONAL = "unconditional", "negative", "conditional"


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) with a negative prompt blended into
    its unconditional branch (docs/algorithm.md §5-§6): E("") (1, 77, d), the conditional texts, one per
    latent (P, 77, d), E(negative) or None, the scale s, and a_i, the unconditional branch's weight
    against the negative one at each step (1 throughout without a negative prompt)."""

    unconditional: torch.Tensor
    conditional: torch.Tensor
    negative: torch.Tensor | None
    scale: float
    negative_prompt_weights: tuple[float, ...]

    @property
    def count(self) -> int:
        """The latents guided at once: one per conditional text."""
        return self.conditional.shape[0]

    def branches(self, step: int) -> list[str]:
        """The branches that can change step `step`'s result: unconditional unless a_i = 0, negative only
        with a negative prompt and a_i < 1, and conditional."""
        has_negative, weight = self.negative is not None, self.negative_prompt_weights[step]
        branches = [] if has_negative and weight == 0 else [UNCONDITIONAL]
        if has_negative and weight != 1:
            branches.append(NEGATIVE)
        return branches + [CONDITIONAL]

    def text(self, branches: list[str]) -> torch.Tensor:
        """The text embeddings of a batch of `branches`, each branch's rows one per latent."""
        texts = {UNCONDITIONAL: self.unconditional, NEGATIVE: self.negative, CONDITIONAL: self.conditional}
        return torch.cat([texts[branch].expand(self.count, -1, -1) for branch in branches])

    def combine(self, eps: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """ε = ε_u~ + s (ε_c − ε_u~), with ε_u~ = a_i ε_u + (1 − a_i) ε_n (docs/algorithm.md §5)."""
        weight = self.negative_prompt_weights[step]
        if UNCONDITIONAL in eps and NEGATIVE in eps:
            unconditional = weight * eps[UNCONDITIONAL] + (1 - weight) * eps[NEGATIVE]
        else:
            unconditional = eps.get(UNCONDITIONAL, eps.get(NEGATIVE))
        return unconditional + self.scale * (eps[CONDITIONAL] - unconditional)


@dataclass(frozen=True)
class Injection:
    """Source features and how many steps of them to inject: ResNet at steps i < n_f, attention at i < n_a."""

    source: SourceFeatures
    injection_steps: InjectionSteps

    def at_step(self, step: int, branches: list[str], count: int) -> dict[str, torch.Tensor]:
        """The features injected at `step`: a real image's one source as a single row that every row of the
        batch shares, or a generated source's guidance halves laid out one row per (branch, prompt): its
        conditional half feeds the conditional branch, its unconditional half the others."""
        injected = self.source.at_step(step, self.injection_steps)
        if not self.source.guidance_halves:
            return injected

        def half(branch: str) -> int:
            return 1 if branch == CONDITIONAL else 0

        return {
            key: torch.cat([halves[half(b)].unsqueeze(0).expand(count, *halves.shape[1:]) for b in branches])
            for key, halves in injected.items()
        }


@dataclass
class Denoiser:
    """(latents (P, C, h, w), step i) -> the guided ε of step i (docs/algorithm.md §5).

    Evaluates, for all latents at once, only the branches of `guidance` that can change the result, in as
    few UNet calls as `unet_batch` allows, with the injection of step i. A v-prediction UNet's outputs
    are turned into ε first (docs/algorithm.md §9).
    """

    unet: InjectionUNet
    schedule: NoiseSchedule
    timesteps: list[int]
    guidance: Guidance
    unet_batch: int
    injection: Injection | None = None
    _device_timesteps: list[torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._device_timesteps = device_timesteps(self.timesteps, self.guidance.conditional.device)

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        count, branches = self.guidance.count, self.guidance.branches(step)
        context = self.guidance.text(branches)
        latents = x.repeat(len(branches), 1, 1, 1).to(self.unet.dtype)
        features = self.injection.at_step(step, branches, count) if self.injection is not None else {}
        outputs = []
        for lo in range(0, len(latents), self.unet_batch):
            hi = lo + self.unet_batch
            # A single row is shared by the whole batch; rows laid out per latent are cut like the latents.
            chunk = {key: value if len(value) == 1 else value[lo:hi] for key, value in features.items()}
            outputs.append(self.unet(latents[lo:hi], self._device_timesteps[step], context[lo:hi], chunk))
        alpha_bar = self.schedule.alpha_bar(self.timesteps[step])
        outputs_by_branch = zip(branches, torch.cat(outputs).split(count), strict=True)
        eps = {branch: self.schedule.epsilon(output, x, alpha_bar) for branch, output in outputs_by_branch}
        return self.guidance.combine(eps, step)


def sample(
    denoise: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: list[int],
    phase: str,
    after_step: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """DDIM from x at t_0 down to the clean latent; `after_step(x, i)`, where given, gives the latents that
    step i hands on (a mask's region keeps the source's outside it: docs/algorithm.md §8)."""
    alpha_bars = [schedule.alpha_bar(t) for t in timesteps] + [schedule.alpha_bar(None)]
    for step in progress(len(timesteps), phase):
        x = ddim_step(x, denoise(x, step), alpha_bars[step], alpha_bars[step + 1])
        if after_step is not None:
            x = after_step(x, step)
    return x


@torch.no_grad()
def generate_source(
    denoiser: Denoiser, noise: torch.Tensor, injection_steps: InjectionSteps
) -> tuple[tuple[torch.Tensor, ...], SourceFeatures]:
    """Sample a source image from `noise`; return its latent after each step (the last is its clean latent)
    and its features: at each step i < max(n_f, n_a) the sites' outputs of both guidance halves,
    unconditional then conditional (docs/algorithm.md §4)."""
    recorder = FeatureRecorder(injection_steps, guidance_halves=True)
    trajectory: list[torch.Tensor] = []

    def keep(x: torch.Tensor, step: int) -> torch.Tensor:
        trajectory.append(x)
        return x

    def denoise_and_capture(x: torch.Tensor, step: int) -> torch.Tensor:
        if step >= injection_steps.capture_steps:
            return denoiser(x, step)
        with denoiser.unet.capturing() as captured:
            eps = denoiser(x, step)
        recorder.record(step, captured)
        return eps

    sample(denoise_and_capture, noise.float(), denoiser.schedule, denoiser.timesteps, "generation", keep)
    return tuple(trajectory), recorder.features()
