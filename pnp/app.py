"""The web page for one person's machine: `python -m pnp.app` serves a Gradio page over one loaded engine.

Its controls are made from the one table of public inputs (`PUBLIC_INPUTS`), so each has the input's name,
its description as help text, its default and its bounds; the API (`/run`) names its parameters likewise.
`input_image` is an image editor whose brush paints the mask (painted edits, the rest keeps the image);
`input_video` takes a video to edit instead (docs/algorithm.md §11). "Run" fills the "output" gallery with the files
`Predictor.run` returns, in its order (the images, or one MP4 per prompt), the automatic masks beside them,
and a line with the request's seconds, UNet evaluations and where its source came from (`RunStats.headline`).
The engine's own progress reporting (`pnp.progress.reporting_to`) drives the progress bar; requests run one at
a time, the others wait in Gradio's queue. Bad input shows the engine's message, which names the input.

Serving many users is the Cog container's job: the page binds to 127.0.0.1 unless `--host` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from .config import PUBLIC_INPUTS, InputSpec, PnPConfig
from .engine import PnPEngine
from .errors import InputError, PnPError
from .frontend import LatestOutputs, add_model_options, load_engine, log_to_stderr, run_request
from .image_io import load_image, save_images
from .progress import reporting_to

EXAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "examples" / "horse.jpg"
EXAMPLE_PROMPT = "a photo of a robot horse"
# What most requests leave as it is goes into the collapsed "advanced" group.
MAIN_INPUTS = ("translation_prompts", "generation_prompt", "inversion_prompt", "negative_prompt", "auto_mask")
INPUT_IMAGE_HELP = (
    "input_image: the image to edit (ignored when generation_prompt is set). Paint with the brush where the "
    "prompts may edit: the painted region is the mask, the rest keeps the image exactly; nothing painted "
    "edits everywhere."
)
INPUT_VIDEO_HELP = (
    "input_video: a video to edit instead of an image (mp4, mov, webm, mkv, gif), consistently across its frames; "
    "one MP4 per prompt. Not with input_image, generation_prompt, a painted mask or auto_mask; video_frames, "
    "video_fps and keyframe_interval are under advanced."
)


def read_uploads_as_the_api(editor: gr.ImageEditor) -> gr.ImageEditor:
    """Make `editor` read its uploaded image first as the API reads it (`load_image`), so that a file that
    is not an image, or declares too many pixels, is refused with the engine's message naming
    `input_image` before Gradio decodes it. (A subclass would do the same, but Gradio writes a stub file
    beside the module of every component class.)"""
    preprocess = editor.preprocess

    def checked(payload: Any) -> Any:
        background = None
        if payload is not None and payload.id is not None and payload.id in editor.blob_storage:
            background = editor.blob_storage[payload.id].background  # the page's upload, as bytes
        elif payload is not None and payload.background is not None:
            background = payload.background.path  # a file sent through the API
        if background is not None:
            try:
                load_image(background)
            except InputError as error:
                raise gr.Error(str(error)) from None
        return preprocess(payload)

    editor.preprocess = checked
    return editor


def editor_to_image_and_mask(value: dict[str, Any] | None) -> tuple[Image.Image | None, Image.Image | None]:
    """The image editor's value as the engine's image and mask: the background in RGB, and where any layer
    has paint (alpha above 0) white on black at the image's size; no paint, no mask."""
    if value is None or value.get("background") is None:
        return None, None
    background = value["background"]
    painted = np.zeros((background.height, background.width), dtype=bool)
    for layer in value.get("layers") or []:
        alpha = np.asarray(layer.convert("RGBA").resize(background.size, Image.Resampling.NEAREST))[..., 3]
        painted |= alpha > 0
    mask = Image.fromarray(painted.astype(np.uint8) * 255, mode="L") if painted.any() else None
    return background.convert("RGB"), mask


def control(name: str, spec: InputSpec) -> gr.components.Component:
    """The control of one public input: its name as label, its description as help, its default and bounds."""
    common = {"label": name, "info": spec.description}
    if spec.type is bool:
        return gr.Checkbox(value=spec.default, **common)
    if spec.type is str and spec.choices is not None:
        return gr.Dropdown(choices=list(spec.choices), value=spec.default, **common)
    if spec.type is str:
        return gr.Textbox(value=spec.default, **common)
    if spec.default is None:  # the seed: a number box cannot be empty in the browser, and empty means random
        return gr.Textbox(value="", placeholder=f"random ({spec.minimum:.0f} to {spec.maximum:.0f})", **common)
    step = spec.multiple_of or (1 if spec.type is int else 0.01)
    return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, value=spec.default, step=step, **common)


def parse_seed(text: str | None) -> int | str | None:
    """The seed box's text: empty is a random seed (None), digits a number; anything else is passed on for
    the config to refuse, naming the seed."""
    text = (text or "").strip()
    if not text:
        return None
    return int(text) if text.isdigit() else text


class App:
    """The page's request handler over one engine; only the latest request's files are kept on disk."""

    def __init__(self, engine: PnPEngine):
        self.engine = engine
        self.outputs = LatestOutputs(prefix="pnp-app-")

    def run(
        self,
        input_image: dict[str, Any] | None = None,
        input_video: str | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio fills it in, recognising the default)
        **inputs: Any,
    ) -> tuple[list[str], list[Image.Image], str]:
        """One request: the editor's image and mask, the video's path and the controls' values, by the public
        inputs' names -> (output, masks, status)."""
        output_format = inputs.pop("output_format")
        image, mask = editor_to_image_and_mask(input_image)
        inputs["seed"] = parse_seed(inputs["seed"])
        try:
            config = PnPConfig.from_mapping(inputs)
            if config.generation_mode:
                image = mask = None  # as in the schema: a generation prompt ignores input_image
            with reporting_to(lambda phase, done, total: progress((done, total), desc=phase)):
                # The engine refuses a video with an image, a generation prompt or a mask, naming input_video.
                sources = {"image": image, "mask": mask, "video": input_video}
                result, paths = run_request(self.engine, config, self.outputs.fresh, sources)
        except PnPError as error:
            raise gr.Error(str(error)) from None
        if input_video is None:
            paths = save_images(result.images, self.outputs.fresh(), output_format)
        return [str(path) for path in paths], result.masks, result.stats.headline()


def build_page(engine: PnPEngine) -> gr.Blocks:
    """The page: the editor and the main inputs, the advanced ones collapsed, Run, and the results."""
    app = App(engine)
    with gr.Blocks(title="Plug-and-Play image translation", analytics_enabled=False) as page:
        gr.Markdown("# Plug-and-Play image translation\nEdit an image with text (Tumanyan et al., CVPR 2023).")
        with gr.Row():
            with gr.Column():
                editor = read_uploads_as_the_api(
                    gr.ImageEditor(
                        label="input_image",
                        type="pil",
                        image_mode="RGBA",
                        sources=["upload"],
                        layers=False,
                        transforms=(),
                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                        elem_id="input_image",
                    )
                )
                gr.Markdown(INPUT_IMAGE_HELP)
                video = gr.Video(label="input_video", sources=["upload"], elem_id="input_video")
                gr.Markdown(INPUT_VIDEO_HELP)
                controls = {name: control(name, PUBLIC_INPUTS[name]) for name in MAIN_INPUTS}
                with gr.Accordion("advanced", open=False):
                    controls.update(
                        {name: control(name, spec) for name, spec in PUBLIC_INPUTS.items() if name not in controls}
                    )
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column():
                output = gr.Gallery(label="output", elem_id="output", format="png")
                masks = gr.Gallery(label="auto_mask masks", elem_id="masks", format="png")
                status = gr.Markdown(elem_id="status")
        gr.Examples(
            examples=[[{"background": str(EXAMPLE_IMAGE), "layers": [], "composite": None}, EXAMPLE_PROMPT]],
            inputs=[editor, controls["translation_prompts"]],
            label="example",
        )
        # By name: the API's parameters are the public inputs' (the two sources, then the schema's order).
        sources = {"input_image": editor, "input_video": video}
        run.click(
            app.run,
            inputs_kwargs={**sources, **{name: controls[name] for name in PUBLIC_INPUTS}},
            outputs=[output, masks, status],
            api_name="run",
            concurrency_limit=1,
        )
    page.app = app  # for main() to remove its files at exit
    return page


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pnp.app", description="A web page for the Plug-and-Play engine.")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    add_model_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_stderr()
    try:
        engine = load_engine(args)
    except PnPError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    page = build_page(engine)
    page.queue(default_concurrency_limit=1)
    try:
        page.launch(server_name=args.host, server_port=args.port, show_error=True)
    finally:
        page.app.outputs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
