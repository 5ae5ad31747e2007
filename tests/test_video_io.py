"""Videos in and out (pnp.video_io): frames taken from the start at the video's rate or at video_fps (FFmpeg's
fps filter), decoding that stops once enough frames are taken, the containers FFmpeg reads, rotation metadata,
refusals of unusable and hostile files, and H.264 MP4 output.

The videos are written here with PyAV. Frame i is a solid colour that encodes i (red and green levels that
H.264 and GIF's 3-3-2 palette both keep), so a decoded frame tells which one it is."""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageOps

from pnp import image_io
from pnp.errors import InputError
from pnp.video_io import load_video, save_video, save_videos
from tests.helpers import ROOT

WIDTH, HEIGHT = 64, 48
LEVELS = [36 * k for k in range(8)]  # exact in GIF's 3-bit red and green, far apart for H.264


def coloured(index: int) -> np.ndarray:
    """A frame that encodes `index` (below 64) in its red and green levels."""
    pixels = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    pixels[..., 0] = LEVELS[index % 8]
    pixels[..., 1] = LEVELS[index // 8]
    return pixels


def index_of(image: Image.Image) -> int:
    """The index a decoded `coloured` frame encodes: the nearest levels of its mean red and green."""
    red, green = np.asarray(image, dtype=float)[..., :2].mean(axis=(0, 1))
    return int(
        np.argmin([abs(red - level) for level in LEVELS]) + 8 * np.argmin([abs(green - level) for level in LEVELS])
    )


def write_video(
    path: Path,
    frames: Sequence[np.ndarray],
    times: Sequence[Fraction] | None = None,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    display: tuple[float, bool, bool] | None = None,
) -> Path:
    """Write RGB `frames` at presentation `times` in seconds (10 fps when None) to `path`, whose extension names
    the container; `display` is the rotation (counter-clockwise degrees) and flips of its display matrix."""
    times = times if times is not None else [Fraction(index, 10) for index in range(len(frames))]
    time_base = Fraction(1, 1000)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
        stream.codec_context.time_base = time_base
        if display is not None:
            stream.set_display_rotation(display[0], hflip=display[1], vflip=display[2])
        for pixels, time in zip(frames, times, strict=True):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = int(time / time_base), time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def coloured_video(path: Path, count: int, times: Sequence[Fraction] | None = None) -> Path:
    return write_video(path, [coloured(index) for index in range(count)], times)


def fps_filter_indices(path: Path, fps: float) -> list[int]:
    """FFmpeg's fps filter computed from the demuxed timestamps: for each output time k / fps before the end of
    the last frame, the index of the last frame whose presentation time is at most k / fps."""
    with av.open(str(path)) as container:
        packets = [packet for packet in container.demux(video=0) if packet.pts is not None]
    packets.sort(key=lambda packet: packet.pts)
    first = packets[0].pts * packets[0].time_base
    times = [packet.pts * packet.time_base - first for packet in packets]
    end = times[-1] + packets[-1].duration * packets[-1].time_base
    outputs = [Fraction(k) / Fraction(fps) for k in range(int(end * Fraction(fps)) + 2)]
    return [max(i for i, time in enumerate(times) if time <= output) for output in outputs if output < end]


# --- frames in: which, how many, in which order ----------------------------------------------------------


def test_every_frame_in_order_at_the_video_rate(tmp_path: Path):
    video = load_video(coloured_video(tmp_path / "ten.mp4", 6), video_frames=40, video_fps=0)
    assert [index_of(frame) for frame in video.frames] == list(range(6))
    assert video.fps == 10.0
    assert all(frame.mode == "RGB" and frame.size == (WIDTH, HEIGHT) for frame in video.frames)


# A constant 10 fps, and a variable rate with gaps and bursts.
VARIABLE_TIMES = [Fraction(ms, 1000) for ms in (0, 100, 130, 160, 450, 500, 900, 950, 1000)]


@pytest.mark.parametrize("times", [None, VARIABLE_TIMES], ids=["10fps", "variable"])
@pytest.mark.parametrize("video_fps", [4.0, 25.0])
def test_frames_at_a_rate_follow_the_fps_filter(tmp_path: Path, times, video_fps: float):
    path = coloured_video(tmp_path / "clip.mkv", 9 if times is None else len(times), times)
    expected = fps_filter_indices(path, video_fps)
    video = load_video(path, video_frames=100, video_fps=video_fps)
    assert [index_of(frame) for frame in video.frames] == expected
    assert video.fps == video_fps
    # Not a trivial case: taken below the rate some frames are skipped, above it some are repeated.
    skips_or_repeats = len(set(expected)) < len(expected) if video_fps == 25 else len(expected) < 9
    assert skips_or_repeats


def test_a_repeated_frame_is_one_image(tmp_path: Path):
    video = load_video(coloured_video(tmp_path / "ten.mp4", 3), video_frames=100, video_fps=25)
    assert video.frames[0] is video.frames[1]


@pytest.mark.parametrize("video_fps", [0.0, 25.0])
def test_video_frames_caps_the_count(tmp_path: Path, video_fps: float):
    path = coloured_video(tmp_path / "ten.mp4", 10)
    video = load_video(path, video_frames=3, video_fps=video_fps)
    expected = list(range(10)) if video_fps == 0 else fps_filter_indices(path, video_fps)
    assert [index_of(frame) for frame in video.frames] == expected[:3]


class CountingReader(io.BytesIO):
    """A file object that counts the bytes read from it."""

    bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


@pytest.mark.parametrize("video_fps", [0.0, 25.0])
def test_decoding_stops_once_enough_frames_are_taken(tmp_path: Path, video_fps: float):
    # Noise does not compress, so each frame's bytes are in the file and reading them shows in the count.
    noise = np.random.default_rng(0).integers(0, 256, (600, HEIGHT, WIDTH, 3), dtype=np.uint8)
    data = write_video(tmp_path / "long.mp4", list(noise)).read_bytes()
    start = CountingReader(data)
    assert len(load_video(start, video_frames=3, video_fps=video_fps).frames) == 3
    assert start.bytes_read < len(data) / 10
    # The count sees decoding: taking every frame reads (almost) the whole file.
    whole = CountingReader(data)
    assert len(load_video(whole, video_frames=600, video_fps=0).frames) == 600
    assert whole.bytes_read > 0.9 * len(data)


# --- containers and sources ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "codec", "pix_fmt"),
    [
        ("clip.mov", "libx264", "yuv420p"),
        ("clip.mkv", "libx264", "yuv420p"),
        ("vp9.webm", "libvpx-vp9", "yuv420p"),
        ("vp8.webm", "libvpx", "yuv420p"),
        ("clip.gif", "gif", "rgb8"),
    ],
)
def test_containers_ffmpeg_reads(tmp_path: Path, name: str, codec: str, pix_fmt: str):
    path = write_video(tmp_path / name, [coloured(index) for index in range(5)], codec=codec, pix_fmt=pix_fmt)
    video = load_video(path, video_frames=40, video_fps=0)
    assert [index_of(frame) for frame in video.frames] == list(range(5))
    assert video.fps == 10.0


def test_transparency_is_composited_on_white(tmp_path: Path):
    pixels = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    pixels[:, : WIDTH // 2] = (255, 0, 255, 0)  # transparent, whatever its colour
    pixels[:, WIDTH // 2 :] = (0, 0, 0, 128)  # half-transparent black
    path = tmp_path / "transparent.png"
    Image.fromarray(pixels, mode="RGBA").save(path)
    (frame,) = load_video(path, video_frames=40, video_fps=0).frames
    assert frame.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(value - 127) <= 1 for value in frame.getpixel((WIDTH - 1, 0)))


def test_an_image_file_is_a_one_frame_video(tmp_path: Path):
    path = tmp_path / "still.png"
    Image.fromarray(coloured(5)).save(path)
    video = load_video(path, video_frames=40, video_fps=0)
    assert len(video.frames) == 1
    assert np.array_equal(np.asarray(video.frames[0]), coloured(5))


class Unseekable(io.BytesIO):
    """A stream that can only be read forwards, like a pipe or an upload."""

    def seekable(self) -> bool:
        return False

    def seek(self, *args) -> int:
        raise io.UnsupportedOperation("seek")

    def tell(self) -> int:
        raise io.UnsupportedOperation("tell")


def test_bytes_and_file_objects_load_like_a_path(tmp_path: Path):
    path = coloured_video(tmp_path / "ten.mp4", 6)
    from_path = load_video(path, video_frames=4, video_fps=25)
    with path.open("rb") as file:
        sources = [path.read_bytes(), io.BytesIO(path.read_bytes()), Unseekable(path.read_bytes()), file, str(path)]
        for source in sources:
            loaded = load_video(source, video_frames=4, video_fps=25)
            assert loaded.fps == from_path.fps
            assert [np.asarray(frame).tolist() for frame in loaded.frames] == [
                np.asarray(frame).tolist() for frame in from_path.frames
            ]


def test_the_example_video_loads():
    video = load_video(ROOT / "examples" / "wolf.mp4", video_frames=8, video_fps=0)
    assert len(video.frames) == 8 and video.frames[0].size == (512, 512) and video.fps == 20.0


# --- rotation --------------------------------------------------------------------------------------------


def marked() -> np.ndarray:
    """An asymmetric picture: a red square at the top left and a blue bar at the bottom, left of centre."""
    pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    pixels[:16, :16] = (255, 0, 0)
    pixels[-8:, 20:40] = (0, 0, 255)
    return pixels


@pytest.mark.parametrize(
    "display",
    [(90, False, False), (-90, False, False), (180, False, False), (0, True, False), (0, False, True)]
    + [(90, True, False), (-90, True, False), (90, False, True), (-90, False, True)],
)
def test_display_matrix_is_applied(tmp_path: Path, display: tuple[float, bool, bool]):
    # A phone held upright records landscape frames and a display rotation; a player turns them upright.
    path = write_video(tmp_path / "turned.mp4", [marked()], pix_fmt="yuv444p", display=display)
    degrees, hflip, vflip = display
    # The display matrix turns the picture counter-clockwise, then mirrors it (PyAV's set_display_rotation).
    expected = Image.fromarray(marked()).rotate(degrees, expand=True)
    expected = ImageOps.mirror(expected) if hflip else expected
    expected = ImageOps.flip(expected) if vflip else expected
    (frame,) = load_video(path, video_frames=1, video_fps=0).frames
    assert frame.size == expected.size
    assert np.abs(np.asarray(frame, dtype=float) - np.asarray(expected, dtype=float)).mean() < 2


# --- refusals --------------------------------------------------------------------------------------------


def mux_silence(container: av.container.OutputContainer) -> None:
    """An AAC stream of 1024 silent samples in `container`."""
    stream = container.add_stream("aac", rate=44100)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate, frame.pts = 44100, 0
    container.mux(stream.encode(frame))
    container.mux(stream.encode())


def audio_only(path: Path) -> Path:
    with av.open(str(path), mode="w") as container:
        mux_silence(container)
    return path


def video_stream_without_frames(path: Path) -> Path:
    """An MKV that declares a video stream but holds only audio packets."""
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        mux_silence(container)
    return path


def garbled(path: Path, source: Path) -> Path:
    """`source`'s stream and timestamps with every packet's bytes zeroed: nothing decodes."""
    with av.open(str(source)) as original, av.open(str(path), mode="w") as container:
        stream = container.add_stream_from_template(original.streams.video[0])
        for packet in original.demux(video=0):
            if packet.size:
                zeroed = av.Packet(bytes(packet.size))
                zeroed.pts, zeroed.dts, zeroed.time_base = packet.pts, packet.dts, packet.time_base
                zeroed.stream = stream
                container.mux(zeroed)
    return path


def truncated(path: Path, source: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: write_text(d / "notes.txt", "not a video\n" * 20), "not a video format"),
        (lambda d: truncated(d / "cut.mp4", coloured_video(d / "ten.mp4", 10)), "not a video format"),
        (lambda d: audio_only(d / "sound.m4a"), "no video stream"),
        (lambda d: write_text(d / "empty.mp4", ""), "the file is empty"),
        (lambda d: video_stream_without_frames(d / "silent.mkv"), "no decodable frame"),
        (lambda d: garbled(d / "garbled.mkv", coloured_video(d / "ten.mkv", 3)), "could not be decoded"),
        (lambda d: d / "missing.mp4", "No such file"),
    ],
    ids=["text", "truncated-mp4", "audio-only", "zero-bytes", "no-frames", "corrupt-frames", "missing"],
)
def test_unusable_files_are_refused(tmp_path: Path, make, message: str):
    with pytest.raises(InputError, match=message) as refused:
        load_video(make(tmp_path), video_frames=40, video_fps=0)
    assert refused.value.input_name == "input_video"


def test_empty_bytes_are_refused():
    with pytest.raises(InputError, match="the file is empty") as refused:
        load_video(b"", video_frames=40, video_fps=0)
    assert refused.value.input_name == "input_video"


def test_frames_over_the_pixel_limit_are_refused_before_decoding(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(image_io, "MAX_INPUT_PIXELS", WIDTH * HEIGHT - 1)
    # Its frames do not decode, so the refusal by size comes from the declared size, before any decoding.
    path = garbled(tmp_path / "garbled.mkv", coloured_video(tmp_path / "ten.mkv", 3))
    with pytest.raises(InputError, match="64x48 = 3,072 pixels, more than the limit of 3,071") as refused:
        load_video(path, video_frames=40, video_fps=0)
    assert refused.value.input_name == "input_video"
    monkeypatch.setattr(image_io, "MAX_INPUT_PIXELS", WIDTH * HEIGHT)
    assert len(load_video(coloured_video(tmp_path / "ok.mkv", 3), video_frames=40, video_fps=0).frames) == 3


def test_playlists_cannot_make_ffmpeg_read_other_files(tmp_path: Path, monkeypatch):
    # Both open a video on this machine when FFmpeg may follow what they name.
    segment = write_video(tmp_path / "segment.ts", [coloured(index) for index in range(3)])
    playlist = tmp_path / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:0.3,\nfile://{segment}\n#EXT-X-ENDLIST\n")
    concat = write_text(tmp_path / "list.ffconcat", "ffconcat version 1.0\nfile segment.ts\n")
    monkeypatch.chdir(tmp_path)
    for hostile in (playlist, concat, playlist.read_bytes(), concat.read_bytes()):
        with pytest.raises(InputError, match="not a video format") as refused:
            load_video(hostile, video_frames=40, video_fps=0)
        assert refused.value.input_name == "input_video"


# --- video out -------------------------------------------------------------------------------------------


def gradient(index: int) -> Image.Image:
    """A smooth picture that differs from frame to frame, as an edited video's frames do."""
    columns = np.linspace(0, 255, WIDTH)[None, :, None]
    rows = np.linspace(0, 255, HEIGHT)[:, None, None]
    pixels = np.concatenate(
        [np.broadcast_to(columns, (HEIGHT, WIDTH, 1)), np.broadcast_to(rows, (HEIGHT, WIDTH, 1))], 2
    )
    pixels = np.concatenate([pixels, np.full((HEIGHT, WIDTH, 1), 30.0 * index)], 2)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize(
    ("fps", "rate"), [(10.0, Fraction(10)), (29.97, Fraction(2997, 100)), (30000 / 1001, Fraction(30000, 1001))]
)
def test_save_video_round_trips(tmp_path: Path, fps: float, rate: Fraction):
    frames = [gradient(index) for index in range(6)]
    path = save_video(frames, tmp_path / "out.mp4", fps)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (stream.codec_context.width, stream.codec_context.height) == (WIDTH, HEIGHT)
        assert stream.average_rate == rate
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    assert len(decoded) == 6
    # H.264 is lossy and yuv420p halves the colour resolution; consecutive frames differ by 10 on average.
    for written, read in zip(frames, decoded, strict=True):
        assert np.abs(read.astype(float) - np.asarray(written, dtype=float)).mean() < 3
    assert load_video(path, video_frames=40, video_fps=0).fps == pytest.approx(float(rate))


def test_odd_sides_are_padded_by_repeating_the_edge(tmp_path: Path):
    frames = [gradient(index).crop((0, 0, WIDTH - 1, HEIGHT - 1)) for index in range(3)]
    (read, *_) = load_video(save_video(frames, tmp_path / "odd.mp4", 10), video_frames=40, video_fps=0).frames
    assert read.size == (WIDTH, HEIGHT)
    pixels, written = np.asarray(read, dtype=float), np.asarray(frames[0], dtype=float)
    assert np.abs(pixels[:-1, :-1] - written).mean() < 2
    assert np.abs(pixels[:-1, -1] - written[:, -1]).mean() < 4 and np.abs(pixels[-1, :-1] - written[-1]).mean() < 4


def test_save_video_refuses_mixed_sizes_and_no_frames(tmp_path: Path):
    with pytest.raises(ValueError, match="one size"):
        save_video([gradient(0), gradient(1).resize((32, 32))], tmp_path / "mixed.mp4", 10)
    with pytest.raises(ValueError, match="at least one frame"):
        save_video([], tmp_path / "none.mp4", 10)


def test_save_videos_names_them_like_images(tmp_path: Path):
    videos = [[gradient(index) for index in range(count)] for count in (2, 3)]
    paths = save_videos(videos, tmp_path / "new" / "dir", fps=8)
    assert paths == [tmp_path / "new" / "dir" / "out-0.mp4", tmp_path / "new" / "dir" / "out-1.mp4"]
    assert [len(load_video(path, video_frames=40, video_fps=0).frames) for path in paths] == [2, 3]


@pytest.mark.parametrize("video_fps", [0.0, 25.0])
def test_frames_are_brought_to_the_working_size_as_they_are_taken(tmp_path: Path, video_fps: float):
    """With image_size, every frame (here upright after a 90 degree display rotation) comes at the first frame's
    working size, the same pixels as resizing the full-size frames afterwards; a repeated frame is one image."""
    path = write_video(tmp_path / "turned.mp4", [coloured(index) for index in range(4)], display=(90.0, False, False))
    full = load_video(path, video_frames=40, video_fps=video_fps)
    sized = load_video(path, video_frames=40, video_fps=video_fps, image_size=256)
    size = image_io.working_size(HEIGHT, WIDTH, 256)  # upright: the sides swap, (192, 256)
    assert full.frames[0].size == (HEIGHT, WIDTH) and len(sized.frames) == len(full.frames)
    for frame, whole in zip(sized.frames, full.frames, strict=True):
        assert frame.size == size
        assert np.array_equal(np.asarray(frame), np.asarray(image_io.resized(whole, size)))
    repeats = [i for i in range(1, len(full.frames)) if full.frames[i] is full.frames[i - 1]]
    assert all(sized.frames[i] is sized.frames[i - 1] for i in repeats) and (repeats or video_fps == 0)
