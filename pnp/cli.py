"""The command line: `pnp IMAGE "prompt one; prompt two" --out DIR [--mask PATH] [--config PRESET] [--INPUT VALUE]`.

`pnp` is the console script that installing the package makes; `python -m pnp` is the same.

With `--generation_prompt TEXT` (or a preset that sets it) the image is left out and the source is
generated. Every public input is an option of the same name (`--auto_mask` is a flag); a preset (a YAML
file or a name in configs/) gives the values that are not on the command line. `--save-masks` writes each
prompt's automatic mask beside its image.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .config import INPUTS, OUTPUT_FORMAT, PnPConfig, load_preset
from .errors import InputError, PnPError
from .frontend import add_model_options, load_engine, log_to_stderr
from .image_io import save_images, save_masks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pnp",
        description="Edit an image with text by Plug-and-Play diffusion feature injection.",
        epilog='Examples: pnp examples/horse.jpg "a photo of a robot horse; a horse made of lego" '
        '--out outputs | pnp --generation_prompt "a photo of a horse" "a robot horse" --out outputs',
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="[IMAGE] PROMPTS",
        help="the image (unless generating) and the ';'-separated target prompts",
    )
    parser.add_argument("--out", default="outputs", help="directory for the images (default: outputs)")
    parser.add_argument("--config", help="a preset: a YAML file, or real, generated or primitive from configs/")
    parser.add_argument("--mask", metavar="PATH", help="region to edit: white is edited, black keeps the image exactly")
    parser.add_argument(
        "--save-masks",
        action="store_true",
        help="with --auto_mask, also write each prompt's mask beside its image (out-K-mask.png: white edits)",
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
    # Whether an image comes first is the config's to say: a preset may carry the generation prompt.
    expected = 1 if config.generation_mode else 2
    if len(args.inputs) != expected:
        usage = "PROMPTS (the source is generated)" if config.generation_mode else "IMAGE PROMPTS"
        print(f"error: expected {usage}, got {len(args.inputs)} positional arguments", file=sys.stderr)
        return 2
    if args.save_masks and not config.auto_mask:
        print("error: --save-masks saves the masks of --auto_mask, which is off", file=sys.stderr)
        return 2
    try:
        engine = load_engine(args)
        result = engine(config, None if config.generation_mode else args.inputs[0], mask=args.mask)
    except PnPError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in save_images(result.images, args.out, args.output_format):
        print(path)
    if args.save_masks:
        # Each prompt's mask beside its image: after the generated source, if there is one.
        for path in save_masks(result.masks, args.out, first_index=len(result.images) - len(result.masks)):
            print(path)
    if result.seed is not None:
        print(f"seed: {result.seed}")
    print(result.stats.summary())
    return 0
