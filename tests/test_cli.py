"""The command line (pnp.cli): `pnp IMAGE PROMPTS --out DIR` (or `python -m pnp`), its generation and video forms,
its options (the inputs) and its exit codes."""

from __future__ import annotations

import argparse
import runpy
import subprocess
import sys
from pathlib import Path

import av
import pytest
from PIL import Image

from pnp.cli import build_parser, is_video, main
from pnp.config import PUBLIC_INPUTS, PnPConfig
from tests.helpers import HORSE, write_horse_video
from tests.test_video_audio import audio_packets, tone, with_sound

FAST = ["--image_size", "128", "--num_inference_steps", "10", "--ddim_inversion_steps", "10", "--device", "cpu"]


def test_options_are_the_inputs_with_their_types_and_choices():
    options = {action.dest: action for action in build_parser()._actions}
    for name, spec in PUBLIC_INPUTS.items():
        if name == "translation_prompts":  # the last positional argument
            assert name not in options
            continue
        option = options[name]
        if spec.type is bool:  # a flag with its negation: --auto_mask, --no-auto_mask
            assert isinstance(option, argparse.BooleanOptionalAction), name
        else:
            assert option.type is spec.type and option.choices == spec.choices, name
        assert option.help.startswith(spec.description), name
        # An input left out takes the preset's value, else the config's default; output_format is no config field.
        assert option.default == (spec.default if name == "output_format" else None), name


def test_translates_an_image_with_a_preset_and_overrides(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            str(HORSE),
            "a robot horse; a zebra",
            "--out",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--config",
            "primitive",
            *FAST,
        ]
    )
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    assert printed[:2] == [str(out / "out-0.png"), str(out / "out-1.png")]
    assert all(Image.open(out / f"out-{i}.png").size == (128, 128) for i in range(2))
    # The primitive preset's negative prompt is on: its branch shows in the translation's evaluations.
    translation = next(line for line in printed if line.startswith("translation"))
    assert int(translation.split()[-3]) > 2 * 10 * 2


def test_generation_form_writes_the_source_first_and_prints_the_seed(tiny_model_dir, tmp_path, capsys):
    code = main(
        [
            "--generation_prompt",
            "a horse",
            "a zebra",
            "--out",
            str(tmp_path),
            "--model",
            str(tiny_model_dir),
            "--seed",
            "5",
            "--output_format",
            "jpg",
            *FAST,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-0.jpg", "out-1.jpg"]
    assert "seed: 5" in printed


def test_a_preset_with_a_generation_prompt_takes_the_prompts_alone(tiny_model_dir, tmp_path, capsys):
    code = main(["a zebra", "--config", "generated", "--out", str(tmp_path), "--model", str(tiny_model_dir), *FAST])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-0.png", "out-1.png"]
    assert "seed: 0" in capsys.readouterr().out  # the preset's seed
    # An image as well is one positional argument too many for that preset.
    assert main([str(HORSE), "a zebra", "--config", "generated", "--out", str(tmp_path), *FAST]) == 2
    assert "expected PROMPTS (the source is generated)" in capsys.readouterr().err


def test_auto_mask_saves_each_prompts_mask_beside_its_image(tiny_model_dir, tmp_path, capsys):
    arguments = ["--generation_prompt", "a horse", "--seed", "3", "--model", str(tiny_model_dir), *FAST]
    code = main(["a robot horse; a zebra", "--out", str(tmp_path), "--auto_mask", "--save-masks", *arguments])
    printed = capsys.readouterr().out
    assert code == 0
    # The generated source is out-0; each prompt's mask goes with its image.
    names = ["out-0.png", "out-1-mask.png", "out-1.png", "out-2-mask.png", "out-2.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert Image.open(tmp_path / "out-1-mask.png").mode == "L"
    assert "mask coverage" in printed and printed.count("UNet evals") >= 8
    # Masks without --auto_mask are a usage error, before any work.
    assert main(["a cat", "--out", str(tmp_path / "none"), "--save-masks", *arguments]) == 2
    assert "--save-masks saves the masks of --auto_mask" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_bad_input_is_an_error_naming_it(tiny_model_dir, tmp_path, capsys):
    code = main([str(HORSE), "a cat", "--out", str(tmp_path), "--model", str(tiny_model_dir), "--scale", "99", *FAST])
    assert code == 1
    assert "scale" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_an_image_is_required_unless_generating(tiny_model_dir, tmp_path, capsys):
    assert main(["a cat", "--out", str(tmp_path), "--model", str(tiny_model_dir), *FAST]) == 2
    assert "IMAGE PROMPTS" in capsys.readouterr().err


def test_a_video_gives_one_mp4_per_prompt_and_on_request_its_frames(tiny_model_dir, tmp_path, capsys):
    clip = with_sound(
        tmp_path / "clip.mkv", write_horse_video(tmp_path / "picture.mp4", frames=4, fps=8), "vorbis", tone(1.0)
    )
    out = tmp_path / "out"
    arguments = ["--out", str(out), "--model", str(tiny_model_dir), "--keyframe_interval", "2", *FAST]
    code = main([str(clip), "a robot horse; a zebra", "--save-frames", *arguments])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    videos = [out / "out-0.mp4", out / "out-1.mp4"]
    frames = [out / f"out-{k}-{index:03d}.png" for k in range(2) for index in range(4)]
    assert printed[:10] == [str(path) for path in videos + frames]
    assert sorted(out.iterdir()) == sorted(videos + frames)
    for video in videos:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            decoded = list(container.decode(stream))
            assert stream.codec_context.name == "h264" and stream.average_rate == 8
        assert [(frame.width, frame.height) for frame in decoded] == [(128, 128)] * 4
        assert audio_packets(video)[0].name == "aac"  # the clip's Vorbis sound, encoded as AAC
    assert all(Image.open(path).size == (128, 128) for path in frames)
    assert any(line.startswith("encode ") for line in printed)  # the MP4s' writing is in the stats
    # A video takes no mask: the engine's refusal, before any work.
    assert main([str(clip), "a cat", "--mask", str(HORSE), *arguments[:4], *FAST]) == 1
    assert "input_video: cannot be used together with mask" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "video"),
    [
        (["clip.mp4"], True),
        (["CLIP.MOV"], True),
        (["clip.webm"], True),
        (["horse.jpg"], False),
        (["animation.gif"], False),  # Pillow's first frame, as before
        (["--video", "animation.gif"], True),
        (["--generation_prompt", "a horse"], False),
    ],
)
def test_the_source_is_a_video_by_its_suffix_or_by_the_video_flag(arguments, video):
    args = build_parser().parse_args([*arguments, "a cat"])
    assert is_video(args, PnPConfig(generation_prompt=args.generation_prompt or "")) is video


def test_save_frames_needs_a_video(tiny_model_dir, tmp_path, capsys):
    assert main([str(HORSE), "a cat", "--out", str(tmp_path / "none"), "--save-frames", *FAST]) == 2
    assert "--save-frames saves a video's frames" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_runs_as_a_module(monkeypatch, capsys):
    # What `python -m pnp --help` does, in this process (runpy runs pnp/__main__.py as __main__, as -m does).
    monkeypatch.setattr(sys, "argv", ["pnp", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("pnp", run_name="__main__", alter_sys=True)
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert "--feature_injection_threshold" in help_text and "--generation_prompt" in help_text


def test_the_package_installs_the_pnp_console_script():
    # pyproject.toml's [project.scripts], installed beside this environment's python.
    script = Path(sys.executable).parent / "pnp"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: pnp ") and "--generation_prompt" in result.stdout
