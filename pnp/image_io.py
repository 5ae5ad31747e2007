"""Images in and out of the engine: decode untrusted input safely, size it, and convert to and from tensors."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import check_output_format
from .errors import InputError, NonFiniteError

ImageSource = str | os.PathLike | bytes | BinaryIO | Image.Image

MAX_INPUT_PIXELS: int = 50_000_000
"""Most pixels an input image may declare. A small compressed file can declare a huge canvas (a decompression
bomb) that would exhaust memory when decoded, so the declared size is checked before any pixel is read."""

_SAVE_OPTIONS: dict[str, tuple[str, dict]] = {
    "png": ("PNG", {}),
    "webp": ("WEBP", {"quality": 95}),
    "jpg": ("JPEG", {"quality": 95}),
}


def load_image(source: ImageSource) -> Image.Image:
    """Decode a path, bytes, binary stream or PIL image into a fully loaded RGB image.

    EXIF orientation is applied, an animation gives its first frame, transparency is composited on white,
    and high-bit-depth grey is scaled to 8 bits. Anything unreadable raises `InputError("input_image", ...)`.
    """
    return _to_rgb(_decode(source, "input_image"), background=(255, 255, 255))


def load_mask(source: ImageSource, size: tuple[int, int]) -> torch.Tensor:
    """The edit region of a mask file at the working `size` (W, H): m_px, (1, 1, H, W) float32 in [0, 1].

    Decoded like an input image, but transparency is composited on black, so a transparent PNG with
    white strokes selects the strokes; then grey ("L"), resized to `size` with LANCZOS (the aspect ratio
    is not kept) unless it has that size, and divided by 255: 1 (white) edits, 0 (black) keeps the input
    (docs/algorithm.md §8). Unreadable masks and masks that select nothing raise `InputError("mask", ...)`.
    """
    mask = _to_rgb(_decode(source, "mask"), background=(0, 0, 0)).convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.LANCZOS)
    values = torch.from_numpy(np.array(mask)).float() / 255
    if not values.any():
        raise InputError("mask", "selects nothing: it is black everywhere; paint the region to edit white")
    return values[None, None]


def _decode(source: ImageSource, input_name: str) -> Image.Image:
    """The EXIF-oriented, fully decoded image of `source`; any failure is an `InputError` naming `input_name`."""
    try:
        # Pillow only warns between its own limit and twice that; a warning must refuse the image too.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = (
                source if isinstance(source, Image.Image) else Image.open(io.BytesIO(_read_bytes(source, input_name)))
            )
            _check_size(image, input_name)
            image.load()  # decodes every pixel now, so a truncated file fails here and not later in the engine
            return ImageOps.exif_transpose(image)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(input_name, f"image is too large (more than {MAX_INPUT_PIXELS:,} pixels)") from exc
    except UnidentifiedImageError as exc:
        raise InputError(input_name, "could not be read: not a recognised image format") from exc
    # Pillow's decoders raise many unrelated types on malformed data (OSError, SyntaxError, EOFError,
    # struct.error, KeyError, ...); whatever goes wrong while decoding, the file is to blame.
    except Exception as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"corrupt or truncated data ({exc})"
        raise InputError(input_name, f"could not be read: {reason}") from exc


def _read_bytes(source: str | os.PathLike | bytes | BinaryIO, input_name: str) -> bytes:
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, (str, os.PathLike)):
        data = Path(source).read_bytes()
    else:
        data = source.read()
    if not data:
        raise InputError(input_name, "could not be read: the file is empty")
    return data


def _check_size(image: Image.Image, input_name: str) -> None:
    width, height = image.size
    if width * height == 0:
        raise InputError(input_name, "could not be read: the image has no pixels")
    if width * height > MAX_INPUT_PIXELS:
        raise InputError(
            input_name,
            f"image is {width}x{height} = {width * height:,} pixels, more than the limit of {MAX_INPUT_PIXELS:,}",
        )


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    # Pillow's convert() clips 16-bit and float samples to 0..255 instead of scaling them.
    if image.mode.startswith("I;16") or image.mode == "I":
        # Mode "I" is how Pillow widens 16-bit samples, so it is read on the same 0..65535 scale.
        samples = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray(((samples + 128) // 257).astype(np.uint8))
    elif image.mode == "F":
        samples = np.nan_to_num(np.asarray(image, dtype=np.float64))
        # Float images usually hold 0..1; Pillow's own convert("F") keeps 0..255.
        scale = 255.0 if samples.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(np.round(samples * scale), 0, 255).astype(np.uint8))
    if image.has_transparency_data:
        canvas = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def working_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is `image_size`, each side rounded to a multiple of 64 (min 64).

    Halves round up; integer arithmetic keeps them exact: floor(side * image_size / longer / 64 + 1/2) * 64.
    """
    longer = max(width, height)

    def rounded(side: int) -> int:
        return max(64, (2 * side * image_size + 64 * longer) // (128 * longer) * 64)

    return rounded(width), rounded(height)


def prepare_image(image: Image.Image, image_size: int) -> Image.Image:
    """Resize `image` (Lanczos) to its working size; one already that size is returned as it is."""
    return resized(image, working_size(*image.size, image_size))


def resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` at `size` (Lanczos); one already that size is returned as it is."""
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def _rgb_values(image: Image.Image) -> torch.Tensor:
    """The RGB uint8 values of `image` as a (3, H, W) float32 tensor."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float()


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A (1, 3, H, W) float32 tensor of the RGB pixels mapped to [-1, 1]: x = uint8 / 127.5 - 1."""
    return (_rgb_values(image) / 127.5 - 1).unsqueeze(0).contiguous()


def image_to_pixels(image: Image.Image) -> torch.Tensor:
    """A (1, 3, H, W) float32 tensor of the RGB pixels in [0, 1]: uint8 / 255, as images are blended
    (docs/algorithm.md §8)."""
    return (_rgb_values(image) / 255).unsqueeze(0)


def decoded_to_pixels(decoded: torch.Tensor) -> torch.Tensor:
    """A VAE output (B, 3, H, W) in [-1, 1] as float32 pixels y = (x / 2 + 1/2) clamped to [0, 1].

    NaN or infinity raises `NonFiniteError`: cast to uint8 it would give a black image that would look
    like a valid, if odd, result.
    """
    if not torch.isfinite(decoded).all():
        raise NonFiniteError("the decoded image contains NaN/inf values, so there is no valid image to return")
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def pixels_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """RGB images of float pixels (B, 3, H, W) in [0, 1], rounded: uint8 = round(255 y)."""
    values = torch.round(255 * pixels).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in values]


def masks_to_images(masks: torch.Tensor) -> list[Image.Image]:
    """Grey ("L") images of masks (B, 1, H, W) in [0, 1], rounded: uint8 = round(255 m)."""
    values = torch.round(255 * masks[:, 0]).to(torch.uint8).cpu().numpy()
    return [Image.fromarray(array, mode="L") for array in values]


def save_masks(masks: Sequence[Image.Image], out_dir: str | os.PathLike, first_index: int) -> list[Path]:
    """Write `out-K-mask.png` for K = first_index, first_index + 1, ... (the index of each mask's image)."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, mask in enumerate(masks, start=first_index):
        path = directory / f"out-{index}-mask.png"
        mask.save(path, "PNG")
        paths.append(path)
    return paths


def save_images(images: Sequence[Image.Image], out_dir: str | os.PathLike, output_format: str) -> list[Path]:
    """Write `out-0.<format>`, `out-1.<format>`, ... into `out_dir` (created if missing) and return their paths."""
    pil_format, options = _SAVE_OPTIONS[check_output_format(output_format)]
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        # The service names the files, so no user input ever reaches a path.
        path = directory / f"out-{index}.{output_format}"
        image.save(path, pil_format, **options)
        paths.append(path)
    return paths
