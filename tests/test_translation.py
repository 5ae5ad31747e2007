"""Translation and generation (pnp.translation, pnp.engine; docs/algorithm.md §5, §9): guided DDIM against
diffusers' own sampling, the negative-prompt blend, which features are injected at which steps and
into which branches, batching of prompts, seeded generation, and output sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pnp import PnPEngine
from pnp.config import MAX_PROMPTS
from pnp.injection import RESNET_KEY, RESNET_SITE
from pnp.schedules import negative_prompt_weights
from tests.helpers import (
    HORSE,
    SiteRecorder,
    assert_sites_follow_the_source,
    config,
    decoded_image,
    inverted_noise,
    pixels,
    reference_sampling,
    site_features,
)


def test_zero_thresholds_equal_plain_guided_ddim_from_the_inverted_noise(engine: PnPEngine):
    result = engine(
        config(feature_injection_threshold=0, attention_injection_threshold=0, translation_prompts="a cat"), HORSE
    )
    reference = decoded_image(engine, reference_sampling(engine, inverted_noise(engine), "a cat", 10.0, 10))
    assert np.abs(pixels(result.images[0]) - pixels(reference)).max() <= 1


def test_negative_prompt_blend_matches_the_formula(engine: PnPEngine):
    weights = negative_prompt_weights("exp", 0.6, 10)
    result = engine(
        config(
            feature_injection_threshold=0,
            attention_injection_threshold=0,
            translation_prompts="a cat",
            negative_prompt="a horse",
            negative_prompt_alpha=0.6,
            negative_prompt_schedule="exp",
            scale=7.5,
        ),
        HORSE,
    )
    expected = reference_sampling(engine, inverted_noise(engine), "a cat", 7.5, 10, negative="a horse", weights=weights)
    assert np.abs(pixels(result.images[0]) - pixels(decoded_image(engine, expected))).max() <= 1


@pytest.mark.parametrize("feature_threshold, attention_threshold", [(0.5, 0.3), (0.2, 0.6)])
def test_injection_replaces_source_features_for_exactly_the_first_steps(
    engine: PnPEngine, feature_threshold, attention_threshold
):
    request = config(
        feature_injection_threshold=feature_threshold,
        attention_injection_threshold=attention_threshold,
        translation_prompts="a robot horse; a cat",
        inversion_prompt=f"injection {feature_threshold} {attention_threshold}",
    )
    engine(request, HORSE)  # inverts and caches the source features
    (source,) = [e.features for k, e in engine.cache.items() if k.inversion_prompt == request.inversion_prompt]
    with SiteRecorder(engine.model.unet) as recorder:
        result = engine(request, HORSE)
    assert result.stats.cache_hit
    assert len(recorder.calls) == 10  # one batched call per step: 2 prompts x (unconditional, conditional)
    n_f, n_a = request.feature_injection_steps, request.attention_injection_steps
    assert (n_f, n_a) == (int(10 * feature_threshold), int(10 * attention_threshold))
    assert_sites_follow_the_source(recorder.calls, lambda step, key: source.features[key][step], n_f, n_a)


def test_prompts_in_one_batch_equal_prompts_one_at_a_time(engine: PnPEngine, tiny_model_dir):
    prompts = ["a robot horse", "a cat", "a zebra"]
    together = engine(config(translation_prompts="; ".join(prompts), negative_prompt="blurry"), HORSE).images
    assert len(together) == 3
    one_latent_per_call = PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu", batch_latent_pixels=1)
    for prompt, image in zip(prompts, together, strict=True):
        alone = one_latent_per_call(config(translation_prompts=prompt, negative_prompt="blurry"), HORSE).images[0]
        assert np.abs(pixels(alone) - pixels(image)).max() <= 1
    assert np.abs(pixels(together[0]) - pixels(together[1])).max() > 1  # different prompts, different images


def test_the_maximum_number_of_prompts_is_served(engine: PnPEngine):
    assert MAX_PROMPTS >= 8  # the documented maximum (README, the schema's description) is at least 8
    prompts = "; ".join(f"prompt {i}" for i in range(MAX_PROMPTS))
    result = engine(config(generation_prompt="a horse", seed=5, translation_prompts=prompts), None)
    assert len(result.images) == MAX_PROMPTS + 1  # the generated source first
    assert all(image.size == (128, 128) for image in result.images)


def test_generation_returns_the_seeded_source_first(engine: PnPEngine):
    request = config(generation_prompt="a horse in a field", translation_prompts="a robot horse; a cat", seed=7)
    first = engine(request, None)
    again = engine(request, HORSE)  # the image is ignored in generation mode
    assert first.seed == 7 and len(first.images) == 3
    for a, b in zip(first.images, again.images, strict=True):
        assert np.array_equal(pixels(a), pixels(b))
    other = engine(request.replace(seed=8, translation_prompts="a cat"), None)  # only its source is compared
    assert not np.array_equal(pixels(other.images[0]), pixels(first.images[0]))

    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(7))
    reference = decoded_image(engine, reference_sampling(engine, noise, "a horse in a field", 5.0, 10))
    assert np.abs(pixels(first.images[0]) - pixels(reference)).max() <= 1


def test_generation_injects_each_half_into_its_own_branches(engine: PnPEngine):
    request = config(
        generation_prompt="a horse",
        translation_prompts="a cat",
        seed=1,
        negative_prompt="a dog",
        negative_prompt_schedule="constant",
        negative_prompt_alpha=0.5,
    )
    with SiteRecorder(engine.model.unet) as recorder:
        result = engine(request, None)
    assert len(result.images) == 2
    source_calls, target_calls = recorder.calls[:10], recorder.calls[10:]
    assert len(target_calls) == 10

    def injected_rows(step: int, key: str) -> torch.Tensor:
        # Source rows: unconditional, conditional. Target rows: unconditional, negative, conditional.
        name = RESNET_SITE if key == RESNET_KEY else key.split(".attn1.")[0]
        return site_features(name, *source_calls[step][name][:2])[key][[0, 0, 1]]

    assert_sites_follow_the_source(
        target_calls, injected_rows, request.feature_injection_steps, request.attention_injection_steps
    )


def test_output_has_the_working_size_of_a_non_square_image(engine: PnPEngine):
    wide = Image.new("RGB", (1000, 500), (200, 30, 30))
    result = engine(config(translation_prompts="a red wall"), wide)
    assert result.images[0].size == (128, 64)


# --- v-prediction models (docs/algorithm.md §9) -------------------------------------------------------------


def test_v_prediction_translation_equals_diffusers_guided_sampling(v_engine: PnPEngine):
    v_engine.cache.clear()  # a new image: its inversion is counted
    result = v_engine(
        config(feature_injection_threshold=0, attention_injection_threshold=0, translation_prompts="a cat"), HORSE
    )
    assert result.stats.unet_evals == 10 + 20  # inversion and translation; no features to extract
    reference = decoded_image(v_engine, reference_sampling(v_engine, inverted_noise(v_engine), "a cat", 10.0, 10))
    assert np.abs(pixels(result.images[0]) - pixels(reference)).max() <= 1


def test_v_prediction_generation_and_injected_translation(v_engine: PnPEngine):
    request = config(generation_prompt="a horse in a field", translation_prompts="a robot horse; a cat", seed=5)
    result = v_engine(request, None)
    assert len(result.images) == 3 and result.stats.unet_evals == 20 + 40
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(5))
    reference = decoded_image(v_engine, reference_sampling(v_engine, noise, "a horse in a field", 5.0, 10))
    assert np.abs(pixels(result.images[0]) - pixels(reference)).max() <= 1
    v_engine.cache.clear()  # a new image: its inversion and extraction are counted
    real = v_engine(config(translation_prompts="a robot horse", inversion_prompt="a horse"), HORSE)
    assert real.stats.unet_evals == 10 + 8 + 20 and pixels(real.images[0]).std() > 0
