"""Running out of memory (docs/cost-model.md §7): a request that meets a CUDA out-of-memory error frees what
it does not need, halves its latents per UNet or VAE call and runs the failed phase again, down to one
latent per call; where even that does not fit, a clear error, and the next request works. On the CPU a
UNet that raises `torch.OutOfMemoryError` for calls of more than k latents stands in for a small GPU."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from pnp import InputError, ModelError, PnPEngine
from pnp.memory_policy import batch_latent_pixels_setting
from tests.helpers import HORSE, config, entries_for, pixels


class SmallMemory:
    """The UNet's forward, failing as CUDA does when a call carries more than `limit` latents."""

    def __init__(self, forward, limit: int):
        self.forward, self.limit, self.refused = forward, limit, []

    def __call__(self, latents: torch.Tensor, *args, **kwargs):
        if latents.shape[0] > self.limit:
            self.refused.append(latents.shape[0])
            raise torch.OutOfMemoryError(f"CUDA out of memory (a call of {latents.shape[0]} latents)")
        return self.forward(latents, *args, **kwargs)


@pytest.fixture
def small_memory(engine: PnPEngine, monkeypatch) -> Iterator:
    """Install a limit of k latents per UNet call on the session engine, for the test's duration."""
    unet = engine.model.injection_unet

    def install(limit: int) -> SmallMemory:
        fault = SmallMemory(unet.unet_forward, limit)
        monkeypatch.setattr(unet, "unet_forward", fault)
        return fault

    yield install


def test_a_request_that_runs_out_of_memory_completes_with_the_same_images(engine: PnPEngine, small_memory):
    # 2 prompts: extraction calls of 8 latents, translation calls of 4 (2 branches x 2 prompts), at most 2 fit.
    request = config(translation_prompts="a robot horse; a zebra", inversion_prompt="memory", auto_mask=True)
    unconstrained = engine(request, HORSE)
    engine.cache.clear()
    fault = small_memory(2)
    result = engine(request, HORSE)
    assert fault.refused  # it did run out of memory
    assert result.stats.memory_retries == len(fault.refused) > 0
    assert "out-of-memory retries" in result.stats.summary()
    assert result.stats.mask_coverage == unconstrained.stats.mask_coverage
    for constrained, free in zip(result.images, unconstrained.images, strict=True):
        assert np.abs(pixels(constrained) - pixels(free)).max() <= 1  # other batch sizes, same images
    # The entry is whole: a repeat needs no inversion or extraction.
    ((_, entry),) = entries_for(engine, "memory")
    assert entry.is_finite() and engine(request, HORSE).stats.cache_hit


def test_the_failed_phase_starts_again_and_the_ones_before_it_stand(engine: PnPEngine, small_memory):
    engine.cache.clear()
    small_memory(2)
    stats = engine(config(translation_prompts="a robot horse; a zebra", inversion_prompt="phases"), HORSE).stats
    # Extraction (8 latents a call) failed twice (8, then 4) before 2 per call fitted; the inversion (one
    # latent a call) ran once: 10 evaluations. Translation then ran at 2 per call from the start.
    assert stats.phases["inversion"].unet_evals == 10
    assert stats.phases["extraction"].unet_evals == 8
    assert stats.memory_retries == 2
    assert stats.phases["translation"].unet_evals == 40


def test_when_even_one_latent_does_not_fit_the_error_is_clear_and_the_next_request_works(
    engine: PnPEngine, small_memory, monkeypatch
):
    engine(config(inversion_prompt="kept"), HORSE)  # an entry of another request, dropped to free memory
    fault = small_memory(0)
    with pytest.raises(InputError, match="image_size: a 128x128 working size with 2 translation_prompts does not fit"):
        engine(config(translation_prompts="a cat; a dog", inversion_prompt="too large"), HORSE)
    assert fault.refused == [1, 1]  # the inversion's first call, and once more after the memory was freed
    assert entries_for(engine, "too large") == []  # nothing partial was stored
    assert entries_for(engine, "kept") == []  # the memory of unused entries was given back
    assert engine.model.injection_unet.idle
    monkeypatch.undo()  # the memory is back
    assert len(engine(config(translation_prompts="a cat; a dog"), HORSE).images) == 2


def test_the_latents_per_call_come_from_pnp_batch_latent_pixels(monkeypatch, tiny_model_dir):
    monkeypatch.delenv("PNP_BATCH_LATENT_PIXELS", raising=False)
    assert batch_latent_pixels_setting() is None  # unset: chosen from the free memory
    monkeypatch.setenv("PNP_BATCH_LATENT_PIXELS", "256")  # one 16x16 latent (128 px) per call
    engine = PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu")
    assert engine.batch_latent_pixels == 256
    calls = []
    engine.model.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    engine(config(translation_prompts="a cat; a dog"), HORSE)
    assert set(calls) == {1}
    for bad in ("0", "-5", "lots"):
        monkeypatch.setenv("PNP_BATCH_LATENT_PIXELS", bad)
        with pytest.raises(ModelError, match="PNP_BATCH_LATENT_PIXELS: must be a positive whole number"):
            batch_latent_pixels_setting()


def test_a_vae_decoder_call_that_runs_out_of_memory_decodes_fewer_images(engine: PnPEngine, monkeypatch):
    request = config(translation_prompts="a cat; a dog; a zebra", inversion_prompt="decoder")
    unconstrained = engine(request, HORSE)
    decode, refused = engine.model.vae_decode, []

    def small_memory(latents: torch.Tensor):
        if latents.shape[0] > 1:
            refused.append(latents.shape[0])
            raise torch.OutOfMemoryError(f"CUDA out of memory (a decoder call of {latents.shape[0]} latents)")
        return decode(latents)

    monkeypatch.setattr(engine.model, "vae_decode", small_memory)
    result = engine(request, HORSE)
    assert refused == [3]  # the failed call's 3 images halved: 1 a call
    assert result.stats.memory_retries == 1 and result.stats.vae_batch == 1
    assert result.stats.phases["translation"].unet_evals == 60  # the UNet phases ran once
    for constrained, free in zip(result.images, unconstrained.images, strict=True):
        assert np.abs(pixels(constrained) - pixels(free)).max() <= 1

    def no_memory(latents: torch.Tensor):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(engine.model, "vae_decode", no_memory)
    with pytest.raises(InputError, match="even one image per VAE decoder call"):
        engine(request, HORSE)
