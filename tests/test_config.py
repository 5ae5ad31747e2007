"""The request configuration (pnp.config): each input's type, bounds and choices, the prompts, presets.

Every refusal of a bad value is checked here once, in one table, however the config is built; the
predictor, the command line and the HTTP service build the same `PnPConfig`.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

import pytest

from pnp import InputError, PnPConfig, load_preset
from pnp.config import INPUTS, MAX_PROMPTS, OUTPUT_FORMAT, check_output_format

NUMBERS = {name: spec for name, spec in INPUTS.items() if spec.type in (int, float)}
BUILDERS: dict[str, Callable[[dict[str, Any]], PnPConfig]] = {
    "from_mapping": PnPConfig.from_mapping,
    "constructor": lambda values: PnPConfig(**values),
    "dataclasses.replace": lambda values: dataclasses.replace(PnPConfig(), **values),
    "replace": lambda values: PnPConfig().replace(**values),
}


def _out_of_bounds() -> list[tuple[dict[str, Any], str, list[str]]]:
    """Just below and just above each numeric input's range; the message names the range."""
    cases = []
    for name, spec in NUMBERS.items():
        step = 1 if spec.type is int else 0.001
        below, above = spec.minimum - step, spec.maximum + step
        if spec.multiple_of:  # out of range while still a multiple, so only the range can refuse it
            below, above = spec.minimum - spec.multiple_of, spec.maximum + spec.multiple_of
        expected = [str(spec.minimum), str(spec.maximum)]
        cases += [({name: below}, name, expected), ({name: above}, name, expected)]
    return cases


SCHEDULES = list(INPUTS["negative_prompt_schedule"].choices)
# (values, the input the error names, what its message must say)
BAD_VALUES: list[tuple[dict[str, Any], str, list[str]]] = [
    *_out_of_bounds(),
    *[({"image_size": size}, "image_size", ["multiple of 64"]) for size in (193, 200, 500, 1000)],
    ({"num_inference_steps": 20.5}, "num_inference_steps", ["integer"]),
    ({"num_inference_steps": float("inf")}, "num_inference_steps", ["finite"]),
    ({"negative_prompt_alpha": float("nan")}, "negative_prompt_alpha", ["finite"]),
    ({"scale": None}, "scale", ["number"]),
    ({"scale": "high"}, "scale", ["number"]),
    ({"seed": True}, "seed", ["number"]),
    ({"negative_prompt_schedule": "cosine"}, "negative_prompt_schedule", SCHEDULES),
    ({"generation_prompt": 3}, "generation_prompt", ["text"]),
    ({"translation_prompts": 3}, "translation_prompts", ["text"]),
    *[({"translation_prompts": text}, "translation_prompts", ["non-empty"]) for text in ("", "   ", " ; ;  ; ", ";")],
    (
        {"translation_prompts": "; ".join(f"prompt {i}" for i in range(MAX_PROMPTS + 1))},
        "translation_prompts",
        [f"at most {MAX_PROMPTS}", f"got {MAX_PROMPTS + 1}"],
    ),
]


@pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS.keys())
@pytest.mark.parametrize("values, input_name, expected", BAD_VALUES, ids=lambda v: str(v)[:40])
def test_bad_values_are_refused_naming_the_input_and_what_it_allows(build, values, input_name, expected):
    with pytest.raises(InputError) as error:
        build(values)
    assert type(error.value) is InputError
    assert error.value.input_name == input_name
    assert str(error.value).startswith(f"{input_name}: ")
    assert all(text in str(error.value) for text in expected), str(error.value)


@pytest.mark.parametrize("end", ["minimum", "maximum"])
def test_every_numeric_bound_itself_is_accepted_and_stored(end):
    values = {name: getattr(spec, end) for name, spec in NUMBERS.items()}
    config = PnPConfig.from_mapping(values)
    assert {name: getattr(config, name) for name in values} == values


def test_unknown_output_format_is_refused_listing_the_formats():
    with pytest.raises(InputError) as error:
        check_output_format("gif")
    assert str(error.value).startswith("output_format: ")
    assert all(choice in str(error.value) for choice in OUTPUT_FORMAT.choices)
    assert [check_output_format(choice) for choice in OUTPUT_FORMAT.choices] == list(OUTPUT_FORMAT.choices)


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


def test_prompts_are_split_and_stripped_dropping_blank_ones():
    config = PnPConfig.from_mapping({"translation_prompts": " a cat ;; a dog ;"})
    assert config.translation_prompts == ("a cat", "a dog")
    assert PnPConfig(translation_prompts=["a cat", " ", "a dog; a zebra"]).translation_prompts == (
        "a cat",
        "a dog",
        "a zebra",
    )


def test_injection_step_bounds_truncate():
    config = PnPConfig.from_mapping(
        {"num_inference_steps": 33, "feature_injection_threshold": 0.8, "attention_injection_threshold": 0.5}
    )
    assert (config.feature_injection_steps, config.attention_injection_steps) == (26, 16)


# --- presets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["real", "generated", "primitive"])
def test_presets_load_and_validate(name):
    config = load_preset(name, {"translation_prompts": "a cat"})
    assert config.translation_prompts == ("a cat",)
    if name == "primitive":
        assert (config.feature_injection_threshold, config.attention_injection_threshold) == (0.5, 0.5)
        assert config.negative_prompt and config.negative_prompt_alpha < 1
    assert config.generation_mode == (name == "generated")


@pytest.mark.parametrize("text, input_name", [("scale: 40\n", "scale"), ("sampling_steps: 20\n", "sampling_steps")])
def test_presets_with_bad_keys_or_values_name_the_key(tmp_path, text, input_name):
    preset = tmp_path / "bad.yaml"
    preset.write_text(text)
    with pytest.raises(InputError) as error:
        load_preset(preset)
    assert error.value.input_name == input_name


def test_unknown_preset_lists_the_presets():
    with pytest.raises(InputError, match="primitive"):
        load_preset("nonexistent")
