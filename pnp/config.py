"""The request configuration: the public inputs, their types and bounds, presets, and validation.

`INPUTS` defines each of the engine's inputs once. `PnPConfig` takes its fields and defaults from it
and checks every field when it is constructed, so each input is checked in one place, whichever
interface (the Cog predictor, the command line, the Python API) builds it. What needs the model's
scheduler (the step counts against its training timesteps, and the inversion steps against the
sampling steps) the engine checks, before any UNet evaluation. A bad input is refused with an
`InputError` that names it and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .errors import InputError
from .injection import InjectionSteps
from .schedules import NEGATIVE_PROMPT_SCHEDULES

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

MAX_PROMPTS = 8
"""Most target prompts one request may carry; each one costs 2N UNet evaluations."""


@dataclass(frozen=True)
class InputSpec:
    """What one public input accepts, shared by validation, the Cog schema test and the command line.

    `type` is the input's type in a request: int, float (both with bounds), str or bool. None is accepted
    only where it is the default (the seed, where it means a random one).
    """

    type: type
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    multiple_of: int | None = None

    def check(self, name: str, value: Any) -> Any:
        """`value` as a `type`, or an InputError saying what the input `name` allows."""
        if value is None and self.default is None:
            return None
        if self.type is str:
            if self.choices is not None and value not in self.choices:
                raise InputError(name, f"must be one of {', '.join(self.choices)}; got {value!r}")
            if not isinstance(value, str):
                raise InputError(name, f"must be text, not {type(value).__name__}")
            return value
        if self.type is bool:
            if not isinstance(value, bool):
                raise InputError(name, f"must be true or false, not {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(name, f"must be a number, not {value!r}")
        if not math.isfinite(value):
            raise InputError(name, f"must be a finite number, not {value!r}")
        if self.type is int and value != int(value):
            raise InputError(name, f"must be an integer, not {value!r}")
        if not self.minimum <= value <= self.maximum:
            raise InputError(name, f"must be between {self.minimum} and {self.maximum}, got {value}")
        if self.multiple_of and value % self.multiple_of:
            raise InputError(name, f"must be a multiple of {self.multiple_of}, got {value}")
        return self.type(value)


# In the public schema's order (README, Inputs): the published model's inputs first, then the new ones.
INPUTS: dict[str, InputSpec] = {
    "ddim_inversion_steps": InputSpec(
        int,
        50,
        "Number of DDIM steps used to invert the input image. Every sampling timestep must be one of "
        "the inversion timesteps (for 50 sampling steps: 50, 99, 100, 197-200, 246-250, 491-500 or "
        "981-999); other values are refused with the nearest valid ones.",
        minimum=10,
        maximum=999,
    ),
    "generation_prompt": InputSpec(
        str,
        "",
        "Generate the source image from this text instead of using input_image; the generated image is returned first.",
    ),
    "scale": InputSpec(float, 10.0, "Classifier-free guidance scale of the translation.", minimum=0.0, maximum=30.0),
    "feature_injection_threshold": InputSpec(
        float,
        0.8,
        "Fraction of the sampling steps, from the start, during which the source's ResNet features "
        "are injected. Higher keeps more of the source's structure.",
        minimum=0.0,
        maximum=1.0,
    ),
    "translation_prompts": InputSpec(
        str,
        "a photo of a robot horse",
        f"Target prompts separated by ';', one output image per prompt (at most {MAX_PROMPTS}).",
    ),
    "negative_prompt": InputSpec(
        str, "", "Text blended into the unconditional branch to steer away from (e.g. a description of the source)."
    ),
    "negative_prompt_alpha": InputSpec(
        float,
        1.0,
        "Strength of the negative prompt, lower is stronger: the unconditional branch gets weight alpha times "
        "the schedule, the negative prompt the rest (with the constant schedule, 1 leaves it out).",
        minimum=0.0,
        maximum=1.0,
    ),
    "num_inference_steps": InputSpec(
        int, 50, "Number of DDIM sampling steps of generation and translation.", minimum=10, maximum=200
    ),
    "attention_injection_threshold": InputSpec(
        float,
        0.5,
        "Fraction of the sampling steps, from the start, during which the source's self-attention "
        "queries and keys are injected.",
        minimum=0.0,
        maximum=1.0,
    ),
    "negative_prompt_schedule": InputSpec(
        str,
        "linear",
        "How the negative prompt's weight evolves over the sampling steps.",
        choices=tuple(NEGATIVE_PROMPT_SCHEDULES),
    ),
    "inversion_prompt": InputSpec(
        str,
        "",
        "Text that conditions the DDIM inversion of the input image (the source features always use the empty prompt).",
    ),
    "image_size": InputSpec(
        int,
        512,
        "Longer side of the working resolution in pixels (a multiple of 64); the other side keeps the "
        "aspect ratio, rounded to a multiple of 64.",
        minimum=128,
        maximum=1024,
        multiple_of=64,
    ),
    "seed": InputSpec(
        int,
        None,
        "Seed of the generation noise (generation mode), and of auto_mask's noises (0 if empty for an "
        "input image). Leave empty for a random seed; the seed used is logged.",
        minimum=0,
        maximum=2**32 - 1,
    ),
    "auto_mask": InputSpec(
        bool,
        False,
        "Edit only where each prompt differs from the source: a mask per prompt, computed from where the "
        "prompt changes the model's noise prediction against the source's description (DiffEdit). Describe "
        "the input image in inversion_prompt (in generation mode, generation_prompt describes it). Helps "
        "local edits of an object; a global restyle needs no mask. Not with mask.",
    ),
    "video_frames": InputSpec(
        int,
        40,
        "With input_video: the most frames to edit, from the video's start (at video_fps); up to a minute at 30 "
        "fps. Past 25 keyframe groups the keyframes go in windows beside 8 anchors, so memory stays bounded.",
        minimum=1,
        maximum=1800,
    ),
    "video_fps": InputSpec(
        float,
        0.0,
        "With input_video: frames per second to take from the video and to write; 0 keeps the video's own "
        "rate. Otherwise between 1 and 60.",
        minimum=0.0,
        maximum=60.0,
    ),
    "keyframe_interval": InputSpec(
        int,
        8,
        "With input_video: frames per group. At each step one keyframe a group is edited jointly with the "
        "others, and every frame takes its edit from the keyframes (TokenFlow); smaller is more faithful "
        "to each frame and costs more.",
        minimum=1,
        maximum=16,
    ),
}

# How the images are written, not what the engine computes: an input of the predictor and the command
# line, so it is no PnPConfig field.
OUTPUT_FORMAT = InputSpec(str, "png", "Format of the returned images.", choices=("png", "webp", "jpg"))

# Every public input but the three files (input_image, mask, input_video), in the schema's order, for the
# front ends and the tests: output_format came before auto_mask, so it sits between seed and auto_mask.
_BEFORE_OUTPUT_FORMAT = list(INPUTS)[: list(INPUTS).index("auto_mask")]
PUBLIC_INPUTS: dict[str, InputSpec] = {
    **{name: INPUTS[name] for name in _BEFORE_OUTPUT_FORMAT},
    "output_format": OUTPUT_FORMAT,
    **{name: spec for name, spec in INPUTS.items() if name not in _BEFORE_OUTPUT_FORMAT},
}


def parse_prompts(prompts: str | Sequence[str]) -> tuple[str, ...]:
    """Split `;`-separated prompts (text, or a list of texts), dropping blank ones; refuse none or more than
    MAX_PROMPTS."""
    if isinstance(prompts, (list, tuple)) and all(isinstance(prompt, str) for prompt in prompts):
        prompts = ";".join(prompts)
    if not isinstance(prompts, str):
        raise InputError("translation_prompts", f"must be text or a list of texts, not {type(prompts).__name__}")
    parsed = tuple(part.strip() for part in prompts.split(";") if part.strip())
    if not parsed:
        raise InputError("translation_prompts", "give at least one non-empty prompt (separate several with ';')")
    if len(parsed) > MAX_PROMPTS:
        raise InputError("translation_prompts", f"at most {MAX_PROMPTS} prompts per request, got {len(parsed)}")
    return parsed


def check_output_format(output_format: str) -> str:
    """The format of the returned images, refused unless it is one of OUTPUT_FORMAT's choices."""
    return OUTPUT_FORMAT.check("output_format", output_format)


def _checked(name: str, value: Any) -> Any:
    """The value the config field `name` stores for `value`: the prompts as a tuple, numbers as their type."""
    if name == "translation_prompts":
        return parse_prompts(value)
    checked = INPUTS[name].check(name, value)
    if name == "video_fps" and 0 < checked < 1:
        raise InputError(name, f"must be 0 (the video's own rate) or between 1 and 60, got {value}")
    return checked


def _default(name: str) -> Any:
    """A dataclass field whose default is the input's, as the field stores it."""
    return dataclasses.field(default=_checked(name, INPUTS[name].default))


@dataclass(frozen=True, kw_only=True)
class PnPConfig:
    """One valid translation request (everything but the image itself): the fields are INPUTS, in its
    order and with its defaults, and constructing one, also by `dataclasses.replace`, checks each."""

    ddim_inversion_steps: int = _default("ddim_inversion_steps")
    generation_prompt: str = _default("generation_prompt")
    scale: float = _default("scale")
    feature_injection_threshold: float = _default("feature_injection_threshold")
    translation_prompts: tuple[str, ...] = _default("translation_prompts")
    negative_prompt: str = _default("negative_prompt")
    negative_prompt_alpha: float = _default("negative_prompt_alpha")
    num_inference_steps: int = _default("num_inference_steps")
    attention_injection_threshold: float = _default("attention_injection_threshold")
    negative_prompt_schedule: str = _default("negative_prompt_schedule")
    inversion_prompt: str = _default("inversion_prompt")
    image_size: int = _default("image_size")
    seed: int | None = _default("seed")
    auto_mask: bool = _default("auto_mask")
    video_frames: int = _default("video_frames")
    video_fps: float = _default("video_fps")
    keyframe_interval: int = _default("keyframe_interval")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            # Frozen, so set through object; checking also normalises (20.0 steps -> 20, text -> prompts).
            object.__setattr__(self, field.name, _checked(field.name, getattr(self, field.name)))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PnPConfig:
        """Validate `values` (defaults for what is missing); `translation_prompts` may be `;`-separated text or
        a list."""
        unknown = sorted(set(values) - set(INPUTS))
        if unknown:
            raise InputError(unknown[0], f"unknown input; known inputs are {', '.join(INPUTS)}")
        return cls(**values)

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

    @property
    def injection_steps(self) -> InjectionSteps:
        """n_f and n_a together."""
        return InjectionSteps(self.feature_injection_steps, self.attention_injection_steps)

    def replace(self, **changes: Any) -> PnPConfig:
        """A copy with `changes`; unlike `dataclasses.replace`, an unknown name is an InputError."""
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
