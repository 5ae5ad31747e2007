"""Videos in and out of the engine: decode untrusted input with FFmpeg (PyAV), take its frames at a rate, and
write the edited frames as H.264 MP4."""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
from PIL import Image

from . import image_io
from .errors import InputError

VideoSource = str | os.PathLike | bytes | BinaryIO

_INPUT_NAME = "input_video"
_FALLBACK_RATE = Fraction(25)
# Nested opens (an HLS playlist's segments, an ffconcat list's files) go through FFmpeg's protocols; naming
# no real protocol refuses them all, so an uploaded playlist cannot make FFmpeg read the server's files or URLs.
_CONTAINER_OPTIONS = {"protocol_whitelist": "none"}
# x264's constant quality: 18 is visually lossless for most content.
_ENCODER_OPTIONS = {"crf": "18"}
# The index at the start, so a browser can play the video before it is fully downloaded.
_MP4_OPTIONS = {"movflags": "+faststart"}


@dataclass(frozen=True)
class Video:
    """The frames taken from a video, RGB, upright and at the video's own size, and the rate they were taken at."""

    frames: list[Image.Image]
    fps: float


def load_video(source: VideoSource, video_frames: int, video_fps: float, image_size: int | None = None) -> Video:
    """Decode at most `video_frames` frames from the start of `source` (a path, bytes or binary file object).

    With `video_fps` 0 every frame is taken, at the video's average rate; otherwise, for k = 0, 1, ... until the
    stream ends, the last frame whose presentation time (from the first frame's) is at most k / video_fps, as
    FFmpeg's fps filter takes them: a frame taken for several k appears that often (the same image object).
    Decoding stops once enough frames are taken. Each frame has the stream's rotation and flips applied and any
    transparency composited on white; with `image_size`, it is brought to the first frame's working size
    (image_io.working_size) as it is taken, so that one frame at most is held at its own size (200 frames of
    the largest allowed would be 30 GB). Anything FFmpeg cannot read, a file without a video stream or
    decodable frame, and frames over image_io.MAX_INPUT_PIXELS raise `InputError("input_video", ...)`.
    """
    if video_frames < 1 or video_fps < 0:
        raise ValueError(f"video_frames must be at least 1 and video_fps at least 0, got {video_frames}, {video_fps}")
    with _binary_file(source) as file, _open_container(file) as container:
        stream = _video_stream(container)
        rate = _stream_rate(stream)
        try:
            timed = _timed_frames(container, stream, rate)
            if video_fps == 0:
                frames = (frame for _, _, frame in itertools.islice(timed, video_frames))
            else:
                frames = _frames_at_rate(timed, video_frames, Fraction(video_fps))
            images = _upright_images(frames, image_size)
        except av.FFmpegError as exc:
            raise InputError(_INPUT_NAME, f"could not be decoded: corrupt or truncated data ({exc})") from exc
    if not images:
        raise InputError(_INPUT_NAME, "has no decodable frame")
    return Video(frames=images, fps=float(video_fps) if video_fps > 0 else float(rate))


@contextlib.contextmanager
def _binary_file(source: VideoSource) -> Iterator[BinaryIO]:
    """`source` as a seekable binary file, refused when empty. A path is opened here rather than by FFmpeg, which
    would take a name like `concat:...` or `http://...` for a URL to follow."""
    if isinstance(source, bytes):
        file = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        try:
            file = open(source, "rb")  # closed below, once FFmpeg is done with it
        except OSError as exc:
            raise InputError(_INPUT_NAME, f"could not be read: {exc.strerror or exc}") from exc
    else:
        seekable = getattr(source, "seekable", None)
        file = source if seekable is not None and seekable() else io.BytesIO(source.read())
    try:
        if _bytes_left(file) == 0:
            raise InputError(_INPUT_NAME, "could not be read: the file is empty")
        yield file
    finally:
        if file is not source:
            file.close()


def _bytes_left(file: BinaryIO) -> int:
    position = file.tell()
    end = file.seek(0, io.SEEK_END)
    file.seek(position)
    return end - position


def _open_container(file: BinaryIO) -> av.container.InputContainer:
    try:
        # Tags in a foreign encoding are no reason to refuse a video.
        return av.open(file, mode="r", metadata_errors="ignore", container_options=_CONTAINER_OPTIONS)
    except av.FFmpegError as exc:
        raise InputError(_INPUT_NAME, "could not be read: not a video format FFmpeg recognises") from exc


def _video_stream(container: av.container.InputContainer) -> av.VideoStream:
    """The first video stream, its declared frame size checked before any frame is decoded."""
    if not container.streams.video:
        raise InputError(_INPUT_NAME, "has no video stream (is it an audio file?)")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise InputError(_INPUT_NAME, f"could not be decoded: FFmpeg has no decoder for its codec ({stream.name})")
    _check_pixels(stream.codec_context.width, stream.codec_context.height)
    return stream


def _check_pixels(width: int, height: int) -> None:
    # Read at call time, so the limit is image_io's even where a test lowers it.
    limit = image_io.MAX_INPUT_PIXELS
    if width * height > limit:
        raise InputError(
            _INPUT_NAME, f"frames are {width}x{height} = {width * height:,} pixels, more than the limit of {limit:,}"
        )


def _stream_rate(stream: av.VideoStream) -> Fraction:
    """The stream's average frame rate, else FFmpeg's guess, else 25."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate:
            return Fraction(rate)
    return _FALLBACK_RATE


def _timed_frames(
    container: av.container.InputContainer, stream: av.VideoStream, rate: Fraction
) -> Iterator[tuple[Fraction, Fraction, av.VideoFrame]]:
    """Each decoded frame with its presentation time and end time, in seconds from the first frame's time."""
    origin = None
    end = Fraction(0)
    for frame in container.decode(stream):
        _check_pixels(frame.width, frame.height)
        time_base = frame.time_base or stream.time_base
        if frame.pts is None or time_base is None:
            start = end  # a raw stream has no timestamps: each frame follows the previous one
        else:
            if origin is None:
                origin = frame.pts * time_base - end
            start = frame.pts * time_base - origin
        end = start + (frame.duration * time_base if frame.duration and time_base else 1 / rate)
        yield start, end, frame


def _frames_at_rate(
    timed: Iterator[tuple[Fraction, Fraction, av.VideoFrame]], count: int, fps: Fraction
) -> Iterator[av.VideoFrame]:
    """FFmpeg's fps filter: for k = 0, 1, ..., the last frame starting at most k / fps, while k / fps is before
    the end of the last frame; at most `count` of them, reading no frame past the one that shows they are all.
    A frame taken for several k comes that many times in a row."""
    taken = 0
    held = None  # the last frame starting at or before the next output time, taken / fps
    end = Fraction(0)
    for start, frame_end, frame in timed:
        while held is not None and taken / fps < start:
            yield held
            taken += 1
            if taken == count:
                return
        held, end = frame, frame_end
    while held is not None and taken / fps < end and taken < count:
        yield held
        taken += 1


def _upright_images(frames: Iterator[av.VideoFrame], image_size: int | None) -> list[Image.Image]:
    """The upright RGB images of `frames`, with `image_size` at the first one's working size, each converted as
    it comes; a frame repeated in a row is converted once (the same image)."""
    images: list[Image.Image] = []
    previous, size = None, None
    for frame in frames:
        if frame is not previous:
            image = _upright_rgb(frame)
            if image_size is not None:
                size = size or image_io.working_size(*image.size, image_size)
                image = image_io.resized(image, size)
            previous = frame
        images.append(image)
    return images


def _upright_rgb(frame: av.VideoFrame) -> Image.Image:
    if any(component.is_alpha for component in frame.format.components):
        # Transparent pixels (a GIF's) on white, as an input image's are.
        rgba = Image.fromarray(frame.to_ndarray(format="rgba"), mode="RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    else:
        image = frame.to_image()
    for transpose in _display_transposes(frame):
        image = image.transpose(transpose)
    return image


def _display_transposes(frame: av.VideoFrame) -> list[Image.Transpose]:
    """The Pillow transposes that show `frame` upright, from its display matrix as FFmpeg's command line reads it
    (fftools' autorotate); a rotation that is no multiple of 90 degrees is left alone."""
    side_data = {data.type.name: data for data in frame.side_data}
    if "DISPLAYMATRIX" not in side_data:
        return []
    m = struct.unpack("=9i", bytes(side_data["DISPLAYMATRIX"]))
    if math.hypot(m[0], m[3]) == 0 or math.hypot(m[1], m[4]) == 0:
        return []
    clockwise = round(math.degrees(math.atan2(m[1] / math.hypot(m[1], m[4]), m[0] / math.hypot(m[0], m[3])))) % 360
    if clockwise == 90:
        return [Image.Transpose.TRANSPOSE if m[3] > 0 else Image.Transpose.ROTATE_270]
    if clockwise == 270:
        return [Image.Transpose.TRANSVERSE if m[3] < 0 else Image.Transpose.ROTATE_90]
    flips = []
    if clockwise == 180 and m[0] < 0:
        flips.append(Image.Transpose.FLIP_LEFT_RIGHT)
    if clockwise in (0, 180) and m[4] < 0:
        flips.append(Image.Transpose.FLIP_TOP_BOTTOM)
    return flips


def save_video(frames: Sequence[Image.Image], path: str | os.PathLike, fps: float) -> Path:
    """Write `frames` (all one size) as an H.264 MP4 (yuv420p, crf 18) at `fps` frames per second; return its path.

    yuv420p needs even sides: a frame with an odd side gets its last row or column repeated (padded, not cropped).
    """
    if not frames or fps <= 0:
        raise ValueError(f"need at least one frame and a positive rate, got {len(frames)} frames at {fps}")
    sizes = {frame.size for frame in frames}
    if len(sizes) > 1:
        raise ValueError(f"the frames of a video must have one size, got {sorted(sizes)}")
    # 29.97 and NTSC's 30000/1001 (as a float) both come out as an exact small fraction.
    rate = Fraction(fps).limit_denominator(1001)
    path = Path(path)
    with av.open(os.fspath(path), mode="w", format="mp4", options=_MP4_OPTIONS) as container:
        stream = container.add_stream("libx264", rate=rate, options=_ENCODER_OPTIONS)
        width, height = sizes.pop()
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(_even_sides(image), format="rgb24")
            frame.pts, frame.time_base = index, 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path


def _even_sides(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    return np.pad(pixels, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def save_videos(videos: Sequence[Sequence[Image.Image]], out_dir: str | os.PathLike, fps: float) -> list[Path]:
    """Write `out-0.mp4`, `out-1.mp4`, ... into `out_dir` (created if missing), one per video; return their paths."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    # The service names the files, so no user input ever reaches a path.
    return [save_video(frames, directory / f"out-{index}.mp4", fps) for index, frames in enumerate(videos)]


def save_frames(frames: Sequence[Image.Image], out_dir: str | os.PathLike, prefix: str) -> list[Path]:
    """Write the frames as PNG, `<prefix>-000.png`, `<prefix>-001.png`, ..., into `out_dir`; return their paths."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, frame in enumerate(frames):
        path = directory / f"{prefix}-{index:03d}.png"
        frame.save(path, "PNG")
        paths.append(path)
    return paths
