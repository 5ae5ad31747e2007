"""The Cog entry point: a thin adapter from Cog's inputs to the Plug-and-Play engine in `pnp/`.

`cog build` generates the OpenAPI schema (the Replicate web form, the HTTP API's validation) by
reading this file's source statically, so every `Input()` below holds plain literals, one string
literal per description: the static reader silently drops bounds, and turns defaults into "required",
when they are expressions such as `INPUTS["scale"].minimum`. The values are those of
`pnp.config.PUBLIC_INPUTS`, where the engine's own validation reads them; tests/test_cog_schema.py
checks that the two agree and that a static reader sees the same as Cog's runtime inspector.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

from cog import BaseRunner, Input, Path

from pnp.config import PnPConfig, check_output_format
from pnp.engine import PnPEngine
from pnp.frontend import LatestOutputs, run_request
from pnp.image_io import save_images

logger = logging.getLogger("pnp.predict")


def configure_logging() -> None:
    """Send the engine's INFO logs (its phases, seconds and UNet evals) to stdout, where Cog collects logs."""
    pnp_logger = logging.getLogger("pnp")
    if not any(getattr(handler, "_pnp_stdout", False) for handler in pnp_logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._pnp_stdout = True  # type: ignore[attr-defined]
        pnp_logger.addHandler(handler)
    pnp_logger.setLevel(logging.INFO)
    pnp_logger.propagate = False
    logging.captureWarnings(True)


class Predictor(BaseRunner):
    def setup(self) -> None:
        """Load the model once: PNP_MODEL, else weights/ (downloaded there first where missing); with
        PNP_COMPILE=1, also compile the UNet and VAE decoder for a default request."""
        configure_logging()
        self.engine = PnPEngine.from_pretrained()
        if self.engine.model.compiled:
            # PNP_COMPILE=1: compile the default request's graphs now, not in the first prediction.
            start = time.perf_counter()
            self.engine.warm_up()
            logger.info(
                "compiled the UNet and VAE decoder for the default request in %.1f s; other shapes run eagerly",
                time.perf_counter() - start,
            )
        self.outputs = LatestOutputs(prefix="pnp-out-")

    def run(
        self,
        input_image: Optional[Path] = Input(
            default=None,
            description="The image to edit (any format Pillow reads). Ignored when generation_prompt is set.",
        ),
        ddim_inversion_steps: int = Input(
            default=50,
            ge=10,
            le=999,
            description="Number of DDIM steps used to invert the input image. Every sampling timestep must be one of the inversion timesteps (for 50 sampling steps: 50, 99, 100, 197-200, 246-250, 491-500 or 981-999); other values are refused with the nearest valid ones.",
        ),
        generation_prompt: str = Input(
            default="",
            description="Generate the source image from this text instead of using input_image; the generated image is returned first.",
        ),
        scale: float = Input(
            default=10.0,
            ge=0.0,
            le=30.0,
            description="Classifier-free guidance scale of the translation.",
        ),
        feature_injection_threshold: float = Input(
            default=0.8,
            ge=0.0,
            le=1.0,
            description="Fraction of the sampling steps, from the start, during which the source's ResNet features are injected. Higher keeps more of the source's structure.",
        ),
        translation_prompts: str = Input(
            default="a photo of a robot horse",
            description="Target prompts separated by ';', one output image per prompt (at most 8).",
        ),
        negative_prompt: str = Input(
            default="",
            description="Text blended into the unconditional branch to steer away from (e.g. a description of the source).",
        ),
        negative_prompt_alpha: float = Input(
            default=1.0,
            ge=0.0,
            le=1.0,
            description="Strength of the negative prompt, lower is stronger: the unconditional branch gets weight alpha times the schedule, the negative prompt the rest (with the constant schedule, 1 leaves it out).",
        ),
        num_inference_steps: int = Input(
            default=50,
            ge=10,
            le=200,
            description="Number of DDIM sampling steps of generation and translation.",
        ),
        attention_injection_threshold: float = Input(
            default=0.5,
            ge=0.0,
            le=1.0,
            description="Fraction of the sampling steps, from the start, during which the source's self-attention queries and keys are injected.",
        ),
        negative_prompt_schedule: str = Input(
            default="linear",
            choices=["linear", "constant", "exp"],
            description="How the negative prompt's weight evolves over the sampling steps.",
        ),
        inversion_prompt: str = Input(
            default="",
            description="Text that conditions the DDIM inversion of the input image (the source features always use the empty prompt).",
        ),
        image_size: int = Input(
            default=512,
            ge=128,
            le=1024,
            description="Longer side of the working resolution in pixels (a multiple of 64); the other side keeps the aspect ratio, rounded to a multiple of 64.",
        ),
        seed: Optional[int] = Input(
            default=None,
            ge=0,
            le=4294967295,
            description="Seed of the generation noise (generation mode), and of auto_mask's noises (0 if empty for an input image). Leave empty for a random seed; the seed used is logged.",
        ),
        output_format: str = Input(
            default="png",
            choices=["png", "webp", "jpg"],
            description="Format of the returned images.",
        ),
        mask: Optional[Path] = Input(
            default=None,
            description="Region to edit, with input_image: white is edited, black keeps the input image exactly, grey blends. Any size (it is stretched to the image); transparent areas count as black.",
        ),
        auto_mask: bool = Input(
            default=False,
            description="Edit only where each prompt differs from the source: a mask per prompt, computed from where the prompt changes the model's noise prediction against the source's description (DiffEdit). Describe the input image in inversion_prompt (in generation mode, generation_prompt describes it). Helps local edits of an object; a global restyle needs no mask. Not with mask.",
        ),
        input_video: Optional[Path] = Input(
            default=None,
            description="A video to edit instead of an image (any container and codec FFmpeg reads: mp4, mov, webm, mkv, gif), consistently across its frames (TokenFlow). Returns one H.264 MP4 per prompt; output_format applies to images only. Not with input_image, generation_prompt, mask or auto_mask.",
        ),
        video_frames: int = Input(
            default=40,
            ge=1,
            le=1800,
            description="With input_video: the most frames to edit, from the video's start (at video_fps); up to a minute at 30 fps. Past 25 keyframe groups the keyframes go in windows beside 8 anchors, so memory stays bounded.",
        ),
        video_fps: float = Input(
            default=0.0,
            ge=0.0,
            le=60.0,
            description="With input_video: frames per second to take from the video and to write; 0 keeps the video's own rate. Otherwise between 1 and 60.",
        ),
        keyframe_interval: int = Input(
            default=8,
            ge=1,
            le=16,
            description="With input_video: frames per group. At each step one keyframe a group is edited jointly with the others, and every frame takes its edit from the keyframes (TokenFlow); smaller is more faithful to each frame and costs more.",
        ),
    ) -> list[Path]:
        # Validate everything before any work, also for callers that bypass Cog's schema.
        config = PnPConfig.from_mapping(
            {
                "ddim_inversion_steps": ddim_inversion_steps,
                "generation_prompt": generation_prompt,
                "scale": scale,
                "feature_injection_threshold": feature_injection_threshold,
                "translation_prompts": translation_prompts,
                "negative_prompt": negative_prompt,
                "negative_prompt_alpha": negative_prompt_alpha,
                "num_inference_steps": num_inference_steps,
                "attention_injection_threshold": attention_injection_threshold,
                "negative_prompt_schedule": negative_prompt_schedule,
                "inversion_prompt": inversion_prompt,
                "image_size": image_size,
                "seed": seed,
                "auto_mask": auto_mask,
                "video_frames": video_frames,
                "video_fps": video_fps,
                "keyframe_interval": keyframe_interval,
            }
        )
        check_output_format(output_format)

        # The engine refuses a video with another source or a mask, naming input_video.
        sources = {"image": input_image, "mask": mask, "video": input_video}
        result, paths = run_request(self.engine, config, self.outputs.fresh, sources)
        if input_video is None:
            paths = save_images(result.images, self.outputs.fresh(), output_format)

        if result.seed is not None:
            print(f"seed: {result.seed}", flush=True)
        print(result.stats.summary(), flush=True)
        # The prediction's metrics in the API response, beside Cog's own predict_time.
        for name, value in result.stats.metrics().items():
            self.record_metric(name, value)
        return [Path(path) for path in paths]
