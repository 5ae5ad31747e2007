"""Videos in and out of the engine: decode untrusted input with FFmpeg (PyAV), take its frames at a rate, and
write the edited frames as H.264 MP4, a frame at a time, with the input's sound for the span of the taken frames."""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import logging
import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Self

import av
import numpy as np
from PIL import Image

from . import image_io
from .errors import InputError

VideoSource = str | os.PathLike | bytes | BinaryIO

logger = logging.getLogger(__name__)

_INPUT_NAME = "input_video"
_FALLBACK_RATE = Fraction(25)
# Nested opens (an HLS playlist's segments, an ffconcat list's files) go through FFmpeg's protocols; naming
# no real protocol refuses them all, so an uploaded playlist cannot make FFmpeg read the server's files or URLs.
_CONTAINER_OPTIONS = {"protocol_whitelist": "none"}
# x264's constant quality: 18 is visually lossless for most content.
_ENCODER_OPTIONS = {"crf": "18"}
# The index at the start, so a browser can play the video before it is fully downloaded.
_MP4_OPTIONS = {"movflags": "+faststart"}
# MP4 holds these audio codecs as they are (FFmpeg's codec names); any other is encoded as AAC.
_COPIED_AUDIO = frozenset({"aac", "mp3"})
_AAC = av.Codec("aac", "w")
_AAC_FALLBACK_RATE = 48000


@dataclass(frozen=True)
class AudioSpan:
    """Where the outputs' sound comes from: audio stream `stream_index` of the input `source` (its path, or its
    bytes where it came as bytes or a file object), from `start`, the first taken frame's presentation time in
    seconds on the input's own timeline, for `duration` = taken frames / rate seconds."""

    source: str | os.PathLike | bytes = field(repr=False)  # an upload's bytes have no place in a log line
    stream_index: int
    start: Fraction
    duration: Fraction


@dataclass(frozen=True)
class Video:
    """The frames taken from a video, RGB, upright and at the video's own size, the rate they were taken at, and
    the span of its first audio stream that they cover (None without audio)."""

    frames: list[Image.Image]
    fps: float
    audio: AudioSpan | None = None


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
    The audio is only looked up, never decoded here: a broken audio stream is found out (and left out) when the
    outputs are written, so it never costs the video.
    """
    if video_frames < 1 or video_fps < 0:
        raise ValueError(f"video_frames must be at least 1 and video_fps at least 0, got {video_frames}, {video_fps}")
    with _binary_file(source) as file, _open_container(file) as container:
        stream = _video_stream(container)
        rate = _stream_rate(stream)
        clock = _Clock()
        try:
            timed = _timed_frames(container, stream, rate, clock)
            if video_fps == 0:
                frames = (frame for _, _, frame in itertools.islice(timed, video_frames))
            else:
                frames = _frames_at_rate(timed, video_frames, Fraction(video_fps))
            images = _upright_images(frames, image_size)
        except av.FFmpegError as exc:
            raise InputError(_INPUT_NAME, f"could not be decoded: corrupt or truncated data ({exc})") from exc
        if not images:
            raise InputError(_INPUT_NAME, "has no decodable frame")
        taken_rate = Fraction(video_fps) if video_fps > 0 else rate
        audio = _audio_span(source, file, container, clock.origin or Fraction(0), len(images) / taken_rate)
    return Video(frames=images, fps=float(video_fps) if video_fps > 0 else float(rate), audio=audio)


def _audio_span(
    source: VideoSource, file: BinaryIO, container: av.container.InputContainer, start: Fraction, duration: Fraction
) -> AudioSpan | None:
    """The span of the first audio stream that the taken frames cover, None without audio."""
    if not container.streams.audio:
        return None
    if isinstance(source, (str, os.PathLike, bytes)):
        kept = source
    else:
        # The caller's file object may be closed or read on by the time the outputs are written.
        try:
            kept = file.getvalue() if isinstance(file, io.BytesIO) else _whole_file(file)
        except (OSError, ValueError) as exc:
            logger.warning("input_video's sound is left out: its file could not be read again (%s)", exc)
            return None
    return AudioSpan(kept, container.streams.audio[0].index, start, duration)


def _whole_file(file: BinaryIO) -> bytes:
    position = file.tell()
    file.seek(0)
    try:
        return file.read()
    finally:
        file.seek(position)


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


@dataclass
class _Clock:
    """Where the first frame is on the container's own timeline, in seconds, once a frame with a timestamp is
    decoded: the sound of the outputs starts there."""

    origin: Fraction | None = None


def _timed_frames(
    container: av.container.InputContainer, stream: av.VideoStream, rate: Fraction, clock: _Clock
) -> Iterator[tuple[Fraction, Fraction, av.VideoFrame]]:
    """Each decoded frame with its presentation time and end time, in seconds from the first frame's time (set
    in `clock`)."""
    end = Fraction(0)
    for frame in container.decode(stream):
        _check_pixels(frame.width, frame.height)
        time_base = frame.time_base or stream.time_base
        if frame.pts is None or time_base is None:
            start = end  # a raw stream has no timestamps: each frame follows the previous one
        else:
            if clock.origin is None:
                clock.origin = frame.pts * time_base - end
            start = frame.pts * time_base - clock.origin
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


class _Finished:
    """An output used as a context manager: leaving it finishes the files (`close`), or on an exception removes what
    it wrote (`_abandon`): an unfinished video is no output."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abandon()

    def close(self) -> None:
        raise NotImplementedError

    def _abandon(self) -> None:
        raise NotImplementedError


class VideoWriter(_Finished):
    """An H.264 MP4 (yuv420p, crf 18, index at the start) at `fps` frames per second, written a frame at a time:
    each `write` encodes its image at once and keeps nothing of it, so memory stays flat however long the video.

    The first frame fixes the size; yuv420p needs even sides, so a frame with an odd side gets its last row or
    column repeated (padded, not cropped). With `audio`, the file carries that span of the input's sound, starting
    with the first frame: AAC and MP3 packets copied as they are, any other codec encoded as AAC. Sound that cannot
    be read, decoded or written is left out with a warning in the log; it never stops the video. Use it as a
    context manager: leaving it closes the file, or on an exception removes the unfinished file.
    """

    def __init__(self, path: str | os.PathLike, fps: float, audio: AudioSpan | None = None) -> None:
        if fps <= 0:
            raise ValueError(f"a video needs a positive rate, got {fps}")
        self.path = Path(path)
        # 29.97 and NTSC's 30000/1001 (as a float) both come out as an exact small fraction.
        self._rate = Fraction(fps).limit_denominator(1001)
        self._sound = _Sound(audio) if audio is not None else None
        self._container: av.container.OutputContainer | None = None
        self._stream: av.VideoStream | None = None
        self._size: tuple[int, int] | None = None
        self._written = 0
        self._closed = False

    def write(self, image: Image.Image) -> None:
        """Encode `image` as the next frame; one of another size than the first raises ValueError."""
        if self._closed:
            raise ValueError(f"{self.path} is closed")
        if self._container is None:
            self._open(image.size)
        elif image.size != self._size:
            raise ValueError(f"the frames of a video must have one size, got {self._size} and then {image.size}")
        frame = av.VideoFrame.from_ndarray(_even_sides(image), format="rgb24")
        frame.pts, frame.time_base = self._written, 1 / self._rate
        self._container.mux(self._stream.encode(frame))
        self._written += 1

    def close(self) -> None:
        """Flush the encoder and finish the file; a video without a frame raises ValueError (and leaves no file)."""
        if self._closed:
            return
        if self._container is None:
            self._closed = True
            raise ValueError(f"need at least one frame to write {self.path}")
        self._container.mux(self._stream.encode())  # flush the encoder's delayed frames
        self._container.close()
        self._closed = True

    def _open(self, size: tuple[int, int]) -> None:
        self._size = size
        self._container, self._stream = self._start()
        m4a = self._sound.m4a if self._sound is not None else None
        if m4a is None:
            return
        try:
            _mux_sound(self._container, m4a)
        except Exception as exc:  # whatever went wrong with the sound, the video is still written
            logger.warning("%s is written without sound: its audio could not be muxed (%s)", self.path, exc)
            with contextlib.suppress(Exception):
                self._container.close()
            # No video frame is written yet: start the file again, without an audio stream.
            self._container, self._stream = self._start()

    def _start(self) -> tuple[av.container.OutputContainer, av.VideoStream]:
        container = av.open(os.fspath(self.path), mode="w", format="mp4", options=_MP4_OPTIONS)
        stream = container.add_stream("libx264", rate=self._rate, options=_ENCODER_OPTIONS)
        width, height = self._size
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        return container, stream

    def _abandon(self) -> None:
        """Close without finishing: an unfinished video is no output, so its file is removed."""
        if self._closed:
            return
        self._closed = True
        if self._container is not None:
            with contextlib.suppress(av.FFmpegError, OSError):
                self._container.close()
            self.path.unlink(missing_ok=True)


def _even_sides(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    return np.pad(pixels, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


class Mp4Clips(_Finished):
    """A video request's edited frames as `out-0.mp4`, `out-1.mp4`, ... in `out_dir` (created if missing), one per
    prompt, each frame encoded as it comes (the engine's `frames_to`, a `pnp.video.FrameSink`): no prompt's frames
    are held. Every file carries the clip's sound, read once for all of them. With `save_frames`, each frame is also
    written as PNG, `out-K-000.png`, `out-K-001.png`, ... `out_dir` may be a function that makes the directory: it
    is called when the first frames come, so a request refused before them makes none. Use it as a context manager:
    leaving it finishes the files (`paths`), or on an exception removes them."""

    def __init__(self, out_dir: str | os.PathLike | Callable[[], Path], save_frames: bool = False) -> None:
        self._out_dir, self.save_frames = out_dir, save_frames
        self.paths: list[Path] = []
        self._writers: list[VideoWriter] = []
        self._frames: list[list[Path]] = []

    def open(self, prompts: int, fps: float, audio: AudioSpan | None) -> None:
        """Start the clips of `prompts` prompts at `fps`, with `audio`'s span of sound; a second call (after a run
        that failed part way) starts them over."""
        self._abandon()
        if callable(self._out_dir):
            self._out_dir = self._out_dir()  # once: a run that starts over writes into the same directory
        self.out_dir = Path(self._out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        sound = _Sound(audio) if audio is not None else None
        # The service names the files, so no user input ever reaches a path.
        self._writers = [VideoWriter(self.out_dir / f"out-{index}.mp4", fps) for index in range(prompts)]
        for writer in self._writers:
            writer._sound = sound  # the sound is read (and re-encoded where needed) once, not once a file
        self._frames = [[] for _ in range(prompts)]

    def write(self, prompt: int, frames: Sequence[Image.Image]) -> None:
        """The next frames of prompt `prompt`'s clip."""
        for frame in frames:
            self._writers[prompt].write(frame)
            if self.save_frames:
                path = self.out_dir / f"out-{prompt}-{len(self._frames[prompt]):03d}.png"
                frame.save(path, "PNG")
                self._frames[prompt].append(path)

    def close(self) -> None:
        """Finish every clip: `paths` are then the MP4s in prompt order, then the PNGs."""
        for writer in self._writers:
            writer.close()
        self.paths = [writer.path for writer in self._writers] + [path for paths in self._frames for path in paths]

    def _abandon(self) -> None:
        for writer in self._writers:
            writer._abandon()  # nothing for a closed writer
        for path in (path for paths in self._frames for path in paths):
            path.unlink(missing_ok=True)
        self._writers, self._frames, self.paths = [], [], []


def save_video(
    frames: Sequence[Image.Image], path: str | os.PathLike, fps: float, audio: AudioSpan | None = None
) -> Path:
    """Write `frames` (all one size) as an H.264 MP4 (yuv420p, crf 18) at `fps` frames per second, with `audio`'s
    span of the input's sound (see VideoWriter); return its path."""
    _check_frames(frames, fps)
    with VideoWriter(path, fps, audio) as writer:
        for frame in frames:
            writer.write(frame)
    return writer.path


def save_videos(
    videos: Sequence[Sequence[Image.Image]], out_dir: str | os.PathLike, fps: float, audio: AudioSpan | None = None
) -> list[Path]:
    """Write `out-0.mp4`, `out-1.mp4`, ... into `out_dir` (created if missing), one per video, each with `audio`'s
    span of the input's sound; return their paths."""
    for frames in videos:
        _check_frames(frames, fps)
    with Mp4Clips(out_dir) as clips:
        clips.open(len(videos), fps, audio)
        for prompt, frames in enumerate(videos):
            clips.write(prompt, frames)
    return clips.paths


def _check_frames(frames: Sequence[Image.Image], fps: float) -> None:
    """Refuse what cannot be a video before any file is written."""
    if not frames or fps <= 0:
        raise ValueError(f"need at least one frame and a positive rate, got {len(frames)} frames at {fps}")
    sizes = {frame.size for frame in frames}
    if len(sizes) > 1:
        raise ValueError(f"the frames of a video must have one size, got {sorted(sizes)}")


@dataclass
class _Sound:
    """An AudioSpan's sound made ready to mux, once for all the videos that carry it: an in-memory M4A whose one
    audio stream holds the span's packets, starting at 0. Preparing it reads and decodes the span, so that
    sound that cannot be used is found out before any output has an audio stream."""

    span: AudioSpan

    @functools.cached_property
    def m4a(self) -> bytes | None:
        """The prepared M4A, or None (with the reason in the log) where the input's sound cannot be used."""
        try:
            return _span_m4a(self.span)
        except Exception as exc:  # an audio problem of any kind leaves the videos silent, never unwritten
            logger.warning(
                "the videos are written without sound: input_video's audio stream %d could not be used (%s)",
                self.span.stream_index,
                exc,
            )
            return None


def _span_m4a(span: AudioSpan) -> bytes:
    """The span of the input's audio stream as an M4A starting at 0: copied where MP4 holds the codec, else
    decoded and encoded as AAC. Raises where the stream is missing, undecodable or has nothing in the span."""
    with _binary_file(span.source) as file, _open_container(file) as source:
        stream = source.streams[span.stream_index]
        if stream.type != "audio":
            raise ValueError(f"stream {span.stream_index} is {stream.type}, not audio")
        if stream.codec_context is None:
            raise ValueError("FFmpeg has no decoder for its codec")
        try:
            if stream.codec_context.codec.canonical_name in _COPIED_AUDIO:
                return _copied_m4a(source, stream, span)
            return _encoded_m4a(source, stream, span)
        except av.FFmpegError as exc:
            raise ValueError(f"corrupt or undecodable data: {exc}") from exc


def _copied_m4a(source: av.container.InputContainer, stream: av.AudioStream, span: AudioSpan) -> bytes:
    """The packets of `stream` that overlap the span, unchanged but for timestamps moved to start with the span.
    Each is decoded first: a packet that does not decode (corrupt data) raises, so no broken sound is copied."""
    end = span.start + span.duration
    shift = round(span.start / stream.time_base)
    decoded = 0
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as m4a:
        copy = m4a.add_stream_from_template(stream)
        for packet in source.demux(stream):
            if packet.pts is None or not packet.size:
                continue
            begin = packet.pts * packet.time_base
            if begin >= end:
                break
            if begin + (packet.duration or 0) * packet.time_base <= span.start and begin < span.start:
                continue
            decoded += len(stream.codec_context.decode(packet))
            packet.pts -= shift
            if packet.dts is not None:
                packet.dts -= shift
            packet.stream = copy
            m4a.mux(packet)
        decoded += len(stream.codec_context.decode(None))
    if not decoded:
        raise ValueError("it has no sound for the taken frames")
    return out.getvalue()


def _encoded_m4a(source: av.container.InputContainer, stream: av.AudioStream, span: AudioSpan) -> bytes:
    """The span of `stream` decoded and encoded with FFmpeg's AAC encoder, at the stream's rate where AAC has it,
    in mono or stereo (AAC's encoder takes only some layouts; more channels are mixed down to two)."""
    rate = stream.codec_context.sample_rate
    rate = rate if rate in _AAC.audio_rates else _AAC_FALLBACK_RATE
    layout = "mono" if stream.codec_context.channels == 1 else "stereo"
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
    written = 0
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as m4a:
        aac = m4a.add_stream("aac", rate=rate, layout=layout)
        for samples in _span_samples(_decoded(source, stream, span.start + span.duration), resampler, span):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = rate, written, Fraction(1, rate)
            m4a.mux(aac.encode(frame))
            written += samples.shape[1]
        if not written:
            raise ValueError("it has no sound for the taken frames")
        m4a.mux(aac.encode())
    return out.getvalue()


def _decoded(source: av.container.InputContainer, stream: av.AudioStream, end: Fraction) -> Iterator[av.AudioFrame]:
    """The frames of `stream` from its start until its packets reach `end` (the span starts near the start of
    the video, so little is decoded before it)."""
    for packet in source.demux(stream):
        if packet.pts is not None and packet.pts * packet.time_base >= end:
            break
        yield from stream.codec_context.decode(packet)
    yield from stream.codec_context.decode(None)


def _span_samples(
    frames: Iterator[av.AudioFrame], resampler: av.AudioResampler, span: AudioSpan
) -> Iterator[np.ndarray]:
    """The span's samples (planar, channels x samples) from `frames` resampled: silence first where the sound
    begins after the span does. The sound is taken as one run from its first frame's time (gaps are not kept)."""
    total = round(span.duration * resampler.rate)
    position = None  # where the next resampled sample falls, in samples from the span's start
    for frame in itertools.chain(frames, [None]):  # None flushes the resampler
        if position is None:
            if frame is None:
                return
            begin = frame.pts * frame.time_base if frame.pts is not None else span.start
            position = round((begin - span.start) * resampler.rate)
            if position > 0:
                yield np.zeros((resampler.layout.nb_channels, min(position, total)), np.float32)
        for resampled in resampler.resample(frame):
            samples = resampled.to_ndarray()
            first, last = max(position, 0), min(position + samples.shape[1], total)
            if first < last:
                yield samples[:, first - position : last - position]
            position += samples.shape[1]
        if position >= total:
            return


def _mux_sound(container: av.container.OutputContainer, m4a: bytes) -> None:
    """Copy the prepared sound into `container` before its first video frame: FFmpeg's interleaving holds the
    audio packets (a minute of AAC is a megabyte or two) and writes each as the video reaches its time, so it
    never has to hold the video back waiting for sound."""
    with av.open(io.BytesIO(m4a), mode="r") as sound:
        stream = sound.streams.audio[0]
        copy = container.add_stream_from_template(stream)
        for packet in sound.demux(stream):
            if packet.size:
                packet.stream = copy
                container.mux(packet)
