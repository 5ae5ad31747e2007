"""Timesteps and weights (pnp.schedules): inversion steps that nest the sampling timesteps, the model's
training range, the negative-prompt schedules, and the DDIM step with v-predictions turned into noise."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pnp import InputError, PnPEngine
from pnp.config import INPUTS
from pnp.schedules import ddim_step, negative_prompt_weights
from pnp.testing import make_random_model
from tests.helpers import HORSE, config, reference_scheduler


def test_inversion_steps_that_do_not_nest_are_refused_with_valid_values(engine: PnPEngine):
    """docs/conventions.md §7: every sampling timestep must be an inversion timestep."""
    evals = engine.unet_evals
    with pytest.raises(InputError) as error:
        engine(config(num_inference_steps=50, ddim_inversion_steps=30), HORSE)
    assert error.value.input_name == "ddim_inversion_steps"
    assert str(error.value).startswith("ddim_inversion_steps: ")
    assert engine.unet_evals == evals  # refused before any work
    proposed = [int(v) for v in str(error.value).split("nearest valid values: ")[1].split(", ")]
    assert proposed == [50, 99, 100]  # leading spacing: 1000 // M must divide 20 and reach t_0 = 981
    spec = INPUTS["ddim_inversion_steps"]
    for valid in proposed:  # every value offered is indeed valid
        engine.schedule.check_nesting(50, valid, spec.minimum, spec.maximum)


def test_step_counts_leaving_the_training_range_are_refused_before_any_work(engine: PnPEngine, tmp_path):
    # With SD's 1000 training timesteps the config's bound (999) already refuses 1000 inversion steps.
    # A model trained on 150 timesteps shows the engine's own check, which reads the model's schedule.
    path = make_random_model(tmp_path / "short")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler_file.write_text(json.dumps({**json.loads(scheduler_file.read_text()), "num_train_timesteps": 150}))
    short = PnPEngine.from_pretrained(str(path), device="cpu")
    assert short.schedule.in_training_range(149) and not short.schedule.in_training_range(150)
    for name, values in [
        ("ddim_inversion_steps", {"ddim_inversion_steps": 999}),
        ("num_inference_steps", {"num_inference_steps": 200, "ddim_inversion_steps": 200}),
    ]:
        with pytest.raises(InputError) as error:
            short(config(**values), HORSE)
        assert error.value.input_name == name
        assert "150 training timesteps; the largest valid value is 149" in str(error.value)
    assert short.unet_evals == 0
    with pytest.raises(
        InputError,
        match="1000 steps need timestep 1000, outside the model's 1000 training timesteps; "
        "the largest valid value is 999",
    ):
        engine.schedule.check_training_range("ddim_inversion_steps", 1000, 10)


def test_negative_weights_follow_the_three_schedules():
    """docs/algorithm.md §6."""
    n, alpha = 5, 0.5
    assert negative_prompt_weights("linear", alpha, n) == pytest.approx([alpha * (1 - i / 4) for i in range(n)])
    assert negative_prompt_weights("constant", alpha, n) == pytest.approx([alpha] * n)
    assert negative_prompt_weights("exp", alpha, n) == pytest.approx([alpha * math.exp(-6 * i / 4) for i in range(n)])
    assert negative_prompt_weights("linear", 1.0, n)[0] == 1.0 and negative_prompt_weights("linear", 1.0, n)[-1] == 0.0


def test_v_to_epsilon_and_the_ddim_step_give_diffusers_own_v_prediction_step(v_engine: PnPEngine):
    """docs/algorithm.md §9 and §5: ε from v, then the DDIM step, equal diffusers' DDIMScheduler.step on v."""
    scheduler = reference_scheduler(v_engine, 10)
    generator = torch.Generator().manual_seed(0)
    x, v = torch.randn((2, 1, 4, 8, 8), generator=generator)
    for i, t in enumerate(scheduler.timesteps.tolist()):
        alpha = v_engine.schedule.alpha_bar(t)
        alpha_next = v_engine.schedule.alpha_bar(int(scheduler.timesteps[i + 1]) if i + 1 < 10 else None)
        eps = v_engine.schedule.epsilon(v, x, alpha)
        # ε = sqrt(ᾱ) v + sqrt(1 − ᾱ) z, written out independently in float64.
        expected = math.sqrt(alpha) * v.double() + math.sqrt(1 - alpha) * x.double()
        torch.testing.assert_close(eps.double(), expected, atol=1e-6, rtol=1e-6)
        ours = ddim_step(x, eps, alpha, alpha_next)
        torch.testing.assert_close(ours, scheduler.step(v, t, x).prev_sample, atol=1e-5, rtol=1e-5)
