"""Images in and out (pnp.image_io): defensive decoding of odd and hostile files, working sizes, masks'
decoding, tensor conversion, rounding and saving; and that the engine refuses an unusable image before
any UNet work."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pnp import PnPConfig, PnPEngine, image_io
from pnp.config import OUTPUT_FORMAT
from pnp.errors import InputError, NonFiniteError
from pnp.image_io import (
    decoded_to_pixels,
    image_to_pixels,
    image_to_tensor,
    load_image,
    load_mask,
    pixels_to_images,
    prepare_image,
    save_images,
    working_size,
)
from tests.helpers import BLUE, FAST, GREEN, RED, WHITE, encode, halves, png_declaring


def red_left_blue_right(width: int = 40, height: int = 20) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return Image.fromarray(pixels)


def with_orientation(image: Image.Image, fmt: str, **options) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90 degrees clockwise
    return encode(image, fmt, exif=exif, **options)


# --- load_image: orientation, frames, modes --------------------------------------------------------------


def test_exif_orientation_rotates_png_exactly():
    loaded = load_image(with_orientation(red_left_blue_right(), "PNG"))
    assert loaded.size == (20, 40)
    # Turning clockwise brings the left (red) half to the top.
    expected = np.asarray(red_left_blue_right().transpose(Image.Transpose.ROTATE_270))
    assert np.array_equal(np.asarray(loaded), expected)
    assert loaded.getpixel((0, 0)) == RED and loaded.getpixel((19, 39)) == BLUE


def test_exif_orientation_rotates_jpeg():
    loaded = load_image(with_orientation(red_left_blue_right(), "JPEG", quality=95))
    assert loaded.size == (20, 40)
    # JPEG is lossy: compare corner colours with a tolerance.
    assert np.allclose(loaded.getpixel((0, 0)), RED, atol=40)
    assert np.allclose(loaded.getpixel((19, 39)), BLUE, atol=40)


def test_path_stream_and_pil_sources_agree(tmp_path):
    data = with_orientation(red_left_blue_right(), "PNG")
    path = tmp_path / "in.png"
    path.write_bytes(data)
    expected = np.asarray(load_image(data))
    for source in (path, str(path), io.BytesIO(data), Image.open(io.BytesIO(data))):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), expected)


def test_pil_input_is_not_modified():
    image = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert load_image(image).getpixel((0, 0)) == WHITE
    assert image.mode == "RGBA" and image.getpixel((0, 0)) == (255, 0, 0, 0)


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 128))
    image.putpixel((2, 0), (0, 255, 0, 255))
    loaded = load_image(encode(image))
    assert loaded.getpixel((0, 0)) == WHITE
    red, green, blue = loaded.getpixel((1, 0))
    assert red == 255 and abs(green - 127) <= 1 and abs(blue - 127) <= 1
    assert loaded.getpixel((2, 0)) == (0, 255, 0)


def test_la_is_composited_on_white():
    image = Image.new("LA", (2, 1), (0, 0))
    image.putpixel((1, 0), (0, 255))
    loaded = load_image(encode(image))
    assert loaded.getpixel((0, 0)) == WHITE and loaded.getpixel((1, 0)) == (0, 0, 0)


def test_palette_transparent_index_becomes_white():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    loaded = load_image(encode(image))
    assert loaded.getpixel((0, 0)) == WHITE and loaded.getpixel((1, 0)) == RED


def test_palette_without_transparency():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 255, 255, 0, 0])
    image.putpixel((1, 0), 1)
    loaded = load_image(encode(image))
    assert loaded.getpixel((0, 0)) == BLUE and loaded.getpixel((1, 0)) == RED


def test_grey_becomes_equal_channels():
    image = Image.fromarray(np.array([[0, 77, 200]], np.uint8))
    loaded = load_image(encode(image))
    assert [loaded.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (77, 77, 77), (200, 200, 200)]


@pytest.mark.parametrize("value, expected", [(0, 0), (32768, 128), (65535, 255), (257 * 100, 100)])
def test_16_bit_grey_png_is_scaled_not_clipped(value, expected):
    image = Image.fromarray(np.full((2, 2), value, np.uint16))
    assert image.mode == "I;16"
    data = encode(image)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert load_image(data).getpixel((0, 0)) == (expected,) * 3


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_other_16_bit_modes_are_scaled(mode):
    samples = np.full((2, 2), 32768, ">u2" if mode == "I;16B" else np.int32)
    image = Image.frombytes(mode, (2, 2), samples.tobytes())
    assert load_image(image).getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("value, expected", [(0.5, 128), (1.0, 255), (200.0, 200), (300.0, 255)])
def test_float_images(value, expected):
    image = Image.fromarray(np.full((2, 2), value, np.float32))
    assert image.mode == "F"
    assert load_image(image).getpixel((0, 0)) == (expected,) * 3


def test_cmyk_becomes_rgb():
    image = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    assert load_image(encode(image, "TIFF")).getpixel((0, 0)) == RED


def test_one_bit_image():
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    loaded = load_image(encode(image))
    assert loaded.getpixel((0, 0)) == (0, 0, 0) and loaded.getpixel((1, 0)) == WHITE


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animation_gives_its_first_frame(fmt):
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **options)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert load_image(data).getpixel((4, 4)) == RED


# --- load_image: refusals ---------------------------------------------------------------------------------


def assert_unreadable(source) -> InputError:
    with pytest.raises(InputError) as caught:
        load_image(source)
    assert type(caught.value) is InputError and caught.value.input_name == "input_image"
    assert str(caught.value).startswith("input_image: ") and "could not be read" in str(caught.value)
    return caught.value


def valid_png() -> bytes:
    return encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)))


def test_text_is_not_an_image():
    assert "not a recognised image format" in str(assert_unreadable(b"this is a text file, not an image\n" * 10))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert "empty" in str(assert_unreadable(path))
    assert "empty" in str(assert_unreadable(b""))


def test_truncated_png():
    data = valid_png()
    assert "truncated" in str(assert_unreadable(data[: len(data) // 2]))


def test_missing_path(tmp_path):
    assert "No such file" in str(assert_unreadable(tmp_path / "nowhere.png"))


def test_directory_path(tmp_path):
    assert_unreadable(tmp_path)


def test_zero_sized_pil_image():
    assert_unreadable(Image.new("RGB", (0, 0)))


def assert_too_large(source) -> InputError:
    with pytest.raises(InputError) as caught:
        load_image(source)
    assert type(caught.value) is InputError and caught.value.input_name == "input_image"
    assert str(caught.value).startswith("input_image: ")
    return caught.value


def test_declared_size_over_the_limit_is_refused_naming_the_limit():
    # 8000 x 8000 = 64M pixels: under Pillow's own limit, over the service's documented MAX_INPUT_PIXELS.
    assert 8000 * 8000 > image_io.MAX_INPUT_PIXELS
    assert f"more than the limit of {image_io.MAX_INPUT_PIXELS:,}" in str(assert_too_large(png_declaring(8000, 8000)))


def test_a_decompression_bomb_is_refused_as_too_large():
    # Declares 100000 x 100000 pixels in a file of ~100 bytes: Pillow's own bomb check refuses it.
    assert "too large" in str(assert_too_large(png_declaring(100_000, 100_000)))


def test_size_is_refused_before_decoding(monkeypatch):
    # Header intact (64 x 64), pixel data missing: decoding would fail as truncated, so only a check of
    # the declared size, made before decoding, can give the size error rather than a "could not be read" one.
    data = valid_png()
    header_only = data[: data.index(b"IDAT") + 20]
    assert_unreadable(header_only)
    monkeypatch.setattr(image_io, "MAX_INPUT_PIXELS", 1000)
    error = str(assert_too_large(header_only))
    assert "4,096 pixels" in error and "limit of 1,000" in error
    assert "could not be read" not in error


@pytest.mark.parametrize("pillow_limit", [100, 300])  # over twice Pillow's limit it raises, over once it warns
def test_pillow_decompression_bomb_check_becomes_input_error(monkeypatch, pillow_limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    error = assert_too_large(encode(Image.new("RGB", (20, 20))))
    assert f"{image_io.MAX_INPUT_PIXELS:,}" in str(error)


# --- working_size and prepare_image -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, height, image_size, expected",
    [
        (512, 512, 512, (512, 512)),
        (1000, 500, 512, (512, 256)),
        (500, 1000, 512, (256, 512)),
        (1, 1, 512, (512, 512)),
        (10000, 10, 512, (512, 64)),
        (640, 480, 512, (512, 384)),
        (300, 200, 128, (128, 64)),
        (512, 96, 512, (512, 128)),  # exactly 1.5 * 64: the half rounds up
        (96, 512, 512, (128, 512)),
        (1024, 159, 512, (512, 64)),  # 79.5 is under 1.5 * 64 = 96: down to 64
        (3_000_001, 281_250, 1024, (1024, 64)),  # just under 1.5 * 64
        (3_000_000, 281_250, 1024, (1024, 128)),  # exactly 1.5 * 64
    ],
)
def test_working_size_examples(width, height, image_size, expected):
    assert working_size(width, height, image_size) == expected


@pytest.mark.parametrize("image_size", [128, 512, 768, 1024])
def test_working_size_properties(image_size):
    rng = np.random.default_rng(image_size)
    for width, height in rng.integers(1, 5000, (200, 2)).tolist():
        size = working_size(width, height, image_size)
        assert all(side % 64 == 0 and side >= 64 for side in size)
        if max(width, height) <= 2 * min(width, height):
            assert max(size) == image_size
            assert size[0] >= size[1] if width >= height else size[0] <= size[1]


def test_prepare_image_keeps_an_image_already_of_working_size():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (256, 512, 3), np.uint8))
    prepared = prepare_image(image, 512)
    assert prepared is image
    assert np.array_equal(np.asarray(prepared), np.asarray(image))


@pytest.mark.parametrize("size, expected", [((1000, 500), (512, 256)), ((1, 1), (512, 512)), ((4000, 10), (512, 64))])
def test_prepare_image_resizes(size, expected):
    image = Image.new("RGB", size, (10, 200, 30))
    prepared = prepare_image(image, 512)
    assert prepared.size == expected
    assert prepared.getpixel((expected[0] // 2, expected[1] // 2)) == (10, 200, 30)


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise: the stored 256x128 image shows as 128x256
    return encode(halves(256, 128, RED, BLUE), "JPEG", quality=95, exif=exif)


def _palette() -> bytes:
    image = Image.new("P", (64, 64), 0)
    image.putpalette([*RED, *BLUE])
    image.paste(1, (32, 0, 64, 64))
    return encode(image)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (64, 64), RED), Image.new("RGB", (64, 64), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


# File bytes, their working size at image_size 128, and {(x, y) of the working-size image: its colour}.
ODD_FILES = {
    # Rotated first: the red left half ends on top; unrotated the working size would be (128, 64).
    "exif-rotated-jpeg": (_exif_rotated_jpeg, (64, 128), {(32, 20): RED, (32, 108): BLUE}),
    # The left half fully transparent: white.
    "rgba-transparent": (
        lambda: encode(halves(64, 64, (255, 0, 0, 0), (0, 0, 255, 255), "RGBA")),
        (128, 128),
        {(20, 64): WHITE, (108, 64): BLUE},
    ),
    "palette": (_palette, (128, 128), {(20, 64): RED, (108, 64): BLUE}),
    "cmyk-jpeg": (
        lambda: encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=95),
        (128, 128),
        {(64, 64): RED},
    ),
    "grey-16-bit-png": (
        lambda: encode(Image.fromarray(np.full((64, 64), 32768, np.uint16))),
        (128, 128),
        {(64, 64): (128, 128, 128)},
    ),
    "grey-L": (lambda: encode(Image.fromarray(np.full((64, 64), 77, np.uint8))), (128, 128), {(64, 64): (77, 77, 77)}),
    "animated-gif": (_animated_gif, (128, 128), {(64, 64): RED}),  # the first frame
    "one-pixel": (lambda: encode(Image.new("RGB", (1, 1), GREEN)), (128, 128), {(0, 0): GREEN, (127, 127): GREEN}),
    "2000x20": (
        lambda: encode(Image.new("RGB", (2000, 20), GREEN)),
        (128, 64),
        {(64, 32): GREEN},
    ),  # never a side under 64
}


@pytest.mark.parametrize("case", list(ODD_FILES))
def test_odd_files_become_rgb_images_of_their_working_size(tmp_path, case):
    """What the engine encodes for a file of each odd kind (docs/algorithm.md §2): decoded from a path,
    as the predictor hands it over, then brought to its working size."""
    make, size, colours = ODD_FILES[case]
    path = tmp_path / f"{case}.img"
    path.write_bytes(make())
    image = prepare_image(load_image(path), 128)
    assert image.mode == "RGB" and image.size == size
    for xy, colour in colours.items():
        # JPEG is lossy; the lossless formats come through exactly (up to resampling a flat colour).
        tolerance = 40 if "jpeg" in case else 1
        assert np.allclose(image.getpixel(xy), colour, atol=tolerance), (case, xy, image.getpixel(xy))


# --- tensors ----------------------------------------------------------------------------------------------


def test_image_to_tensor_layout_and_range():
    image = Image.new("RGB", (3, 2), (0, 255, 0))
    tensor = image_to_tensor(image)
    assert tensor.shape == (1, 3, 2, 3) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    assert torch.equal(tensor[0, 0], torch.full((2, 3), -1.0))
    assert torch.equal(tensor[0, 1], torch.full((2, 3), 1.0))


def test_round_trip_is_exact_for_every_value():
    values = np.arange(256, dtype=np.uint8)
    pixels = np.stack([values, values[::-1], np.roll(values, 7)], axis=-1).reshape(16, 16, 3)
    image = Image.fromarray(pixels)
    [back] = pixels_to_images(decoded_to_pixels(image_to_tensor(image)))
    assert back.mode == "RGB" and np.array_equal(np.asarray(back), pixels)


def test_decoded_pixels_are_clamped_and_rounded():
    def decoded_for(pixel: float) -> float:
        return 2 * pixel / 255 - 1

    values = [decoded_for(127.6), decoded_for(127.4), -3.0, 5.0]
    decoded = torch.tensor(values).view(1, 1, 1, 4).expand(2, 3, 1, 4)
    images = pixels_to_images(decoded_to_pixels(decoded))
    assert len(images) == 2
    assert [images[1].getpixel((x, 0)) for x in range(4)] == [(128,) * 3, (127,) * 3, (0,) * 3, (255,) * 3]


def test_decoded_float16_becomes_float32_pixels():
    pixels = decoded_to_pixels(torch.full((1, 3, 2, 2), 1.0, dtype=torch.float16))
    assert pixels.dtype == torch.float32
    [image] = pixels_to_images(pixels)
    assert image.getpixel((0, 0)) == WHITE


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_raise(bad):
    decoded = torch.zeros(1, 3, 4, 4, dtype=torch.float16)
    decoded[0, 1, 2, 3] = bad
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        decoded_to_pixels(decoded)


def test_image_to_pixels_is_uint8_over_255():
    image = Image.new("RGB", (3, 2), (0, 51, 255))
    pixels = image_to_pixels(image)
    assert pixels.shape == (1, 3, 2, 3) and pixels.dtype == torch.float32
    assert torch.equal(pixels[0, :, 0, 0], torch.tensor([0, 51, 255]) / 255)


# --- load_mask ----------------------------------------------------------------------------------------------


def test_mask_is_grey_over_255_at_the_working_size():
    grey = Image.new("L", (64, 64), 128)
    mask = load_mask(encode(grey), (64, 64))
    assert mask.shape == (1, 1, 64, 64) and mask.dtype == torch.float32
    assert torch.equal(mask, torch.full((1, 1, 64, 64), 128 / 255))
    # Colour is read as Pillow's grey ("L"): 0.299 R + 0.587 G + 0.114 B.
    assert load_mask(encode(Image.new("RGB", (8, 8), RED)), (8, 8))[0, 0, 0, 0] == pytest.approx(76 / 255)


def test_mask_is_stretched_to_the_working_size_ignoring_its_aspect_ratio():
    tall = Image.new("L", (10, 40), 0)
    tall.paste(255, (0, 0, 5, 40))  # left half white
    mask = load_mask(encode(tall), (128, 64))
    assert mask.shape == (1, 1, 64, 128)
    assert (mask[..., :24] == 1).all() and (mask[..., 104:] == 0).all()
    expected = np.asarray(tall.resize((128, 64), Image.Resampling.LANCZOS)) / 255
    assert np.allclose(mask[0, 0].numpy(), expected)


def test_mask_transparency_is_black_so_white_strokes_select():
    strokes = Image.new("RGBA", (16, 16), (255, 255, 255, 0))  # transparent white canvas
    strokes.paste((255, 255, 255, 255), (0, 0, 4, 16))  # opaque white stroke
    strokes.paste((255, 255, 255, 128), (8, 0, 12, 16))  # half-transparent white
    mask = load_mask(encode(strokes), (16, 16))[0, 0]
    assert (mask[:, :4] == 1).all() and (mask[:, 4:8] == 0).all() and (mask[:, 12:] == 0).all()
    assert mask[0, 8] == pytest.approx(128 / 255, abs=1 / 255)


def test_mask_exif_orientation_is_applied():
    mask = load_mask(with_orientation(red_left_blue_right(), "PNG"), (20, 40))[0, 0]
    # Turned clockwise, the red (brighter in grey) left half becomes the top.
    assert (mask[:20] > mask[20:].max()).all()


@pytest.mark.parametrize("data", [b"", b"not an image", encode(Image.new("L", (8, 8), 0))])
def test_mask_errors_name_mask(data):
    with pytest.raises(InputError) as caught:
        load_mask(data, (8, 8))
    assert caught.value.input_name == "mask"


# --- save_images ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", OUTPUT_FORMAT.choices)
def test_save_images_names_and_contents(tmp_path, output_format):
    images = [Image.new("RGB", (64, 128), RED), Image.new("RGB", (128, 64), BLUE)]
    out_dir = tmp_path / "new" / "dir"
    paths = save_images(images, out_dir, output_format)
    assert [p.name for p in paths] == [f"out-0.{output_format}", f"out-1.{output_format}"]
    assert all(p.parent == out_dir for p in paths)
    for path, image in zip(paths, images, strict=True):
        with Image.open(path) as saved:
            assert saved.format == {"jpg": "JPEG"}.get(output_format, output_format.upper())
            assert saved.size == image.size
            assert np.allclose(saved.convert("RGB").getpixel((10, 10)), image.getpixel((10, 10)), atol=8)


def test_save_images_refuses_unknown_format(tmp_path):
    with pytest.raises(InputError) as caught:
        save_images([Image.new("RGB", (64, 64))], tmp_path, "gif")
    assert caught.value.input_name == "output_format"
    assert all(name in str(caught.value) for name in OUTPUT_FORMAT.choices)
    assert not list(tmp_path.iterdir())


# --- the engine's input image --------------------------------------------------------------------------------


def test_the_engine_refuses_an_unreadable_image_before_any_work(engine: PnPEngine, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    evals = engine.unet_evals
    with pytest.raises(InputError) as error:
        engine(PnPConfig.from_mapping(FAST), bad)
    assert error.value.input_name == "input_image"
    assert "could not be read" in str(error.value)
    assert engine.unet_evals == evals


def test_no_image_and_no_generation_prompt_is_refused_naming_input_image(engine: PnPEngine):
    evals = engine.unet_evals
    with pytest.raises(InputError) as error:
        engine(PnPConfig.from_mapping(FAST), None)
    assert error.value.input_name == "input_image"
    assert "generation_prompt" in str(error.value)
    assert engine.unet_evals == evals
