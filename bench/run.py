"""Benchmark: a fixed set of requests on one engine, timed per phase and checked against the cost model
(docs/cost-model.md).

    python -m bench.run                                   # tiny random model on the CPU
    python -m bench.run --model /path/to/sd15             # any diffusers directory
    python -m bench.run --full-size-random /tmp/sd15-random --device cuda --dtype float16

The requests, in order, on ONE engine (so the inversion cache works as it does in the service):
  new-1       new image, 1 prompt
  repeat-1    repeat of new-1 with another prompt (cached inversion and features)
  new-4       another new image (the horse mirrored), 4 prompts
  repeat-4    repeat of new-4 with 4 other prompts (cached)
  generation  generation mode, 1 prompt, fixed seed
  auto-mask   the example image described in inversion_prompt, 1 prompt, auto_mask (a new inversion)
  new-8       another new image (the horse upside down and mirrored), 8 prompts
  video-new     a new video (examples/wolf.mp4, its first --video-frames frames), 1 prompt
  video-repeat  the same video with another prompt (cached inversion)
  long-24, long-192  (only when named in --requests) a clip of wolf.mp4's frames played forward and back to 24
                and to 192 frames, keyframe_interval 4: 6 groups, and 48 in two windows beside 8 anchors
`--requests` runs a subset (a repeat needs its new image or video). On CUDA each request first runs once,
unreported. For each request the table gives the seconds of each engine phase, the wall time of the
call, the memory it took beyond what was allocated before it (measured, and by the memory model of
docs/cost-model.md §8), the UNet evaluations the engine counted, those the cost model expects, those
the published model spends, and the ratio of the two.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from PIL import Image, ImageOps

from pnp import PnPConfig, PnPEngine
from pnp.automask import MASK_NOISES
from pnp.config import INPUTS
from pnp.memory import MemoryModel, RequestShape
from pnp.stats import PHASES, VIDEO_PHASES
from pnp.testing import make_random_model
from pnp.tokenflow import window_layout
from pnp.video_io import load_video, save_video

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = REPO / "examples" / "horse.jpg"
DEFAULT_VIDEO = REPO / "examples" / "wolf.mp4"
DEFAULT_JSON = REPO / "bench" / "results.json"
TINY_IMAGE_SIZE = (
    256  # the tiny model's first blocks attend over every latent pixel: 512 takes minutes a request on 2 cores
)
DEFAULT_VIDEO_FRAMES = INPUTS["video_frames"].default
TINY_VIDEO_FRAMES = 4  # a video request costs about F times an image's: 4 frames keep the tiny model's run short

# The published model (daanelson/plug_and_play_image_translation): a 999-step inversion, a 999-step
# reconstruction with two UNet evaluations a step, then 50 sampling steps of two evaluations per prompt.
PUBLISHED_INVERSION_STEPS = 999
PUBLISHED_SAMPLING_STEPS = 50

PROMPTS_1 = ["a photo of a robot horse"]
PROMPTS_1_OTHER = ["a photo of a golden horse"]
PROMPTS_4 = [
    "a photo of a zebra",
    "a bronze statue of a horse",
    "a watercolor painting of a horse",
    "a toy horse made of lego",
]
PROMPTS_4_OTHER = [
    "a photo of a unicorn",
    "a marble statue of a horse",
    "a pencil sketch of a horse",
    "a horse made of wood",
]
PROMPTS_8 = PROMPTS_4 + PROMPTS_4_OTHER
GENERATION_PROMPT = "a photo of a horse in a field"
VIDEO_PROMPTS = ["a robotic wolf"]
VIDEO_PROMPTS_OTHER = ["a wolf made of gold"]
# The requests' keys, each with the request whose cache entry it reuses.
REQUEST_KEYS = {
    "new-1": None,
    "repeat-1": "new-1",
    "new-4": None,
    "repeat-4": "new-4",
    "generation": None,
    "auto-mask": None,
    "new-8": None,
    "video-new": None,
    "video-repeat": "video-new",
    "long-24": None,
    "long-192": None,
}
DEFAULT_REQUESTS = [key for key in REQUEST_KEYS if not key.startswith("long-")]
LONG_FRAMES = {"long-24": 24, "long-192": 192}
LONG_KEYFRAME_INTERVAL = 4  # 192 frames make 48 groups: past KEYFRAME_WINDOW, so windows and anchors run
MINUTE_FRAMES = INPUTS["video_frames"].maximum
SOURCE_DESCRIPTION = "a photo of a horse"


@dataclass(frozen=True)
class Request:
    """One benchmarked request: its key (`REQUEST_KEYS`), its label, the config's inputs, and the image (None
    in generation mode and for a video) or the video."""

    key: str
    name: str
    inputs: dict[str, Any]
    image: Image.Image | Path | None
    video: Path | None = None

    @property
    def repeat(self) -> bool:
        """Whether it reuses the cache entry of an earlier request."""
        return REQUEST_KEYS[self.key] is not None


def expected_evals(config: PnPConfig, repeat: bool = False) -> int:
    """The cost model's UNet evaluations for a request without a negative prompt.

    Real image: M inversion + max(n_f, n_a) extraction + 2·N·P translation; a repeat on the same image
    and inversion settings: 2·N·P. Generation: 2·N for the guided source pass + 2·N·P. auto_mask adds
    K·(1 + P) to any of them.
    """
    n, prompts = config.num_inference_steps, len(config.translation_prompts)
    evals = 2 * n * prompts + (MASK_NOISES * (1 + prompts) if config.auto_mask else 0)
    if config.generation_mode:
        return 2 * n + evals
    if repeat:
        return evals
    return config.ddim_inversion_steps + config.injection_steps.capture_steps + evals


def expected_video_evals(config: PnPConfig, frames: int, repeat: bool = False) -> int:
    """The cost model's UNet evaluations for a video of F frames without a negative prompt (b = 2 guidance
    branches a prompt), in G = ceil(F / keyframe_interval) groups: F·M inversion + N·(G + F + A)·(1 + b·P)
    sampling, A the anchors past KEYFRAME_WINDOW groups (0 up to it); the same video again (cached inversion):
    the sampling only."""
    groups = math.ceil(frames / config.keyframe_interval)
    _, anchors = window_layout(groups)
    branches = 2
    per_step = (groups + frames + len(anchors)) * (1 + branches * len(config.translation_prompts))
    sampling = config.num_inference_steps * per_step
    return sampling if repeat else frames * config.ddim_inversion_steps + sampling


def published_evals(prompts: int, frames: int = 1) -> int:
    """The published model's UNet evaluations for P prompts: 999 + 2·999 + 2·50·P, whatever the request
    (it has no cache; in generation mode it also inverted the generated image, so the same formula is used).
    It has no video mode: a video of F frames counts F times that, as if each frame were edited on its own."""
    per_image = PUBLISHED_INVERSION_STEPS + 2 * PUBLISHED_INVERSION_STEPS + 2 * PUBLISHED_SAMPLING_STEPS * prompts
    return per_image * frames


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model from /proc/cpuinfo with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} torch threads"


def _display_path(path: Path) -> str:
    """`path` relative to the working directory where it lies under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def resident_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def start_memory_peak(device: torch.device) -> int:
    """Start measuring a request's peak: CUDA's peak allocation is reset, the process's peak resident size
    (VmHWM) starts again from its size now; returns the bytes in use now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")
    return resident_bytes("VmRSS")


def memory_peak_mib(device: torch.device, start: int) -> float:
    """How far the memory in use rose above `start` since `start_memory_peak` (MiB): CUDA's allocated bytes,
    or the process's resident size on the CPU."""
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resident_bytes("VmHWM")
    # The peak cannot lie below `start`; but Linux folds its per-CPU or per-thread RSS counters into VmRSS and
    # VmHWM lazily, so a request that grew nothing can read a few pages below it (-0.05 MiB seen on the CPU).
    return max(0, peak - start) / 2**20


def requests(
    image_path: Path,
    image_size: int,
    steps: int,
    keys: list[str] | None = None,
    video_path: Path = DEFAULT_VIDEO,
    video_frames: int = DEFAULT_VIDEO_FRAMES,
) -> list[Request]:
    """The benchmarked requests in their order, or those of them named in `keys`; all use the inputs'
    defaults except the prompts, size, steps and a video's frames."""
    common = {"image_size": image_size, "num_inference_steps": steps}
    video = {**common, "video_frames": video_frames}
    mirrored = ImageOps.mirror(ImageOps.exif_transpose(Image.open(image_path)).convert("RGB"))
    generation = {**common, "translation_prompts": PROMPTS_1, "generation_prompt": GENERATION_PROMPT, "seed": 0}
    auto_mask = {**common, "inversion_prompt": SOURCE_DESCRIPTION, "auto_mask": True}
    every = [
        Request("new-1", "new image", {**common, "translation_prompts": PROMPTS_1}, image_path),
        Request("repeat-1", "repeat (cached)", {**common, "translation_prompts": PROMPTS_1_OTHER}, image_path),
        Request("new-4", "new image", {**common, "translation_prompts": PROMPTS_4}, mirrored),
        Request("repeat-4", "repeat (cached)", {**common, "translation_prompts": PROMPTS_4_OTHER}, mirrored),
        Request("generation", "generation", generation, None),
        Request("auto-mask", "auto-mask", {**auto_mask, "translation_prompts": PROMPTS_1}, image_path),
        Request("new-8", "new image", {**common, "translation_prompts": PROMPTS_8}, ImageOps.flip(mirrored)),
        Request("video-new", "new video", {**video, "translation_prompts": VIDEO_PROMPTS}, None, video_path),
        Request(
            "video-repeat", "video (cached)", {**video, "translation_prompts": VIDEO_PROMPTS_OTHER}, None, video_path
        ),
    ]
    return [request for request in every if keys is None or request.key in keys]


def long_requests(directory: Path, image_size: int, steps: int, keys: list[str]) -> list[Request]:
    """The long-clip requests named in `keys`: wolf.mp4's frames played forward and back (a clip with no cut) to
    each one's frames, written to `directory`, at keyframe_interval LONG_KEYFRAME_INTERVAL."""
    named = [key for key in LONG_FRAMES if key in keys]
    if not named:
        return []
    frames = load_video(DEFAULT_VIDEO, DEFAULT_VIDEO_FRAMES, 0).frames
    there_and_back = frames + frames[-2:0:-1]
    inputs = {"image_size": image_size, "num_inference_steps": steps, "keyframe_interval": LONG_KEYFRAME_INTERVAL}
    built = []
    for key in named:
        count = LONG_FRAMES[key]
        clip = [there_and_back[index % len(there_and_back)] for index in range(count)]
        path = save_video(clip, directory / f"{key}.mp4", 20)
        config = {**inputs, "video_frames": count, "translation_prompts": VIDEO_PROMPTS}
        built.append(Request(key, f"long clip {count}", config, None, path))
    return built


def minute_memory(engine: PnPEngine, request: Request, image_size: int, unet_batch: int) -> str:
    """The memory model's device and host bytes (MiB) for `request`'s clip and for a minute of it (MINUTE_FRAMES
    frames), new, on this model at this working size and `unet_batch` latents a call (docs/cost-model.md §9)."""
    model, config = MemoryModel.of(engine.model), PnPConfig.from_mapping(request.inputs)
    figures = []
    for frames in (config.video_frames, MINUTE_FRAMES):
        shape = RequestShape.of_video(config, (image_size, image_size), frames, new_source=True)
        device, host = model.request_bytes(shape, unet_batch, unet_batch), model.host_bytes(shape, unet_batch)
        figures.append(f"{frames} frames: device {device / 2**20:.0f} MiB, host {host / 2**20:.0f} MiB")
    return "; ".join(figures) + f" (the memory model beside the weights, at {unet_batch} latents a call)"


def phase_names() -> list[str]:
    """An image's phases and a video's, in the order they run: the video's own ones (keyframes, groups) before
    the decode both end with, any after it last."""
    names = list(PHASES)
    for index, name in enumerate(VIDEO_PHASES):
        if name not in names:
            later = [other for other in VIDEO_PHASES[index + 1 :] if other in names]
            names.insert(names.index(later[0]) if later else len(names), name)
    return names


PHASE_NAMES = phase_names()


def run_request(engine: PnPEngine, request: Request) -> tuple[dict[str, Any], list[Image.Image]]:
    """Run one request and return its table row and its images (a video's: every prompt's frames, in order).
    A phase the request has not (an image's keyframes, a video's extraction) is 0 in the row."""
    device = engine.model.device
    config = PnPConfig.from_mapping(request.inputs)
    prompts = len(config.translation_prompts)
    in_use = start_memory_peak(device)
    start = time.perf_counter()
    result = engine(config, image=request.image, video=request.video)
    wall = time.perf_counter() - start
    if request.video is None:
        images = result.images
        expected, published = expected_evals(config, request.repeat), published_evals(prompts)
    else:
        images = [frame for frames in result.videos for frame in frames]
        frames = len(result.videos[0])
        expected = expected_video_evals(config, frames, request.repeat)
        published = published_evals(prompts, frames)
    phases, ours = result.stats.phases, result.stats.unet_evals
    row = {
        "request": request.name,
        "mode": "compiled" if engine.model.compiled else "eager",
        "prompts": prompts,
        "cache_hit": result.stats.cache_hit,
        **{f"{name}_s": phases[name].seconds if name in phases else 0.0 for name in PHASE_NAMES},
        "total_s": wall,
        "seconds_per_frame": wall / len(images) if request.video is not None else 0.0,
        "peak_memory_mib": memory_peak_mib(device, in_use),
        "model_memory_mib": result.stats.modelled_bytes / 2**20,
        "unet_evals": ours,
        "unet_batch": result.stats.unet_batch,
        "expected_evals": expected,
        "published_evals": published,
        "published_over_ours": published / ours,
    }
    return row, images


def warm_up(engine: PnPEngine, benchmarked: list[Request], image_path: Path) -> float:
    """Run the benchmarked requests once, unreported, the image ones on another image (the horse upside down)
    and the video ones on their video: CUDA chooses its kernels and a compiled UNet compiles its graphs for
    every batch size. Returns the seconds it took; the cache is cleared after it, so no benchmarked request
    hits what the warm-up stored."""
    flipped = ImageOps.flip(ImageOps.exif_transpose(Image.open(image_path)).convert("RGB"))
    start = time.perf_counter()
    for request in benchmarked:
        image = None if request.image is None else flipped
        engine(PnPConfig.from_mapping(request.inputs), image=image, video=request.video)
    engine.cache.clear()
    return time.perf_counter() - start


def run_all(engine: PnPEngine, benchmarked: list[Request]) -> tuple[list[dict], list[list[Image.Image]]]:
    """The rows and images of the requests; each row is also printed to stderr once done, so that a run
    cut short (a time limit on a borrowed GPU) still shows what it measured."""
    rows, images = [], []
    for request in benchmarked:
        row, request_images = run_request(engine, request)
        print(f"{request.key}: {json.dumps(row)}", file=sys.stderr, flush=True)
        rows.append(row)
        images.append(request_images)
    return rows, images


def max_pixel_difference(images: list[Image.Image], reference: list[Image.Image]) -> int:
    return max(
        int(np.abs(np.asarray(a, int) - np.asarray(b, int)).max()) for a, b in zip(images, reference, strict=True)
    )


COLUMNS = [
    ("request", "request", "{:<16}"),
    ("mode", "mode", "{:<8}"),
    ("prompts", "P", "{:>2}"),
    ("cache_hit", "cache", "{!s:>5}"),
    *[(f"{name}_s", name, "{:>11.2f}") for name in PHASE_NAMES],
    ("total_s", "total s", "{:>8.2f}"),
    ("seconds_per_frame", "s/frame", "{:>7.3f}"),
    ("peak_memory_mib", "peak MiB", "{:>9.0f}"),
    ("model_memory_mib", "model MiB", "{:>9.0f}"),
    ("unet_evals", "UNet evals", "{:>10}"),
    ("expected_evals", "expected", "{:>8}"),
    ("published_evals", "published", "{:>9}"),
    ("published_over_ours", "pub/ours", "{:>8.1f}"),
]


def format_table(header: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The header lines and the rows as a fixed-width text table."""
    lines = [f"{key}: {value}" for key, value in header.items()]
    widths = [len(fmt.format(rows[0][key])) if rows else len(title) for key, title, fmt in COLUMNS]
    widths = [max(w, len(title)) for w, (_, title, _) in zip(widths, COLUMNS, strict=True)]
    titles = [title for _, title, _ in COLUMNS]
    lines.append(
        "  ".join(t.rjust(w) if i else t.ljust(w) for i, (w, t) in enumerate(zip(widths, titles, strict=True)))
    )
    for row in rows:
        cells = [fmt.format(row[key]) for key, _, fmt in COLUMNS]
        padded = [c.rjust(w) if i else c.ljust(w) for i, (w, c) in enumerate(zip(widths, cells, strict=True))]
        lines.append("  ".join(padded))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="diffusers model directory (default: a tiny random model in a temp dir)")
    model.add_argument(
        "--full-size-random", metavar="DIR", help="write a random SD 1.5-sized model to DIR if absent, and use it"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    parser.add_argument(
        "--dtype", choices=["float16", "bfloat16", "float32"], help="default: float16 on CUDA, float32 on CPU"
    )
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="input image (default: examples/horse.jpg)")
    parser.add_argument(
        "--image-size", type=int, help=f"working size (default 512; {TINY_IMAGE_SIZE} for the tiny default model)"
    )
    parser.add_argument("--steps", type=int, default=50, help="num_inference_steps (default 50)")
    parser.add_argument(
        "--video-frames",
        type=int,
        help=f"video_frames of the video requests (default {DEFAULT_VIDEO_FRAMES}; {TINY_VIDEO_FRAMES} for the "
        "tiny default model)",
    )
    parser.add_argument(
        "--requests",
        type=lambda value: value.split(","),
        default=DEFAULT_REQUESTS,
        help=f"comma-separated subset of {','.join(REQUEST_KEYS)} (default: all but the long clips); a repeat "
        "needs its new image or video",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="UNet and VAE weights in channels_last (NHWC) layout, for every row",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the table as JSON")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the requests eagerly, then with the UNet and the VAE decoder under torch.compile, and print both "
        "(compile time apart)",
    )
    args = parser.parse_args(argv)
    for key in args.requests:
        if key not in REQUEST_KEYS:
            parser.error(f"--requests: unknown request {key!r}; choose from {', '.join(REQUEST_KEYS)}")
        needed = REQUEST_KEYS[key]
        if needed is not None and needed not in args.requests:
            parser.error(f"--requests: {key} repeats {needed}, so it needs {needed} too")
    return args


def load_bench_model(args: argparse.Namespace, tmp: Path) -> tuple[PnPEngine, str, bool]:
    """The engine on the model the options name (a tiny random one written to `tmp` by default), its label for
    the header, and whether it is the tiny default."""
    tiny = args.model is None and args.full_size_random is None
    if tiny:
        model_dir, model_label = make_random_model(tmp / "tiny"), "tiny random model (SD layout, tiny widths)"
    elif args.full_size_random:
        model_dir = Path(args.full_size_random)
        if not (model_dir / "model_index.json").is_file():
            print(f"writing a random SD 1.5-sized model to {model_dir} ...", file=sys.stderr)
            make_random_model(model_dir, size="full")
        model_label = f"random SD 1.5-sized model ({model_dir})"
    else:
        model_dir, model_label = Path(args.model), str(args.model)
    engine = PnPEngine.from_pretrained(str(model_dir), device=args.device, dtype=args.dtype, compile=False)
    if args.channels_last:
        engine.model.use_channels_last()
    return engine, model_label, tiny


def measure(
    engine: PnPEngine, benchmarked: list[Request], args: argparse.Namespace, image_size: int
) -> tuple[list[dict], dict[str, str]]:
    """The rows of the requests, eager and with --compile compiled, and the header's notes on them: the compile
    time and pixel difference, and the long clips' memory model for a minute."""
    if engine.model.device.type == "cuda":
        warm_up(engine, benchmarked, args.image)
    engine.cache.clear()
    rows, eager_images = run_all(engine, benchmarked)
    notes = {}
    if args.compile:
        engine.model.compile()
        # The warm-up compiles every graph the requests need: its time is the compile time.
        compile_seconds = warm_up(engine, benchmarked, args.image)
        compiled_rows, compiled_images = run_all(engine, benchmarked)
        for row, images, reference in zip(compiled_rows, compiled_images, eager_images, strict=True):
            row["max_pixel_diff_vs_eager"] = max_pixel_difference(images, reference)
        rows += compiled_rows
        notes["compile"] = (
            "torch.compile failed: the UNet and the VAE decoder fell back to eager (see the warning above)"
            if not engine.model.compiled
            else f"{compile_seconds:.1f} s to compile and run every request once (unreported); compiled images "
            f"differ from eager ones by at most {max(r['max_pixel_diff_vs_eager'] for r in compiled_rows)} grey levels"
        )
    longest = [(row, request) for row, request in zip(rows, benchmarked, strict=False) if request.key in LONG_FRAMES]
    if longest:
        row, request = longest[-1]
        notes["a minute's memory"] = minute_memory(engine, request, image_size, row["unet_batch"])
    return rows, notes


def table_header(args: argparse.Namespace, engine: PnPEngine, model_label: str, tiny: bool) -> dict[str, Any]:
    """The header lines: the model, device, versions, inputs and how memory is measured."""
    device = engine.model.device
    header = {
        "model": model_label,
        "device": device_name(device),
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "memory format": "channels_last (NHWC)" if engine.model.channels_last else "contiguous (NCHW)",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "image": _display_path(args.image),
        "image_size": args.image_size or (TINY_IMAGE_SIZE if tiny else 512),
        "video": _display_path(DEFAULT_VIDEO),
        "video_frames": args.video_frames or (TINY_VIDEO_FRAMES if tiny else DEFAULT_VIDEO_FRAMES),
        "num_inference_steps": args.steps,
        "peak memory": "the request's rise of "
        + ("CUDA's max_memory_allocated" if device.type == "cuda" else "the process's peak resident size (VmHWM)")
        + " above the memory in use before it; model: the memory model's figure for the request beside the "
        "weights and the cache (docs/cost-model.md §8)",
        "warm-up": "each request once, unreported, first" if device.type == "cuda" else "none (CPU)",
    }
    if tiny:
        defaults = []
        if not args.image_size:
            defaults.append(f"image size {TINY_IMAGE_SIZE} (512 for real models)")
        if not args.video_frames:
            defaults.append(f"{TINY_VIDEO_FRAMES} video frames ({DEFAULT_VIDEO_FRAMES} for real models)")
        header["note"] = "tiny random model: timings show the engine's overheads, not a real model's speed" + (
            f"; by default for it {' and '.join(defaults)}" if defaults else ""
        )
    return header


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its table, write it as JSON and return it ({"header", "rows"})."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="pnp-bench-") as tmp:
        engine, model_label, tiny = load_bench_model(args, Path(tmp))
        header = table_header(args, engine, model_label, tiny)
        image_size, video_frames = header["image_size"], header["video_frames"]
        benchmarked = requests(args.image, image_size, args.steps, args.requests, DEFAULT_VIDEO, video_frames)
        benchmarked += long_requests(Path(tmp), image_size, args.steps, args.requests)
        rows, notes = measure(engine, benchmarked, args, image_size)
    header.update(notes)
    if engine.model.device.type == "cpu":
        header["load average"] = " ".join(f"{load:.1f}" for load in os.getloadavg()) + " (1, 5, 15 min; after the run)"
    table = {"header": header, "rows": rows}
    print(format_table(header, rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(table, indent=2) + "\n")
    print(f"\nwritten to {args.json}")
    return table


if __name__ == "__main__":
    main()
