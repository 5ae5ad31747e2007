"""Region editing with a mask (pnp.region; docs/algorithm.md §8): the latent and pixel blends, that the input
is kept exactly outside the mask at no UNet cost, and the masks the engine refuses before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pnp import InputError, PnPEngine, image_io
from pnp.inversion import invert
from tests.helpers import HORSE, config, horse_at, pixels, reference_sampling, source_latent, write


def left_half_white(width: int = 128, height: int = 128) -> Image.Image:
    """White (edit) on the left half, black (keep) on the right; at 128 px the halves fall on latent pixels."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    return mask


def test_an_all_white_mask_gives_exactly_the_unmasked_result(engine: PnPEngine):
    request = config(translation_prompts="a robot horse; a cat", negative_prompt="blurry")
    unmasked = engine(request, HORSE)
    masked = engine(request, HORSE, mask=Image.new("L", (7, 3), 255))  # any size is stretched to the image
    assert masked.stats.cache_hit  # the mask is not part of the inversion's cache key
    assert masked.stats.unet_evals == unmasked.stats.phases["translation"].unet_evals  # and costs no evaluation
    for a, b in zip(unmasked.images, masked.images, strict=True):
        assert np.array_equal(pixels(a), pixels(b))


def test_outside_the_mask_latents_follow_the_source_and_pixels_equal_the_input(engine: PnPEngine, monkeypatch):
    request = config(translation_prompts="a robot horse; a cat", inversion_prompt="kept")
    engine(request, HORSE)  # caches the inversion
    (entry,) = [e for k, e in engine.cache.items() if k.inversion_prompt == "kept"]
    timesteps = engine.schedule.sampling_timesteps(10)
    unet_inputs, decoded = [], []
    handle = engine.model.unet.register_forward_pre_hook(lambda module, args: unet_inputs.append(args[0].clone()))
    decode = engine.model.decode_latents
    monkeypatch.setattr(
        engine.model, "decode_latents", lambda latents, size: decoded.append(latents) or decode(latents, size)
    )
    try:
        result = engine(request, HORSE, mask=left_half_white())
    finally:
        handle.remove()
    assert len(unet_inputs) == 10  # one batched call per step
    for step, batch in enumerate(unet_inputs):  # rows: 2 prompts x (unconditional, conditional)
        expected = entry.latents[timesteps[step]][..., 8:].expand_as(batch[..., 8:])
        assert torch.equal(batch[..., 8:], expected), f"step {step}"
        assert (
            not torch.equal(batch[..., :8], entry.latents[timesteps[step]][..., :8].expand_as(batch[..., :8]))
            or step == 0
        )
    assert torch.equal(decoded[0][..., 8:], entry.image_latent[..., 8:].expand_as(decoded[0][..., 8:]))
    for image in result.images:
        out = pixels(image)
        assert np.array_equal(out[:, 64:], horse_at()[:, 64:])  # kept exactly
        assert np.abs(out[:, :64] - horse_at()[:, :64]).mean() > 5  # edited
    assert not np.array_equal(pixels(result.images[0]), pixels(result.images[1]))  # each prompt its own edit


def test_masked_translation_follows_the_latent_and_pixel_blends(engine: PnPEngine):
    """Grey values blend: an independent loop (diffusers' DDIM step, avg-pooled mask, float64 pixel blend)."""
    ramp = np.tile(np.linspace(0, 255, 96).round().astype(np.uint8), (48, 1))  # stretched to 128x128
    request = config(
        feature_injection_threshold=0, attention_injection_threshold=0, translation_prompts="a cat", scale=7.5
    )
    result = engine(request, HORSE, mask=Image.fromarray(ramp))

    mask_pixels = (
        torch.from_numpy(np.array(Image.fromarray(ramp).resize((128, 128), Image.Resampling.LANCZOS))).double() / 255
    )
    latent_mask = torch.nn.functional.avg_pool2d(mask_pixels[None, None].float(), 8)
    timesteps = engine.schedule.sampling_timesteps(10)
    image_latent = source_latent(engine)
    z_src = invert(
        engine.model.injection_unet, engine.schedule, image_latent, engine.model.encode_text([""]), 10, set(timesteps)
    )
    kept = [z_src[t] for t in timesteps[1:]] + [image_latent]
    x = reference_sampling(
        engine,
        z_src[timesteps[0]],
        "a cat",
        7.5,
        10,
        after_step=lambda i, x: latent_mask * x + (1 - latent_mask) * kept[i],
    )
    with torch.no_grad():
        y = (engine.model.decode_latents(x, 4)[0].double() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    x_in = horse_at() / 255
    m = mask_pixels.numpy()[..., None]
    expected = np.round(255 * (m * y + (1 - m) * x_in))
    assert np.abs(pixels(result.images[0]) - expected).max() <= 1
    grey = (m > 0.2) & (m < 0.8)
    assert grey.any() and np.abs(pixels(result.images[0]) - horse_at())[grey[..., 0]].max() > 0


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
def test_bad_masks_are_refused_naming_mask_before_any_work(engine: PnPEngine, tmp_path, monkeypatch, case, expected):
    request = config()
    mask: object = Image.new("L", (32, 32), 0)
    if case == "transparent":
        mask = Image.new("RGBA", (32, 32), (255, 255, 255, 0))  # white, but fully transparent: black
    elif case == "corrupt":
        mask = write(tmp_path, "mask.png", b"\x89PNG\r\n\x1a\n not really")
    elif case == "empty":
        mask = write(tmp_path, "mask.png", b"")
    elif case == "huge":
        monkeypatch.setattr(image_io, "MAX_INPUT_PIXELS", 512 * 512)  # the 512x512 input image passes
        mask = Image.new("L", (513, 512), 255)
    elif case == "generation":
        request, mask = config(generation_prompt="a horse"), Image.new("L", (32, 32), 255)
    evals = engine.unet_evals
    with pytest.raises(InputError) as error:
        engine(request, HORSE, mask=mask)
    assert type(error.value) is InputError
    assert error.value.input_name == "mask" and str(error.value).startswith("mask: ")
    assert expected in str(error.value)
    assert engine.unet_evals == evals
