"""UNet evaluation counts (docs/cost-model.md §2), as the engine counts them while it runs: a request at the
defaults, new and repeated, and the branches of the negative prompt that are evaluated.

The benchmark's rows (tests/test_bench.py) check the same formula for four prompts and generation mode.
"""

from __future__ import annotations

import pytest

from pnp import PnPConfig, PnPEngine
from tests.helpers import HORSE, config


def test_cost_model_of_the_default_request(engine: PnPEngine):
    """M + max(n_f, n_a) + 2NP on a new image, 2NP on a repeat (defaults: M = N = 50, n_f = 40, n_a = 25)."""
    engine.cache.clear()  # a new image
    defaults = {"image_size": 128}  # the cost does not depend on the size
    new = engine(PnPConfig.from_mapping({**defaults, "translation_prompts": "a cat"}), HORSE).stats
    assert [new.phases[p].unet_evals for p in ("inversion", "extraction", "translation")] == [50, 40, 100]
    assert new.unet_evals == 190 and not new.cache_hit

    repeat = engine(PnPConfig.from_mapping({**defaults, "translation_prompts": "a dog; a zebra"}), HORSE).stats
    assert repeat.cache_hit and repeat.unet_evals == repeat.phases["translation"].unet_evals == 200


def test_cost_model_of_generation_mode(engine: PnPEngine):
    """2N for the guided source, its own "generation" phase (it captures the features: no extraction), then 2NP."""
    stats = engine(config(generation_prompt="a horse", translation_prompts="a cat; a dog", seed=0), None).stats
    assert {name: phase.unet_evals for name, phase in stats.phases.items()} == {
        "load": 0,
        "inversion": 0,
        "extraction": 0,
        "generation": 20,
        "mask": 0,
        "translation": 40,
        "decode": 0,
    }


@pytest.mark.parametrize(
    "negative, schedule, alpha, evals",
    [
        ("", "linear", 0.5, 20),  # no negative prompt: no negative branch at all
        ("a horse", "constant", 1.0, 20),  # a_i = 1 throughout: the negative branch cannot matter
        ("a horse", "linear", 1.0, 28),  # a_0 = 1 skips the negative branch, a_9 = 0 the unconditional one
        ("a horse", "constant", 0.0, 20),  # a_i = 0: the unconditional branch cannot matter
        ("a horse", "exp", 0.5, 30),  # every branch matters at every step
    ],
)
def test_translation_evaluates_only_branches_that_matter(engine: PnPEngine, negative, schedule, alpha, evals):
    """docs/cost-model.md §2, negative prompt: N·P·2 + P·#{i : 0 < a_i < 1}, less where a_i = 0."""
    request = config(negative_prompt=negative, negative_prompt_schedule=schedule, negative_prompt_alpha=alpha)
    # The translation phase counts only its own evaluations, whether the inversion was cached or not.
    assert engine(request, HORSE).stats.phases["translation"].unet_evals == evals
