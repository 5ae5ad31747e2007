"""The algorithm (docs/algorithm.md) on a tiny random model: inversion, injection, guidance, batching, generation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from PIL import Image

from pnp import InputError, PnPConfig, PnPEngine
from pnp.image_io import decoded_to_pixels, image_to_tensor, pixels_to_images, prepare_image
from pnp.injection import RESNET_KEY, attention_keys, locate_sites
from pnp.inversion import invert
from pnp.schedules import negative_prompt_weights
from pnp.testing import make_random_model

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


def reference_sampling(engine, start, prompt, scale, steps, negative=None, weights=None, after_step=None) -> torch.Tensor:
    """Plain guided DDIM (diffusers' own scheduler step, eta 0, which reads v-predictions itself) with the
    negative blend of docs/algorithm.md §5; `after_step(i, x)` may replace the latents after each step."""
    model = engine.model
    scheduler = reference_scheduler(engine, steps)
    texts = model.encode_text(["", prompt] + ([negative] if negative else []))
    x = start.float()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            out = [model.unet(x, t, encoder_hidden_states=texts[k : k + 1]).sample for k in range(len(texts))]
            uncond = out[0] if negative is None else weights[i] * out[0] + (1 - weights[i]) * out[2]
            guided = uncond + scale * (out[1] - uncond)
            x = scheduler.step(guided, t, x).prev_sample
            if after_step is not None:
                x = after_step(i, x)
    return x


def decoded_image(engine: PnPEngine, latents: torch.Tensor) -> Image.Image:
    return pixels_to_images(decoded_to_pixels(engine.model.decode_latents(latents, 4)))[0]


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


def test_inversion_equals_diffusers_ddim_inverse_scheduler(engine):
    latent = source_latent(engine)
    inverse = DDIMInverseScheduler.from_config(engine.model.scheduler_config, clip_sample=False, set_alpha_to_one=False)
    inverse.set_timesteps(10)
    taus = [int(t) for t in inverse.timesteps]
    assert taus == engine.schedule.inversion_timesteps(10)
    text = engine.model.encode_text(["a horse"])
    kept = invert(engine.model.unet, engine.schedule, latent, text, 10, set(taus))
    assert sorted(kept) == taus
    z = latent.float()
    with torch.no_grad():
        for tau in taus:
            eps = engine.model.unet(z, tau, encoder_hidden_states=text).sample
            z = inverse.step(eps, tau, z).prev_sample
            torch.testing.assert_close(kept[tau], z, atol=1e-5, rtol=1e-5)
    # The first step starts from ᾱ[0] (set_alpha_to_one=False), not 1, in both.
    assert engine.schedule.final_alpha_cumprod == pytest.approx(float(inverse.alphas_cumprod[0]))


def test_zero_thresholds_equal_plain_guided_ddim_from_the_inverted_noise(engine):
    result = engine(config(feature_injection_threshold=0, attention_injection_threshold=0, translation_prompts="a cat"), HORSE)
    timesteps = engine.schedule.sampling_timesteps(10)
    x_t = invert(engine.model.unet, engine.schedule, source_latent(engine), engine.model.encode_text([""]), 10, {timesteps[0]})
    expected = reference_sampling(engine, x_t[timesteps[0]], "a cat", 10.0, 10)
    reference = decoded_image(engine, expected)
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
    reference = decoded_image(engine, expected)
    assert np.abs(pixels(result.images[0]) - pixels(reference)).max() <= 1


@pytest.mark.parametrize("feature_threshold, attention_threshold", [(0.5, 0.3), (0.2, 0.6)])
def test_injection_replaces_source_features_for_exactly_the_first_steps(engine, feature_threshold, attention_threshold):
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
    reference = decoded_image(engine, expected)
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


# --- source features of a real image: E(""), whatever the inversion prompt ----------------------------------


def test_source_features_use_the_empty_prompt_whatever_the_inversion_prompt(engine):
    request = config(inversion_prompt="a brown horse", translation_prompts="a cat")
    engine(request, HORSE)
    entries = {key.inversion_prompt: entry for key, entry in engine.cache.items() if key.num_inference_steps == 10}
    engine(request.replace(inversion_prompt=""), HORSE)
    entries = {key.inversion_prompt: entry for key, entry in engine.cache.items() if key.num_inference_steps == 10}
    conditioned, plain = entries["a brown horse"], entries[""]
    timesteps = engine.schedule.sampling_timesteps(10)
    # The inversion prompt conditions the inversion: its latents differ.
    assert not torch.allclose(conditioned.latents[timesteps[0]], plain.latents[timesteps[0]])
    texts = {prompt: engine.model.encode_text([prompt]) for prompt in ("", "a brown horse")}
    for step in (0, 3):
        t = timesteps[step]
        seen = {}
        for prompt, text in texts.items():
            with SiteRecorder(engine.model.unet) as recorder, torch.no_grad():
                engine.model.unet(conditioned.latents[t], t, encoder_hidden_states=text)
            seen[prompt] = recorder.calls[0]
        for key in (RESNET_KEY, *attention_keys()):
            cached = conditioned.features.features[key][step][0]
            torch.testing.assert_close(cached, seen[""][key][1][0], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(cached, seen["a brown horse"][key][1][0], atol=1e-5), key


# --- step counts outside the training range -------------------------------------------------------------


def test_step_counts_leaving_the_training_range_are_refused_before_any_work(engine, tmp_path):
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
    with pytest.raises(InputError, match="1000 steps need timestep 1000, outside the model's 1000 training timesteps; the largest valid value is 999"):
        engine.schedule.check_training_range("ddim_inversion_steps", 1000, 10)


# --- v-prediction models --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v_engine(tiny_v_model_dir) -> PnPEngine:
    return PnPEngine.from_pretrained(str(tiny_v_model_dir), device="cpu")


def test_v_to_epsilon_gives_diffusers_own_v_prediction_ddim_step(v_engine):
    scheduler = reference_scheduler(v_engine, 10)
    generator = torch.Generator().manual_seed(0)
    x, v = torch.randn((2, 1, 4, 8, 8), generator=generator)
    for i, t in enumerate(scheduler.timesteps.tolist()):
        alpha = v_engine.schedule.alpha(t)
        alpha_next = v_engine.schedule.alpha(int(scheduler.timesteps[i + 1]) if i + 1 < 10 else None)
        eps = v_engine.schedule.epsilon(v, x, alpha)
        # ε = sqrt(ᾱ) v + sqrt(1 − ᾱ) z, written out independently in float64.
        expected = math.sqrt(alpha) * v.double() + math.sqrt(1 - alpha) * x.double()
        torch.testing.assert_close(eps.double(), expected, atol=1e-6, rtol=1e-6)
        x0 = (x - (1 - alpha) ** 0.5 * eps) / alpha**0.5
        ours = alpha_next**0.5 * x0 + (1 - alpha_next) ** 0.5 * eps
        torch.testing.assert_close(ours, scheduler.step(v, t, x).prev_sample, atol=1e-5, rtol=1e-5)


def test_v_prediction_inversion_converts_each_output(v_engine):
    latent = source_latent(v_engine)
    taus = v_engine.schedule.inversion_timesteps(10)
    kept = invert(v_engine.model.unet, v_engine.schedule, latent, v_engine.model.encode_text([""]), 10, set(taus))
    alphas = reference_scheduler(v_engine, 10).alphas_cumprod.double()
    z = latent.double()
    with torch.no_grad():
        for i, tau in enumerate(taus):
            a = alphas[tau]
            a_prev = alphas[taus[i - 1]] if i else alphas[0]
            v = v_engine.model.unet(z.float(), tau, encoder_hidden_states=v_engine.model.encode_text([""])).sample.double()
            eps = a.sqrt() * v + (1 - a).sqrt() * z
            z = a.sqrt() * (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt() + (1 - a).sqrt() * eps
            torch.testing.assert_close(kept[tau].double(), z, atol=1e-4, rtol=1e-4)


def test_v_prediction_translation_equals_diffusers_guided_sampling(v_engine):
    result = v_engine(config(feature_injection_threshold=0, attention_injection_threshold=0, translation_prompts="a cat"), HORSE)
    assert result.stats.unet_evals == 10 + 20  # inversion and translation; no features to extract
    timesteps = v_engine.schedule.sampling_timesteps(10)
    x_t = invert(v_engine.model.unet, v_engine.schedule, source_latent(v_engine), v_engine.model.encode_text([""]), 10, {timesteps[0]})
    reference = decoded_image(v_engine, reference_sampling(v_engine, x_t[timesteps[0]], "a cat", 10.0, 10))
    assert np.abs(pixels(result.images[0]) - pixels(reference)).max() <= 1


def test_v_prediction_generation_and_injected_translation(v_engine):
    request = config(generation_prompt="a horse in a field", translation_prompts="a robot horse; a cat", seed=5)
    result = v_engine(request, None)
    assert len(result.images) == 3 and result.stats.unet_evals == 20 + 40
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(5))
    reference = decoded_image(v_engine, reference_sampling(v_engine, noise, "a horse in a field", 5.0, 10))
    assert np.abs(pixels(result.images[0]) - pixels(reference)).max() <= 1
    real = v_engine(config(translation_prompts="a robot horse", inversion_prompt="a horse"), HORSE)
    assert real.stats.unet_evals == 10 + 8 + 20 and pixels(real.images[0]).std() > 0


# --- region editing with a mask -------------------------------------------------------------------------


def left_half_white(width: int = 128, height: int = 128) -> Image.Image:
    """White (edit) on the left half, black (keep) on the right; at 128 px the halves fall on latent pixels."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    return mask


def horse_at(image_size: int = 128) -> np.ndarray:
    return pixels(prepare_image(Image.open(HORSE).convert("RGB"), image_size))


def test_an_all_white_mask_gives_exactly_the_unmasked_result(engine):
    request = config(translation_prompts="a robot horse; a cat", negative_prompt="blurry")
    unmasked = engine(request, HORSE)
    masked = engine(request, HORSE, mask=Image.new("L", (7, 3), 255))  # any size is stretched to the image
    assert masked.stats.cache_hit  # the mask is not part of the inversion's cache key
    assert masked.stats.unet_evals == unmasked.stats.phases["translation"].unet_evals  # and costs no evaluation
    for a, b in zip(unmasked.images, masked.images):
        assert np.array_equal(pixels(a), pixels(b))


def test_outside_the_mask_latents_follow_the_source_and_pixels_equal_the_input(engine, monkeypatch):
    request = config(translation_prompts="a robot horse; a cat", inversion_prompt="kept")
    engine(request, HORSE)  # caches the inversion
    (entry,) = [e for k, e in engine.cache.items() if k.inversion_prompt == "kept"]
    timesteps = engine.schedule.sampling_timesteps(10)
    unet_inputs, decoded = [], []
    handle = engine.model.unet.register_forward_pre_hook(lambda module, args: unet_inputs.append(args[0].clone()))
    decode = engine.model.decode_latents
    monkeypatch.setattr(engine.model, "decode_latents", lambda latents, size: decoded.append(latents) or decode(latents, size))
    try:
        result = engine(request, HORSE, mask=left_half_white())
    finally:
        handle.remove()
    assert len(unet_inputs) == 10  # one batched call per step
    for step, batch in enumerate(unet_inputs):  # rows: 2 prompts x (unconditional, conditional)
        expected = entry.latents[timesteps[step]][..., 8:].expand_as(batch[..., 8:])
        assert torch.equal(batch[..., 8:], expected), f"step {step}"
        assert not torch.equal(batch[..., :8], entry.latents[timesteps[step]][..., :8].expand_as(batch[..., :8])) or step == 0
    assert torch.equal(decoded[0][..., 8:], entry.image_latent[..., 8:].expand_as(decoded[0][..., 8:]))
    for image in result.images:
        out = pixels(image)
        assert np.array_equal(out[:, 64:], horse_at()[:, 64:])  # kept exactly
        assert np.abs(out[:, :64] - horse_at()[:, :64]).mean() > 5  # edited
    assert not np.array_equal(pixels(result.images[0]), pixels(result.images[1]))  # each prompt its own edit


def test_masked_translation_follows_the_latent_and_pixel_blends(engine):
    """Grey values blend: an independent loop (diffusers' DDIM step, avg-pooled mask, float64 pixel blend)."""
    ramp = np.tile(np.linspace(0, 255, 96).round().astype(np.uint8), (48, 1))  # stretched to 128x128
    request = config(feature_injection_threshold=0, attention_injection_threshold=0, translation_prompts="a cat", scale=7.5)
    result = engine(request, HORSE, mask=Image.fromarray(ramp))

    mask_pixels = torch.from_numpy(np.array(Image.fromarray(ramp).resize((128, 128), Image.Resampling.LANCZOS))).double() / 255
    latent_mask = torch.nn.functional.avg_pool2d(mask_pixels[None, None].float(), 8)
    timesteps = engine.schedule.sampling_timesteps(10)
    image_latent = source_latent(engine)
    z_src = invert(engine.model.unet, engine.schedule, image_latent, engine.model.encode_text([""]), 10, set(timesteps))
    kept = [z_src[t] for t in timesteps[1:]] + [image_latent]
    x = reference_sampling(
        engine, z_src[timesteps[0]], "a cat", 7.5, 10, after_step=lambda i, x: latent_mask * x + (1 - latent_mask) * kept[i]
    )
    with torch.no_grad():
        y = (engine.model.decode_latents(x, 4)[0].double() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    x_in = horse_at() / 255
    m = mask_pixels.numpy()[..., None]
    expected = np.round(255 * (m * y + (1 - m) * x_in))
    assert np.abs(pixels(result.images[0]) - expected).max() <= 1
    grey = (m > 0.2) & (m < 0.8)
    assert grey.any() and np.abs(pixels(result.images[0]) - horse_at())[grey[..., 0]].max() > 0


def mask_file(tmp_path, data: bytes):
    path = tmp_path / "mask.png"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("black", "selects nothing"),
        ("transparent", "selects nothing"),
        ("corrupt", "could not be read"),
        ("empty", "could not be read"),
        ("huge", "more than the limit"),
        ("generation", "only with an input_image"),
    ],
)
def test_bad_masks_are_refused_naming_mask_before_any_work(engine, tmp_path, monkeypatch, case, expected):
    from pnp import image_io

    request = config()
    mask: object = Image.new("L", (32, 32), 0)
    if case == "transparent":
        mask = Image.new("RGBA", (32, 32), (255, 255, 255, 0))  # white, but fully transparent: black
    elif case == "corrupt":
        mask = mask_file(tmp_path, b"\x89PNG\r\n\x1a\n not really")
    elif case == "empty":
        mask = mask_file(tmp_path, b"")
    elif case == "huge":
        monkeypatch.setattr(image_io, "MAX_INPUT_PIXELS", 512 * 512)  # the 512x512 input image passes
        mask = Image.new("L", (513, 512), 255)
    elif case == "generation":
        request, mask = config(generation_prompt="a horse"), Image.new("L", (32, 32), 255)
    evals = engine.unet_evals
    with pytest.raises(InputError) as error:
        engine(request, HORSE, mask=mask)
    assert error.value.input_name == "mask" and expected in str(error.value)
    assert engine.unet_evals == evals
