"""Automatic masks from the prompts (pnp.automask; docs/algorithm.md §10): the masks against diffusers' own
DiffEdit `generate_mask`, the exactness of the kept source, one mask per prompt, their cost in UNet
evaluations, and the refusal of auto_mask with a painted mask.

The tiny random models give a real image a nearly uniform D map (its masks select a handful of latent
positions, 1 to 3 of 256 here), while their generated sources give structured ones (about 9% of the
positions): the comparison with diffusers uses generated sources, so that the masks are neither empty nor
full; the exactness tests run both.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMInverseScheduler,
    DDIMScheduler,
    StableDiffusionDiffEditPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from pnp import InputError, NonFiniteError, PnPConfig, PnPEngine
from pnp.automask import MASK_NOISES, AutoMasks, mask_timestep, noise_differences, threshold
from pnp.prompts import encode_prompts
from pnp.source import SourceLatents
from pnp.stats import PhaseTimer, RunStats
from tests.helpers import HORSE, config, horse_at, nan_unet_hook, pixels

GENERATED = {"generation_prompt": "a horse", "seed": 3}


def prepared_source(engine: PnPEngine, request: PnPConfig, image=None) -> SourceLatents:
    """The request's source as the engine prepares it (generated, or the image's inversion)."""
    engine.check_inputs(request, image, None)
    timer = PhaseTimer(RunStats(), engine.model.injection_unet, engine.model.device)
    run = engine.plan_run(engine.load_request(request, image, None, timer), timer)
    return engine.prepare_source(run, encode_prompts(engine.model, request))


def engine_masks(engine: PnPEngine, request: PnPConfig, image=None) -> AutoMasks:
    """The masks the engine computes for `request`: the source's text against each prompt."""
    source = prepared_source(engine, request, image)
    embeddings = encode_prompts(engine.model, request)
    texts = torch.cat([embeddings.source, embeddings.targets])
    seed = request.seed if request.seed is not None else 0
    return threshold(
        noise_differences(engine.model.injection_unet, engine.schedule, source.clean_latent, texts, seed, 16), 8
    )


def diffedit_pipeline(model_dir) -> StableDiffusionDiffEditPipeline:
    """diffusers' DiffEdit pipeline on the same checkpoint, its modules loaded anew (plain diffusers code)."""
    pipeline = StableDiffusionDiffEditPipeline(
        vae=AutoencoderKL.from_pretrained(model_dir / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(model_dir / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(model_dir / "unet"),
        scheduler=DDIMScheduler.from_pretrained(model_dir / "scheduler"),
        inverse_scheduler=DDIMInverseScheduler.from_pretrained(model_dir / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("model", ["sd1", "v"])
def test_masks_equal_diffusers_diffedit_generate_mask(engine, v_engine, tiny_model_dir, tiny_v_model_dir, model):
    """generate_mask with 10 maps, encode strength 0.5 (t_m = index 25 of 50 steps), ratio 3.0, the latent
    passed as the image, one target prompt a call (its threshold is shared across a batch). Its guidance
    (with its negative and positive embeddings swapped) scales the difference by a constant, and so does
    turning v into ε (both branches see the same z_k): the threshold cancels both."""
    pnp_engine, model_dir = (engine, tiny_model_dir) if model == "sd1" else (v_engine, tiny_v_model_dir)
    request = config(**GENERATED, translation_prompts="a robot horse; a zebra")
    masks = engine_masks(pnp_engine, request)
    latent = prepared_source(pnp_engine, request).clean_latent
    pipeline = diffedit_pipeline(model_dir)
    for index, prompt in enumerate(request.translation_prompts):
        theirs = pipeline.generate_mask(
            image=latent,
            target_prompt=prompt,
            source_prompt=request.generation_prompt,
            num_maps_per_mask=10,
            mask_encode_strength=0.5,
            mask_thresholding_ratio=3.0,
            num_inference_steps=50,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(request.seed),
        )
        ours = masks.latent_masks[index, 0].numpy()
        assert 0 < ours.mean() < 0.5, "a test case whose mask is neither empty nor full"
        np.testing.assert_array_equal(ours, theirs[0])


def test_mask_timestep_is_index_25_of_50(engine: PnPEngine):
    assert mask_timestep(engine.schedule) == 481  # SD's leading spacing: (49 - 25) * 20 + 1


def kept_region(masks: AutoMasks, index: int) -> np.ndarray:
    """Where prompt `index`'s pixels must equal the source's: farther than 12 pixels (along either axis, the
    blur's square support) from its mask grown by one latent position."""
    grown = F.max_pool2d(masks.latent_masks[index : index + 1], 3, stride=1, padding=1)
    near = F.max_pool2d(F.interpolate(grown, scale_factor=8, mode="nearest"), 25, stride=1, padding=12)
    return near[0, 0].numpy() == 0


@pytest.mark.parametrize("mode", ["real", "generation"])
def test_the_source_is_kept_exactly_far_from_each_mask(engine: PnPEngine, mode: str):
    inputs = {"inversion_prompt": "a horse"} if mode == "real" else GENERATED
    request = config(**inputs, translation_prompts="a robot horse; a zebra", auto_mask=True)
    image = HORSE if mode == "real" else None
    result = engine(request, image)
    masks = engine_masks(engine, request, image)
    assert result.stats.mask_coverage == pytest.approx(masks.coverage)
    assert all(coverage > 0 for coverage in masks.coverage)
    source = horse_at(128) if mode == "real" else pixels(result.images[0])
    targets = result.images[1:] if mode == "generation" else result.images
    assert len(targets) == len(result.masks) == 2
    for index, (image_out, mask_image) in enumerate(zip(targets, result.masks, strict=True)):
        kept = kept_region(masks, index)
        assert kept.mean() > 0.05  # a real test: part of the image (over 800 pixels) is far from the mask
        assert np.array_equal(pixels(image_out)[kept], source[kept])
        # Inside the latent mask the edit shows almost fully: m_px >= 0.95 (242 of 255 in the mask image).
        inside = F.interpolate(masks.latent_masks[index : index + 1], scale_factor=8, mode="nearest")[0, 0].numpy() > 0
        assert np.asarray(mask_image).shape == (128, 128) and (np.asarray(mask_image)[inside] >= 242).all()
        assert not np.array_equal(pixels(image_out)[inside], source[inside])  # and something was edited there
    # Each prompt its own mask.
    assert not torch.equal(masks.latent_masks[0], masks.latent_masks[1])


def test_a_batch_of_prompts_equals_one_prompt_at_a_time(engine: PnPEngine):
    prompts = ["a robot horse", "a zebra"]
    together = engine(config(**GENERATED, translation_prompts="; ".join(prompts), auto_mask=True), None)
    for index, prompt in enumerate(prompts):
        alone = engine(config(**GENERATED, translation_prompts=prompt, auto_mask=True), None)
        assert alone.stats.mask_coverage == [together.stats.mask_coverage[index]]
        assert np.array_equal(np.asarray(alone.masks[0]), np.asarray(together.masks[index]))
        assert np.abs(pixels(alone.images[1]) - pixels(together.images[1 + index])).max() <= 1


@pytest.mark.parametrize("prompts", [1, 3])
def test_auto_mask_costs_k_times_one_plus_p_unet_evaluations(engine: PnPEngine, prompts: int):
    request = config(inversion_prompt="a horse", translation_prompts="; ".join(["a cat", "a dog", "a zebra"][:prompts]))
    engine(request, HORSE)  # the inversion is cached from here on
    plain = engine(request, HORSE).stats
    masked = engine(request.replace(auto_mask=True), HORSE).stats
    assert plain.cache_hit and masked.cache_hit  # with a cached inversion the mask still costs its passes
    assert masked.phases["mask"].unet_evals == MASK_NOISES * (1 + prompts)
    assert masked.unet_evals - plain.unet_evals == MASK_NOISES * (1 + prompts)
    assert {name: p.unet_evals for name, p in masked.phases.items() if name != "mask"} == {
        name: p.unet_evals for name, p in plain.phases.items() if name != "mask"
    }


def test_the_negative_prompt_does_not_change_the_masks(engine: PnPEngine):
    request = config(**GENERATED, translation_prompts="a robot horse; a zebra", auto_mask=True)
    plain = engine(request, None)
    negative = engine(request.replace(negative_prompt="a blurry photo", negative_prompt_alpha=0.5), None)
    assert negative.stats.mask_coverage == plain.stats.mask_coverage
    for a, b in zip(plain.masks, negative.masks, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_prompt_that_says_nothing_new_edits_nothing(engine: PnPEngine, pnp_logs):
    # The prompt is the generation prompt itself: D = 0, no mask, and its image is the source's exactly.
    with pnp_logs.at_level(logging.INFO, logger="pnp"):
        result = engine(config(**GENERATED, translation_prompts="a horse", auto_mask=True), None)
    assert result.stats.mask_coverage == [0.0]
    assert np.array_equal(pixels(result.images[1]), pixels(result.images[0]))
    assert "'a horse' predicts the same noise as the source's description; it edits nothing" in pnp_logs.text


def test_differences_are_float32_in_half_precision(bf16_engine: PnPEngine):
    request = config(**GENERATED, translation_prompts="a robot horse")
    source = prepared_source(bf16_engine, request)
    texts = bf16_engine.model.encode_text(["a horse", "a robot horse"])
    differences = noise_differences(
        bf16_engine.model.injection_unet, bf16_engine.schedule, source.clean_latent, texts, 3, 16
    )
    assert differences.dtype == torch.float32 and differences.shape == (1, 16, 16)
    assert torch.isfinite(differences).all() and differences.mean() > 0
    result = bf16_engine(request.replace(auto_mask=True), None)
    assert len(result.masks) == 1 and result.stats.phases["mask"].unet_evals == 20


def test_non_finite_noise_predictions_are_an_error_not_an_empty_mask(engine: PnPEngine):
    # NaN > threshold is false everywhere: unchecked, a broken mask would silently edit nothing.
    latent = torch.zeros((1, 4, 16, 16))
    texts = engine.model.encode_text(["a horse", "a zebra"])
    handle = engine.model.unet.register_forward_hook(nan_unet_hook({}, only_below_float32=False))
    try:
        with pytest.raises(NonFiniteError, match="automatic mask"):
            noise_differences(engine.model.injection_unet, engine.schedule, latent, texts, 0, 16)
    finally:
        handle.remove()


def test_auto_mask_with_a_painted_mask_is_refused_before_any_work(engine: PnPEngine):
    evals = engine.unet_evals
    with pytest.raises(InputError, match="auto_mask: cannot be used together with mask"):
        engine(config(auto_mask=True), HORSE, mask=Image.new("L", (8, 8), 255))
    assert engine.unet_evals == evals


def test_auto_mask_must_be_a_boolean():
    with pytest.raises(InputError, match="auto_mask: must be true or false, not 'yes'"):
        PnPConfig.from_mapping({"auto_mask": "yes"})
