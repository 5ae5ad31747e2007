"""Long videos through the engine (docs/algorithm.md §12; pnp/tokenflow.py): keyframe windows and anchors past
KEYFRAME_WINDOW groups, tried on short videos with a smaller window and fewer anchors: the windows and anchors
of the formulas, identical frames against the image path, the counted UNet evaluations new and cached, and the naive
reference of the rule (tests/tokenflow_reference.py) against the engine, with small windows and with the real ones."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from pnp import PnPEngine, tokenflow
from pnp.tokenflow import anchor_groups, keyframe_windows
from tests.test_video import (
    decoded_frames,
    horse_frames,
    max_difference,
    reference_frames,
    video_config,
    write_video,
)


@pytest.fixture
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """W = 2 groups a window and A = 2 anchors: five groups make three windows."""
    monkeypatch.setattr(tokenflow, "KEYFRAME_WINDOW", 2)
    monkeypatch.setattr(tokenflow, "ANCHOR_KEYFRAMES", 2)


def test_windows_and_anchors_are_the_formulas():
    """n_w = ceil(G / W) windows from s_w = floor(w·G / n_w); a_j = floor((2j + 1)·G / (2A)); one window and no
    anchor up to W groups."""
    assert keyframe_windows(7, 3) == [range(0, 2), range(2, 4), range(4, 7)]
    assert keyframe_windows(225, 25) == [range(25 * w, 25 * (w + 1)) for w in range(9)]
    assert keyframe_windows(26, 25) == [range(0, 13), range(13, 26)]
    assert keyframe_windows(25, 25) == [range(0, 25)] and anchor_groups(25, 8, 25) == []
    assert anchor_groups(26, 8, 25) == [1, 4, 8, 11, 14, 17, 21, 24]
    assert anchor_groups(225, 8, 25) == [14, 42, 70, 98, 126, 154, 182, 210]
    assert anchor_groups(5, 2, 2) == [1, 3]


def test_identical_frames_in_windows_each_get_the_image_paths_edit(engine: PnPEngine, tmp_path: Path, small_windows):
    """Every keyframe, anchor and nearest neighbour is the same frame, so attending to more copies of its keys
    changes nothing: in three windows too, each frame is the image's edit."""
    frame = horse_frames(1)[0]
    path = write_video(tmp_path, [frame] * 5)
    request = video_config(
        translation_prompts="a robot horse", inversion_prompt="identical windows", keyframe_interval=1
    )
    result = engine(request, video=path)
    image = engine(request, decoded_frames(path)[0]).images[0]
    assert result.stats.phases["anchors"].unet_evals > 0
    assert max(max_difference(edited, image) for edited in result.videos[0]) <= 1


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_the_unet_evaluations_in_windows_are_the_formulas(
    engine: PnPEngine, tmp_path: Path, small_windows, negative: str, caplog: pytest.LogCaptureFixture
):
    """F·M + N·(G + F + A)·(1 + b·P) on a new video past W groups, N·(G + F + A)·(1 + b·P) on the same video
    again; the anchor passes N·A·(1 + b·P). A debug line names each window as it starts."""
    path = write_video(tmp_path, horse_frames(5, shift=4))  # F = 5, B = 1: G = 5 > W = 2
    request = video_config(
        translation_prompts="a robot horse; a zebra",
        keyframe_interval=1,
        negative_prompt=negative,
        negative_prompt_schedule="constant",
        negative_prompt_alpha=0.5,
        inversion_prompt=f"counted windows {negative}",
    )
    frames, groups, anchors, steps, prompts, branches = 5, 5, 2, 10, 2, 3 if negative else 2
    units = 1 + branches * prompts
    with caplog.at_level(logging.DEBUG, logger="pnp.tokenflow"):
        new = engine(request, video=path).stats
    windows = [r.getMessage() for r in caplog.records if r.name == "pnp.tokenflow" and "window" in r.getMessage()]
    assert len(windows) == steps * 3 and windows[:3] == [
        "step 0: window 1 of 3, groups 0 to 0",
        "step 0: window 2 of 3, groups 1 to 2",
        "step 0: window 3 of 3, groups 3 to 4",
    ]
    assert new.phases["anchors"].unet_evals == steps * anchors * units
    assert new.phases["keyframes"].unet_evals == steps * groups * units
    assert new.unet_evals == frames * 10 + steps * (groups + frames + anchors) * units
    cached = engine(request.replace(translation_prompts="a cat; a dog"), video=path).stats
    assert cached.cache_hit and cached.unet_evals == steps * (groups + frames + anchors) * units


def assert_within_one_grey_level(videos: list[list[Image.Image]], expected: list[list[Image.Image]]) -> None:
    for frames, reference in zip(videos, expected, strict=True):
        assert max(max_difference(a, b) for a, b in zip(frames, reference, strict=True)) <= 1


def test_the_engine_equals_the_naive_reference_in_windows(engine: PnPEngine, tmp_path: Path, small_windows):
    """Nine frames in groups of 2 (the last of 1): three windows, [0], [1, 2], [3, 4], anchors 1 and 3, so window 0
    attends to both anchors, window 1 to the previous keyframe and anchor 3, window 2 to the previous keyframe and
    anchor 1; two prompts and a negative prompt; within 1 grey level of the reference."""
    path = write_video(tmp_path, horse_frames(9, shift=4))
    request = video_config(
        translation_prompts="a robot horse; a zebra",
        negative_prompt="blurry",
        inversion_prompt="reference windows",
        seed=5,
    )
    videos = engine(request, video=path).videos
    assert_within_one_grey_level(videos, reference_frames(engine, request, window=2, anchors=2))


def test_the_engine_equals_the_naive_reference_past_25_groups(engine: PnPEngine, tmp_path: Path):
    """The real W = 25 and A = 8: 26 one-frame groups make two windows of 13 beside 8 anchors; one prompt."""
    path = write_video(tmp_path, horse_frames(26, shift=2))
    request = video_config(keyframe_interval=1, translation_prompts="a robot horse", inversion_prompt="26", seed=2)
    result = engine(request, video=path)
    assert result.stats.phases["anchors"].unet_evals == 10 * 8 * 3
    assert_within_one_grey_level(result.videos, reference_frames(engine, request, window=25, anchors=8))
