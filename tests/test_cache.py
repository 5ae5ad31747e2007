"""The inversion cache (pnp.cache; docs/cost-model.md §5): least recently used out within a byte bound, what
an entry holds, what a repeat costs, that only complete and finite entries are kept, and that the
float32 retry's entry serves later half-precision requests."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from pnp import PnPEngine
from pnp.cache import SourceCache, SourceEntry, SourceKey
from pnp.injection import RESNET_KEY, InjectionSteps, SourceFeatures
from pnp.memory import MemoryModel, RequestShape
from pnp.stats import CacheUse
from tests.helpers import HORSE, config, entries_for, model_dtypes, nan_unet_hook, pixels


def entry_of(nbytes: int) -> SourceEntry:
    return SourceEntry(
        torch.zeros(0), {0: torch.zeros(nbytes // 4)}, SourceFeatures({}, InjectionSteps(0, 0), guidance_halves=False)
    )


def key(name: str) -> SourceKey:
    return SourceKey("model", "torch.float32", name, 64, 64, 50, 50, "")


def cached_features(engine: PnPEngine, inversion_prompt: str) -> SourceFeatures:
    ((_, entry),) = entries_for(engine, inversion_prompt)
    return entry.features


def test_cache_evicts_least_recently_used_within_its_byte_bound():
    cache = SourceCache(max_bytes=1000)
    cache.put(key("a"), entry_of(400))
    cache.put(key("b"), entry_of(400))
    assert cache.get(key("a")) is not None  # a is now the most recent
    cache.put(key("c"), entry_of(400))
    assert key("b") not in cache and key("a") in cache and key("c") in cache
    assert cache.nbytes <= 1000
    cache.put(key("huge"), entry_of(4000))
    assert key("huge") not in cache and len(cache) == 2


@pytest.mark.parametrize("where", ["image_latent", "latents", "features"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_an_entry_with_a_non_finite_tensor_anywhere_is_not_finite(where, bad):
    def entry(poisoned: bool) -> SourceEntry:
        tensors = {name: torch.zeros(2, 3) for name in ("image_latent", "latents", "features")}
        if poisoned:
            tensors[where][1, 2] = bad
        features = SourceFeatures({RESNET_KEY: tensors["features"]}, InjectionSteps(2, 0), guidance_halves=False)
        return SourceEntry(tensors["image_latent"], {981: torch.zeros(1), 901: tensors["latents"]}, features)

    assert entry(poisoned=False).is_finite()
    assert not entry(poisoned=True).is_finite()


def test_an_entry_holds_only_the_injected_steps(engine: PnPEngine):
    stats = engine(config(inversion_prompt="defaults"), HORSE).stats
    assert stats.phases["extraction"].unet_evals == 8  # max(n_f, n_a) = max(8, 5)
    features = cached_features(engine, "defaults")
    assert features.injection_steps == InjectionSteps(8, 5)
    assert {len(t) for k, t in features.features.items() if k != RESNET_KEY} == {5}
    assert len(features.features[RESNET_KEY]) == 8
    # Nothing else is held: each kept tensor owns exactly its own memory.
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in features.features.values())


def test_a_repeat_gives_identical_images_for_only_the_translation(engine: PnPEngine):
    request = config(translation_prompts="a cat", inversion_prompt="repeat")
    first = engine(request, HORSE)
    assert not first.stats.cache_hit
    second = engine(request, Image.open(HORSE))  # same pixels, another object
    assert second.stats.cache_hit
    assert second.stats.unet_evals == second.stats.phases["translation"].unet_evals == 20
    assert np.array_equal(pixels(first.images[0]), pixels(second.images[0]))
    other_prompt = engine(request.replace(inversion_prompt="repeat, another inversion prompt"), HORSE)
    assert not other_prompt.stats.cache_hit  # the inversion prompt is part of the key


def test_longer_injection_extracts_again_for_the_longer_of_both_requests(engine: PnPEngine, tiny_model_dir):
    short = config(inversion_prompt="steps", feature_injection_threshold=0.3, attention_injection_threshold=0.5)
    assert engine(short, HORSE).stats.phases["extraction"].unet_evals == 5
    within = engine(short.replace(feature_injection_threshold=0.2, attention_injection_threshold=0.4), HORSE).stats
    assert within.cache_hit and within.unet_evals == within.phases["translation"].unet_evals
    longer = short.replace(feature_injection_threshold=0.6, attention_injection_threshold=0.2)
    stats = engine(longer, HORSE).stats
    # The inversion came from the cache, the features did not: reported as a widened entry, not a hit, and
    # the memory model counts the new features.
    assert stats.cache is CacheUse.WIDENED and not stats.cache_hit and stats.metrics()["cache"] == "widened"
    assert "features extracted for more steps" in stats.summary()
    assert stats.phases["inversion"].unet_evals == 0
    shape = RequestShape.of(longer, (128, 128), generated=False, new_source=True)
    assert stats.modelled_bytes == MemoryModel.of(engine.model).request_bytes(shape, stats.unet_batch, stats.vae_batch)
    assert stats.phases["extraction"].unet_evals == 6  # one batched pass for n_f = 6, keeping n_a = 5
    extended = cached_features(engine, "steps")
    assert extended.injection_steps == InjectionSteps(6, 5)
    reference = PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu")  # a fresh cache computes them in one go
    reference(longer.replace(attention_injection_threshold=0.5), HORSE)
    (fresh,) = [e.features for _, e in reference.cache.items()]
    assert extended.features.keys() == fresh.features.keys()
    for name, tensor in fresh.features.items():
        # Equal up to float noise from batching the timesteps differently; a step out of place is far off.
        torch.testing.assert_close(extended.features[name], tensor, atol=1e-4, rtol=1e-4)


def test_a_request_that_fails_midway_leaves_no_cache_entry(engine: PnPEngine):
    request = config(inversion_prompt="cancelled")
    calls = []

    def fail_during_extraction(module, args, kwargs):
        calls.append(1)
        if len(calls) == 11:  # 10 inversion calls, then one batched extraction call
            raise KeyboardInterrupt("cancelled")

    entries = len(engine.cache)
    handle = engine.model.unet.register_forward_pre_hook(fail_during_extraction, with_kwargs=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            engine(request, HORSE)
    finally:
        handle.remove()
    assert len(calls) == 11 and len(engine.cache) == entries and entries_for(engine, "cancelled") == []
    stats = engine(request, HORSE).stats
    assert not stats.cache_hit and stats.phases["inversion"].unet_evals == 10


def test_the_float32_retry_serves_later_half_precision_requests(bf16_engine: PnPEngine, pnp_logs):
    """docs/conventions.md §8: a request whose bfloat16 inversion is not finite runs again in float32, and
    its float32 entry serves later bfloat16 requests."""
    request = config(inversion_prompt="retried once")
    calls: dict = {}
    handle = bf16_engine.model.unet.register_forward_hook(nan_unet_hook(calls, only_below_float32=True))
    try:
        result = bf16_engine(request, HORSE)
    finally:
        handle.remove()
    assert calls.get(torch.bfloat16, 0) > 0 and calls.get(torch.float32, 0) > 0  # failed, then ran again
    assert [image.size for image in result.images] == [(128, 128)] and pixels(result.images[0]).std() > 0  # not black
    retries = [r for r in pnp_logs.records if r.name == "pnp.models" and r.levelno == logging.WARNING]
    assert any("float32" in r.getMessage() for r in retries)
    assert model_dtypes(bf16_engine) == {torch.bfloat16}  # back in its own dtype
    # The stats are the request's cost: both runs, the retry's inversion after the failed one.
    assert result.stats.float32_retry and result.stats.phases["inversion"].unet_evals == 2 * 10
    assert "float32 retry" in result.stats.summary().splitlines()[-1]
    # Its memory figures are the float32 run's: the model's in float32, twice bfloat16's values.
    shape = RequestShape.of(request, (128, 128), generated=False, new_source=True)
    bfloat16_model = MemoryModel.of(bf16_engine.model)  # the engine is back in bfloat16
    float32_model = replace(bfloat16_model, value_bytes=4, weight_bytes=2 * bfloat16_model.weight_bytes)
    at_its_batches = (shape, result.stats.unet_batch, result.stats.vae_batch)
    assert float32_model.request_bytes(*at_its_batches) > bfloat16_model.request_bytes(*at_its_batches)
    assert result.stats.modelled_bytes == float32_model.request_bytes(*at_its_batches)
    (key,) = [key for key, _ in entries_for(bf16_engine, "retried once")]
    assert key.dtype == "torch.float32"
    # The next bfloat16 request reuses the float32 inversion instead of failing its own first.
    stats = bf16_engine(request.replace(translation_prompts="a zebra"), HORSE).stats
    assert stats.cache_hit and stats.unet_evals == stats.phases["translation"].unet_evals == 20
    assert not stats.float32_retry
    assert model_dtypes(bf16_engine) == {torch.bfloat16}
