"""DDIM inversion and the source features of a real image (pnp.inversion; docs/algorithm.md §3-§4),
against diffusers' own inverse scheduler and independent loops."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler

from pnp import PnPEngine
from pnp.injection import RESNET_KEY, FeatureRecorder, InjectionSteps, attention_keys
from pnp.inversion import invert
from tests.helpers import HORSE, SiteRecorder, config, reference_scheduler, site_features, source_latent


def test_inversion_equals_diffusers_ddim_inverse_scheduler(engine: PnPEngine):
    latent = source_latent(engine)
    inverse = DDIMInverseScheduler.from_config(engine.model.scheduler_config, clip_sample=False, set_alpha_to_one=False)
    inverse.set_timesteps(10)
    taus = [int(t) for t in inverse.timesteps]
    assert taus == engine.schedule.inversion_timesteps(10)
    text = engine.model.encode_text(["a horse"])
    kept = invert(engine.model.injection_unet, engine.schedule, latent, text, 10, set(taus))
    assert sorted(kept) == taus
    z = latent.float()
    with torch.no_grad():
        for tau in taus:
            eps = engine.model.unet(z, tau, encoder_hidden_states=text).sample
            z = inverse.step(eps, tau, z).prev_sample
            torch.testing.assert_close(kept[tau], z, atol=1e-5, rtol=1e-5)
    # The first step starts from ᾱ[0] (set_alpha_to_one=False), not 1, in both.
    assert engine.schedule.final_alpha_cumprod == pytest.approx(float(inverse.alphas_cumprod[0]))


def test_v_prediction_inversion_converts_each_output(v_engine: PnPEngine):
    latent = source_latent(v_engine)
    taus = v_engine.schedule.inversion_timesteps(10)
    kept = invert(
        v_engine.model.injection_unet, v_engine.schedule, latent, v_engine.model.encode_text([""]), 10, set(taus)
    )
    alphas = reference_scheduler(v_engine, 10).alphas_cumprod.double()
    z = latent.double()
    with torch.no_grad():
        for i, tau in enumerate(taus):
            a = alphas[tau]
            a_prev = alphas[taus[i - 1]] if i else alphas[0]
            v = v_engine.model.unet(
                z.float(), tau, encoder_hidden_states=v_engine.model.encode_text([""])
            ).sample.double()
            eps = a.sqrt() * v + (1 - a).sqrt() * z
            z = a.sqrt() * (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt() + (1 - a).sqrt() * eps
            torch.testing.assert_close(kept[tau].double(), z, atol=1e-4, rtol=1e-4)


def test_source_features_use_the_empty_prompt_whatever_the_inversion_prompt(engine: PnPEngine):
    """docs/algorithm.md §4 and docs/conventions.md §5: the inversion prompt conditions the inversion only."""
    request = config(inversion_prompt="a brown horse", translation_prompts="a cat")
    engine(request, HORSE)
    # Cache items are least recently used first: the last one is the entry the request just used.
    conditioned_key, conditioned = engine.cache.items()[-1]
    engine(request.replace(inversion_prompt=""), HORSE)
    plain_key, plain = engine.cache.items()[-1]
    assert (conditioned_key.inversion_prompt, plain_key.inversion_prompt) == ("a brown horse", "")
    assert conditioned_key.image_digest == plain_key.image_digest
    timesteps = engine.schedule.sampling_timesteps(10)
    # The inversion prompt conditions the inversion: its latents differ.
    assert not torch.allclose(conditioned.latents[timesteps[0]], plain.latents[timesteps[0]])
    texts = {prompt: engine.model.encode_text([prompt]) for prompt in ("", "a brown horse")}
    for step in (0, 3):
        t = timesteps[step]
        seen: dict[str, dict[str, torch.Tensor]] = {}
        for prompt, text in texts.items():
            with SiteRecorder(engine.model.unet) as recorder, torch.no_grad():
                engine.model.unet(conditioned.latents[t], t, encoder_hidden_states=text)
            seen[prompt] = {}
            for name, (module, inputs, _) in recorder.calls[0].items():
                seen[prompt].update(site_features(name, module, inputs))
        for key in (RESNET_KEY, *attention_keys()):
            cached = conditioned.features.features[key][step][0]
            torch.testing.assert_close(cached, seen[""][key][0], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(cached, seen["a brown horse"][key][0], atol=1e-5), key


def test_feature_recorder_keeps_exactly_the_injected_steps_of_each_call():
    """Calls of 3 steps, 2 sources a step: the ResNet site keeps 4 steps, the attention sites 2; rows past
    those are dropped, and the kept ones are copies in tensors of their final size."""
    query = attention_keys()[0]
    recorder = FeatureRecorder(
        InjectionSteps(feature_injection_steps=4, attention_injection_steps=2), guidance_halves=True
    )
    calls = [torch.arange(start * 2, (start + 3) * 2, dtype=torch.float32).reshape(6, 1) for start in (0, 3)]
    for start, rows in zip((0, 3), calls, strict=True):
        recorder.record(start, {RESNET_KEY: rows, query: rows + 100})
    calls[0].zero_()  # what was recorded does not alias the capture
    features = recorder.features()
    assert features.injection_steps == InjectionSteps(4, 2)
    assert features.features[RESNET_KEY].squeeze(-1).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert features.features[query].squeeze(-1).tolist() == [[100, 101], [102, 103]]
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in features.features.values())
