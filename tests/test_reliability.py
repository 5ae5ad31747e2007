"""Reliability: hostile and odd inputs, numerical faults, faults mid-prediction, output files,
a soak run and the network, all end to end through the Cog predictor (`predict.Predictor`) in-process.

pnp.image_io and pnp.config have their own unit tests (tests/test_image_io.py, tests/test_requests.py);
here each case goes through `Predictor.setup()` and `Predictor.run()` on the tiny model, as a request
of the service would, and the assertions are about what the service answers and what it leaves behind.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import struct
import tempfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import pnp.engine as engine_module
from pnp import image_io
from pnp.config import INPUTS, MAX_PROMPTS, OUTPUT_FORMAT, PnPConfig
from pnp.engine import PnPEngine, PnPResult, RunStats
from pnp.errors import InputError, NonFiniteError

ROOT = Path(__file__).resolve().parent.parent
HORSE = ROOT / "examples" / "horse.jpg"
FAST = {"image_size": 128, "num_inference_steps": 10, "ddim_inversion_steps": 10}
# A small inversion cache (one to three entries of the tiny model, ~1.3 MB at 128 px, ~3 MB at 192 px),
# so that the soak test's new images must evict: at the default bound (a fifth of the machine's memory)
# the cache could legitimately keep every one of them.
CACHE_BYTES = 4 * 2**20
RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 200, 0), (255, 255, 255)


# --- the service ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One predictor set up as Cog does (env: PNP_MODEL, PNP_DEVICE), with a private temp directory
    so that what the service leaves in it is all ours to inspect."""
    temp_root = tmp_path_factory.mktemp("reliability-tmp")
    pnp_logger = logging.getLogger("pnp")
    saved_logging = (list(pnp_logger.handlers), pnp_logger.level, pnp_logger.propagate)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNP_MODEL", str(tiny_model_dir))
        mp.setenv("PNP_DEVICE", "cpu")
        mp.delenv("PNP_DTYPE", raising=False)
        mp.setenv("PNP_CACHE_BYTES", str(CACHE_BYTES))
        mp.setattr(tempfile, "tempdir", str(temp_root))
        mp.syspath_prepend(str(ROOT))
        import predict

        predictor = predict.Predictor()
        predictor.setup()
        yield SimpleNamespace(predictor=predictor, predict=predict, temp_root=temp_root)
    # setup() sends the pnp logs to stdout and stops their propagation; give other modules theirs back.
    pnp_logger.handlers[:] = saved_logging[0]
    pnp_logger.setLevel(saved_logging[1])
    pnp_logger.propagate = saved_logging[2]


@pytest.fixture
def pnp_logs(caplog: pytest.LogCaptureFixture):
    """caplog for the `pnp` loggers, which the predictor's logging setup keeps from propagating to root."""
    logger = logging.getLogger("pnp")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.DEBUG)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture
def prepared(monkeypatch: pytest.MonkeyPatch) -> list[Image.Image]:
    """The working-size images the engine encodes, recorded as the engine prepares them."""
    seen: list[Image.Image] = []
    original = engine_module.prepare_image

    def spy(image: Image.Image, image_size: int) -> Image.Image:
        result = original(image, image_size)
        seen.append(result)
        return result

    monkeypatch.setattr(engine_module, "prepare_image", spy)
    return seen


def inputs(**overrides) -> dict:
    """Every argument of run(): called in-process, Cog's Input() defaults are FieldInfo objects."""
    return {
        "input_image": None,
        **{name: spec.default for name, spec in INPUTS.items()},
        "output_format": "png",
        "mask": None,
        **FAST,
        **overrides,
    }


def out_dirs(service) -> set[str]:
    """Everything in the service's temp directory (the predictor's `pnp-out-*` directories and anything else)."""
    return set(os.listdir(service.temp_root))


def sizes(paths) -> list[tuple[int, int]]:
    result = []
    for path in paths:
        with Image.open(path) as image:
            result.append(image.size)
    return result


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


def assert_refused(service, request: dict, input_name: str) -> InputError:
    """The request fails with an InputError naming `input_name`, before any UNet work and any output file."""
    engine = service.predictor.engine
    evals, dirs = engine.unet_evals, out_dirs(service)
    with pytest.raises(InputError) as caught:
        service.predictor.run(**request)
    assert type(caught.value) is InputError
    assert caught.value.input_name == input_name
    assert str(caught.value).startswith(f"{input_name}: ")
    assert engine.unet_evals == evals
    assert out_dirs(service) == dirs
    return caught.value


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def halves(width: int, height: int, left, right, mode: str = "RGB") -> Image.Image:
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


# --- images ---------------------------------------------------------------------------------------------


def _truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    data = encode(Image.fromarray(noise))
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"this is a text file, not an image\n" * 10, "not a recognised image format"),
        (b"", "empty"),
        (_truncated_png(), "truncated"),
        # Declares 100000 x 100000 pixels in a file of ~100 bytes: Pillow's own bomb check refuses it.
        (png_declaring(100_000, 100_000), "too large"),
        # 8000 x 8000 = 64M pixels: under Pillow's limit, over the service's documented MAX_INPUT_PIXELS.
        (png_declaring(8000, 8000), f"{image_io.MAX_INPUT_PIXELS:,}"),
    ],
    ids=["text", "empty", "truncated", "bomb", "over-limit"],
)
def test_unreadable_or_oversized_files_are_refused_naming_input_image(service, tmp_path, data, expected):
    error = assert_refused(service, inputs(input_image=write(tmp_path, "input.png", data)), "input_image")
    assert expected in str(error)


def test_declared_size_over_a_lowered_limit_is_refused_before_decoding(service, tmp_path, monkeypatch):
    # The header says 64 x 64; the pixel data is missing, so only a check of the declared size (made
    # before decoding) can give the size error rather than a "could not be read" one.
    monkeypatch.setattr(image_io, "MAX_INPUT_PIXELS", 1000)
    request = inputs(input_image=write(tmp_path, "big.png", png_declaring(64, 64)))
    error = assert_refused(service, request, "input_image")
    assert "4,096 pixels" in str(error) and "limit of 1,000" in str(error)
    assert "could not be read" not in str(error)


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise: the stored 256x128 image shows as 128x256
    return encode(halves(256, 128, RED, BLUE), "JPEG", quality=95, exif=exif)


def _rgba() -> bytes:
    return encode(halves(64, 64, (255, 0, 0, 0), (0, 0, 255, 255), "RGBA"))  # left half fully transparent


def _palette() -> bytes:
    image = Image.new("P", (64, 64), 0)
    image.putpalette([*RED, *BLUE])
    image.paste(1, (32, 0, 64, 64))
    return encode(image)


def _cmyk() -> bytes:
    return encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=95)  # red


def _grey16() -> bytes:
    image = Image.fromarray(np.full((64, 64), 32768, np.uint16))
    assert image.mode == "I;16"
    return encode(image)


def _grey() -> bytes:
    return encode(Image.fromarray(np.full((64, 64), 77, np.uint8)))


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (64, 64), RED), Image.new("RGB", (64, 64), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def _one_pixel() -> bytes:
    return encode(Image.new("RGB", (1, 1), GREEN))


def _extreme() -> bytes:
    return encode(Image.new("RGB", (2000, 20), GREEN))


# (bytes, working size of the output, {(x, y) in the prepared image: expected colour})
ACCEPTED = {
    # Rotated first: the red left half ends on top; unrotated the output would be (128, 64).
    "exif-rotated-jpeg": (_exif_rotated_jpeg, (64, 128), {(32, 20): RED, (32, 108): BLUE}),
    "rgba-transparent": (_rgba, (128, 128), {(20, 64): WHITE, (108, 64): BLUE}),
    "palette": (_palette, (128, 128), {(20, 64): RED, (108, 64): BLUE}),
    "cmyk-jpeg": (_cmyk, (128, 128), {(64, 64): RED}),
    "grey-16-bit-png": (_grey16, (128, 128), {(64, 64): (128, 128, 128)}),
    "grey-L": (_grey, (128, 128), {(64, 64): (77, 77, 77)}),
    "animated-gif": (_animated_gif, (128, 128), {(64, 64): RED}),  # the first frame
    "one-pixel": (_one_pixel, (128, 128), {(0, 0): GREEN, (127, 127): GREEN}),
    "2000x20": (_extreme, (128, 64), {(64, 32): GREEN}),  # docs/algorithm.md §2: never a zero side, at least 64
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_odd_images_are_accepted_at_their_working_size(service, tmp_path, prepared, case):
    make, size, colours = ACCEPTED[case]
    paths = service.predictor.run(
        **inputs(input_image=write(tmp_path, f"{case}.img", make()), translation_prompts="a cat")
    )
    assert sizes(paths) == [size]
    (image,) = prepared
    assert image.mode == "RGB" and image.size == size
    for xy, colour in colours.items():
        # JPEG is lossy; the lossless formats come through exactly (up to resampling a flat colour).
        tolerance = 40 if "jpeg" in case else 1
        assert np.allclose(image.getpixel(xy), colour, atol=tolerance), (case, xy, image.getpixel(xy))


# --- prompts --------------------------------------------------------------------------------------------


def test_blank_prompts_between_separators_are_dropped(service):
    paths = service.predictor.run(**inputs(input_image=HORSE, translation_prompts=" a ; ; b "))
    assert [p.name for p in paths] == ["out-0.png", "out-1.png"]


@pytest.mark.parametrize("text", ["", "   ", " ; ;  ; ", ";"])
def test_no_prompt_left_is_refused(service, text):
    assert_refused(service, inputs(input_image=HORSE, translation_prompts=text), "translation_prompts")


def test_more_prompts_than_the_limit_are_refused_naming_it(service):
    text = "; ".join(f"prompt {i}" for i in range(MAX_PROMPTS + 1))
    error = assert_refused(service, inputs(input_image=HORSE, translation_prompts=text), "translation_prompts")
    assert f"at most {MAX_PROMPTS}" in str(error) and str(MAX_PROMPTS + 1) in str(error)
    assert MAX_PROMPTS >= 8  # the documented maximum is at least 8


def test_the_maximum_number_of_prompts_is_served(service):
    text = "; ".join(f"prompt {i}" for i in range(MAX_PROMPTS))
    paths = service.predictor.run(**inputs(generation_prompt="a horse", seed=5, translation_prompts=text))
    assert [p.name for p in paths] == [f"out-{i}.png" for i in range(MAX_PROMPTS + 1)]  # source first


def test_a_prompt_over_77_tokens_is_truncated_with_a_warning(service, pnp_logs):
    long_prompt = "a photo of a horse " * 20  # ~380 byte-level tokens with the tiny tokenizer
    tokenizer = service.predictor.engine.model.tokenizer
    assert len(tokenizer(long_prompt).input_ids) > tokenizer.model_max_length == 77
    paths = service.predictor.run(**inputs(input_image=HORSE, translation_prompts=long_prompt))
    assert sizes(paths) == [(128, 128)]
    warnings = [r for r in pnp_logs.records if r.name == "pnp.models" and r.levelno == logging.WARNING]
    assert any("truncated" in r.getMessage() and "77" in r.getMessage() for r in warnings)


# --- numbers --------------------------------------------------------------------------------------------


NUMBERS = {name: spec for name, spec in INPUTS.items() if spec.type in (int, float)}


def _bad_numbers() -> list[tuple[str, object]]:
    cases = []
    for name, spec in NUMBERS.items():
        step = 1 if spec.type is int else 0.001
        below, above = spec.minimum - step, spec.maximum + step
        if spec.multiple_of:  # out of range while still a multiple, so only the range can refuse it
            below, above = spec.minimum - spec.multiple_of, spec.maximum + spec.multiple_of
        cases += [(name, below), (name, above)]
    return cases


@pytest.mark.parametrize("name, value", _bad_numbers(), ids=lambda v: str(v))
def test_every_numeric_bound_is_enforced_by_the_predictor(service, name, value):
    spec = INPUTS[name]
    request = inputs(input_image=HORSE, generation_prompt="a horse" if name == "seed" else "", seed=1)
    error = assert_refused(service, {**request, name: value}, name)
    assert str(spec.minimum) in str(error) and str(spec.maximum) in str(error)  # says what is allowed


@pytest.mark.parametrize("value", [192 + 1, 200, 1000])
def test_image_size_must_be_a_multiple_of_64(service, value):
    error = assert_refused(service, inputs(input_image=HORSE, image_size=value), "image_size")
    assert "multiple of 64" in str(error)


@pytest.mark.parametrize("name, value", [("negative_prompt_schedule", "cosine"), ("output_format", "gif")])
def test_unknown_choices_are_refused_listing_the_choices(service, name, value):
    error = assert_refused(service, inputs(input_image=HORSE, **{name: value}), name)
    choices = {**INPUTS, "output_format": OUTPUT_FORMAT}[name].choices
    assert all(choice in str(error) for choice in choices)


def test_every_numeric_bound_itself_is_accepted(service, monkeypatch):
    """The bounds are inclusive: the predictor hands them to the engine unchanged."""
    received = []

    def engine(config, image=None, mask=None):
        received.append(config)
        return PnPResult(images=[Image.new("RGB", (64, 64))], seed=config.seed, stats=RunStats())

    monkeypatch.setattr(service.predictor, "engine", engine)
    for end in ("minimum", "maximum"):
        values = {name: getattr(spec, end) for name, spec in NUMBERS.items()}
        paths = service.predictor.run(**inputs(input_image=HORSE, **values))
        assert len(paths) == 1
        assert {name: getattr(received[-1], name) for name in values} == values


@pytest.mark.parametrize("case", ["generation", "black", "corrupt"])
def test_bad_masks_are_refused_by_the_predictor_naming_mask(service, tmp_path, case):
    mask = write(tmp_path, "mask.png", encode(Image.new("L", (16, 16), 0 if case == "black" else 255)))
    if case == "corrupt":
        mask = write(tmp_path, "mask.png", b"GIF89a broken")
    request = inputs(generation_prompt="a horse", mask=mask) if case == "generation" else inputs(input_image=HORSE, mask=mask)
    assert_refused(service, request, "mask")


def test_inversion_steps_that_do_not_nest_are_refused_with_valid_values(service):
    request = inputs(input_image=HORSE, num_inference_steps=50, ddim_inversion_steps=30)
    error = assert_refused(service, request, "ddim_inversion_steps")
    proposed = [int(v) for v in str(error).split("nearest valid values: ")[1].split(", ")]
    assert proposed and 30 not in proposed
    spec = INPUTS["ddim_inversion_steps"]
    for valid in proposed:  # every value offered is indeed valid
        assert spec.minimum <= valid <= spec.maximum
        service.predictor.engine.schedule.check_nesting(50, valid, spec.minimum, spec.maximum)


# --- numerical faults -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_engine(service, tiny_model_dir) -> PnPEngine:
    return PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu", dtype="bfloat16")


def nan_unet_hook(calls: dict, only_below_float32: bool):
    """A UNet forward hook that turns its output into NaN (in every dtype, or only below float32)."""

    def hook(module, args, output):
        calls[module.dtype] = calls.get(module.dtype, 0) + 1
        if only_below_float32 and module.dtype == torch.float32:
            return output
        return type(output)(sample=torch.full_like(output.sample, float("nan")))

    return hook


def model_dtypes(engine: PnPEngine) -> set:
    model = engine.model
    return {model.dtype, model.unet.dtype, model.vae.dtype, model.text_encoder.dtype}


def entries_for(engine: PnPEngine, inversion_prompt: str) -> list:
    return [(key, entry) for key, entry in engine.cache.items() if key.inversion_prompt == inversion_prompt]


@pytest.mark.parametrize("mode", ["real", "generation"])
def test_non_finite_in_bfloat16_is_retried_in_float32(service, bf16_engine, monkeypatch, pnp_logs, mode):
    monkeypatch.setattr(service.predictor, "engine", bf16_engine)
    calls: dict = {}
    handle = bf16_engine.model.unet.register_forward_hook(nan_unet_hook(calls, only_below_float32=True))
    request = (
        inputs(input_image=HORSE, inversion_prompt="retry")
        if mode == "real"
        else inputs(generation_prompt="a horse", seed=7)
    )
    try:
        paths = service.predictor.run(**request)
    finally:
        handle.remove()
    assert sizes(paths) == [(128, 128)] * (1 if mode == "real" else 2)
    for path in paths:
        assert pixels(path).std() > 0  # a real image, not a flat (black) one
    assert calls.get(torch.bfloat16, 0) > 0 and calls.get(torch.float32, 0) > 0  # failed, then ran again
    retries = [r for r in pnp_logs.records if r.name == "pnp.engine" and r.levelno == logging.WARNING]
    assert any("float32" in r.getMessage() for r in retries)
    assert model_dtypes(bf16_engine) == {torch.bfloat16}  # back in its own dtype


def test_the_float32_retry_serves_later_half_precision_requests(bf16_engine):
    request = PnPConfig.from_mapping({**FAST, "inversion_prompt": "retried once"})
    calls: dict = {}
    handle = bf16_engine.model.unet.register_forward_hook(nan_unet_hook(calls, only_below_float32=True))
    try:
        bf16_engine(request, HORSE)
    finally:
        handle.remove()
    assert calls.get(torch.bfloat16, 0) > 0 and calls.get(torch.float32, 0) > 0
    (key,) = [key for key, _ in entries_for(bf16_engine, "retried once")]
    assert key.dtype == "torch.float32"
    # The next bfloat16 request reuses the float32 inversion instead of failing its own first.
    stats = bf16_engine(request.replace(translation_prompts="a zebra"), HORSE).stats
    assert stats.cache_hit and stats.unet_evals == stats.phases["translation"].unet_evals == 20
    assert model_dtypes(bf16_engine) == {torch.bfloat16}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["real", "generation"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_everywhere_is_an_error_not_a_black_image(service, bf16_engine, monkeypatch, dtype, mode, bad):
    if dtype == "bfloat16":
        monkeypatch.setattr(service.predictor, "engine", bf16_engine)
    engine = service.predictor.engine
    tag = f"non-finite-{dtype}-{mode}-{bad}"
    calls: dict = {}

    def hook(module, args, output):
        calls[module.dtype] = calls.get(module.dtype, 0) + 1
        return type(output)(sample=torch.full_like(output.sample, bad))

    if mode == "real":
        request = inputs(input_image=HORSE, inversion_prompt=tag)
    else:
        request = inputs(generation_prompt=tag, seed=3)
    dirs, entries = out_dirs(service), len(engine.cache)
    handle = engine.model.unet.register_forward_hook(hook)
    try:
        with pytest.raises(NonFiniteError):
            service.predictor.run(**request)
    finally:
        handle.remove()
    assert calls.get(torch.float32, 0) > 0  # float32 too: a bfloat16 engine retried once
    assert entries_for(engine, tag) == [] and len(engine.cache) == entries  # nothing cached
    assert out_dirs(service) == dirs  # no image written
    assert model_dtypes(engine) == {getattr(torch, dtype)}


def test_the_engine_works_normally_after_a_numerical_fault(service):
    request = inputs(generation_prompt="a horse", seed=11, translation_prompts="a cat")
    before = [pixels(p) for p in service.predictor.run(**request)]
    handle = service.predictor.engine.model.unet.register_forward_hook(nan_unet_hook({}, only_below_float32=False))
    try:
        with pytest.raises(NonFiniteError):
            service.predictor.run(**request)
    finally:
        handle.remove()
    after = [pixels(p) for p in service.predictor.run(**request)]
    assert len(after) == len(before) == 2
    assert all(np.array_equal(a, b) for a, b in zip(after, before))


# --- faults during a prediction -------------------------------------------------------------------------

FAULT_REQUEST = inputs(input_image=HORSE, inversion_prompt="fault", translation_prompts="a cat")
# Another image key (its own inversion prompt): after a fault it is inverted and extracted from scratch,
# so hooks or injection state left over from the fault would change its images.
OTHER_REQUEST = {**FAULT_REQUEST, "inversion_prompt": "fault, then another request"}


@pytest.fixture(scope="module")
def reference_output(service) -> dict[str, list[np.ndarray]]:
    """The images of FAULT_REQUEST and OTHER_REQUEST from a fresh predictor that never saw a fault."""
    predictor = service.predict.Predictor()
    predictor.setup()
    images = {}
    for name, request in (("fault", FAULT_REQUEST), ("other", OTHER_REQUEST)):
        paths = predictor.run(**request)
        images[name] = [pixels(p) for p in paths]
    shutil.rmtree(paths[0].parent)
    return images


def assert_images(paths, expected: list[np.ndarray]) -> None:
    assert [pixels(p).shape for p in paths] == [e.shape for e in expected]
    assert all(np.array_equal(pixels(p), e) for p, e in zip(paths, expected))


def hook_count(engine: PnPEngine) -> int:
    modules = [*engine.model.unet.modules(), *engine.model.vae.modules(), *engine.model.text_encoder.modules()]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)


@pytest.mark.parametrize(
    "phase, exception",
    [
        ("inversion", RuntimeError),
        ("extraction", RuntimeError),
        ("translation", RuntimeError),
        ("decode", RuntimeError),
        ("translation", KeyboardInterrupt),  # what a cancel looks like to the code that runs
    ],
    ids=["inversion", "extraction", "translation", "decode", "cancel"],
)
def test_a_fault_in_any_phase_leaves_the_service_ready(service, reference_output, monkeypatch, phase, exception):
    predictor, engine = service.predictor, service.predictor.engine
    engine.cache.clear()  # so that this request inverts and extracts again
    current = {"phase": None}

    def in_phase(name, function):
        def wrapper(*args, **kwargs):
            current["phase"] = name
            try:
                return function(*args, **kwargs)
            finally:
                current["phase"] = None

        return wrapper

    monkeypatch.setattr(engine_module, "invert", in_phase("inversion", engine_module.invert))
    monkeypatch.setattr(engine_module, "extract_features", in_phase("extraction", engine_module.extract_features))
    monkeypatch.setattr(engine_module, "translate", in_phase("translation", engine_module.translate))
    raised = []

    def fault(module, args):
        if phase == "decode" or current["phase"] == phase:
            raised.append(phase)
            raise exception(f"injected fault in {phase}")

    site = engine.model.vae.decoder if phase == "decode" else engine.model.unet
    hooks, dirs, last_dir = hook_count(engine), out_dirs(service), predictor._last_output_dir
    handle = site.register_forward_pre_hook(fault)
    try:
        with pytest.raises(exception, match="injected fault"):
            predictor.run(**FAULT_REQUEST)
    finally:
        handle.remove()
    assert raised == [phase]

    # Nothing left behind: no output directory, no hook, no partial cache entry, the model's own dtype.
    assert out_dirs(service) == dirs
    assert hook_count(engine) == hooks
    # The injector neither injects stale features nor keeps capturing (and holding) site outputs.
    assert engine.injector._captured is None and not engine.injector._injected
    assert model_dtypes(engine) == {torch.float32}
    entries = entries_for(engine, "fault")
    if phase in ("inversion", "extraction"):
        assert entries == [] and len(engine.cache) == 0
    else:  # put once complete, before the translation: it must be whole and finite
        ((_, entry),) = entries
        timesteps = engine.schedule.sampling_timesteps(FAST["num_inference_steps"])
        assert set(timesteps) <= set(entry.latents)
        assert entry.features.resnet_steps >= 8 and entry.features.attention_steps >= 5  # n_f, n_a of 10 steps
        assert entry.is_finite()

    # Ready: a new image, then the same request, succeed with the images of a predictor that never failed
    # (the second one from the cache where the entry was kept).
    assert_images(predictor.run(**OTHER_REQUEST), reference_output["other"])
    assert_images(predictor.run(**FAULT_REQUEST), reference_output["fault"])
    new_dir = Path(predictor._last_output_dir).name
    assert out_dirs(service) == (dirs - {Path(last_dir).name if last_dir else None}) | {new_dir}


# --- output files ---------------------------------------------------------------------------------------


def test_output_files_get_fresh_directories_and_names_the_service_chooses(service):
    hostile = "../../etc/passwd; x/y"
    first = service.predictor.run(**inputs(input_image=HORSE, translation_prompts=hostile))
    first_dir = first[0].parent
    assert [p.name for p in first] == ["out-0.png", "out-1.png"]
    assert all(p.parent == first_dir and p.is_file() for p in first)
    assert sorted(os.listdir(first_dir)) == ["out-0.png", "out-1.png"]  # nothing else written there
    assert first_dir.parent == service.temp_root and first_dir.name.startswith("pnp-out-")

    hostile = "out-0.png; /etc/passwd"
    second = service.predictor.run(**inputs(input_image=HORSE, translation_prompts=hostile, output_format="jpg"))
    second_dir = second[0].parent
    assert second_dir != first_dir and second_dir.parent == service.temp_root
    assert [p.name for p in second] == ["out-0.jpg", "out-1.jpg"]
    assert sorted(os.listdir(second_dir)) == ["out-0.jpg", "out-1.jpg"]
    assert all(p.resolve().parent == second_dir.resolve() for p in second)
    assert not first_dir.exists()  # served by now, so removed (one output directory at a time)
    assert [name for name in out_dirs(service) if name.startswith("pnp-out-")] == [second_dir.name]


# --- soak -----------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# RSS may grow by at most this much after the fifth prediction. Measured: 18-22 MB, about the same with
# the cache bounded or not (allocator arenas, and the cache filling up): on the tiny model a cache entry
# is only ~1.3 MB (128 px) to ~3 MB (192 px), too little to show in RSS over 10 new images, so the
# cache's own bound is asserted directly (without eviction the new images hold more than CACHE_BYTES).
# The RSS bound, a little over twice the measured growth so that allocator noise does not trip it,
# catches a leak outside the cache of ~2 MB or more per prediction over the 25 measured (e.g. the UNet
# activations or source features of every request kept alive); smaller leaks on the tiny model (an
# output image is 50-110 KB) are within allocator noise, the limit of an RSS check at this scale.
RSS_GROWTH_BOUND = 48 * 2**20
SOAK_BAD_INPUTS = [
    {"input_image": b"not an image"},
    {"translation_prompts": " ; ; "},
    {"scale": 31.0},
    {"image_size": 200},
    {"num_inference_steps": 50, "ddim_inversion_steps": 30},
    {"output_format": "gif"},
    {"translation_prompts": ";".join(["x"] * (MAX_PROMPTS + 1))},
    {"input_image": b""},
    {"feature_injection_threshold": 1.5},
    {"seed": -1},
]


def test_soak_of_30_mixed_predictions(service, tmp_path):
    predictor = service.predictor
    assert predictor.engine.cache.max_bytes == CACHE_BYTES
    rng = np.random.default_rng(0)
    baseline, peak, served, refused = None, 0, 0, 0
    for i in range(30):
        size = (128, 192)[i % 2]
        prompts = "; ".join(["a cat", "a dog", "a zebra"][: 1 + (i // 2) % 3])
        request = inputs(image_size=size, translation_prompts=prompts)
        if i % 3 == 1:
            request.update(generation_prompt=f"a horse {i}", seed=i)
        else:  # a new image each time: every one is a cache miss
            shape = (int(rng.integers(48, 160)), int(rng.integers(48, 160)), 3)
            image = Image.fromarray(rng.integers(0, 256, shape, np.uint8))
            request.update(input_image=write(tmp_path, f"soak-{i}.png", encode(image)))
        if i % 3 == 2:  # a third fail on purpose
            bad = dict(SOAK_BAD_INPUTS[(i // 3) % len(SOAK_BAD_INPUTS)])
            if isinstance(bad.get("input_image"), bytes):
                bad["input_image"] = write(tmp_path, f"soak-bad-{i}.png", bad["input_image"])
            request.update(bad)
            with pytest.raises(InputError) as caught:
                predictor.run(**request)
            assert caught.value.input_name in {*INPUTS, "input_image", "output_format"}
            refused += 1
        else:
            paths = predictor.run(**request)
            count = len(prompts.split(";")) + (1 if request["generation_prompt"] else 0)
            assert len(paths) == count and all(p.is_file() for p in paths)
            if request["generation_prompt"]:
                assert sizes(paths) == [(size, size)] * count
            else:
                assert max(sizes(paths)[0]) == size and len(set(sizes(paths))) == 1
            served += 1
        if i == 4:
            baseline = rss_bytes()
        elif i > 4:
            peak = max(peak, rss_bytes())
    assert (served, refused) == (20, 10)
    assert 0 < len(predictor.engine.cache) and predictor.engine.cache.nbytes <= CACHE_BYTES
    assert peak - baseline < RSS_GROWTH_BOUND, f"RSS grew by {(peak - baseline) / 2**20:.1f} MB"
    assert len([n for n in out_dirs(service) if n.startswith("pnp-out-")]) == 1  # the disk does not fill up


# --- network --------------------------------------------------------------------------------------------


def test_setup_and_predictions_never_touch_the_network(service, monkeypatch):
    calls = []

    def blocked(name):
        def refuse(*args, **kwargs):
            calls.append((name, args))
            raise OSError(f"network access blocked by the test ({name})")

        return refuse

    # Offline switches would hide an attempt; without them the libraries would try, and be recorded.
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(socket.socket, "connect", blocked("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", blocked("connect_ex"))
    monkeypatch.setattr(socket, "create_connection", blocked("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", blocked("getaddrinfo"))

    predictor = service.predict.Predictor()
    predictor.setup()
    real = predictor.run(**inputs(input_image=HORSE, inversion_prompt="offline"))
    assert sizes(real) == [(128, 128)]
    generated = predictor.run(**inputs(generation_prompt="a horse", seed=2))
    assert sizes(generated) == [(128, 128)] * 2
    assert calls == []
    shutil.rmtree(generated[0].parent)
