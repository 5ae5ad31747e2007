"""Video requests through the engine (docs/algorithm.md §11-§12; pnp/video.py, pnp/tokenflow.py): a one-frame video and
a video of identical frames against the image path, the keyframes' draws, seeds, several prompts at once, the counted
UNet evaluations new and cached, the refusals that come before any UNet work, and a naive implementation of
docs/algorithm.md §11 (tests/tokenflow_reference.py) against the engine. The test videos are made here with PyAV
(`pnp.video_io.save_video`), from crops of the example image: natural content, no flat repeated regions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pnp import InputError, PnPConfig, PnPEngine, memory_policy, tokenflow
from pnp.image_io import decoded_to_pixels, pixels_to_images
from pnp.memory import MemoryModel, RequestShape
from pnp.memory_policy import usable_bytes
from pnp.prompts import encode_prompts
from pnp.schedules import negative_prompt_weights
from pnp.tokenflow import draw_keyframes, frame_groups
from pnp.video_io import load_video, save_video
from tests.helpers import HORSE, config, pixels
from tests.tokenflow_reference import ReferenceSchedule, ReferenceSettings, ReferenceTexts, reference_video_latents

VIDEO = {"keyframe_interval": 2, "video_frames": 40}


def horse_frames(count: int, shift: int = 6) -> list[Image.Image]:
    """`count` 128x128 crops of the example image, each `shift` pixels further right."""
    horse = Image.open(HORSE).convert("RGB").resize((160 + count * shift, 160))
    return [horse.crop((i * shift, 16, i * shift + 128, 144)) for i in range(count)]


def write_video(directory: Path, frames: list[Image.Image], fps: float = 8) -> Path:
    return save_video(frames, directory / f"clip-{len(frames)}-{abs(hash(frames[-1].tobytes()))}.mp4", fps)


def video_config(**values) -> PnPConfig:
    return config(**{**VIDEO, **values})


def decoded_frames(path: Path) -> list[Image.Image]:
    """The frames as the engine reads them (H.264 is lossy: the image path must see the same pixels)."""
    return load_video(path, 40, 0).frames


def max_difference(first: Image.Image, second: Image.Image) -> int:
    return int(np.abs(pixels(first) - pixels(second)).max())


def assert_same_up_to_ties(frames: list[Image.Image], expected: list[Image.Image]) -> None:
    """The frames of one request run in other UNet batches: equal within 1 grey level, but for the few pixels
    where a near-tie of docs/algorithm.md §11's nearest-neighbour search went the other way. The tiny model's
    16-channel tokens have cosine-similarity margins down to 1e-7, the rounding that another batch size brings
    to the convolutions; a flipped match moves about 0.1% of a frame's values by 2-4 grey levels. A split that
    mixed up frames, branches or prompts moves most of them."""
    for frame, other in zip(frames, expected, strict=True):
        difference = np.abs(pixels(frame) - pixels(other))
        assert (difference > 1).mean() <= 0.005 and difference.mean() <= 0.25, (difference > 1).mean()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five distinct frames: groups of 2, 2 and 1 at keyframe_interval 2."""
    return write_video(tmp_path_factory.mktemp("video"), horse_frames(5))


def test_a_one_frame_video_is_the_image_path(engine: PnPEngine, tmp_path: Path):
    path = write_video(tmp_path, horse_frames(1))
    request = video_config(translation_prompts="a robot horse; a zebra", inversion_prompt="one frame")
    video = engine(request, video=path)
    (frame,) = decoded_frames(path)
    image = engine(request, frame)
    assert video.images == [] and [len(frames) for frames in video.videos] == [1, 1] and video.fps == 8
    for (edited,), expected in zip(video.videos, image.images, strict=True):
        assert max_difference(edited, expected) <= 1


def test_identical_frames_each_get_the_image_paths_edit(engine: PnPEngine, tmp_path: Path):
    """Every keyframe and every nearest neighbour is the same frame: each frame is the image's edit."""
    frame = horse_frames(1)[0]
    path = write_video(tmp_path, [frame] * 5)
    request = video_config(translation_prompts="a robot horse", inversion_prompt="identical")
    (video,) = engine(request, video=path).videos
    image = engine(request, decoded_frames(path)[0]).images[0]
    assert len(video) == 5
    assert max(max_difference(edited, image) for edited in video) <= 1


def test_the_keyframes_are_the_documented_draws():
    """docs/algorithm.md §11: one generator seeded once, r = randint(B, (G,)) a step, k_g = gB + (r_g mod |group g|)."""
    groups = frame_groups(10, 4)
    assert groups == [range(0, 4), range(4, 8), range(8, 10)]
    draws = draw_keyframes(groups, 4, seed=7, num_steps=3)
    generator = torch.Generator("cpu").manual_seed(7)
    for keyframes in draws:
        r = torch.randint(4, (3,), generator=generator)
        assert keyframes == [0 + int(r[0]) % 4, 4 + int(r[1]) % 4, 8 + int(r[2]) % 2]
    assert all(8 <= keyframes[2] <= 9 for keyframes in draws)  # the short last group keeps its own frames
    # With F a multiple of B, TokenFlow's pivotal_idx under torch.manual_seed(seed).
    torch.manual_seed(3)
    pivots = [(torch.randint(4, (2,)) + torch.arange(0, 8, 4)).tolist() for _ in range(3)]
    assert draw_keyframes(frame_groups(8, 4), 4, seed=3, num_steps=3) == pivots


def test_the_seed_draws_the_keyframes(engine: PnPEngine, clip: Path):
    request = video_config(translation_prompts="a robot horse", seed=1)
    first, again = engine(request, video=clip).videos[0], engine(request, video=clip).videos[0]
    other = engine(request.replace(seed=2), video=clip).videos[0]
    assert all(max_difference(a, b) == 0 for a, b in zip(first, again, strict=True))
    assert max(max_difference(a, b) for a, b in zip(first, other, strict=True)) > 1


def test_several_prompts_equal_one_prompt_at_a_time(engine: PnPEngine, clip: Path):
    request = video_config(translation_prompts="a robot horse; a zebra", negative_prompt="blurry")
    together = engine(request, video=clip).videos
    for prompt, frames in zip(request.translation_prompts, together, strict=True):
        (alone,) = engine(request.replace(translation_prompts=prompt), video=clip).videos
        assert_same_up_to_ties(frames, alone)


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_the_unet_evaluations_are_the_cost_models(engine: PnPEngine, tmp_path: Path, negative: str):
    """F·M + N·(G + F)·(1 + b·P) on a new video, N·(G + F)·(1 + b·P) on the same video again; b = 3 with a
    negative prompt whose constant weight 0.5 keeps both the unconditional and the negative branch."""
    path = write_video(tmp_path, horse_frames(3, shift=5))  # F = 3, B = 2: G = 2
    request = video_config(
        translation_prompts="a robot horse; a zebra",
        negative_prompt=negative,
        negative_prompt_schedule="constant",
        negative_prompt_alpha=0.5,
        inversion_prompt=f"counted {negative}",
    )
    frames, groups, steps, prompts, branches = 3, 2, 10, 2, 3 if negative else 2
    sampling = steps * (groups + frames) * (1 + branches * prompts)
    new = engine(request, video=path).stats
    assert new.phases["inversion"].unet_evals == frames * 10 and new.cache == "new"
    assert new.phases["keyframes"].unet_evals == steps * groups * (1 + branches * prompts)
    assert new.unet_evals == frames * 10 + sampling
    cached = engine(request.replace(translation_prompts="a cat; a dog"), video=path).stats
    assert cached.cache_hit and cached.unet_evals == sampling


@pytest.mark.parametrize(
    ("others", "named"),
    [
        ({"image": HORSE}, "input_image"),
        ({"config": {"generation_prompt": "a horse"}}, "generation_prompt"),
        ({"image": None, "mask": HORSE}, "mask"),
        ({"config": {"auto_mask": True}}, "auto_mask"),
    ],
)
def test_a_video_with_another_source_or_a_mask_is_refused_before_any_work(
    engine: PnPEngine, clip: Path, others: dict, named: str
):
    evals = engine.unet_evals
    request = video_config(**others.get("config", {}))
    with pytest.raises(InputError, match=f"input_video: cannot be used together with {named}"):
        engine(request, others.get("image"), mask=others.get("mask"), video=clip)
    assert engine.unet_evals == evals


def test_a_file_that_is_not_a_video_is_refused_before_any_work(engine: PnPEngine, tmp_path: Path):
    evals = engine.unet_evals
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video")
    with pytest.raises(InputError, match="input_video"):
        engine(video_config(), video=not_a_video)
    assert engine.unet_evals == evals


def reference_frames(
    engine: PnPEngine, request: PnPConfig, window: int = 25, anchors: int = 8
) -> list[list[Image.Image]]:
    """The frames of tests/tokenflow_reference.py, with windows of `window` groups and `anchors` anchors, on the
    engine's own cached inversion of `request`'s video."""
    ((_, entry),) = [(k, e) for k, e in engine.cache.items() if k.inversion_prompt == request.inversion_prompt]
    embeddings = encode_prompts(engine.model, request)
    steps = request.num_inference_steps
    weights = negative_prompt_weights(request.negative_prompt_schedule, request.negative_prompt_alpha, steps)
    latents = reference_video_latents(
        engine.model.unet,
        ReferenceSchedule.from_scheduler_config(engine.model.scheduler_config, steps),
        entry.latents,
        ReferenceTexts(embeddings.unconditional, embeddings.targets, embeddings.negative),
        ReferenceSettings(
            scale=request.scale,
            negative_prompt_weights=tuple(weights),
            feature_steps=request.feature_injection_steps,
            attention_steps=request.attention_injection_steps,
            keyframe_interval=request.keyframe_interval,
            seed=0 if request.seed is None else request.seed,
            keyframe_window=window,
            anchor_keyframes=anchors,
        ),
    )
    return [pixels_to_images(decoded_to_pixels(engine.model.decode_latents(video, 8))) for video in latents]


def test_the_engine_equals_a_naive_implementation_of_the_algorithm(engine: PnPEngine, clip: Path):
    """tests/tokenflow_reference.py (loops over frames, rows and positions, plain softmax attention) on the
    engine's own inversion: 2 prompts, groups of 2, 2 and 1 frames, a negative prompt; within 1 grey level."""
    request = video_config(
        translation_prompts="a robot horse; a zebra",
        negative_prompt="blurry",
        inversion_prompt="reference",
        seed=5,
    )
    result = engine(request, video=clip)
    for frames, expected in zip(result.videos, reference_frames(engine, request), strict=True):
        assert max(max_difference(a, b) for a, b in zip(frames, expected, strict=True)) <= 1


def test_smaller_calls_give_the_same_frames(engine: PnPEngine, clip: Path, monkeypatch):
    """With one latent a UNet call (batch_latent_pixels = one 16x16 latent), the keyframe pass's targets go one
    unit (a branch and prompt's 3 keyframes) a call, the source and the group passes one frame a call, and the
    similarity search 7 rows of 256 similarities at a time: the same frames, up to ties."""
    request = video_config(translation_prompts="a robot horse; a zebra", inversion_prompt="chunked")
    whole = engine(request, video=clip).videos
    small = PnPEngine(engine.model, batch_latent_pixels=16 * 16)
    monkeypatch.setattr(tokenflow, "SIMILARITY_CHUNK_SCORES", 7 * 16 * 16)
    calls: list[int] = []
    hook = engine.model.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        chunked = small(request, video=clip).videos
    finally:
        hook.remove()
    assert max(calls) == 3  # one unit of 3 keyframes; everything else a latent a call
    for frames, expected in zip(chunked, whole, strict=True):
        assert_same_up_to_ties(frames, expected)


def test_a_video_that_runs_out_of_memory_retries_with_smaller_calls(engine: PnPEngine, clip: Path, monkeypatch):
    """UNet calls of more than 3 latents fail as CUDA's do: the sampling runs again with smaller calls and gives
    the same frames; where even the smallest calls (a unit of 3 keyframes) fail, an error names video_frames."""
    request = video_config(translation_prompts="a robot horse; a zebra", inversion_prompt="out of memory")
    unconstrained = engine(request, video=clip).videos
    unet = engine.model.injection_unet
    forward = unet.unet_forward

    def limited(limit: int):
        def call(latents: torch.Tensor, *args, **kwargs):
            if latents.shape[0] > limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory (a call of {latents.shape[0]} latents)")
            return forward(latents, *args, **kwargs)

        return call

    monkeypatch.setattr(unet, "unet_forward", limited(3))
    result = engine(request, video=clip)
    assert result.stats.memory_retries > 0 and result.stats.cache_hit
    for frames, expected in zip(result.videos, unconstrained, strict=True):
        assert_same_up_to_ties(frames, expected)
    monkeypatch.setattr(unet, "unet_forward", limited(2))
    with pytest.raises(InputError, match="video_frames: a video of 5 frames at a 128x128 working size"):
        engine(request, video=clip)


def test_the_similarity_search_in_chunks_is_the_whole_search(monkeypatch):
    """Rows in chunks of 5 (across frame boundaries: 3 frames of 8 tokens) give every token the position of its
    most cosine-similar keyframe token, as one (n, n') matrix and as a loop over tokens do."""
    generator = torch.Generator().manual_seed(0)
    tokens, keyframe = torch.randn(3, 8, 6, generator=generator), torch.randn(10, 6, generator=generator)
    whole = tokenflow.nearest_positions(tokens, keyframe)
    monkeypatch.setattr(tokenflow, "SIMILARITY_CHUNK_SCORES", 5 * 10)
    chunked = tokenflow.nearest_positions(tokens, keyframe)
    looped = [
        [max(range(10), key=lambda k: torch.cosine_similarity(row, keyframe[k], dim=0).item()) for row in frame]
        for frame in tokens
    ]
    assert chunked.tolist() == whole.tolist() == looped


def test_a_step_keeps_what_the_memory_model_counts(engine: PnPEngine, clip: Path, monkeypatch):
    """The keyframe pass's S_k and A_k (every attn1, the source and 2 prompts x 2 branches, 3 keyframes) are the
    memory model's keyframe terms, byte for byte."""
    kept: list[int] = []
    finish = tokenflow.FrameAttention.finish_keyframes

    def counted(frames: tokenflow.FrameAttention) -> None:
        finish(frames)
        layers = [*frames.sources.values(), *frames.source_outputs.values(), *frames.outputs.values()]
        kept.append(sum(part.numel() * part.element_size() for parts in layers for part in parts))

    monkeypatch.setattr(tokenflow.FrameAttention, "finish_keyframes", counted)
    request = video_config(translation_prompts="a robot horse; a zebra", inversion_prompt="kept")
    engine(request, video=clip)
    model = MemoryModel.of(engine.model)
    keyframes, branches = 3, 4
    assert len(model.self_attention_layers) == sum(
        name.endswith("attn1") for name, _ in engine.model.unet.named_modules()
    )
    assert (
        kept
        == [(2 + branches) * keyframes * model.self_attention_values((128, 128)) * model.value_bytes]
        * request.num_inference_steps
    )


def test_a_video_that_cannot_fit_is_refused_before_its_inversion(engine: PnPEngine, clip: Path, monkeypatch):
    """Where by the memory model the video needs more than the device has free, even a latent a call: an error
    naming video_frames and what would fit, and no UNet evaluation."""
    request = video_config(inversion_prompt="too long")
    model = MemoryModel.of(engine.model)

    def needed(frames: int) -> int:
        return model.request_bytes(RequestShape.of_video(request, (128, 128), frames, new_source=True), 1, 1)

    assert needed(1) < needed(2) < needed(3) < needed(5)
    monkeypatch.setattr(engine, "free_memory", lambda: needed(5) - 1)
    monkeypatch.setattr(memory_policy, "MEMORY_MARGIN_BYTES", 0)  # the tiny model needs megabytes, not a GiB
    evals = engine.model.injection_unet.evals
    with pytest.raises(InputError, match=r"^video_frames: a video of 5 frames at a 128x128 working size") as raised:
        engine(request, video=clip)
    assert engine.model.injection_unet.evals == evals
    usable = usable_bytes(needed(5) - 1)
    fitting = max(frames for frames in range(1, 5) if needed(frames) <= usable)
    assert str(raised.value).endswith(
        f"video_frames {fitting} or fewer would fit at this working size, and no smaller image_size would fit all 5 "
        "frames"
    )
    monkeypatch.setattr(engine, "free_memory", lambda: needed(5))  # just enough: it runs
    assert len(engine(request, video=clip).videos[0]) == 5
