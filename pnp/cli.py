"""The command line: `pnp IMAGE "prompt one; prompt two" --out DIR [--mask PATH] [--config PRESET] [--INPUT VALUE]`.

`pnp` is the console script that installing the package makes; `python -m pnp` is the same.

With `--generation_prompt TEXT` (or a preset that sets it) the image is left out and the source is
generated. Every public input is an option of the same name (`--auto_mask` is a flag); a preset (a YAML
file or a name in configs/) gives the values that are not on the command line. `--save-masks` writes each
prompt's automatic mask beside its image.

A source whose suffix names a video container (VIDEO_SUFFIXES), or any file with `--video`, is a video
(docs/algorithm.md §11): one MP4 per prompt, out-K.mp4, and with `--save-frames` each prompt's frames as PNG.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import INPUTS, OUTPUT_FORMAT, PnPConfig, load_preset
from .engine import PnPResult
from .errors import InputError, PnPError
from .frontend import add_model_options, load_engine, log_to_stderr, run_request
from .image_io import save_images, save_masks

# The containers taken for a video by their suffix. A GIF stays an image, as it always was here (Pillow reads its
# first frame): `--video` edits an animated GIF's frames, or those of a container with another suffix.
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pnp",
        description="Edit an image or a video with text by Plug-and-Play diffusion feature injection.",
        epilog='Examples: pnp examples/horse.jpg "a photo of a robot horse; a horse made of lego" '
        '--out outputs | pnp --generation_prompt "a photo of a horse" "a robot horse" --out outputs | '
        'pnp examples/wolf.mp4 "a robot wolf" --out outputs',
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="[IMAGE|VIDEO] PROMPTS",
        help="the image or video (unless generating) and the ';'-separated target prompts",
    )
    parser.add_argument("--out", default="outputs", help="directory for the outputs (default: outputs)")
    parser.add_argument("--config", help="a preset: a YAML file, or real, generated or primitive from configs/")
    parser.add_argument("--mask", metavar="PATH", help="region to edit: white is edited, black keeps the image exactly")
    parser.add_argument(
        "--save-masks",
        action="store_true",
        help="with --auto_mask, also write each prompt's mask beside its image (out-K-mask.png: white edits)",
    )
    parser.add_argument(
        "--video",
        action="store_true",
        help=f"edit the source as a video whatever its suffix (without it: {', '.join(sorted(VIDEO_SUFFIXES))})",
    )
    parser.add_argument(
        "--save-frames",
        action="store_true",
        help="with a video, also write each prompt's frames as PNG (out-K-000.png, out-K-001.png, ...)",
    )
    parser.add_argument(
        "--output_format",
        type=OUTPUT_FORMAT.type,
        choices=OUTPUT_FORMAT.choices,
        default=OUTPUT_FORMAT.default,
        help=f"{OUTPUT_FORMAT.description} (default: {OUTPUT_FORMAT.default})",
    )
    add_model_options(parser)
    options = parser.add_argument_group("inputs (default: the preset's, else the service's)")
    for name, spec in INPUTS.items():
        if name == "translation_prompts":  # the last positional argument
            continue
        if spec.type is bool:  # --auto_mask, --no-auto_mask
            options.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, help=spec.description)
        else:
            options.add_argument(f"--{name}", type=spec.type, choices=spec.choices, help=spec.description)
    return parser


def usage_error(args: argparse.Namespace, config: PnPConfig) -> str | None:
    """What is wrong with the command line's form, before any work: the positional arguments the config asks
    for (a preset may carry the generation prompt), and flags that do not fit the request."""
    expected = 1 if config.generation_mode else 2
    if len(args.inputs) != expected:
        usage = "PROMPTS (the source is generated)" if config.generation_mode else "IMAGE PROMPTS or VIDEO PROMPTS"
        return f"expected {usage}, got {len(args.inputs)} positional arguments"
    if args.save_masks and not config.auto_mask:
        return "--save-masks saves the masks of --auto_mask, which is off"
    if args.video and config.generation_mode:
        return "--video edits a video given before the prompts; a generation prompt generates an image"
    if args.save_frames and not is_video(args, config):
        return "--save-frames saves a video's frames, and the source is no video (see --video)"
    return None


def is_video(args: argparse.Namespace, config: PnPConfig) -> bool:
    """Whether the source (the first positional argument) is a video: by its suffix, or `--video`."""
    if config.generation_mode:
        return False
    return args.video or Path(args.inputs[0]).suffix.lower() in VIDEO_SUFFIXES


def save_outputs(result: PnPResult, args: argparse.Namespace) -> list[Path]:
    """An image request's files in `--out`: its images, and with --save-masks its masks."""
    paths = save_images(result.images, args.out, args.output_format)
    if args.save_masks:
        # Each prompt's mask beside its image: after the generated source, if there is one.
        paths += save_masks(result.masks, args.out, first_index=len(result.images) - len(result.masks))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_stderr()
    overrides = {name: getattr(args, name) for name in INPUTS if getattr(args, name, None) is not None}
    overrides["translation_prompts"] = args.inputs[-1]
    try:
        config = load_preset(args.config, overrides) if args.config else PnPConfig.from_mapping(overrides)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    error = usage_error(args, config)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    source = None if config.generation_mode else args.inputs[0]
    video = is_video(args, config)
    try:
        engine = load_engine(args)
        sources = {"image": None if video else source, "mask": args.mask, "video": source if video else None}
        # A video's MP4s (and with --save-frames its frames) are written as its frames are decoded.
        result, paths = run_request(engine, config, lambda: Path(args.out), sources, save_frames=args.save_frames)
    except PnPError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in paths if video else save_outputs(result, args):
        print(path)
    if result.seed is not None:
        print(f"seed: {result.seed}")
    print(result.stats.summary())
    return 0
