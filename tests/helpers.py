"""Plain helpers shared by the tests: the example image, small requests, image bytes and pixels, and an
independent reference implementation of guided DDIM sampling (diffusers' own scheduler).

Fixtures (tiny models, engines, the in-process Cog predictor, log capture) are in tests/conftest.py.
"""

from __future__ import annotations

import io
import socket
import struct
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from PIL import Image

from pnp import PnPConfig, PnPEngine
from pnp.config import PUBLIC_INPUTS
from pnp.image_io import decoded_to_pixels, image_to_tensor, pixels_to_images, prepare_image
from pnp.injection import ATTENTION_SITES, RESNET_KEY, RESNET_SITE, locate_sites
from pnp.video_io import save_video

ROOT = Path(__file__).resolve().parent.parent
HORSE = ROOT / "examples" / "horse.jpg"
# Small enough for CPU tests: 128x128 pixels (16x16 latents), 10 sampling and 10 inversion steps.
FAST: dict[str, Any] = {"image_size": 128, "num_inference_steps": 10, "ddim_inversion_steps": 10}
RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 200, 0), (255, 255, 255)
# The service's inversion cache: one to three entries of the tiny model (~1.3 MB at 128 px, ~3 MB at
# 192 px), so that the soak test's new images must evict; at the default bound (a fifth of the
# machine's memory) the cache could legitimately keep every one of them.
SERVICE_CACHE_BYTES = 4 * 2**20


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a server a test starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- requests ----------------------------------------------------------------------------------------


def config(**values: Any) -> PnPConfig:
    """A config of FAST and `values`."""
    return PnPConfig.from_mapping({**FAST, **values})


def inputs(**overrides: Any) -> dict[str, Any]:
    """Every argument of the predictor's run() (called in-process, Cog's Input() defaults are FieldInfo
    objects): the public inputs' defaults (png), no image, mask or video, FAST, then `overrides`."""
    return {
        "input_image": None,
        **{name: spec.default for name, spec in PUBLIC_INPUTS.items()},
        "mask": None,
        "input_video": None,
        **FAST,
        **overrides,
    }


# --- images ------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    """The bytes of `image` saved as `fmt`."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def pixels(image: Image.Image | Path | str) -> np.ndarray:
    """An image's (or an image file's) RGB pixels as ints, so that differences do not wrap around."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")).astype(int)
    with Image.open(image) as opened:
        return np.asarray(opened.convert("RGB")).astype(int)


def sizes(paths: Iterable[Path]) -> list[tuple[int, int]]:
    """The (width, height) of each image file."""
    result = []
    for path in paths:
        with Image.open(path) as image:
            result.append(image.size)
    return result


def halves(width: int, height: int, left: Any, right: Any, mode: str = "RGB") -> Image.Image:
    """An image whose left half is `left` and right half `right`."""
    image = Image.new(mode, (width, height), left)
    image.paste(Image.new(mode, (width - width // 2, height), right), (width // 2, 0))
    return image


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, followed by a few bytes of pixel data only."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def horse_at(image_size: int = 128) -> np.ndarray:
    """The example image's pixels at its working size."""
    return pixels(prepare_image(Image.open(HORSE).convert("RGB"), image_size))


def write_horse_video(path: Path, frames: int = 4, fps: float = 8) -> Path:
    """A 128x128 H.264 MP4 of `frames` distinct frames at `fps`: the example image panning 8 pixels a frame."""
    horse = horse_at(128).astype(np.uint8)
    return save_video([Image.fromarray(np.roll(horse, 8 * k, axis=1)) for k in range(frames)], path, fps)


# --- the engine's internals ------------------------------------------------------------------------------


def entries_for(engine: PnPEngine, inversion_prompt: str) -> list:
    """The (key, entry) pairs of the engine's cache made with this inversion prompt."""
    return [(key, entry) for key, entry in engine.cache.items() if key.inversion_prompt == inversion_prompt]


def model_dtypes(engine: PnPEngine) -> set[torch.dtype]:
    model = engine.model
    return {model.dtype, model.unet.dtype, model.vae.dtype, model.text_encoder.dtype}


def nan_unet_hook(calls: dict, only_below_float32: bool) -> Callable:
    """A UNet forward hook that counts calls per dtype in `calls` and turns the output into NaN
    (in every dtype, or only below float32)."""

    def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        calls[module.dtype] = calls.get(module.dtype, 0) + 1
        if only_below_float32 and module.dtype == torch.float32:
            return output
        return type(output)(sample=torch.full_like(output.sample, float("nan")))

    return hook


class SiteRecorder:
    """Records, per UNet call, each injection site's module, inputs and output (keyed RESNET_SITE or the
    attention site), to compare with what diffusers' own code computes from the same inputs."""

    def __init__(self, unet: torch.nn.Module):
        resnet, attentions = locate_sites(unet)
        self.calls: list[dict[str, tuple[torch.nn.Module, tuple, torch.Tensor]]] = []
        self.handles = [unet.register_forward_pre_hook(lambda *_: self.calls.append({}))]
        for name, module in [(RESNET_SITE, resnet), *attentions.items()]:
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable:
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.calls[-1][name] = (module, tuple(t.clone() for t in inputs), output.clone())

        return hook

    def __enter__(self) -> SiteRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


class Replacing:
    """A module seen through diffusers' own forward code with some of its submodules replaced."""

    def __init__(self, module: torch.nn.Module, **replaced: Callable):
        self._module = module
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def site_keys(name: str) -> list[str]:
    """The feature keys of a site: its conv2 output, or its to_q and to_k."""
    return [RESNET_KEY] if name == RESNET_SITE else [f"{name}.attn1.to_q", f"{name}.attn1.to_k"]


def diffusers_site_output(name: str, module: Any, inputs: tuple, source: dict | None = None) -> torch.Tensor:
    """What diffusers' ResnetBlock2D.forward or AttnProcessor2_0 computes for a site's inputs; with `source`
    (key -> rows), the residual branch's conv2 or the to_q and to_k projections give the source's instead."""
    with torch.no_grad():
        if name == RESNET_SITE:
            block = module if source is None else Replacing(module, conv2=lambda h: source[RESNET_KEY].expand_as(h))
            return ResnetBlock2D.forward(block, *inputs)
        if source is not None:
            q, k = (source[key] for key in site_keys(name))
            module = Replacing(module, to_q=lambda h: q.expand(len(h), -1, -1), to_k=lambda h: k.expand(len(h), -1, -1))
        return AttnProcessor2_0()(module, inputs[0])


def site_features(name: str, module: Any, inputs: tuple) -> dict[str, torch.Tensor]:
    """The features a site computes on its own from its inputs (diffusers' code): conv2's output, or to_q and to_k."""
    with torch.no_grad():
        if name == RESNET_SITE:
            residual: list[torch.Tensor] = []
            capture = Replacing(module, conv2=lambda h: residual.append(module.conv2(h)) or residual[0])
            diffusers_site_output(name, capture, inputs)
            return {RESNET_KEY: residual[0]}
        return dict(zip(site_keys(name), (module.to_q(inputs[0]), module.to_k(inputs[0])), strict=True))


def assert_sites_follow_the_source(
    calls: list, injected_rows: Callable[[int, str], torch.Tensor], n_f: int, n_a: int
) -> None:
    """At steps i < n_f (ResNet) and i < n_a (attention) each site gives what diffusers computes with the
    source's features (`injected_rows(step, key)`) in place of its own; at later steps, what it computes alone."""
    for step, call in enumerate(calls):
        assert set(call) == {RESNET_SITE, *ATTENTION_SITES}
        for name, (module, inputs, output) in call.items():
            own = diffusers_site_output(name, module, inputs)
            if step < (n_f if name == RESNET_SITE else n_a):
                source = {key: injected_rows(step, key) for key in site_keys(name)}
                torch.testing.assert_close(
                    output, diffusers_site_output(name, module, inputs, source), atol=1e-5, rtol=1e-5
                )
                assert not torch.allclose(output, own, atol=1e-4), f"{name} at step {step}: the source changed nothing"
            else:
                torch.testing.assert_close(output, own, atol=1e-5, rtol=1e-5)


# --- an independent reference: diffusers' DDIM scheduler -------------------------------------------------


def reference_scheduler(engine: PnPEngine, steps: int) -> DDIMScheduler:
    scheduler = DDIMScheduler.from_config(engine.model.scheduler_config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    return scheduler


def reference_sampling(
    engine: PnPEngine,
    start: torch.Tensor,
    prompt: str,
    scale: float,
    steps: int,
    negative: str | None = None,
    weights: list[float] | None = None,
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Plain guided DDIM (diffusers' own scheduler step, eta 0, which reads v-predictions itself) with the
    negative blend of docs/algorithm.md §5 (weights a_i of §6); `after_step(i, x)` may replace the latents
    after each step."""
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
    """The first image of decoded `latents`, rounded as the engine rounds (docs/algorithm.md §7)."""
    return pixels_to_images(decoded_to_pixels(engine.model.decode_latents(latents, 4)))[0]


def source_latent(engine: PnPEngine, image_size: int = 128) -> torch.Tensor:
    """z_0 of the example image at its working size."""
    return engine.model.encode_image(image_to_tensor(prepare_image(Image.open(HORSE).convert("RGB"), image_size)))


def inverted_noise(engine: PnPEngine, steps: int = 10) -> torch.Tensor:
    """x_T of the example image: its DDIM inversion with E("") to the first sampling timestep."""
    from pnp.inversion import invert

    t_0 = engine.schedule.sampling_timesteps(steps)[0]
    return invert(
        engine.model.injection_unet,
        engine.schedule,
        source_latent(engine),
        engine.model.encode_text([""]),
        steps,
        {t_0},
    )[t_0]
