"""What the command line, the web page and the Cog predictor share: the model options and loading the engine
from them, the logging of the command line and the page, running a request whose video frames go into MP4s as
they are decoded, and the servers' one output directory at a time.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from .config import PnPConfig
from .engine import PnPEngine, PnPResult
from .video_io import Mp4Clips


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--device` and `--dtype`: which model to load, on what, in which dtype (`load_engine`)."""
    parser.add_argument("--model", help="diffusers directory or hub id (default: PNP_MODEL, else weights/)")
    parser.add_argument("--device", help="torch device (default: PNP_DEVICE, else cuda when present, else cpu)")
    parser.add_argument("--dtype", help="float16, bfloat16 or float32 (default: PNP_DTYPE, else by device)")


def load_engine(args: argparse.Namespace) -> PnPEngine:
    """The engine on the model that the options of `add_model_options` name; a ModelError where it is unusable."""
    return PnPEngine.from_pretrained(args.model, args.device, args.dtype)


def log_to_stderr() -> None:
    """Show the engine's INFO logs (its phases, seconds and UNet evaluations) on stderr, with time and logger."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def run_request(
    engine: PnPEngine,
    config: PnPConfig,
    out_dir: Callable[[], Path],
    sources: Mapping[str, object | None],
    save_frames: bool = False,
) -> tuple[PnPResult, list[Path]]:
    """Run one request on `engine` with its `sources` (`image`, `mask`, `video` as the engine takes them). A video's
    frames go into out-K.mp4 in the directory `out_dir()` makes as they are decoded, with the clip's sound (with
    `save_frames` also as PNG), so none is held: the MP4s are its files. `out_dir` is called only once the first
    frames come, so a refused request makes no directory. An image request's result comes back with no files: the
    caller saves its images as its format asks."""
    if sources.get("video") is None:
        return engine(config, sources.get("image"), mask=sources.get("mask")), []
    with Mp4Clips(out_dir, save_frames=save_frames) as clips:
        result = engine(config, sources.get("image"), mask=sources.get("mask"), video=sources["video"], frames_to=clips)
    return result, clips.paths


class LatestOutputs:
    """A directory of the system's temp for each request's output files, of which only the latest is kept.

    A server hands one request's files on (Cog uploads them, Gradio copies them into its cache) before it
    runs the next, one at a time; so each request may remove the previous one's, and a long-running server
    does not fill its disk."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.latest: Path | None = None

    def fresh(self) -> Path:
        """A new, empty directory for this request's files; the previous request's is removed."""
        self.close()
        self.latest = Path(tempfile.mkdtemp(prefix=self.prefix))
        return self.latest

    def close(self) -> None:
        """Remove the latest directory, if any (at exit)."""
        if self.latest is not None:
            shutil.rmtree(self.latest, ignore_errors=True)
            self.latest = None
