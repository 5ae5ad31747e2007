"""Requests: validation errors that name the input, presets, the cost model and the inversion cache."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest
import torch
from PIL import Image

from pnp import InputError, PnPConfig, PnPEngine, load_preset
from pnp.cache import SourceCache, SourceEntry, SourceKey
from pnp.config import INPUTS, MAX_PROMPTS
from pnp.injection import RESNET_KEY, SourceFeatures

HORSE = "examples/horse.jpg"
FAST = {"image_size": 128, "num_inference_steps": 10, "ddim_inversion_steps": 10}


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> PnPEngine:
    return PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu")


BAD_VALUES = [
    ({"translation_prompts": " ; ;"}, "translation_prompts"),
    ({"translation_prompts": ";".join(["x"] * (MAX_PROMPTS + 1))}, "translation_prompts"),
    ({"translation_prompts": 3}, "translation_prompts"),
    ({"feature_injection_threshold": 1.5}, "feature_injection_threshold"),
    ({"attention_injection_threshold": -0.1}, "attention_injection_threshold"),
    ({"scale": 31}, "scale"),
    ({"scale": None}, "scale"),
    ({"negative_prompt_alpha": float("nan")}, "negative_prompt_alpha"),
    ({"num_inference_steps": 5}, "num_inference_steps"),
    ({"num_inference_steps": 20.5}, "num_inference_steps"),
    ({"num_inference_steps": float("inf")}, "num_inference_steps"),
    ({"ddim_inversion_steps": 1000}, "ddim_inversion_steps"),
    ({"image_size": 500}, "image_size"),
    ({"image_size": 2048}, "image_size"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
    ({"seed": True}, "seed"),
    ({"negative_prompt_schedule": "cosine"}, "negative_prompt_schedule"),
    ({"scale": "high"}, "scale"),
    ({"generation_prompt": 3}, "generation_prompt"),
]
BUILDERS = {
    "from_mapping": PnPConfig.from_mapping,
    "constructor": lambda values: PnPConfig(**values),
    "dataclasses.replace": lambda values: dataclasses.replace(PnPConfig(), **values),
    "replace": lambda values: PnPConfig().replace(**values),
}


@pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS.keys())
@pytest.mark.parametrize("values, input_name", BAD_VALUES)
def test_bad_values_are_refused_naming_the_input_however_the_config_is_built(build, values, input_name):
    with pytest.raises(InputError) as error:
        build(values)
    assert error.value.input_name == input_name
    assert str(error.value).startswith(f"{input_name}:")


def test_unknown_inputs_are_refused_naming_them():
    with pytest.raises(InputError) as error:
        PnPConfig.from_mapping({"strength": 0.5})
    assert error.value.input_name == "strength"
    assert "known inputs are ddim_inversion_steps" in str(error.value)


def test_the_fields_are_the_inputs_with_their_types_and_defaults():
    assert [field.name for field in dataclasses.fields(PnPConfig)] == list(INPUTS)
    hints, config = typing.get_type_hints(PnPConfig), PnPConfig()
    for name, spec in INPUTS.items():
        if name == "translation_prompts":  # ';'-separated text in a request, stored as the prompts
            assert hints[name] == tuple[str, ...]
            assert config.translation_prompts == (spec.default,)
        else:
            optional = spec.default is None  # the seed: None asks for a random one
            assert hints[name] == (spec.type | None if optional else spec.type), name
            assert optional or type(spec.default) is spec.type, name
            assert getattr(config, name) == spec.default, name


def test_values_are_stored_as_their_inputs_type():
    config = PnPConfig.from_mapping({"num_inference_steps": 20.0, "scale": 7, "seed": 3.0})
    assert (config.num_inference_steps, config.scale, config.seed) == (20, 7.0, 3)
    assert (type(config.num_inference_steps), type(config.scale), type(config.seed)) == (int, float, int)


def test_prompts_are_split_and_stripped():
    config = PnPConfig.from_mapping({"translation_prompts": " a cat ;; a dog ;"})
    assert config.translation_prompts == ("a cat", "a dog")
    assert PnPConfig(translation_prompts=["a cat", " ", "a dog; a zebra"]).translation_prompts == ("a cat", "a dog", "a zebra")


def test_injection_step_bounds_truncate():
    config = PnPConfig.from_mapping({"num_inference_steps": 33, "feature_injection_threshold": 0.8, "attention_injection_threshold": 0.5})
    assert (config.feature_injection_steps, config.attention_injection_steps) == (26, 16)


def test_no_image_and_no_generation_prompt_is_refused(engine):
    with pytest.raises(InputError) as error:
        engine(PnPConfig.from_mapping(FAST), None)
    assert error.value.input_name == "input_image"


def test_inversion_steps_that_do_not_nest_are_refused_with_valid_values(engine):
    evals_before = engine.unet_evals
    with pytest.raises(InputError) as error:
        engine(PnPConfig.from_mapping({**FAST, "num_inference_steps": 50, "ddim_inversion_steps": 30}), HORSE)
    assert error.value.input_name == "ddim_inversion_steps"
    assert engine.unet_evals == evals_before  # refused before any work
    proposed = [int(v) for v in str(error.value).split("nearest valid values: ")[1].split(", ")]
    assert proposed == [50, 99, 100]  # leading spacing: 1000 // M must divide 20 and reach t_0 = 981
    for valid in proposed:
        engine.schedule.check_nesting(50, valid, 10, 1000)


def test_unreadable_image_is_refused_naming_input_image(engine, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(InputError) as error:
        engine(PnPConfig.from_mapping(FAST), bad)
    assert error.value.input_name == "input_image"
    assert "could not be read" in str(error.value)


@pytest.mark.parametrize("name", ["real", "generated", "primitive"])
def test_presets_load_and_validate(name):
    config = load_preset(name, {"translation_prompts": "a cat"})
    assert config.translation_prompts == ("a cat",)
    if name == "primitive":
        assert (config.feature_injection_threshold, config.attention_injection_threshold) == (0.5, 0.5)
        assert config.negative_prompt and config.negative_prompt_alpha < 1
    assert config.generation_mode == (name == "generated")


@pytest.mark.parametrize(
    "text, input_name", [("scale: 40\n", "scale"), ("sampling_steps: 20\n", "sampling_steps")]
)
def test_presets_with_bad_keys_or_values_name_the_key(tmp_path, text, input_name):
    preset = tmp_path / "bad.yaml"
    preset.write_text(text)
    with pytest.raises(InputError) as error:
        load_preset(preset)
    assert error.value.input_name == input_name


def test_unknown_preset_lists_the_presets():
    with pytest.raises(InputError, match="primitive"):
        load_preset("nonexistent")


def test_cost_model_of_the_default_request(engine):
    """docs/cost-model.md: M + max(n_f, n_a) + 2NP on a new image, 2NP on a repeat (defaults: M = N = 50)."""
    defaults = {"image_size": 128}
    new = engine(PnPConfig.from_mapping({**defaults, "translation_prompts": "a cat"}), HORSE).stats
    assert [new.phases[p].unet_evals for p in ("inversion", "extraction", "translation")] == [50, 40, 100]
    assert new.unet_evals == 190 and not new.cache_hit

    repeat = engine(PnPConfig.from_mapping({**defaults, "translation_prompts": "a dog; a zebra"}), HORSE).stats
    assert repeat.cache_hit and repeat.unet_evals == 200

    four = engine(PnPConfig.from_mapping({**defaults, "translation_prompts": "a;b;c;d"}), Image.open(HORSE).transpose(Image.Transpose.FLIP_LEFT_RIGHT)).stats
    assert four.unet_evals == 90 + 400


def test_cache_hit_gives_identical_images_for_only_the_translation(engine):
    request = PnPConfig.from_mapping({**FAST, "translation_prompts": "a cat", "inversion_prompt": "a horse"})
    first = engine(request, HORSE)
    second = engine(request, Image.open(HORSE))  # same pixels, another object
    assert second.stats.cache_hit
    assert second.stats.unet_evals == second.stats.phases["translation"].unet_evals == 20
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    other_prompt = engine(request.replace(inversion_prompt="a pony"), HORSE)
    assert not other_prompt.stats.cache_hit


def cached_features(engine: PnPEngine, inversion_prompt: str) -> SourceFeatures:
    (entry,) = [e for k, e in engine.cache.items() if k.inversion_prompt == inversion_prompt]
    return entry.features


def test_an_entry_holds_only_the_injected_steps(engine):
    stats = engine(PnPConfig.from_mapping({**FAST, "inversion_prompt": "defaults"}), HORSE).stats
    assert stats.phases["extraction"].unet_evals == 8  # max(n_f, n_a) = max(8, 5)
    features = cached_features(engine, "defaults")
    assert (features.resnet_steps, features.attention_steps) == (8, 5)
    assert {len(t) for k, t in features.features.items() if k != RESNET_KEY} == {5}
    assert len(features.features[RESNET_KEY]) == 8
    # Nothing else is held: each kept tensor owns exactly its own memory.
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in features.features.values())


def test_longer_injection_extracts_again_for_the_longer_of_both_requests(engine):
    short = PnPConfig.from_mapping({**FAST, "inversion_prompt": "steps", "feature_injection_threshold": 0.3, "attention_injection_threshold": 0.5})
    assert engine(short, HORSE).stats.phases["extraction"].unet_evals == 5
    within = engine(short.replace(feature_injection_threshold=0.2, attention_injection_threshold=0.4), HORSE).stats
    assert within.cache_hit and within.unet_evals == within.phases["translation"].unet_evals
    longer = short.replace(feature_injection_threshold=0.6, attention_injection_threshold=0.2)
    stats = engine(longer, HORSE).stats
    assert stats.cache_hit and stats.phases["inversion"].unet_evals == 0
    assert stats.phases["extraction"].unet_evals == 6  # one batched pass for n_f = 6, keeping n_a = 5
    extended = cached_features(engine, "steps")
    assert (extended.resnet_steps, extended.attention_steps) == (6, 5)
    reference = PnPEngine(engine.model)  # a fresh cache computes them in one go
    reference(longer.replace(attention_injection_threshold=0.5), HORSE)
    (fresh,) = [e.features for _, e in reference.cache.items()]
    assert extended.features.keys() == fresh.features.keys()
    for name, tensor in fresh.features.items():
        # Equal up to float noise from batching the timesteps differently; a step out of place is far off.
        torch.testing.assert_close(extended.features[name], tensor, atol=1e-4, rtol=1e-4)


def test_a_request_that_fails_midway_leaves_no_cache_entry(engine):
    request = PnPConfig.from_mapping({**FAST, "inversion_prompt": "cancelled"})
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
    assert len(engine.cache) == entries
    stats = engine(request, HORSE).stats
    assert not stats.cache_hit and stats.phases["inversion"].unet_evals == 10


def entry_of(nbytes: int) -> SourceEntry:
    return SourceEntry(torch.zeros(0), {0: torch.zeros(nbytes // 4)}, SourceFeatures({}, 0, 0))


def key(name: str) -> SourceKey:
    return SourceKey("model", "torch.float32", name, 64, 64, 50, 50, "")


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
