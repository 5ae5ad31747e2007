"""The Cog predictor (`predict.Predictor`) set up in-process as the service runs it, end to end: what only the
whole service shows. Refusals before any work and without output files, inputs handed to the engine
unchanged, the float32 retry, numerical faults and faults in each phase leaving the service ready,
the output files, a soak run, and no network.

How each input, image and mask is checked is tested where it is checked (tests/test_config.py,
tests/test_image_io.py, tests/test_region.py); the HTTP server around the predictor in tests/test_http.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import pnp.engine as engine_module
from pnp.config import INPUTS, MAX_PROMPTS, PUBLIC_INPUTS
from pnp.engine import PnPEngine, PnPResult
from pnp.errors import InputError, NonFiniteError
from pnp.injection import InjectionSteps
from pnp.stats import VIDEO_PHASES, RunStats
from tests.helpers import (
    HORSE,
    SERVICE_CACHE_BYTES,
    encode,
    entries_for,
    inputs,
    model_dtypes,
    nan_unet_hook,
    pixels,
    sizes,
    write,
)


def out_dirs(service: SimpleNamespace) -> set[str]:
    """Everything in the service's temp directory (the predictor's `pnp-out-*` directories and anything else)."""
    return set(os.listdir(service.temp_root))


# --- refusals and inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, input_name, expected",
    [
        ({"scale": 31.0}, "scale", "between 0.0 and 30.0"),  # the config's check (tests/test_config.py)
        ({"output_format": "gif"}, "output_format", "png, webp, jpg"),  # the predictor's own check
        ({"input_image": b"not an image"}, "input_image", "could not be read"),  # the engine's (tests/test_image_io.py)
        ({"input_video": HORSE}, "input_video", "cannot be used together with input_image"),  # the engine's, first
    ],
    ids=["config", "predictor", "engine", "video-and-image"],
)
def test_a_refused_request_costs_no_unet_work_and_leaves_no_files(service, tmp_path, overrides, input_name, expected):
    request = inputs(**{"input_image": HORSE, **overrides})
    if isinstance(request["input_image"], bytes):
        request["input_image"] = write(tmp_path, "input.png", request["input_image"])
    engine = service.predictor.engine
    evals, dirs = engine.unet_evals, out_dirs(service)
    with pytest.raises(InputError) as caught:
        service.predictor.run(**request)
    assert type(caught.value) is InputError
    assert caught.value.input_name == input_name
    assert str(caught.value).startswith(f"{input_name}: ") and expected in str(caught.value)
    assert engine.unet_evals == evals
    assert out_dirs(service) == dirs


def test_every_input_is_handed_to_the_engine_unchanged(service, monkeypatch):
    """Every numeric input at each of its (inclusive) bounds, and every other input, reaches the engine."""
    received = []

    def engine(config, image=None, mask=None, video=None, frames_to=None):
        received.append((config, image, mask, video))
        if video is not None:  # one prompt's video of two frames, handed on as the engine hands them
            frames_to.open(1, 12.5, None)
            frames_to.write(0, [Image.new("RGB", (64, 64))] * 2)
            return PnPResult(images=[], seed=None, stats=RunStats.of(VIDEO_PHASES), fps=12.5)
        return PnPResult(images=[Image.new("RGB", (64, 64))], seed=config.seed, stats=RunStats())

    monkeypatch.setattr(service.predictor, "engine", engine)
    numbers = {name: spec for name, spec in INPUTS.items() if spec.type in (int, float)}
    texts = {
        "translation_prompts": "a; b",
        "negative_prompt": "c",
        "inversion_prompt": "d",
        "negative_prompt_schedule": "exp",
    }
    for end in ("minimum", "maximum"):
        values = {name: getattr(spec, end) for name, spec in numbers.items()}
        paths = service.predictor.run(**inputs(input_image=HORSE, mask=HORSE, **values, **texts))
        assert len(paths) == 1
        config, image, mask, video = received[-1]
        assert {name: getattr(config, name) for name in values} == values
        assert config.translation_prompts == ("a", "b")
        assert (config.negative_prompt, config.inversion_prompt, config.negative_prompt_schedule) == ("c", "d", "exp")
        assert image == HORSE and mask == HORSE and video is None
    generation = service.predictor.run(**inputs(generation_prompt="a horse", seed=3))
    assert received[-1][0].generation_prompt == "a horse" and received[-1][0].seed == 3 and len(generation) == 1
    (video,) = service.predictor.run(**inputs(input_video=HORSE, video_fps=12.5, keyframe_interval=3))
    assert received[-1][1:] == (None, None, HORSE) and received[-1][0].keyframe_interval == 3
    assert video.name == "out-0.mp4"


# --- numerical faults (docs/algorithm.md §7, docs/conventions.md §8) -------------------------------------


def test_non_finite_in_bfloat16_is_retried_in_float32(service, bf16_engine, monkeypatch, pnp_logs):
    """A generated source and its translation; the retry of a real image's request, and the reuse of its
    float32 inversion, are in tests/test_cache.py."""
    monkeypatch.setattr(service.predictor, "engine", bf16_engine)
    calls: dict = {}
    handle = bf16_engine.model.unet.register_forward_hook(nan_unet_hook(calls, only_below_float32=True))
    try:
        paths = service.predictor.run(**inputs(generation_prompt="a horse", seed=7))
    finally:
        handle.remove()
    assert sizes(paths) == [(128, 128)] * 2
    for path in paths:
        assert pixels(path).std() > 0  # a real image, not a flat (black) one
    assert calls.get(torch.bfloat16, 0) > 0 and calls.get(torch.float32, 0) > 0  # failed, then ran again
    retries = [r for r in pnp_logs.records if r.name == "pnp.models" and r.levelno == logging.WARNING]
    assert any("float32" in r.getMessage() for r in retries)
    assert model_dtypes(bf16_engine) == {torch.bfloat16}  # back in its own dtype


def test_a_retry_without_memory_for_float32_leaves_the_model_in_its_own_dtype(service, bf16_engine, monkeypatch):
    """The float32 weights do not fit (the VAE's conversion fails after the UNet's): the request fails
    with that error, and the service serves the next request in bfloat16."""
    monkeypatch.setattr(service.predictor, "engine", bf16_engine)
    vae, convert = bf16_engine.model.vae, bf16_engine.model.vae.to

    def out_of_memory_in_float32(*args, **kwargs):
        if torch.float32 in args:
            raise torch.OutOfMemoryError("no memory for the float32 weights")
        return convert(*args, **kwargs)

    handle = bf16_engine.model.unet.register_forward_hook(nan_unet_hook({}, only_below_float32=True))
    vae.to = out_of_memory_in_float32
    try:
        with pytest.raises(torch.OutOfMemoryError):
            service.predictor.run(**inputs(generation_prompt="a horse", seed=5))
    finally:
        del vae.to
        handle.remove()
    assert model_dtypes(bf16_engine) == {torch.bfloat16}
    assert sizes(service.predictor.run(**inputs(generation_prompt="a horse", seed=5))) == [(128, 128)] * 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["real", "generation"])
def test_non_finite_everywhere_is_an_error_not_a_black_image(service, bf16_engine, monkeypatch, dtype, mode):
    """NaN in every UNet output, in float32 too (a bfloat16 engine retries once). Which non-finite value
    does not matter: both checks (the cache entry's, the decoded pixels') take NaN and ±inf alike, as
    tests/test_cache.py and tests/test_image_io.py show."""
    if dtype == "bfloat16":
        monkeypatch.setattr(service.predictor, "engine", bf16_engine)
    engine = service.predictor.engine
    tag = f"non-finite-{dtype}-{mode}"
    calls: dict = {}
    # Real images fail the cache entry's check, generated ones the decoded pixels' check.
    request = (
        inputs(input_image=HORSE, inversion_prompt=tag) if mode == "real" else inputs(generation_prompt=tag, seed=3)
    )
    dirs, entries = out_dirs(service), len(engine.cache)
    handle = engine.model.unet.register_forward_hook(nan_unet_hook(calls, only_below_float32=False))
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
    assert all(np.array_equal(a, b) for a, b in zip(after, before, strict=True))


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


def assert_images(paths: list[Path], expected: list[np.ndarray]) -> None:
    assert [pixels(p).shape for p in paths] == [e.shape for e in expected]
    assert all(np.array_equal(pixels(p), e) for p, e in zip(paths, expected, strict=True))


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
    current: dict[str, Any] = {"phase": None}

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
    monkeypatch.setattr(engine, "translate", in_phase("translation", engine.translate))
    raised = []

    def fault(module, args):
        if phase == "decode" or current["phase"] == phase:
            raised.append(phase)
            raise exception(f"injected fault in {phase}")

    site = engine.model.vae.decoder if phase == "decode" else engine.model.unet
    hooks, dirs, last_dir = hook_count(engine), out_dirs(service), predictor.outputs.latest
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
    # The sites neither inject stale features nor keep capturing (and holding) their outputs.
    assert engine.model.injection_unet.idle
    assert model_dtypes(engine) == {torch.float32}
    entries = entries_for(engine, "fault")
    if phase in ("inversion", "extraction"):
        assert entries == [] and len(engine.cache) == 0
    else:  # put once complete, before the translation: it must be whole and finite
        ((_, entry),) = entries
        timesteps = engine.schedule.sampling_timesteps(FAULT_REQUEST["num_inference_steps"])
        assert set(timesteps) <= set(entry.latents)
        assert entry.features.injection_steps.covers(InjectionSteps(8, 5))  # n_f, n_a of 10 steps
        assert entry.is_finite()

    # Ready: a new image, then the same request, succeed with the images of a predictor that never failed
    # (the second one from the cache where the entry was kept).
    assert_images(predictor.run(**OTHER_REQUEST), reference_output["other"])
    assert_images(predictor.run(**FAULT_REQUEST), reference_output["fault"])
    new_dir = predictor.outputs.latest.name
    assert out_dirs(service) == (dirs - {last_dir.name if last_dir else None}) | {new_dir}


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
    assert sizes(second) == [(128, 128)] * 2
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
# cache's own bound is asserted directly (without eviction the new images hold more than the bound).
# The RSS bound, a little over twice the measured growth so that allocator noise does not trip it,
# catches a leak outside the cache of ~2 MB or more per prediction over the 25 measured (e.g. the UNet
# activations or source features of every request kept alive); smaller leaks on the tiny model (an
# output image is 50-110 KB) are within allocator noise, the limit of an RSS check at this scale.
RSS_GROWTH_BOUND = 48 * 2**20
SOAK_BAD_INPUTS: list[dict[str, Any]] = [
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
    assert predictor.engine.cache.max_bytes == SERVICE_CACHE_BYTES
    predictor.engine.cache.clear()  # only this test's images
    rng = np.random.default_rng(0)
    baseline, peak, served, refused, new_images = None, 0, 0, 0, 0
    for i in range(30):
        # New images at two sizes, so that entries of different sizes fill the cache; generation, which
        # is not cached, at the smaller one.
        size = (128, 192)[i % 2] if i % 3 != 1 else 128
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
            assert caught.value.input_name in {*PUBLIC_INPUTS, "input_image"}
            refused += 1
        else:
            paths = predictor.run(**request)
            count = len(prompts.split(";")) + (1 if request["generation_prompt"] else 0)
            assert len(paths) == count and all(p.is_file() for p in paths)
            if request["generation_prompt"]:
                assert sizes(paths) == [(size, size)] * count
            else:
                assert max(sizes(paths)[0]) == size and len(set(sizes(paths))) == 1
                new_images += 1
            served += 1
        if i == 4:
            baseline = rss_bytes()
        elif i > 4:
            peak = max(peak, rss_bytes())
    assert (served, refused, new_images) == (20, 10, 10)
    # Bounded, and evicting: the ten new images' entries do not all fit.
    assert 0 < len(predictor.engine.cache) < new_images and predictor.engine.cache.nbytes <= SERVICE_CACHE_BYTES
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
