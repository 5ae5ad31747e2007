"""DDIM timesteps and weights: sampling and inversion timesteps, their checks, the model's prediction type,
and the negative-prompt schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler

from .errors import InputError


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ of the model's scheduler (docs/algorithm.md §1), and what the model's UNet predicts."""

    alphas_cumprod: tuple[float, ...]
    final_alpha_cumprod: float
    prediction_type: str
    scheduler: DDIMScheduler

    @classmethod
    def from_config(cls, scheduler_config: dict[str, Any]) -> NoiseSchedule:
        scheduler = DDIMScheduler.from_config(scheduler_config, clip_sample=False, set_alpha_to_one=False)
        return cls(
            alphas_cumprod=tuple(scheduler.alphas_cumprod.tolist()),
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            prediction_type=scheduler.config.prediction_type,
            scheduler=scheduler,
        )

    def sampling_timesteps(self, num_steps: int) -> list[int]:
        """t_0 > t_1 > ... > t_{N-1}: the scheduler's own `set_timesteps(N)`."""
        self.scheduler.set_timesteps(num_steps)
        return [int(t) for t in self.scheduler.timesteps]

    def inversion_timesteps(self, num_steps: int) -> list[int]:
        """τ_0 < τ_1 < ... < τ_{M-1}: `set_timesteps(M)` reversed."""
        return self.sampling_timesteps(num_steps)[::-1]

    def alpha_bar(self, timestep: int | None) -> float:
        """ᾱ[t], or ᾱ_final where there is no further timestep."""
        return self.final_alpha_cumprod if timestep is None else self.alphas_cumprod[timestep]

    def epsilon(self, model_output: torch.Tensor, latents: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """The noise ε that a UNet output stands for, on float32 `latents` at a timestep with ᾱ = `alpha_bar`.

        A v-prediction model (Salimans & Ho 2022, arXiv 2202.00512) predicts v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x0;
        with z = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε this gives ε = sqrt(ᾱ) v + sqrt(1 − ᾱ) z (docs/algorithm.md §9).
        """
        output = model_output.float()
        if self.prediction_type == "v_prediction":
            return alpha_bar**0.5 * output + (1 - alpha_bar) ** 0.5 * latents
        return output

    def in_training_range(self, num_steps: int) -> bool:
        """Whether every timestep of `set_timesteps(num_steps)` is one the model was trained on."""
        trained = len(self.alphas_cumprod)
        # set_timesteps itself refuses more steps than training timesteps.
        return num_steps <= trained and max(self.sampling_timesteps(num_steps)) < trained

    def check_training_range(self, input_name: str, num_steps: int, low: int) -> None:
        """Refuse a step count whose timesteps leave the training range, naming the largest valid count.

        With SD's "leading" spacing and `steps_offset=1`, 1000 steps of 1000 training timesteps would need t = 1000.
        """
        if self.in_training_range(num_steps):
            return
        trained = len(self.alphas_cumprod)
        largest = next((m for m in range(num_steps - 1, low - 1, -1) if self.in_training_range(m)), None)
        reason = (
            f"are more than the model's {trained} training timesteps"
            if num_steps > trained
            else f"need timestep {max(self.sampling_timesteps(num_steps))}, "
            f"outside the model's {trained} training timesteps"
        )
        raise InputError(input_name, f"{num_steps} steps {reason}; the largest valid value is {largest}")

    def check_nesting(self, num_inference_steps: int, ddim_inversion_steps: int, low: int, high: int) -> None:
        """Refuse inversion steps whose timesteps miss a sampling timestep, naming the nearest valid counts in
        [low, high]."""
        sampling = set(self.sampling_timesteps(num_inference_steps))
        if sampling <= set(self.sampling_timesteps(ddim_inversion_steps)):
            return
        valid = [
            m for m in range(low, high + 1) if sampling <= set(self.sampling_timesteps(m)) and self.in_training_range(m)
        ]
        nearest = sorted(sorted(valid, key=lambda m: (abs(m - ddim_inversion_steps), m))[:3])
        raise InputError(
            "ddim_inversion_steps",
            f"{ddim_inversion_steps} inversion steps do not contain every timestep of "
            f"num_inference_steps={num_inference_steps}; nearest valid values: "
            f"{', '.join(map(str, nearest)) or 'none in range'}",
        )


def device_timesteps(timesteps: list[int], device: torch.device, chunk: int = 1) -> list[torch.Tensor]:
    """`timesteps` on `device` in chunks of `chunk`, made once before a loop: a Python int would be copied
    to the device at every UNet call. Each chunk is a tensor of its own, not a view into one tensor, so
    a compiled UNet sees the same offset and alignment at every step and does not compile again."""
    return [part.clone() for part in torch.tensor(timesteps, device=device).split(chunk)]


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float, alpha_bar_next: float) -> torch.Tensor:
    """The deterministic DDIM update from ᾱ = `alpha_bar` to ᾱ' = `alpha_bar_next` (Song et al. 2021, arXiv 2010.02502,
    Eq. 12 with η = 0; docs/algorithm.md §3, §5): x0 = (x − sqrt(1 − ᾱ) ε) / sqrt(ᾱ), then
    x' = sqrt(ᾱ') x0 + sqrt(1 − ᾱ') ε. Towards less noise it samples; towards more noise it inverts.

    diffusers' `DDIMScheduler.step` is not used: it derives the next timestep from its own spacing, so it
    cannot run the inversion (nor land on z_src's timesteps), and it reads ᾱ from CPU tensors at every
    step; here ᾱ are Python floats, so the loops queue GPU work without waiting on the host.
    """
    x0 = (x - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
    return alpha_bar_next**0.5 * x0 + (1 - alpha_bar_next) ** 0.5 * eps


# s_i of step i of N, with last = N − 1 (docs/algorithm.md §6); the names are the input's choices.
NEGATIVE_PROMPT_SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "linear": lambda i, last: 1 - i / last,
    "constant": lambda i, last: 1.0,
    "exp": lambda i, last: math.exp(-6 * i / last),
}


def negative_prompt_weights(schedule: str, negative_prompt_alpha: float, num_steps: int) -> list[float]:
    """a_i = negative_prompt_alpha * s_i (docs/algorithm.md §6): the weight of the unconditional branch against
    the negative one. `schedule` is a key of `NEGATIVE_PROMPT_SCHEDULES`, as `PnPConfig` checks."""
    last = max(num_steps - 1, 1)
    return [negative_prompt_alpha * NEGATIVE_PROMPT_SCHEDULES[schedule](i, last) for i in range(num_steps)]
