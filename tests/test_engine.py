"""The algorithm of SPEC 4 on a tiny random model: inversion, injection, guidance, batching, generation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from pnp import PnPConfig, PnPEngine
from pnp.image_io import image_to_tensor, prepare_image, tensor_to_images
from pnp.injection import RESNET_KEY, attention_keys, locate_sites
from pnp.inversion import invert
from pnp.schedules import negative_prompt_weights

HORSE = "examples/horse.jpg"
# Small enough for CPU tests: 128x128 pixels (16x16 latents), 10 steps.
FAST = {"image_size": 128, "num_inference_steps": 10, "ddim_inversion_steps": 10}


def config(**values) -> PnPConfig:
    return PnPConfig.from_mapping({**FAST, **values})


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> PnPEngine:
    return PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def reference_scheduler(engine: PnPEngine, steps: int) -> DDIMScheduler:
    scheduler = DDIMScheduler.from_config(engine.model.scheduler_config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    return scheduler


def reference_sampling(engine, start, prompt, scale, steps, negative=None, weights=None) -> torch.Tensor:
    """Plain guided DDIM (diffusers' own scheduler step, eta 0) with the negative blend of SPEC 4.4."""
    model = engine.model
    scheduler = reference_scheduler(engine, steps)
    texts = model.encode_text(["", prompt] + ([negative] if negative else []))
    x = start.float()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            eps = [model.unet(x, t, encoder_hidden_states=texts[k : k + 1]).sample for k in range(len(texts))]
            uncond = eps[0] if negative is None else weights[i] * eps[0] + (1 - weights[i]) * eps[2]
            guided = uncond + scale * (eps[1] - uncond)
            x = scheduler.step(guided, t, x).prev_sample
    return x


def source_latent(engine: PnPEngine, image_size: int = 128) -> torch.Tensor:
    return engine.model.encode_image(image_to_tensor(prepare_image(Image.open(HORSE).convert("RGB"), image_size)))


class SiteRecorder:
    """Records, per UNet call, each site's output after the engine's hooks, and what the module itself computes."""

    def __init__(self, unet):
        self.calls: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self.handles = [unet.register_forward_pre_hook(lambda *_: self.calls.append({}))]
        for key, module in locate_sites(unet).items():
            self.handles.append(module.register_forward_hook(self._hook(key)))

    def _hook(self, key):
        def hook(module, inputs, output):
            self.calls[-1][key] = (output.clone(), module.forward(*inputs).clone())

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_inversion_follows_ddim_inversion_formula(engine):
    latent = source_latent(engine)
    scheduler = reference_scheduler(engine, 10)
    taus = [int(t) for t in scheduler.timesteps.flip(0)]
    text = engine.model.encode_text(["a horse"])
    kept = invert(engine.model.unet, engine.schedule, latent, text, 10, set(taus))
    assert sorted(kept) == taus

    alphas = scheduler.alphas_cumprod.double()
    z = latent.double()
    with torch.no_grad():
        for i, tau in enumerate(taus):
            a = alphas[tau]
            a_prev = alphas[taus[i - 1]] if i else scheduler.final_alpha_cumprod.double()
            eps = engine.model.unet(z.float(), tau, encoder_hidden_states=text).sample.double()
            z = a.sqrt() * (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt() + (1 - a).sqrt() * eps
            torch.testing.assert_close(kept[tau].double(), z, atol=1e-4, rtol=1e-4)
    # The final alpha is ᾱ[0] (set_alpha_to_one=False), not 1.
    assert engine.schedule.final_alpha_cumprod == pytest.approx(float(scheduler.alphas_cumprod[0]))


def test_zero_thresholds_equal_plain_guided_ddim_from_the_inverted_noise(engine):
    result = engine(config(feature_injection_threshold=0, attention_injection_threshold=0, translation_prompts="a cat"), HORSE)
    timesteps = engine.schedule.sampling_timesteps(10)
    x_t = invert(engine.model.unet, engine.schedule, source_latent(engine), engine.model.encode_text([""]), 10, {timesteps[0]})
    expected = reference_sampling(engine, x_t[timesteps[0]], "a cat", 10.0, 10)
    reference = tensor_to_images(engine.model.decode_latents(expected, 4))[0]
    assert np.abs(pixels(result.images[0]) - pixels(reference)).max() <= 1


def test_negative_prompt_blend_matches_the_formula(engine):
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
    timesteps = engine.schedule.sampling_timesteps(10)
    x_t = invert(engine.model.unet, engine.schedule, source_latent(engine), engine.model.encode_text([""]), 10, {timesteps[0]})
    expected = reference_sampling(engine, x_t[timesteps[0]], "a cat", 7.5, 10, negative="a horse", weights=weights)
    reference = tensor_to_images(engine.model.decode_latents(expected, 4))[0]
    assert np.abs(pixels(result.images[0]) - pixels(reference)).max() <= 1


@pytest.mark.parametrize("feature_threshold, attention_threshold", [(0.5, 0.3), (0.2, 0.6)])
def test_injection_replaces_source_features_for_exactly_the_first_steps(engine, feature_threshold, attention_threshold):
    request = config(
        feature_injection_threshold=feature_threshold,
        attention_injection_threshold=attention_threshold,
        translation_prompts="a robot horse; a cat",
    )
    engine(request, HORSE)  # inverts and caches the source features
    key = next(k for k in engine.cache._entries if k.num_inference_steps == 10 and k.inversion_prompt == "")
    source = engine.cache.get(key).features
    with SiteRecorder(engine.model.unet) as recorder:
        result = engine(request, HORSE)
    assert result.stats.cache_hit
    assert len(recorder.calls) == 10  # one batched call per step: 2 prompts x (unconditional, conditional)
    n_f, n_a = request.feature_injection_steps, request.attention_injection_steps
    assert (n_f, n_a) == (int(10 * feature_threshold), int(10 * attention_threshold))
    for step, call in enumerate(recorder.calls):
        for key, (seen, own) in call.items():
            injected = step < (n_f if key == RESNET_KEY else n_a)
            if injected:
                expected = source.features[key][step][0].expand_as(seen)
                torch.testing.assert_close(seen, expected, atol=0, rtol=0)
                assert not torch.allclose(seen, own), f"{key} at step {step}: the target's own features equal the source's"
            else:
                torch.testing.assert_close(seen, own, atol=0, rtol=0)
    assert set(call) == {RESNET_KEY, *attention_keys()}


def test_negative_weights_follow_the_three_schedules():
    n, alpha = 5, 0.5
    assert negative_prompt_weights("linear", alpha, n) == pytest.approx([alpha * (1 - i / 4) for i in range(n)])
    assert negative_prompt_weights("constant", alpha, n) == pytest.approx([alpha] * n)
    assert negative_prompt_weights("exp", alpha, n) == pytest.approx([alpha * math.exp(-6 * i / 4) for i in range(n)])
    assert negative_prompt_weights("linear", 1.0, n)[0] == 1.0 and negative_prompt_weights("linear", 1.0, n)[-1] == 0.0


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
def test_translation_evaluates_only_branches_that_matter(engine, negative, schedule, alpha, evals):
    request = config(negative_prompt=negative, negative_prompt_schedule=schedule, negative_prompt_alpha=alpha)
    engine(request, HORSE)
    result = engine(request, HORSE)
    assert result.stats.phases["translation"].unet_evals == evals


def test_prompts_in_one_batch_equal_prompts_one_at_a_time(engine, tiny_model_dir):
    prompts = ["a robot horse", "a cat", "a zebra"]
    together = engine(config(translation_prompts="; ".join(prompts), negative_prompt="blurry"), HORSE).images
    assert len(together) == 3
    one_latent_per_call = PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu", batch_latent_pixels=1)
    for prompt, image in zip(prompts, together):
        alone = one_latent_per_call(config(translation_prompts=prompt, negative_prompt="blurry"), HORSE).images[0]
        assert np.abs(pixels(alone) - pixels(image)).max() <= 1
    assert np.abs(pixels(together[0]) - pixels(together[1])).max() > 1  # different prompts, different images


def test_generation_returns_the_seeded_source_first(engine):
    request = config(generation_prompt="a horse in a field", translation_prompts="a robot horse; a cat", seed=7)
    first = engine(request, None)
    again = engine(request, HORSE)  # the image is ignored in generation mode
    assert first.seed == 7 and len(first.images) == 3
    for a, b in zip(first.images, again.images):
        assert np.array_equal(pixels(a), pixels(b))
    other = engine(request.replace(seed=8), None)
    assert not np.array_equal(pixels(other.images[0]), pixels(first.images[0]))

    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(7))
    expected = reference_sampling(engine, noise, "a horse in a field", 5.0, 10)
    reference = tensor_to_images(engine.model.decode_latents(expected, 4))[0]
    assert np.abs(pixels(first.images[0]) - pixels(reference)).max() <= 1


def test_generation_injects_each_half_into_its_own_branches(engine):
    request = config(generation_prompt="a horse", translation_prompts="a cat", seed=1, negative_prompt="a dog", negative_prompt_schedule="constant", negative_prompt_alpha=0.5)
    with SiteRecorder(engine.model.unet) as recorder:
        result = engine(request, None)
    assert len(result.images) == 2
    source_calls, target_calls = recorder.calls[:10], recorder.calls[10:]
    assert len(target_calls) == 10
    n_f, n_a = request.feature_injection_steps, request.attention_injection_steps
    for step, (source, target) in enumerate(zip(source_calls, target_calls)):
        for key, (seen, own) in target.items():
            if step >= (n_f if key == RESNET_KEY else n_a):
                torch.testing.assert_close(seen, own, atol=0, rtol=0)
                continue
            unconditional, conditional = source[key][0][0], source[key][0][1]
            # Target rows: unconditional, negative, conditional.
            torch.testing.assert_close(seen[0], unconditional, atol=0, rtol=0)
            torch.testing.assert_close(seen[1], unconditional, atol=0, rtol=0)
            torch.testing.assert_close(seen[2], conditional, atol=0, rtol=0)


def test_output_has_the_working_size_of_a_non_square_image(engine):
    wide = Image.new("RGB", (1000, 500), (200, 30, 30))
    result = engine(config(translation_prompts="a red wall"), wide)
    assert result.images[0].size == (128, 64)


def test_sd2_layout_with_linear_projections_runs(tiny_sd2_model_dir):
    sd2 = PnPEngine.from_pretrained(str(tiny_sd2_model_dir), device="cpu")
    result = sd2(config(translation_prompts="a cat"), HORSE)
    assert result.images[0].size == (128, 128)
    assert result.stats.unet_evals == 10 + 8 + 20
