"""The benchmark runs end to end on the tiny model, and its UNet evaluation counts match the cost model
(docs/cost-model.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.run import REQUEST_KEYS, expected_evals, expected_video_evals, main, parse_args, published_evals
from pnp import PnPConfig


def test_expected_evals_match_the_cost_model_at_defaults() -> None:
    """docs/cost-model.md §2 at M = N = 50, and the published model's counts of §3."""
    one, four = PnPConfig.from_mapping({}), PnPConfig.from_mapping({"translation_prompts": "a;b;c;d"})
    assert expected_evals(one) == 190  # 90 + 100 P
    assert expected_evals(four) == 490
    assert expected_evals(four, repeat=True) == 400  # 100 P
    generation = PnPConfig.from_mapping({"generation_prompt": "a horse", "translation_prompts": "a;b"})
    assert expected_evals(generation) == 2 * 50 + 2 * 50 * 2
    masked = PnPConfig.from_mapping({"translation_prompts": "a;b", "auto_mask": True})
    assert expected_evals(masked) == 90 + 200 + 10 * (1 + 2)  # K (1 + P) on top
    assert expected_evals(masked, repeat=True) == 200 + 30
    assert published_evals(1) == 999 + 2 * 999 + 100
    assert published_evals(4) == 999 + 2 * 999 + 400
    # A video, F = 40 frames in G = 5 groups, P = 1, b = 2: F·M + N·(G + F)·(1 + b·P) (docs/cost-model.md §2).
    assert expected_video_evals(one, 40) == 2000 + 6750
    assert expected_video_evals(one, 40, repeat=True) == 6750
    assert expected_video_evals(one, 41) == 41 * 50 + 50 * (6 + 41) * 3  # a last, shorter group
    assert published_evals(1, frames=40) == 40 * (999 + 2 * 999 + 100)  # no video mode: each frame alone


def test_benchmark_counts_follow_the_cost_model(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.json"
    frames = 3
    arguments = ["--model", str(tiny_model_dir), "--image-size", "128", "--steps", "10", "--video-frames", str(frames)]
    returned = main([*arguments, "--json", str(out)])
    table = json.loads(out.read_text())
    assert table == json.loads(json.dumps(returned))

    rows = table["rows"]
    assert [(r["request"], r["prompts"], r["cache_hit"]) for r in rows] == [
        ("new image", 1, False),
        ("repeat (cached)", 1, True),
        ("new image", 4, False),
        ("repeat (cached)", 4, True),
        ("generation", 1, False),
        ("auto-mask", 1, False),
        ("new image", 8, False),
        ("new video", 1, False),
        ("video (cached)", 1, True),
    ]
    # N = 10, M = 50: inversion 50, extraction max(int(8.0), int(5.0)) = 8, translation 2·10·P, masks 10 (1 + P).
    expected = [50 + 8 + 20, 20, 50 + 8 + 80, 80, 20 + 20, 50 + 8 + 20 + 20, 50 + 8 + 160]
    # A video of F frames in G = ceil(F / 8) groups, P = 1 with b = 2 branches: F·M inversion, then
    # N·(G + F)·(1 + b·P) sampling; the repeat reuses the inversion.
    groups = math.ceil(frames / 8)  # keyframe_interval's default
    video_sampling = 10 * (groups + frames) * (1 + 2 * 1)
    expected += [frames * 50 + video_sampling, video_sampling]
    assert [r["expected_evals"] for r in rows] == expected
    for row in rows:
        assert row["unet_evals"] == row["expected_evals"], row
        assert row["published_over_ours"] == pytest.approx(row["published_evals"] / row["unet_evals"])
        assert row["peak_memory_mib"] >= 0 and row["model_memory_mib"] > 0
    # By the model, a new image's features and eight prompts' images weigh more than a repeat's one.
    assert rows[6]["model_memory_mib"] > rows[0]["model_memory_mib"] > rows[1]["model_memory_mib"]
    for repeat in (rows[1], rows[3], rows[8]):
        assert repeat["inversion_s"] == 0 and repeat["extraction_s"] == 0
    # Each row has every phase: an image's keyframes and groups are 0, a video's extraction and translation.
    for image_row in rows[:7]:
        assert image_row["keyframes_s"] == 0 and image_row["groups_s"] == 0
    for video_row in rows[7:]:
        assert video_row["keyframes_s"] > 0 and video_row["groups_s"] > 0
        assert video_row["extraction_s"] == 0 and video_row["translation_s"] == 0
        assert video_row["published_evals"] == frames * published_evals(1)

    header = table["header"]
    assert header["image_size"] == 128 and header["num_inference_steps"] == 10 and header["dtype"] == "float32"
    assert header["video"].endswith("wolf.mp4") and header["video_frames"] == frames
    assert {"device", "torch", "diffusers"} <= set(header)
    printed = capsys.readouterr()
    assert "UNet evals" in printed.out and "expected" in printed.out and "pub/ours" in printed.out
    assert "keyframes" in printed.out and "groups" in printed.out and "new video" in printed.out
    assert f"device: {header['device']}" in printed.out
    # Each row is also printed as soon as it is done, for runs cut short.
    done = [
        json.loads(line.split(": ", 1)[1]) for line in printed.err.splitlines() if line.startswith(tuple(REQUEST_KEYS))
    ]
    assert done == rows


def test_a_subset_of_requests_runs_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    arguments = [
        "--model",
        str(tiny_model_dir),
        "--image-size",
        "128",
        "--steps",
        "10",
        "--json",
        str(tmp_path / "r.json"),
    ]
    table = main([*arguments, "--requests", "repeat-1,new-1"])
    assert [(r["request"], r["cache_hit"], r["unet_evals"]) for r in table["rows"]] == [
        ("new image", False, 50 + 8 + 20),
        ("repeat (cached)", True, 20),
    ]
    assert table["header"]["video_frames"] == 40  # the input's default, for a model given with --model


@pytest.mark.parametrize(
    ("requested", "message"),
    [
        ("new-1,new-2", "unknown request 'new-2'"),
        ("repeat-4", "repeat-4 repeats new-4, so it needs new-4 too"),
        ("new-1,video-repeat", "video-repeat repeats video-new, so it needs video-new too"),
    ],
)
def test_a_request_subset_is_checked(requested: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--requests", requested])
    assert message in capsys.readouterr().err
