"""Guided DDIM sampling with feature injection (docs/algorithm.md §5): a denoiser and a short step loop.

`Denoiser` turns the latents of a step into the guided noise of that step, with that step's source
features injected. `sample` is the step loop around it: denoise, DDIM update, and with a mask the
region blend. `translate` runs it for every target prompt at once; `generate_source` runs it to
generate a source image and captures that image's features on the way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from .injection import FeatureRecorder, SiteUNet, SourceFeatures
from .progress import progress
from .region import EditRegion
from .schedules import NoiseSchedule, ddim_step, device_timesteps

UNCONDITIONAL, NEGATIVE, CONDITIONAL = "unconditional", "negative", "conditional"


@dataclass(frozen=True)
class PromptEmbeddings:
    """Text embeddings of a request: E("") (1, 77, d), E(p) per target prompt (P, 77, d), E(negative) or None."""

    unconditional: torch.Tensor
    targets: torch.Tensor
    negative: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return self.targets.shape[0]


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

    def features(self, step: int, branches: list[str], count: int) -> dict[str, torch.Tensor]:
        """The features injected at `step`: the one source of a real image as a single row that every row
        of the batch shares, or a generated source's halves laid out one row per (branch, prompt)."""
        injected = self.source.at_step(step, self.feature_injection_steps, self.attention_injection_steps)
        if all(sources.shape[0] == 1 for sources in injected.values()):
            return injected
        return {
            key: torch.cat(
                [sources[self.source_index(b)].unsqueeze(0).expand(count, *sources.shape[1:]) for b in branches]
            )
            for key, sources in injected.items()
        }


@dataclass
class Denoiser:
    """(latents (P, 4, h, w), step i) -> the guided ε of step i (docs/algorithm.md §5).

    Evaluates, for all prompts at once, only the branches that can change the result: unconditional
    (unless its weight a_i is 0), negative (only with a negative prompt and a_i below 1) and
    conditional, in as few UNet calls as `batch_size` allows, with the injection of step i. A
    v-prediction UNet's outputs are turned into ε first (docs/algorithm.md §9).
    """

    unet: SiteUNet
    schedule: NoiseSchedule
    timesteps: list[int]
    embeddings: PromptEmbeddings
    scale: float
    negative_weights: list[float]
    batch_size: int
    injection: Injection | None = None
    _device_timesteps: list[torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._device_timesteps = device_timesteps(self.timesteps, self.embeddings.targets.device)

    def branches(self, step: int) -> list[str]:
        has_negative, weight = self.embeddings.negative is not None, self.negative_weights[step]
        branches = [] if has_negative and weight == 0 else [UNCONDITIONAL]
        if has_negative and weight != 1:
            branches.append(NEGATIVE)
        return branches + [CONDITIONAL]

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        count, branches = self.embeddings.count, self.branches(step)
        text = {
            UNCONDITIONAL: self.embeddings.unconditional,
            NEGATIVE: self.embeddings.negative,
            CONDITIONAL: self.embeddings.targets,
        }
        context = torch.cat([text[b].expand(count, -1, -1) for b in branches])
        latents = x.repeat(len(branches), 1, 1, 1).to(self.unet.dtype)
        features = self.injection.features(step, branches, count) if self.injection is not None else {}
        outputs = []
        for lo in range(0, len(latents), self.batch_size):
            hi = lo + self.batch_size
            # A single row is shared by the whole batch; rows laid out per latent are cut like the latents.
            chunk = {key: value if len(value) == 1 else value[lo:hi] for key, value in features.items()}
            outputs.append(self.unet(latents[lo:hi], self._device_timesteps[step], context[lo:hi], chunk))
        alpha = self.schedule.alpha(self.timesteps[step])
        eps = {b: self.schedule.epsilon(out, x, alpha) for b, out in zip(branches, torch.cat(outputs).split(count))}
        return guided_noise(eps, self.negative_weights[step], self.scale)


def guided_noise(eps: dict[str, torch.Tensor], negative_weight: float, scale: float) -> torch.Tensor:
    """ε = ε_u~ + scale (ε_c − ε_u~), with ε_u~ = a ε_u + (1 − a) ε_n (classifier-free guidance, Ho & Salimans
    2022, arXiv 2207.12598, with the negative prompt blended into its unconditional branch)."""
    if UNCONDITIONAL in eps and NEGATIVE in eps:
        unconditional = negative_weight * eps[UNCONDITIONAL] + (1 - negative_weight) * eps[NEGATIVE]
    else:
        unconditional = eps.get(UNCONDITIONAL, eps.get(NEGATIVE))
    return unconditional + scale * (eps[CONDITIONAL] - unconditional)


def sample(
    denoise: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: list[int],
    phase: str,
    region: EditRegion | None = None,
) -> torch.Tensor:
    """DDIM from x at t_0 down to the clean latent; with a `region`, the latents outside it follow the
    source's after every step (docs/algorithm.md §8)."""
    alphas = [schedule.alpha(t) for t in timesteps] + [schedule.alpha(None)]
    for step in progress(len(timesteps), phase):
        x = ddim_step(x, denoise(x, step), alphas[step], alphas[step + 1])
        if region is not None:
            x = region.blend_latents(x, step)
    return x


@torch.no_grad()
def translate(denoiser: Denoiser, start: torch.Tensor, region: EditRegion | None = None) -> torch.Tensor:
    """x_T (1, 4, h, w) -> the final latents (P, 4, h, w), one per target prompt, with the source injected."""
    x = start.float().expand(denoiser.embeddings.count, *start.shape[1:])
    return sample(denoiser, x, denoiser.schedule, denoiser.timesteps, "translation", region)


@torch.no_grad()
def generate_source(
    denoiser: Denoiser, noise: torch.Tensor, resnet_steps: int, attention_steps: int
) -> tuple[torch.Tensor, SourceFeatures]:
    """Sample a source image from `noise` and capture its features: at each step i < max(n_f, n_a) the
    sites' outputs of both guidance halves, unconditional then conditional (docs/algorithm.md §4)."""
    # Both guidance halves of a step, unconditional then conditional, are the step's two sources.
    recorder = FeatureRecorder(resnet_steps, attention_steps, sources=2)
    capture_steps = max(resnet_steps, attention_steps)

    def denoise_and_capture(x: torch.Tensor, step: int) -> torch.Tensor:
        if step >= capture_steps:
            return denoiser(x, step)
        with denoiser.unet.capturing() as captured:
            eps = denoiser(x, step)
        recorder.record(step, captured)
        return eps

    latent = sample(denoise_and_capture, noise.float(), denoiser.schedule, denoiser.timesteps, "generation")
    return latent, recorder.features()
