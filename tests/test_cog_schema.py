"""The Cog packaging: cog.yaml, the image's pinned requirements, and the OpenAPI schema of predict.py.

The schema is what Replicate's web form and HTTP API (and coglet's input validation) see, so it must
list the public inputs in their order with the bounds of `pnp.config.PUBLIC_INPUTS`. `cog build` reads
predict.py statically (tree-sitter), keeping only literal Input() values, so the tests also check that
a static reader sees exactly what Cog's runtime inspector (script/openapi-schema) sees.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from pnp.config import INPUTS, PUBLIC_INPUTS
from tests.helpers import ROOT

SCRIPT = ROOT / "script" / "openapi-schema"

# The published model's eight inputs in their order, then the new ones.
SCHEMA_ORDER = [
    "input_image",
    "ddim_inversion_steps",
    "generation_prompt",
    "scale",
    "feature_injection_threshold",
    "translation_prompts",
    "negative_prompt",
    "negative_prompt_alpha",
    "num_inference_steps",
    "attention_injection_threshold",
    "negative_prompt_schedule",
    "inversion_prompt",
    "image_size",
    "seed",
    "output_format",
    "mask",
    "auto_mask",
    "input_video",
    "video_frames",
    "video_fps",
    "keyframe_interval",
]
FILES = ("input_image", "mask", "input_video")
JSON_TYPES = {str: "string", float: "number", int: "integer", bool: "boolean"}


def _shared_cog_file(name: str) -> Path:
    """Cog's own reference data, kept in tests/data/cog (see its NOTICE)."""
    return ROOT / "tests" / "data" / "cog" / name


def _pins_of(requirements: list[str], source: str) -> dict[str, str]:
    pins = {}
    for line in requirements:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        assert not line.startswith("-"), f"{source}: Cog copies this file alone, so {line!r} cannot work"
        name, sep, version = line.partition("==")
        assert sep, f"{source}: {line!r} is not pinned with =="
        pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    return pins


def _pins(path: Path) -> dict[str, str]:
    return _pins_of(path.read_text().splitlines(), path.name)


@pytest.fixture(scope="module")
def cog_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cog.yaml").read_text())


# --- cog.yaml and the image's requirements ---------------------------------------------------------


def test_cog_yaml_is_valid_for_cog(cog_config: dict[str, Any]) -> None:
    schema = json.loads(_shared_cog_file("config_schema_v1.0.json").read_text())
    jsonschema.validate(cog_config, schema)
    assert cog_config["build"]["gpu"] is True
    # `run` is the current key; `predict` is the deprecated one.
    assert cog_config["run"] == "predict.py:Predictor"
    assert "predict" not in cog_config
    assert (ROOT / cog_config["build"]["python_requirements"]).is_file()


def test_the_entry_point_is_a_current_cog_runner(cog_config: dict[str, Any]) -> None:
    module_file, class_name = cog_config["run"].split(":")
    tree = ast.parse((ROOT / module_file).read_text())
    (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name]
    assert [ast.unparse(base) for base in cls.bases] == ["BaseRunner"]  # not the deprecated BasePredictor
    methods = {node.name for node in cls.body if isinstance(node, ast.FunctionDef)}
    assert {"setup", "run"} <= methods and "predict" not in methods


def test_torch_pin_is_in_cogs_torch_cuda_matrix(cog_config: dict[str, Any]) -> None:
    torch_matrix = json.loads(_shared_cog_file("torch_compatibility.json").read_text())
    cuda_images = json.loads(_shared_cog_file("cuda_compatibility.json").read_text())
    build = cog_config["build"]
    torch_version = _pins(ROOT / build["python_requirements"])["torch"]
    python = str(build["python_version"])
    cuda = str(build["cuda"])
    builds = [
        entry
        for entry in torch_matrix
        if entry["Torch"].split("+")[0] == torch_version and entry["CUDA"] == cuda and python in entry["Pythons"]
    ]
    assert builds, f"torch {torch_version} for CUDA {cuda} on Python {python} is not in Cog's matrix"
    assert any(image["CUDA"].startswith(cuda + ".") for image in cuda_images), f"Cog has no CUDA {cuda} base image"


def test_torch_pin_is_the_newest_in_cogs_matrix_for_the_images_cuda_and_python(cog_config: dict[str, Any]) -> None:
    # A stale pin fails here once tests/data/cog/torch_compatibility.json is refreshed from Cog.
    # The matrix is not sorted, and "2.10.0" < "2.9.1" as strings: compare versions, local part off.
    torch_matrix = json.loads(_shared_cog_file("torch_compatibility.json").read_text())
    build = cog_config["build"]
    python, cuda = str(build["python_version"]), str(build["cuda"])
    offered = [
        Version(entry["Torch"]).public for entry in torch_matrix if entry["CUDA"] == cuda and python in entry["Pythons"]
    ]
    assert offered, f"Cog's matrix has no torch for CUDA {cuda} on Python {python}"
    newest = max(offered, key=Version)
    pinned = Version(_pins(ROOT / build["python_requirements"])["torch"])
    assert not pinned.local, f"pin torch as {pinned.public}: Cog picks the CUDA build itself"
    assert pinned == Version(newest), (
        f"torch {pinned} is pinned, but Cog's matrix has {newest} for CUDA {cuda} on Python {python}"
    )


def test_image_requirements_equal_the_engines(cog_config: dict[str, Any]) -> None:
    image = _pins(ROOT / cog_config["build"]["python_requirements"])
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_bound,) = [Requirement(d) for d in dependencies if Requirement(d).name == "torch"]
    # The engine only bounds torch from below; the image pins its CUDA build, which must satisfy the bound.
    assert Version(image["torch"]) in torch_bound.specifier
    engine = _pins_of([d for d in dependencies if Requirement(d).name != "torch"], "pyproject.toml")
    assert {name: version for name, version in image.items() if name != "torch"} == engine


def test_image_runs_the_cog_sdk_the_tests_use(cog_config: dict[str, Any]) -> None:
    import cog

    dev = (ROOT / "requirements-dev.txt").read_text()
    assert f"cog=={cog_config['build']['sdk_version']}" in dev.splitlines()
    assert cog.__version__ == cog_config["build"]["sdk_version"]


# --- the OpenAPI schema -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema(openapi_schema: dict[str, Any]) -> dict[str, Any]:
    """What script/openapi-schema writes (conftest.py runs it once, for these tests and the HTTP server)."""
    return openapi_schema


@pytest.fixture(scope="module")
def properties(schema: dict[str, Any]) -> dict[str, Any]:
    return schema["components"]["schemas"]["Input"]["properties"]


def _enum_component(schema: dict[str, Any], prop: dict[str, Any]) -> dict[str, Any]:
    (ref,) = prop["allOf"]
    return schema["components"]["schemas"][ref["$ref"].rsplit("/", 1)[-1]]


def _enum(schema: dict[str, Any], prop: dict[str, Any]) -> list[Any]:
    return _enum_component(schema, prop)["enum"]


def test_inputs_are_specs_in_specs_order(properties: dict[str, Any]) -> None:
    assert list(properties) == SCHEMA_ORDER
    assert [properties[name]["x-order"] for name in SCHEMA_ORDER] == list(range(len(SCHEMA_ORDER)))
    # The engine's inputs, in the same order: all but the files and output_format.
    assert list(INPUTS) == [name for name in SCHEMA_ORDER if name not in (*FILES, "output_format")]
    # The front ends' table: every input but the files, in the same order.
    assert list(PUBLIC_INPUTS) == [name for name in SCHEMA_ORDER if name not in FILES]


def test_no_input_is_required(schema: dict[str, Any]) -> None:
    # Existing API callers send only some inputs: every input has a default.
    assert "required" not in schema["components"]["schemas"]["Input"]


@pytest.mark.parametrize("name", list(PUBLIC_INPUTS))
def test_each_input_has_its_specs_type_default_bounds_and_description(
    schema: dict[str, Any], properties: dict[str, Any], name: str
) -> None:
    spec, prop = PUBLIC_INPUTS[name], properties[name]
    assert prop["description"] == spec.description
    if spec.default is None:
        assert prop.get("default") is None and prop.get("nullable") is True
    else:
        assert prop["default"] == spec.default
    if spec.choices is not None:
        assert _enum(schema, prop) == list(spec.choices)
        assert _enum_component(schema, prop)["type"] == JSON_TYPES[spec.type]
    else:
        assert prop["type"] == JSON_TYPES[spec.type]
    assert prop.get("minimum") == spec.minimum
    assert prop.get("maximum") == spec.maximum


@pytest.mark.parametrize("name", FILES)
def test_files_are_optional_uris_with_descriptions(properties: dict[str, Any], name: str) -> None:
    file = properties[name]
    assert file["type"] == "string" and file["format"] == "uri"
    assert file["nullable"] is True and file.get("default") is None
    assert file["description"]


def test_output_is_a_list_of_files(schema: dict[str, Any]) -> None:
    output = schema["components"]["schemas"]["Output"]
    assert output["type"] == "array"
    assert output["items"] == {"type": "string", "format": "uri"}


def test_schema_script_is_deterministic(schema: dict[str, Any]) -> None:
    # Another process (another hash seed) printing to stdout writes the same document as the file.
    printed = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", "-"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert json.loads(printed) == schema


# --- what `cog build`'s static reader sees ----------------------------------------------------------


def _static_string(text: str) -> str | None:
    """How cog's static reader (pkg/schema/python parseStringLiteral) reads a string literal: quotes off, no escapes."""
    for quote in ('"""', "'''", '"', "'"):
        if text.startswith(quote) and text.endswith(quote) and len(text) >= 2 * len(quote):
            return text[len(quote) : -len(quote)]
    return None


def _static_number(text: str) -> float | None:
    if "_" in text or not re.fullmatch(r"-?\s*[0-9.eE+-]+", text):
        return None
    try:
        return float(text.replace(" ", ""))
    except ValueError:
        return None


def _static_inputs() -> dict[str, dict[str, Any]]:
    """predict.py's run() Input() arguments as a source-only reader gets them; fails where it would lose one."""
    source = (ROOT / "predict.py").read_text()
    tree = ast.parse(source)
    (run,) = [
        node
        for cls in tree.body
        if isinstance(cls, ast.ClassDef) and cls.name == "Predictor"
        for node in cls.body
        if isinstance(node, ast.FunctionDef) and node.name == "run"
    ]
    params = run.args.args[1:]
    assert not run.args.kwonlyargs and not run.args.vararg and len(run.args.defaults) == len(params)
    inputs = {}
    for param, default in zip(params, run.args.defaults, strict=True):
        assert isinstance(default, ast.Call) and ast.unparse(default.func) == "Input", param.arg
        assert not default.args, f"{param.arg}: Input() arguments must be keywords"
        read: dict[str, Any] = {}
        for keyword in default.keywords:
            node, where = keyword.value, f"{param.arg}: {keyword.arg}="
            try:
                value = ast.literal_eval(node)
            except ValueError:
                pytest.fail(
                    f"{where}{ast.get_source_segment(source, node)} is not a literal; `cog build` would drop it"
                )
            if keyword.arg == "choices":
                assert isinstance(node, ast.List), f"{where} must be a list literal"
                items = [ast.get_source_segment(source, item) for item in node.elts]
                read[keyword.arg] = [
                    _static_string(t) if isinstance(v, str) else _static_number(t)
                    for t, v in zip(items, value, strict=True)
                ]
            elif isinstance(value, str):
                assert isinstance(node, ast.Constant), f"{where} must be one plain string literal"
                read[keyword.arg] = _static_string(ast.get_source_segment(source, node))
            elif value is None or isinstance(value, bool):
                read[keyword.arg] = value
            else:
                read[keyword.arg] = _static_number(ast.get_source_segment(source, node))
            assert read[keyword.arg] == value, f"{where} reads as {read[keyword.arg]!r} statically, not {value!r}"
        inputs[param.arg] = read
    return inputs


def test_cog_builds_static_reader_sees_the_same_schema(schema: dict[str, Any], properties: dict[str, Any]) -> None:
    static = _static_inputs()
    assert list(static) == list(properties)
    for name, read in static.items():
        prop = properties[name]
        assert read.get("description") == prop.get("description"), name
        assert read.get("default") == prop.get("default"), name
        assert read.get("ge") == prop.get("minimum"), name
        assert read.get("le") == prop.get("maximum"), name
        if "choices" in read:
            assert read["choices"] == _enum(schema, prop), name


# --- script/download-weights ------------------------------------------------------------------------


def test_download_weights_fails_clearly_offline(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    target = tmp_path / "weights"
    result = subprocess.run(
        [sys.executable, str(ROOT / "script" / "download-weights"), "some-owner/some-model", "--dir", str(target)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "could not download 'some-owner/some-model'" in result.stderr
    assert "PNP_MODEL" in result.stderr
    assert result.stdout == ""
