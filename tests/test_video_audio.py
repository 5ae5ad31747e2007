"""The input's sound in the output MP4s (docs/algorithm.md §11, pnp.video_io): the first audio stream for the span of
the taken frames, AAC and MP3 copied packet for packet, other codecs encoded as AAC, and a broken audio stream that
leaves the videos silent (with a warning) but never costs a frame. Also the streaming writer: frames encoded as they
come and not kept.

The clips are a `coloured` video (tests/test_video_io.py) remuxed beside a stereo signal encoded here: noise
where packets are compared (every packet differs), a tone where the decoded sound is."""

from __future__ import annotations

import io
import logging
import os
import tracemalloc
import weakref
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from pnp import video_io
from pnp.video_io import AudioSpan, Mp4Clips, VideoWriter, load_video, save_video, save_videos
from tests.test_video_io import Unseekable, coloured, write_video

RATE = 44100
TONE = 440.0
# Options an encoder needs: FFmpeg's own Vorbis encoder is marked experimental.
ENCODER_OPTIONS = {"vorbis": {"strict": "experimental"}}


def tone(seconds: float, rate: int = RATE, frequency: float = TONE) -> np.ndarray:
    times = np.arange(round(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * frequency * times)).astype(np.float32)
    return np.stack([wave, wave])


def noise(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.random.default_rng(0).uniform(-0.3, 0.3, (2, round(seconds * rate))).astype(np.float32)


def with_sound(
    path: Path, video: Path, codec: str, samples: np.ndarray, rate: int = RATE, start: Fraction = Fraction(0)
) -> Path:
    """`video`'s stream copied into `path` (whose extension names the container) beside stereo `samples` encoded
    with `codec` at `rate`, starting at `start` seconds."""
    with av.open(str(video)) as source, av.open(str(path), mode="w") as container:
        picture = container.add_stream_from_template(source.streams.video[0])
        # Copied packets carry no rate: without it Matroska's average rate comes out as its time base, 1000.
        picture.codec_context.framerate = source.streams.video[0].average_rate
        sound = container.add_stream(codec, rate=rate, options=ENCODER_OPTIONS.get(codec))
        sound.layout = "stereo"
        for offset in range(0, samples.shape[1], 1000):
            chunk = np.ascontiguousarray(samples[:, offset : offset + 1000])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, offset + round(start * rate), Fraction(1, rate)
            container.mux(sound.encode(frame))
        container.mux(sound.encode())
        for packet in source.demux(source.streams.video[0]):
            if packet.size:
                packet.stream = picture
                container.mux(packet)
    return path


def clip(directory: Path, name: str, codec: str, samples: np.ndarray, **kwargs) -> Path:
    """30 frames at 10 fps (VP8 for WebM, else H.264) beside `samples` as `codec`, in the container `name` names."""
    suffix = Path(name).suffix
    frames = [coloured(index) for index in range(30)]
    video = write_video(directory / f"picture-{name}", frames, codec="libvpx" if suffix == ".webm" else "libx264")
    return with_sound(directory / name, video, codec, samples, **kwargs)


def audio_packets(path: Path) -> tuple[av.AudioStream | None, list[av.Packet]]:
    """The first audio stream's codec context and its packets, None and [] without audio."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None, []
        stream = container.streams.audio[0]
        return stream.codec_context, [packet for packet in container.demux(stream) if packet.size]


def span_packets(path: Path, start: Fraction, duration: Fraction) -> list[av.Packet]:
    """The input's audio packets that overlap [start, start + duration)."""
    _, packets = audio_packets(path)
    return [
        packet
        for packet in packets
        if packet.pts * packet.time_base < start + duration
        and (packet.pts + packet.duration) * packet.time_base > start
    ]


def assert_spans(path: Path, duration: Fraction) -> None:
    """The output's audio starts with its video at 0 and ends at `duration`, both within one packet."""
    _, packets = audio_packets(path)
    one_packet = max(packet.duration * packet.time_base for packet in packets)
    first = packets[0].pts * packets[0].time_base
    end = (packets[-1].pts + packets[-1].duration) * packets[-1].time_base
    assert -one_packet <= first <= 0  # an AAC encoder's first packet primes the decoder: -1024 samples
    assert abs(end - duration) <= one_packet


def decoded_sound(path: Path) -> tuple[np.ndarray, int]:
    """The output's first audio channel, decoded, and its rate."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        chunks = [frame.to_ndarray()[0] for frame in container.decode(stream)]
        return np.concatenate(chunks), stream.codec_context.sample_rate


def dominant_frequency(path: Path) -> float:
    samples, rate = decoded_sound(path)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


def frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def write(path: Path, source: Path, video_frames: int = 10, video_fps: float = 0) -> Path:
    """Load `source` as the engine does and write its frames back with their sound."""
    video = load_video(source, video_frames=video_frames, video_fps=video_fps)
    return save_video(video.frames, path, video.fps, video.audio)


# --- the span --------------------------------------------------------------------------------------------


def test_load_video_names_the_span(tmp_path: Path):
    path = clip(tmp_path, "in.mp4", "aac", noise(3.0))
    video = load_video(path, video_frames=10, video_fps=0)
    assert video.audio == AudioSpan(path, 1, Fraction(0), Fraction(1))
    assert load_video(path, video_frames=4, video_fps=5).audio.duration == Fraction(4, 5)
    assert load_video(path, video_frames=100, video_fps=0).audio.duration == Fraction(3)  # all 30 frames


def test_bytes_and_file_objects_keep_the_bytes_a_path_stays_a_path(tmp_path: Path):
    path = clip(tmp_path, "in.mp4", "aac", noise(3.0))
    data = path.read_bytes()
    assert load_video(str(path), video_frames=10, video_fps=0).audio.source == str(path)
    assert load_video(data, video_frames=10, video_fps=0).audio.source is data
    assert load_video(io.BytesIO(data), video_frames=10, video_fps=0).audio.source == data
    assert load_video(Unseekable(data), video_frames=10, video_fps=0).audio.source == data
    with path.open("rb") as file:
        span = load_video(file, video_frames=10, video_fps=0).audio
    assert span.source == data and "source" not in repr(span)
    # The file is closed: the span reopens the bytes it kept.
    out = save_video(load_video(data, video_frames=10, video_fps=0).frames, tmp_path / "out.mp4", 10, span)
    assert [bytes(p) for p in audio_packets(out)[1]] == [bytes(p) for p in span_packets(path, 0, Fraction(1))]


def test_aac_is_copied_packet_for_packet(tmp_path: Path):
    path = clip(tmp_path, "in.mp4", "aac", noise(3.0))
    out = write(tmp_path / "out.mp4", path, video_frames=10)
    context, packets = audio_packets(out)
    expected = span_packets(path, Fraction(0), Fraction(1))
    assert context.name == "aac"
    # Not re-encoded: the same bytes, and only the span's (about 44 of the 130 packets).
    assert [bytes(packet) for packet in packets] == [bytes(packet) for packet in expected]
    assert 40 < len(packets) < 50
    assert_spans(out, Fraction(1))
    assert frame_count(out) == 10


def test_mp3_is_copied(tmp_path: Path):
    path = clip(tmp_path, "in.mkv", "libmp3lame", noise(3.0))
    out = write(tmp_path / "out.mp4", path, video_frames=10)
    context, packets = audio_packets(out)
    assert context.codec.canonical_name == "mp3"
    assert [bytes(packet) for packet in packets] == [
        bytes(packet) for packet in span_packets(path, Fraction(0), Fraction(1))
    ]
    assert_spans(out, Fraction(1))


@pytest.mark.parametrize(
    ("name", "codec"),
    [
        ("in.webm", "vorbis"),
        ("in.mkv", "vorbis"),
        ("in.webm", "libopus"),
        ("in.mkv", "libopus"),
        ("in.mkv", "flac"),
        ("in.mkv", "pcm_s16le"),
    ],
)
def test_other_codecs_are_encoded_as_aac(tmp_path: Path, name: str, codec: str):
    rate = 48000 if codec == "libopus" else RATE  # Opus has no 44.1 kHz
    path = clip(tmp_path, name, codec, tone(3.0, rate), rate=rate)
    out = write(tmp_path / "out.mp4", path, video_frames=10)
    context, _ = audio_packets(out)
    assert context.name == "aac" and context.sample_rate == rate
    assert_spans(out, Fraction(1))
    assert dominant_frequency(out) == pytest.approx(TONE, abs=2)


def test_video_fps_sets_the_span(tmp_path: Path):
    # 4 frames taken at 5 fps from a 10 fps clip span 0.8 s, whichever way the sound comes out.
    for name, codec in (("copied.mp4", "aac"), ("encoded.mkv", "libopus")):
        rate = 48000 if codec == "libopus" else RATE
        path = clip(tmp_path, name, codec, tone(3.0, rate), rate=rate)
        out = write(tmp_path / f"out-{name}.mp4", path, video_frames=4, video_fps=5)
        assert_spans(out, Fraction(4, 5))
        assert frame_count(out) == 4


def test_the_sound_starts_at_the_first_frame(tmp_path: Path):
    """Frames from 1.5 s on, sound from 0: the output's sound is the input's from 1.5 s."""
    times = [Fraction(3, 2) + Fraction(index, 10) for index in range(30)]
    video = write_video(tmp_path / "late.mkv", [coloured(index) for index in range(30)], times)
    # Copied: the packets from 1.5 s on, not those from 0.
    copied = with_sound(tmp_path / "copied.mp4", video, "aac", noise(4.5))
    assert load_video(copied, video_frames=10, video_fps=0).audio.start == Fraction(3, 2)
    out = write(tmp_path / "out-copied.mp4", copied)
    expected = span_packets(copied, Fraction(3, 2), Fraction(1))
    assert [bytes(packet) for packet in audio_packets(out)[1]] == [bytes(packet) for packet in expected]
    assert_spans(out, Fraction(1))
    # Encoded: a low tone until 1.5 s and a high one after; the output has only the high one.
    low, high = tone(1.5, frequency=TONE), tone(3.0, frequency=4 * TONE)
    encoded = with_sound(tmp_path / "encoded.mkv", video, "flac", np.concatenate([low, high], axis=1))
    out = write(tmp_path / "out-encoded.mp4", encoded)
    assert_spans(out, Fraction(1))
    samples, rate = decoded_sound(out)
    spectrum = np.abs(np.fft.rfft(samples))
    frequencies = np.fft.rfftfreq(len(samples), 1 / rate)
    assert frequencies[np.argmax(spectrum)] == pytest.approx(4 * TONE, abs=2)
    assert spectrum[np.argmin(abs(frequencies - TONE))] < spectrum.max() / 100


def test_sound_that_starts_late_keeps_its_place(tmp_path: Path):
    # The sound begins 0.5 s after the first frame: encoded, the output has silence until then.
    path = clip(tmp_path, "in.mkv", "flac", tone(2.0), start=Fraction(1, 2))
    out = write(tmp_path / "out.mp4", path)
    samples, rate = decoded_sound(out)
    assert np.abs(samples[: int(0.45 * rate)]).max() < 0.01
    assert np.abs(samples[int(0.55 * rate) : int(0.95 * rate)]).max() > 0.2
    assert_spans(out, Fraction(1))


# --- no sound, broken sound ------------------------------------------------------------------------------


def test_no_audio_in_no_audio_out(tmp_path: Path):
    path = write_video(tmp_path / "in.mp4", [coloured(index) for index in range(10)])
    video = load_video(path, video_frames=10, video_fps=0)
    assert video.audio is None
    out = save_video(video.frames, tmp_path / "out.mp4", video.fps, video.audio)
    assert audio_packets(out) == (None, [])
    assert frame_count(out) == 10


def zeroed_sound(path: Path, source: Path) -> Path:
    """`source` with every audio packet's bytes zeroed (timestamps kept): the stream is there, nothing decodes."""
    with av.open(str(source)) as original, av.open(str(path), mode="w") as container:
        copies = {stream.index: container.add_stream_from_template(stream) for stream in original.streams}
        for packet in original.demux():
            if not packet.size:
                continue
            if packet.stream.type == "audio":
                zeroed = av.Packet(bytes(packet.size))
                zeroed.pts, zeroed.dts, zeroed.duration = packet.pts, packet.dts, packet.duration
                zeroed.time_base, packet = packet.time_base, zeroed
                packet.stream = copies[1]
            else:
                packet.stream = copies[0]
            container.mux(packet)
    return path


def undecodable_sound(path: Path, video: Path) -> Path:
    """`video` beside an MPEG-H 3D Audio stream, a codec MP4 holds and FFmpeg has no decoder for."""
    with av.open(str(video)) as source, av.open(str(path), mode="w") as container:
        picture = container.add_stream_from_template(source.streams.video[0])
        sound = container.add_mux_stream("mpegh_3d_audio", rate=48000)
        sound.time_base = Fraction(1, 48000)
        for index in range(30):
            packet = av.Packet(bytes(range(100)))
            packet.pts = packet.dts = index * 4800
            packet.duration, packet.time_base, packet.stream = 4800, Fraction(1, 48000), sound
            container.mux(packet)
        for packet in source.demux(source.streams.video[0]):
            if packet.size:
                packet.stream = picture
                container.mux(packet)
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: zeroed_sound(d / "zeroed.mp4", clip(d, "in.mp4", "aac", noise(3.0))), "corrupt or undecodable"),
        (
            lambda d: zeroed_sound(d / "zeroed.mkv", clip(d, "in.mkv", "libmp3lame", noise(3.0))),
            "corrupt or undecodable",
        ),
        (
            lambda d: undecodable_sound(d / "mpegh.mp4", write_video(d / "v.mp4", [coloured(i) for i in range(30)])),
            "no decoder",
        ),
    ],
    ids=["zeroed-aac", "zeroed-mp3", "no-decoder"],
)
def test_broken_sound_leaves_the_video_silent(tmp_path: Path, caplog, make, reason: str):
    path = make(tmp_path)
    video = load_video(path, video_frames=10, video_fps=0)
    assert video.audio is not None  # the stream is there; load_video does not decode it
    with caplog.at_level(logging.WARNING, logger="pnp.video_io"):
        out = save_video(video.frames, tmp_path / "out.mp4", video.fps, video.audio)
    assert audio_packets(out) == (None, [])
    assert frame_count(out) == 10
    (record,) = [record for record in caplog.records if record.name == "pnp.video_io"]
    assert record.levelno == logging.WARNING and reason in record.getMessage()


def test_a_vanished_input_leaves_the_video_silent(tmp_path: Path, caplog):
    path = clip(tmp_path, "in.mp4", "aac", noise(3.0))
    video = load_video(path, video_frames=10, video_fps=0)
    path.unlink()
    with caplog.at_level(logging.WARNING, logger="pnp.video_io"):
        out = save_video(video.frames, tmp_path / "out.mp4", video.fps, video.audio)
    assert audio_packets(out) == (None, [])
    assert frame_count(out) == 10
    assert "could not be used" in caplog.text and "No such file" in caplog.text


def test_a_failure_while_muxing_the_sound_leaves_no_audio_stream(tmp_path: Path, caplog, monkeypatch):
    """The sound is checked before the audio stream is added; should muxing it fail all the same (after adding
    the stream), the file starts again without one."""

    def failing(container, m4a):
        container.add_stream("aac", rate=RATE)
        raise av.InvalidDataError(1094995529, "Invalid data found when processing input")

    monkeypatch.setattr(video_io, "_mux_sound", failing)
    path = clip(tmp_path, "in.mp4", "aac", noise(3.0))
    video = load_video(path, video_frames=10, video_fps=0)
    with caplog.at_level(logging.WARNING, logger="pnp.video_io"):
        out = save_video(video.frames, tmp_path / "out.mp4", video.fps, video.audio)
    assert audio_packets(out) == (None, [])
    assert frame_count(out) == 10
    assert "without sound" in caplog.text


def test_several_outputs_read_the_sound_once(tmp_path: Path, caplog):
    path = clip(tmp_path, "in.mkv", "libopus", tone(3.0, 48000), rate=48000)
    video = load_video(path, video_frames=10, video_fps=0)
    paths = save_videos([video.frames, video.frames[:5]], tmp_path / "outs", video.fps, video.audio)
    assert [path.name for path in paths] == ["out-0.mp4", "out-1.mp4"]
    assert [frame_count(path) for path in paths] == [10, 5]
    # The same encoded sound in both.
    first, second = ([bytes(packet) for packet in audio_packets(path)[1]] for path in paths)
    assert first == second and first
    broken = zeroed_sound(tmp_path / "zeroed.mp4", clip(tmp_path, "aac.mp4", "aac", noise(3.0)))
    video = load_video(broken, video_frames=10, video_fps=0)
    with caplog.at_level(logging.WARNING, logger="pnp.video_io"):
        paths = save_videos([video.frames] * 3, tmp_path / "silent", video.fps, video.audio)
    assert [audio_packets(path) for path in paths] == [(None, [])] * 3
    # Prepared once for the three: one warning.
    assert len([record for record in caplog.records if record.name == "pnp.video_io"]) == 1


# --- the streaming writer --------------------------------------------------------------------------------


def noise_frame(index: int, side: int = 128) -> Image.Image:
    """A frame H.264 cannot squeeze, so that each one adds to the file."""
    return Image.fromarray(np.random.default_rng(index).integers(0, 256, (side, side, 3), dtype=np.uint8))


def test_the_writer_keeps_no_frame(tmp_path: Path):
    written = []
    tracemalloc.start()
    try:
        with VideoWriter(tmp_path / "out.mp4", 10) as writer:
            for index in range(120):
                image = noise_frame(index)
                writer.write(image)
                written.append(weakref.ref(image))
                del image
                if index == 19:
                    baseline = tracemalloc.get_traced_memory()[0]
            grown = tracemalloc.get_traced_memory()[0] - baseline
            # No written frame is referenced, before the file is finished too.
            assert all(reference() is None for reference in written)
    finally:
        tracemalloc.stop()
    # 100 frames of 48 KiB each: kept as arrays they would take 4.7 MiB.
    assert grown < 512 * 1024
    assert frame_count(writer.path) == 120


def test_the_file_grows_as_frames_come_with_sound_too(tmp_path: Path):
    """The sound goes in first, so FFmpeg's interleaving writes the video as it comes instead of holding it."""
    path = clip(tmp_path, "in.mp4", "aac", noise(10.0))
    span = AudioSpan(path, 1, Fraction(0), Fraction(10))
    with VideoWriter(tmp_path / "out.mp4", 10, span) as writer:
        for index in range(100):
            writer.write(noise_frame(index))
        written = os.path.getsize(writer.path)
    assert written > os.path.getsize(writer.path) / 4
    assert_spans(writer.path, Fraction(10))


def test_the_writer_refuses_mixed_sizes_and_no_frames(tmp_path: Path):
    writer = VideoWriter(tmp_path / "mixed.mp4", 10)
    writer.write(noise_frame(0, 64))
    with pytest.raises(ValueError, match="one size"):
        writer.write(noise_frame(1, 32))
    writer.close()
    assert frame_count(writer.path) == 1
    with pytest.raises(ValueError, match="at least one frame"), VideoWriter(tmp_path / "none.mp4", 10):
        pass
    assert not (tmp_path / "none.mp4").exists()
    with pytest.raises(ValueError, match="positive rate"):
        VideoWriter(tmp_path / "still.mp4", 0)


def test_an_exception_leaves_no_unfinished_file(tmp_path: Path):
    with pytest.raises(RuntimeError), Mp4Clips(tmp_path / "outs", save_frames=True) as clips:
        clips.open(2, 10, None)
        clips.write(0, [noise_frame(0, 64)])
        clips.write(1, [noise_frame(1, 64)])
        raise RuntimeError("the sampling failed")
    assert list((tmp_path / "outs").iterdir()) == []


def test_mp4_clips_write_each_prompt_as_it_comes(tmp_path: Path):
    """Frame by frame, every prompt's in turn, with the sound; opened again (a run that failed part way), the clips
    start over."""
    path = clip(tmp_path, "in.mp4", "aac", noise(3.0))
    video = load_video(path, video_frames=10, video_fps=0)
    with Mp4Clips(tmp_path / "new" / "dir") as clips:
        clips.open(3, video.fps, video.audio)
        clips.write(0, video.frames[:4])
        clips.open(3, video.fps, video.audio)
        for frame in video.frames:
            for prompt in range(3):
                clips.write(prompt, [frame])
    assert clips.paths == [tmp_path / "new" / "dir" / f"out-{k}.mp4" for k in range(3)]
    expected = [bytes(packet) for packet in span_packets(path, Fraction(0), Fraction(1))]
    for writer_path in clips.paths:
        assert frame_count(writer_path) == 10
        assert [bytes(packet) for packet in audio_packets(writer_path)[1]] == expected


def test_mp4_clips_save_numbered_pngs_too(tmp_path: Path):
    frames = [noise_frame(index, 32) for index in range(3)]
    with Mp4Clips(tmp_path / "frames", save_frames=True) as clips:
        clips.open(2, 8, None)
        clips.write(0, frames[:1])
        clips.write(1, frames)
    names = [path.name for path in clips.paths]
    assert names == ["out-0.mp4", "out-1.mp4", "out-0-000.png", "out-1-000.png", "out-1-001.png", "out-1-002.png"]
    for path, frame in zip(clips.paths[3:], frames, strict=True):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(frame))
