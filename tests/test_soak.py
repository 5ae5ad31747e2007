"""DRAFT"""

from __future__ import annotations

import ctypes
import gc
import os
import time
from pathlib import Path

import pytest

from pnp import InputError, PnPEngine
from pnp.video_io import Mp4Clips, save_video
from tests.helpers import HORSE, config
from tests.test_video import horse_frames, video_config

CYCLES = 4
LONG_FRAMES = 100
CACHE_BYTES = 64 * 2**20
FREE_MEMORY = 8 * 2**30
RSS_BOUND = 6 * 2**20
CLEAR = os.environ.get("SOAK_CLEAR") == "1"


def rss_bytes() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def test_soak(tiny_model_dir: Path, tmp_path: Path):
    engine = PnPEngine.from_pretrained(
        str(tiny_model_dir), device="cpu", cache_bytes=CACHE_BYTES, free_memory=lambda: FREE_MEMORY
    )
    short = save_video(horse_frames(5), tmp_path / "short.mp4", 8)
    long = save_video(horse_frames(LONG_FRAMES, shift=1), tmp_path / "long.mp4", 8)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 20)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(long.read_bytes()[: long.stat().st_size // 2])
    image_request = config(translation_prompts="a robot horse", inversion_prompt="soak image")
    short_request = video_config(translation_prompts="a robot horse", keyframe_interval=8, inversion_prompt="soak")
    long_request = short_request.replace(video_frames=LONG_FRAMES)

    def run_video(request, path, name):
        with Mp4Clips(tmp_path / name) as clips:
            result = engine(request, video=path, frames_to=clips)
        assert [p.name for p in clips.paths] == ["out-0.mp4"]
        return result

    readings = []
    for cycle in range(CYCLES):
        if CLEAR:
            engine.cache.clear()
        times = {}
        t = time.process_time()
        result = engine(image_request, HORSE)
        assert len(result.images) == 1
        times["image"] = time.process_time() - t
        t = time.process_time()
        run_video(short_request, short, "short")
        times["short"] = time.process_time() - t
        t = time.process_time()
        run_video(long_request, long, "long")
        times["long"] = time.process_time() - t
        t = time.process_time()
        repeat = run_video(short_request.replace(translation_prompts="a zebra"), short, "repeat")
        assert repeat.stats.cache_hit
        times["repeat"] = time.process_time() - t
        t = time.process_time()
        for bad in (text, truncated):
            with pytest.raises(InputError) as caught:
                engine(long_request, video=bad)
            assert caught.value.input_name == "input_video"
        times["bad"] = time.process_time() - t
        readings.append(rss_bytes())
        print(
            cycle,
            {k: round(v, 1) for k, v in times.items()},
            len(engine.cache),
            engine.cache.nbytes,
            readings[-1] / 2**20,
        )
    growth = max(readings[1:]) - readings[0]
    assert growth <= RSS_BOUND, [r / 2**20 for r in readings]
