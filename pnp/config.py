"""The request configuration: the public inputs, their bounds, presets, and validation.

Every interface (the Cog predictor, the command line, the Python API) builds a `PnPConfig` through
`PnPConfig.from_mapping`, so each input is checked in one place and a bad one is refused with an
`InputError` that names it and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .errors import InputError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

MAX_PROMPTS = 8
"""Most target prompts one request may carry; each one costs 2N UNet evaluations."""

NEGATIVE_PROMPT_SCHEDULES = ("linear", "constant", "exp")
OUTPUT_FORMATS = ("png", "webp", "jpg")


@dataclass(frozen=True)
class InputSpec:
    """What one public input accepts, shared by validation, the Cog schema and the command line."""

    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    multiple_of: int | None = None


# In the public schema's order (README, Inputs): the published model's inputs first, then the new ones.
INPUTS: dict[str, InputSpec] = {
    "ddim_inversion_steps": InputSpec(
        50,
        "Number of DDIM steps used to invert the input image. Every sampling timestep must be one of "
        "the inversion timesteps (for 50 sampling steps: 50, 99, 100, 197-200, 246-250, 491-500 or "
        "981-999); other values are refused with the nearest valid ones.",
        minimum=10,
        maximum=999,
    ),
    "generation_prompt": InputSpec(
        "",
        "Generate the source image from this text instead of using input_image; the generated image "
        "is returned first.",
    ),
    "scale": InputSpec(10.0, "Classifier-free guidance scale of the translation.", minimum=0.0, maximum=30.0),
    "feature_injection_threshold": InputSpec(
        0.8,
        "Fraction of the sampling steps, from the start, during which the source's ResNet features "
        "are injected. Higher keeps more of the source's structure.",
        minimum=0.0,
        maximum=1.0,
    ),
    "translation_prompts": InputSpec(
        "a photo of a robot horse",
        f"Target prompts separated by ';', one output image per prompt (at most {MAX_PROMPTS}).",
    ),
    "negative_prompt": InputSpec(
        "", "Text blended into the unconditional branch to steer away from (e.g. a description of the source)."
    ),
    "negative_prompt_alpha": InputSpec(
        1.0,
        "Strength of the negative prompt, lower is stronger: the unconditional branch gets weight alpha times the schedule, the negative prompt the rest (with the constant schedule, 1 leaves it out).",
        minimum=0.0,
        maximum=1.0,
    ),
    "num_inference_steps": InputSpec(
        50, "Number of DDIM sampling steps of generation and translation.", minimum=10, maximum=200
    ),
    "attention_injection_threshold": InputSpec(
        0.5,
        "Fraction of the sampling steps, from the start, during which the source's self-attention "
        "queries and keys are injected.",
        minimum=0.0,
        maximum=1.0,
    ),
    "negative_prompt_schedule": InputSpec(
        "linear",
        "How the negative prompt's weight evolves over the sampling steps.",
        choices=NEGATIVE_PROMPT_SCHEDULES,
    ),
    "inversion_prompt": InputSpec("", "Text that conditions the inversion of the input image and its source features."),
    "image_size": InputSpec(
        512,
        "Longer side of the working resolution in pixels (a multiple of 64); the other side keeps the "
        "aspect ratio, rounded to a multiple of 64.",
        minimum=128,
        maximum=1024,
        multiple_of=64,
    ),
    "seed": InputSpec(
        None,
        "Seed of the generation noise (generation mode). Leave empty for a random seed; the seed used is logged.",
        minimum=0,
        maximum=2**32 - 1,
    ),
}


def parse_prompts(text: str) -> tuple[str, ...]:
    """Split `;`-separated prompts, dropping blank ones; refuse none or more than MAX_PROMPTS."""
    if not isinstance(text, str):
        raise InputError("translation_prompts", f"must be text, not {type(text).__name__}")
    prompts = tuple(part.strip() for part in text.split(";") if part.strip())
    if not prompts:
        raise InputError("translation_prompts", "give at least one non-empty prompt (separate several with ';')")
    if len(prompts) > MAX_PROMPTS:
        raise InputError(
            "translation_prompts", f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}"
        )
    return prompts


def check_output_format(output_format: str) -> str:
    """The format of the returned images, refused unless it is one of OUTPUT_FORMATS."""
    if output_format not in OUTPUT_FORMATS:
        raise InputError("output_format", f"must be one of {', '.join(OUTPUT_FORMATS)}; got {output_format!r}")
    return output_format


def _check_number(name: str, value: Any, spec: InputSpec) -> int | float:
    integral = isinstance(spec.default, int) or name == "seed"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(name, f"must be a number, not {value!r}")
    if integral and value != int(value):
        raise InputError(name, f"must be an integer, not {value!r}")
    if not math.isfinite(value):
        raise InputError(name, f"must be a finite number, not {value!r}")
    if not spec.minimum <= value <= spec.maximum:
        raise InputError(name, f"must be between {spec.minimum} and {spec.maximum}, got {value}")
    if spec.multiple_of and value % spec.multiple_of:
        raise InputError(name, f"must be a multiple of {spec.multiple_of}, got {value}")
    return int(value) if integral else float(value)


def _check(name: str, value: Any) -> Any:
    spec = INPUTS[name]
    if spec.choices is not None:
        if value not in spec.choices:
            raise InputError(name, f"must be one of {', '.join(spec.choices)}; got {value!r}")
        return value
    if spec.minimum is not None:
        return None if value is None and spec.default is None else _check_number(name, value, spec)
    if not isinstance(value, str):
        raise InputError(name, f"must be text, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class PnPConfig:
    """One validated translation request (everything but the image itself)."""

    translation_prompts: tuple[str, ...] = parse_prompts(INPUTS["translation_prompts"].default)
    generation_prompt: str = ""
    ddim_inversion_steps: int = 50
    scale: float = 10.0
    feature_injection_threshold: float = 0.8
    attention_injection_threshold: float = 0.5
    negative_prompt: str = ""
    negative_prompt_alpha: float = 1.0
    negative_prompt_schedule: str = "linear"
    num_inference_steps: int = 50
    inversion_prompt: str = ""
    image_size: int = 512
    seed: int | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PnPConfig:
        """Validate `values` (defaults for what is missing); `translation_prompts` may be `;`-separated text."""
        unknown = sorted(set(values) - set(INPUTS))
        if unknown:
            raise InputError(unknown[0], f"unknown input; known inputs are {', '.join(INPUTS)}")
        checked: dict[str, Any] = {}
        for name, value in values.items():
            if name == "translation_prompts":
                checked[name] = parse_prompts(value if isinstance(value, str) else ";".join(value))
            else:
                checked[name] = _check(name, value)
        return cls(**checked)

    @property
    def generation_mode(self) -> bool:
        return bool(self.generation_prompt.strip())

    @property
    def feature_injection_steps(self) -> int:
        """n_f: ResNet features are injected at sampling steps i < n_f."""
        return int(self.num_inference_steps * self.feature_injection_threshold)

    @property
    def attention_injection_steps(self) -> int:
        """n_a: self-attention queries and keys are injected at sampling steps i < n_a."""
        return int(self.num_inference_steps * self.attention_injection_threshold)

    def replace(self, **changes: Any) -> PnPConfig:
        return PnPConfig.from_mapping({**self.as_dict(), **changes})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_preset(preset: str | Path, overrides: Mapping[str, Any] | None = None) -> PnPConfig:
    """Read an OmegaConf YAML preset (a path, or a name in `configs/`) and apply `overrides` on top."""
    path = Path(preset)
    if not path.suffix:
        path = CONFIGS_DIR / f"{preset}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
        raise InputError("config", f"no preset {str(preset)!r}; presets in {CONFIGS_DIR}: {names}")
    merged = OmegaConf.merge(OmegaConf.load(path), OmegaConf.create(dict(overrides or {})))
    return PnPConfig.from_mapping(OmegaConf.to_container(merged, resolve=True))
