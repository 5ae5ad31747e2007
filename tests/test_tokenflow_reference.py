"""Self-checks of the naive video reference (tests/tokenflow_reference.py, docs/algorithm.md §11-§12) on tiny random
UNets, against a second, separately written Plug-and-Play here (`_plug_and_play`): one frame is plain PnP (also for
a v-prediction model); identical frames all equal the one-frame result; after one step a single group's keyframe
is PnP of that frame, and the first of two keyframes is PnP with both frames' keys and values; prompts do not
mix; the group pass's propagation on hand-made tokens; the keyframe draws of §11 (and TokenFlow's).
§12: the windows' and anchors' formulas; a video within one window is unchanged by W and A; identical frames
in windows still equal the one-frame result; windows and anchors change the result of different frames; the
number of keyframes each keyframe pass attends to; a window pass's keys and values on hand-made tokens.
Every § here is a section of docs/algorithm.md."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

import tests.tokenflow_reference as reference
from tests.tokenflow_reference import (
    ATTENTION_SITES,
    CONDITIONAL,
    RESNET_CONV2,
    SOURCE,
    UNCONDITIONAL,
    ReferenceSchedule,
    ReferenceSettings,
    ReferenceTexts,
    _PassState,
    _ReferenceSelfAttention,
    _Row,
    anchor_groups,
    blend_weight,
    frame_groups,
    keyframe_draws,
    keyframe_windows,
    nearest_positions,
    reference_video_latents,
)

STEPS = 5
LATENT = (4, 16, 16)  # 128x128 pixels
SMALL_LATENT = (4, 8, 8)  # 64x64 pixels: the tiny UNet's smallest input, for the longer videos of §12


@pytest.fixture(scope="module")
def unet(tiny_model_dir: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet", torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def schedule(tiny_model_dir: Path) -> ReferenceSchedule:
    return _schedule(tiny_model_dir, STEPS)


def _schedule(model_dir: Path, steps: int) -> ReferenceSchedule:
    config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    return ReferenceSchedule.from_scheduler_config(config, steps)


def _texts(unet: UNet2DConditionModel, prompts: int, negative: bool) -> ReferenceTexts:
    """Random embeddings stand in for the text encoder's: the reference takes embeddings, not prompts."""
    generator = torch.Generator().manual_seed(1)
    width = unet.config.cross_attention_dim
    embed = lambda count: torch.randn(count, 77, width, generator=generator)  # noqa: E731
    return ReferenceTexts(embed(1), embed(prompts), embed(1) if negative else None)


def _source(
    schedule: ReferenceSchedule, frames: int, seed: int = 2, shape: tuple[int, ...] = LATENT
) -> dict[int, torch.Tensor]:
    """Random z_src per sampling timestep (no inversion needed to compare two implementations)."""
    generator = torch.Generator().manual_seed(seed)
    return {t: torch.randn(frames, *shape, generator=generator) for t in schedule.timesteps}


def _first_steps(schedule: ReferenceSchedule, steps: int) -> ReferenceSchedule:
    """The schedule's first `steps` sampling steps."""
    return ReferenceSchedule(schedule.timesteps[:steps], schedule.alphas_cumprod, schedule.final_alpha_cumprod)


def _settings(keyframe_interval: int, weights: tuple[float, ...] = (1.0,) * STEPS) -> ReferenceSettings:
    # n_f = int(5 * 0.6) and n_a = int(5 * 0.4): both kinds of injection on, then off, at different steps.
    return ReferenceSettings(
        scale=7.5,
        negative_prompt_weights=weights,
        feature_steps=3,
        attention_steps=2,
        keyframe_interval=keyframe_interval,
        seed=3,
    )


class _ImagePnP:
    """Plug-and-Play (§4-§5) on a batch of frames, independently of the video reference: attn1 by
    PyTorch's scaled_dot_product_attention; the source call records q, k and the ResNet residual, target calls
    take them. `extended`: target calls attend to the keys and values of every frame of the batch."""

    def __init__(self, extended: bool) -> None:
        self.mode = "record"  # "record" (source calls) or "inject" (target calls)
        self.extended = extended
        self.inject_attention = self.inject_resnet = False
        self.recorded: dict[str, torch.Tensor] = {}

    def processor(self, name: str) -> Any:
        def call(attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            if name in ATTENTION_SITES and self.mode == "record":
                self.recorded[name + ".q"], self.recorded[name + ".k"] = q, k
            if name in ATTENTION_SITES and self.mode == "inject" and self.inject_attention:
                q = self.recorded[name + ".q"].expand_as(q)
                k = self.recorded[name + ".k"].expand_as(k)
            if self.extended and self.mode == "inject":  # every frame's tokens, for every frame's queries
                k, v = (t.reshape(1, -1, t.shape[-1]).expand(q.shape[0], -1, -1) for t in (k, v))
            heads = lambda t: t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # noqa: E731
            out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).flatten(2)
            return attn.to_out[1](attn.to_out[0](out))

        return call

    def resnet_hook(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if self.mode == "record":
            self.recorded["resnet"] = output
        if self.mode == "inject" and self.inject_resnet:
            return self.recorded["resnet"].expand_as(output)
        return output


def _plug_and_play(
    unet: UNet2DConditionModel,
    schedule: ReferenceSchedule,
    source: dict[int, torch.Tensor],
    texts: ReferenceTexts,
    settings: ReferenceSettings,
    extended: bool = False,
) -> torch.Tensor:
    """Each prompt's final latents (P, F, C, h, w) of PnP on `source` (t -> (F, C, h, w)), all three branches
    always evaluated, one prompt and branch at a time; with `extended`, §11's keyframe pass every step."""
    pnp = _ImagePnP(extended)
    modules = dict(unet.named_modules())
    attn1 = {name: m for name, m in modules.items() if name.endswith(".attn1")}
    originals = {name: m.processor for name, m in attn1.items()}
    handle = modules[RESNET_CONV2].register_forward_hook(pnp.resnet_hook)
    results = []
    try:
        for name, module in attn1.items():
            module.set_processor(pnp.processor(name))
        with torch.no_grad():
            for p in range(texts.targets.shape[0]):
                x = source[schedule.timesteps[0]].clone()
                frames = x.shape[0]
                for i, t in enumerate(schedule.timesteps):
                    pnp.mode = "record"
                    unet(source[t], t, encoder_hidden_states=texts.unconditional.expand(frames, -1, -1))
                    pnp.mode = "inject"
                    pnp.inject_attention, pnp.inject_resnet = i < settings.attention_steps, i < settings.feature_steps
                    branch_texts = [texts.unconditional, texts.targets[p : p + 1]]
                    branch_texts += [texts.negative] if texts.negative is not None else []
                    eps = [
                        unet(x, t, encoder_hidden_states=text.expand(frames, -1, -1)).sample for text in branch_texts
                    ]
                    a_t, a_next = schedule.alpha_bar(i), schedule.alpha_bar(i + 1)
                    if schedule.prediction_type == "v_prediction":  # §9
                        eps = [math.sqrt(a_t) * v + math.sqrt(1 - a_t) * x for v in eps]
                    a = settings.negative_prompt_weights[i]
                    uncond = eps[0] if texts.negative is None else a * eps[0] + (1 - a) * eps[2]
                    guided = uncond + settings.scale * (eps[1] - uncond)
                    x0 = (x - math.sqrt(1 - a_t) * guided) / math.sqrt(a_t)
                    x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * guided
                results.append(x)
    finally:
        handle.remove()
        for name, module in attn1.items():
            module.set_processor(originals[name])
    return torch.stack(results)


def test_one_frame_is_plain_plug_and_play(unet: UNet2DConditionModel, schedule: ReferenceSchedule):
    """§11: a one-frame video is an image. Two prompts and a negative prompt whose linear weights reach
    a_i = 1 (negative branch skipped) and a_i = 0 (unconditional branch skipped)."""
    texts = _texts(unet, prompts=2, negative=True)
    source = _source(schedule, frames=1)
    settings = _settings(1, weights=tuple(1 - i / (STEPS - 1) for i in range(STEPS)))
    processors = {name: type(p) for name, p in unet.attn_processors.items()}

    video = reference_video_latents(unet, schedule, source, texts, settings)
    image = _plug_and_play(unet, schedule, source, texts, settings)

    assert video.shape == (2, 1, *LATENT)
    assert torch.isfinite(video).all()
    torch.testing.assert_close(video, image, rtol=0, atol=1e-4)
    # The two prompts' results differ (the check is not vacuous), and the UNet is left as it was.
    assert (image[0] - image[1]).abs().max() > 1e-2
    assert {name: type(p) for name, p in unet.attn_processors.items()} == processors
    assert not dict(unet.named_modules())[RESNET_CONV2]._forward_hooks


def test_one_frame_of_a_v_prediction_model_is_plain_plug_and_play(tiny_v_model_dir: Path):
    """§9 (v turned into ε) on an SD 2.x-layout UNet (linear projections, heads by width), 4 steps."""
    unet = UNet2DConditionModel.from_pretrained(tiny_v_model_dir / "unet", torch_dtype=torch.float32).eval()
    schedule = _schedule(tiny_v_model_dir, 4)
    assert schedule.prediction_type == "v_prediction"
    texts = _texts(unet, prompts=1, negative=False)
    source = _source(schedule, frames=1)

    video = reference_video_latents(unet, schedule, source, texts, _settings(1))

    torch.testing.assert_close(video, _plug_and_play(unet, schedule, source, texts, _settings(1)), rtol=0, atol=1e-4)


def test_identical_frames_all_equal_the_one_frame_result(unet: UNet2DConditionModel, schedule: ReferenceSchedule):
    """Five identical frames in groups of 2, 2, 1: extended attention over identical keyframes is attention
    over one, every token matches itself, and the blend of two equal outputs is that output."""
    texts = _texts(unet, prompts=1, negative=False)
    one = _source(schedule, frames=1)
    five = {t: z.expand(5, *LATENT).clone() for t, z in one.items()}

    single = reference_video_latents(unet, schedule, one, texts, _settings(1))
    video = reference_video_latents(unet, schedule, five, texts, _settings(2))

    assert video.shape == (1, 5, *LATENT)
    for f in range(5):
        torch.testing.assert_close(video[:, f], single[:, 0], rtol=0, atol=1e-4)


def test_one_step_keyframe_of_a_single_group_is_plain_plug_and_play(
    unet: UNet2DConditionModel, schedule: ReferenceSchedule
):
    """Three different frames in one group, one step: the keyframe pass on one keyframe is PnP of that frame,
    and in the group pass its own tokens match themselves, so its result is PnP's; the other frames take
    their attention from the keyframe's tokens instead of their own, which changes them."""
    one_step = ReferenceSchedule(schedule.timesteps[:1], schedule.alphas_cumprod, schedule.final_alpha_cumprod)
    texts = _texts(unet, prompts=1, negative=False)
    source = {schedule.timesteps[0]: _source(schedule, frames=3)[schedule.timesteps[0]]}
    settings = _settings(3)
    (keyframe,) = keyframe_draws(3, 3, 1, settings.seed)[0]

    video = reference_video_latents(unet, one_step, source, texts, settings)

    for f in range(3):
        image = _plug_and_play(unet, one_step, {t: z[f : f + 1] for t, z in source.items()}, texts, settings)
        if f == keyframe:
            torch.testing.assert_close(video[0, f], image[0, 0], rtol=0, atol=1e-4)
        else:
            assert (video[0, f] - image[0, 0]).abs().max() > 1e-3


def test_one_step_first_keyframe_of_two_is_extended_attention_plug_and_play(
    unet: UNet2DConditionModel, schedule: ReferenceSchedule
):
    """Two different frames, B = 1, one step: both are keyframes; frame 0's group pass reproduces its keyframe
    pass, whose target branches attend to both frames of their own prompt and the source branches to their own
    frame only. Checked against PnP with every frame's keys and values concatenated (two prompts)."""
    one_step = ReferenceSchedule(schedule.timesteps[:1], schedule.alphas_cumprod, schedule.final_alpha_cumprod)
    texts = _texts(unet, prompts=2, negative=False)
    source = {schedule.timesteps[0]: _source(schedule, frames=2)[schedule.timesteps[0]]}
    settings = _settings(1)

    video = reference_video_latents(unet, one_step, source, texts, settings)
    extended = _plug_and_play(unet, one_step, source, texts, settings, extended=True)
    alone = _plug_and_play(unet, one_step, {t: z[:1] for t, z in source.items()}, texts, settings)

    torch.testing.assert_close(video[:, 0], extended[:, 0], rtol=0, atol=1e-4)
    assert (extended[:, 0] - alone[:, 0]).abs().max() > 1e-3  # the other frame's tokens count


def test_several_prompts_equal_one_prompt_at_a_time(unet: UNet2DConditionModel, schedule: ReferenceSchedule):
    """§11: prompts do not mix, in the keyframes' extended attention or the group passes. Four frames
    in two groups (so blended propagation), a negative prompt with a_i strictly between 0 and 1, three steps."""
    three_steps = ReferenceSchedule(schedule.timesteps[:3], schedule.alphas_cumprod, schedule.final_alpha_cumprod)
    texts = _texts(unet, prompts=2, negative=True)
    source = _source(schedule, frames=4)
    settings = _settings(2, weights=(0.5,) * STEPS)

    both = reference_video_latents(unet, three_steps, source, texts, settings)
    for p in range(2):
        alone = ReferenceTexts(texts.unconditional, texts.targets[p : p + 1], texts.negative)
        torch.testing.assert_close(
            both[p], reference_video_latents(unet, three_steps, source, alone, settings)[0], rtol=0, atol=1e-5
        )
    assert (both[0] - both[1]).abs().max() > 1e-2


def test_keyframe_draws_follow_the_formula():
    """§11 with F = 10, B = 4 (groups of 4, 4, 2): one generator, r drawn anew each step."""
    assert frame_groups(10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    generator = torch.Generator("cpu").manual_seed(7)
    expected = []
    for _ in range(6):
        r = torch.randint(4, (3,), generator=generator).tolist()
        expected.append([r[0] % 4, 4 + r[1] % 4, 8 + r[2] % 2])
    draws = keyframe_draws(10, 4, 6, seed=7)
    assert draws == expected
    assert all(k in group for step in draws for k, group in zip(step, frame_groups(10, 4), strict=True))
    assert len({tuple(step) for step in draws}) > 1  # drawn anew each step


def test_keyframe_draws_are_tokenflows_pivots_when_frames_fill_the_groups():
    """With F a multiple of B: TokenFlow's `torch.randint(B, (F // B,)) + torch.arange(0, F, B)` after
    `torch.manual_seed(seed)`, drawn from the global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        pivots = [(torch.randint(4, (3,)) + torch.arange(0, 12, 4)).tolist() for _ in range(4)]
    assert keyframe_draws(12, 4, 4, seed=5) == pivots


def test_blend_weights_and_nearest_positions():
    """§11's w and n by hand: frame 5 of group 1 with B = 4 lies 1 from c_1 = 6 and 3 from c_0 = 2."""
    assert blend_weight(5, 1, 4) == pytest.approx(1 / (1 + math.exp(-3 / 4)))
    assert blend_weight(4, 1, 4) == pytest.approx(1 / (1 + math.exp(-0.5)))
    keyframe = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    tokens = torch.tensor([[0.1, 5.0], [-3.0, 0.2], [2.0, 0.1], [1.0, 1.0]])
    # Cosine, not distance: scale does not count; on a tie the first position wins.
    assert nearest_positions(tokens, keyframe) == [1, 2, 0, 0]


def test_group_pass_propagates_each_branchs_keyframe_outputs_at_the_matched_positions():
    """§11 step 2 on hand-made tokens: frame 5 of group 1 (B = 4) between its keyframe 6 and the previous
    group's keyframe 1; positions matched by the frame's source tokens, every branch taking its own outputs."""
    keyframe_tokens = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    previous_tokens = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0]])
    frame_tokens = torch.tensor([[0.1, 5.0], [-3.0, 0.2], [2.0, -0.1]])
    n1, n2 = [1, 2, 0], [0, 0, 1]  # by hand
    generator = torch.Generator().manual_seed(0)
    outputs = {
        (b, p, k): torch.randn(3, 6, generator=generator) for b, p in ((SOURCE, None), (CONDITIONAL, 0)) for k in (1, 6)
    }
    state = _PassState(
        rows=[_Row(5, SOURCE, None), _Row(5, CONDITIONAL, 0)],
        keyframe_pass=False,
        group=1,
        keyframe=6,
        previous_keyframe=1,
        keyframe_interval=4,
        kept_inputs={"layer.attn1": {6: keyframe_tokens, 1: previous_tokens}},
        kept_outputs={"layer.attn1": outputs},
    )
    # The target row's own tokens play no part: only the frame's source tokens are matched.
    hidden_states = torch.stack([frame_tokens, torch.randn(3, 2, generator=generator)])

    propagated = _ReferenceSelfAttention(state, "layer.attn1")(None, hidden_states)

    w = 1 / (1 + math.exp(-3 / 4))  # d1 = |5 - 6|, d2 = |5 - 2|
    for r, (b, p) in enumerate(((SOURCE, None), (CONDITIONAL, 0))):
        expected = w * outputs[(b, p, 6)][n1] + (1 - w) * outputs[(b, p, 1)][n2]
        torch.testing.assert_close(propagated[r], expected)
    state.group, state.previous_keyframe = 0, None  # the first group: its own keyframe alone
    propagated = _ReferenceSelfAttention(state, "layer.attn1")(None, hidden_states)
    torch.testing.assert_close(propagated[1], outputs[(CONDITIONAL, 0, 6)][n1])


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention over `heads` heads: query (n, heads*d), key and value (n', heads*d)."""
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(0, 1)  # noqa: E731
    return F.scaled_dot_product_attention(split(query), split(key), split(value)).transpose(0, 1).flatten(1)


def _random_attn1(generator: torch.Generator) -> SimpleNamespace:
    """A stand-in for attn1 on tokens of width 4 in two heads: random linear maps as to_q, to_k, to_v and
    to_out[0], the identity as to_out[1] (dropout)."""

    def projection() -> Any:
        matrix = torch.randn(4, 4, generator=generator)
        return lambda h: h @ matrix

    return SimpleNamespace(
        to_q=projection(), to_k=projection(), to_v=projection(), to_out=[projection(), lambda h: h], heads=2
    )


def _windowed(keyframe_interval: int, window: int, anchors: int) -> ReferenceSettings:
    """`_settings` with §12's W and A set small, so that a short video has several windows."""
    return dataclasses.replace(_settings(keyframe_interval), keyframe_window=window, anchor_keyframes=anchors)


def test_keyframe_windows_and_anchor_groups_follow_the_formulas():
    """§12 by hand: n_w = ceil(G / W) windows, window w from s_w = floor(w G / n_w); anchors
    a_j = floor((2j + 1) G / (2A)); then the formulas' properties over many G, W and A."""
    assert keyframe_windows(7, 3) == [[0, 1], [2, 3], [4, 5, 6]]  # s = 0, 7 // 3, 14 // 3, 7
    assert keyframe_windows(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert keyframe_windows(51, 25) == [list(range(0, 17)), list(range(17, 34)), list(range(34, 51))]
    assert keyframe_windows(50, 25) == [list(range(0, 25)), list(range(25, 50))]
    assert keyframe_windows(25, 25) == [list(range(25))] and keyframe_windows(3, 25) == [[0, 1, 2]]
    assert anchor_groups(7, 2) == [1, 5]  # floor(7 / 4), floor(21 / 4)
    assert anchor_groups(26, 8) == [1, 4, 8, 11, 14, 17, 21, 24]
    assert anchor_groups(5, 1) == [2]
    for groups in range(1, 60):
        for window in range(1, 13):
            windows = keyframe_windows(groups, window)
            assert [g for w in windows for g in w] == list(range(groups))  # consecutive, in order, all groups
            assert len(windows) == math.ceil(groups / window)
            assert max(map(len, windows)) <= window and max(map(len, windows)) - min(map(len, windows)) <= 1
            if groups > window:
                for anchors in range(1, window + 1):
                    a = anchor_groups(groups, anchors)
                    assert len(a) == anchors and a == sorted(set(a)) and 0 <= a[0] and a[-1] < groups


def test_windowed_settings_are_checked(unet: UNet2DConditionModel, schedule: ReferenceSchedule):
    """§12 has A <= W (and W >= 1): where windows apply, other values are refused before any UNet call."""
    texts = _texts(unet, prompts=1, negative=False)
    source = _source(schedule, frames=4, shape=SMALL_LATENT)
    for window, anchors in ((0, 1), (2, 3), (2, 0)):
        with pytest.raises(ValueError):
            reference_video_latents(unet, schedule, source, texts, _windowed(1, window, anchors))


def test_videos_within_one_window_are_unchanged_by_the_window_settings(
    unet: UNet2DConditionModel, schedule: ReferenceSchedule
):
    """§12: G <= W is §11 exactly, whatever A. Five frames in groups of 2, 2, 1 (G = 3), two steps, with
    W = 3 (G = W) and A = 1 or A = 9 (> G), bit for bit the default W = 25, A = 8."""
    two_steps = _first_steps(schedule, 2)
    texts = _texts(unet, prompts=1, negative=False)
    source = _source(schedule, frames=5, shape=SMALL_LATENT)

    default = reference_video_latents(unet, two_steps, source, texts, _settings(2))

    for anchors in (1, 9):
        windowed = reference_video_latents(unet, two_steps, source, texts, _windowed(2, 3, anchors))
        assert torch.equal(windowed, default)


def test_identical_frames_in_windows_equal_the_one_frame_result(
    unet: UNet2DConditionModel, schedule: ReferenceSchedule
):
    """§12 with five identical frames, B = 1, W = 2, A = 2 (windows [0], [1, 2], [3, 4], anchors 1 and 3),
    three steps: every key and value attended to (own keyframes, the previous window's last, other anchors) is
    a copy of the same frame's, so each frame equals the one-frame video."""
    three_steps = _first_steps(schedule, 3)
    texts = _texts(unet, prompts=1, negative=False)
    one = _source(schedule, frames=1, shape=SMALL_LATENT)
    five = {t: z.expand(5, *SMALL_LATENT).clone() for t, z in one.items()}

    single = reference_video_latents(unet, three_steps, one, texts, _settings(1))
    video = reference_video_latents(unet, three_steps, five, texts, _windowed(1, 2, 2))

    assert video.shape == (1, 5, *SMALL_LATENT)
    for f in range(5):
        torch.testing.assert_close(video[:, f], single[:, 0], rtol=0, atol=1e-4)


def test_windows_and_anchors_change_the_result_of_different_frames(
    unet: UNet2DConditionModel, schedule: ReferenceSchedule
):
    """§12 on four different frames, B = 1, one step: W = 2 (windows [0, 1], [2, 3]) differs from one window,
    and the anchors count: A = 1 (anchor 2) and A = 2 (anchors 1 and 3) give window 0 different keys."""
    one_step = _first_steps(schedule, 1)
    texts = _texts(unet, prompts=1, negative=False)
    source = _source(schedule, frames=4, shape=SMALL_LATENT)

    whole = reference_video_latents(unet, one_step, source, texts, _settings(1))
    one_anchor = reference_video_latents(unet, one_step, source, texts, _windowed(1, 2, 1))
    two_anchors = reference_video_latents(unet, one_step, source, texts, _windowed(1, 2, 2))

    for first, second in ((whole, one_anchor), (whole, two_anchors), (one_anchor, two_anchors)):
        for f in range(4):
            assert (first[0, f] - second[0, f]).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("frames", "keyframe_passes", "passes"),
    [
        # G = 5, W = 2: windows [0], [1, 2], [3, 4]; anchors 1, 3. Window 0: itself and anchors 1, 3; window 1:
        # itself, group 0, anchor 3; window 2: itself, group 2, anchor 1.
        (5, [(2, 2), (1, 3), (2, 4), (2, 4)], "KKgKggKgg"),
        # G = 4, W = 2: windows [0, 1], [2, 3]; anchors 1, 3. Window 0: itself and anchor 3; window 1: itself and
        # group 1 (an anchor too: attended once, as window 0 computed it); anchor 3 is its own.
        (4, [(2, 2), (2, 3), (2, 3)], "KKggKgg"),
    ],
)
def test_keyframe_passes_attend_to_their_window_the_previous_windows_last_keyframe_and_the_other_anchors(
    unet: UNet2DConditionModel,
    schedule: ReferenceSchedule,
    monkeypatch: pytest.MonkeyPatch,
    frames: int,
    keyframe_passes: list[tuple[int, int]],
    passes: str,
):
    """§12's passes of one step, B = 1, W = 2, A = 2, spied on: the anchor pass, then each window's keyframe
    pass (K) and its group passes (g, no attention). In a keyframe pass of n keyframes every attn1 of a target
    branch attends to k frames' keys (| window | + 1 for w > 0 + anchors not among those), of the source branch
    to its own frame's: `keyframe_passes` holds (n, k) per keyframe pass, the anchor pass first."""
    layers = sum(name.endswith(".attn1") for name, _ in unet.named_modules())
    recorded: list[list[int]] = []
    attention, unet_pass = reference.attention, reference._unet_pass

    def spy_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
        recorded[-1].append(key.shape[0] // query.shape[0])  # frames attended to
        return attention(query, key, value, heads)

    def spy_pass(*args: Any) -> torch.Tensor:
        recorded.append([])
        return unet_pass(*args)

    monkeypatch.setattr(reference, "attention", spy_attention)
    monkeypatch.setattr(reference, "_unet_pass", spy_pass)
    texts = _texts(unet, prompts=1, negative=False)  # target branches: unconditional and conditional
    source = _source(schedule, frames=frames, shape=SMALL_LATENT)

    reference_video_latents(unet, _first_steps(schedule, 1), source, texts, _windowed(1, 2, 2))

    assert "".join("K" if calls else "g" for calls in recorded) == passes
    spied = [Counter(calls) for calls in recorded if calls]
    assert spied == [Counter({1: layers * n, k: layers * 2 * n}) for n, k in keyframe_passes]


def test_window_pass_attends_to_its_keyframes_the_previous_windows_last_and_the_other_anchors():
    """§12 step 3 on hand-made tokens: a window pass on keyframes 4 and 5 after a window whose last keyframe
    is 2, with other anchors 0 and 9. Each target row attends to its branch's keys and values of 4 and 5 (this
    pass), of 2 as the previous window's pass kept them (not the anchor pass's), of 0 and 9 from the anchor pass
    (not a window's), and not the anchor pass's 4; source rows to their own frame. Then the anchor pass keeps
    keys and values only."""
    generator = torch.Generator().manual_seed(0)
    attn = _random_attn1(generator)
    branches = (UNCONDITIONAL, CONDITIONAL)
    random_kv = lambda: (torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator))  # noqa: E731
    window_keys = {(b, 0, k): random_kv() for b in branches for k in (0, 2)}
    anchor_keys = {(b, 0, k): random_kv() for b in branches for k in (0, 2, 4, 9)}
    rows = [_Row(f, b, p) for b, p in ((SOURCE, None), (UNCONDITIONAL, 0), (CONDITIONAL, 0)) for f in (4, 5)]
    state = _PassState(
        rows=rows,
        previous_window_keyframe=2,
        other_anchors=[0, 9],
        window_keys={"layer.attn1": dict(window_keys)},
        anchor_keys={"layer.attn1": anchor_keys},
    )
    hidden_states = torch.randn(6, 3, 4, generator=generator)

    with torch.no_grad():
        output = _ReferenceSelfAttention(state, "layer.attn1")(attn, hidden_states)
        keys, values = attn.to_k(hidden_states), attn.to_v(hidden_states)
        for r, row in enumerate(rows):
            attended = [(keys[r], values[r])]
            if row.branch != SOURCE:
                attended = [(keys[s], values[s]) for s in range(6) if rows[s].branch == row.branch]
                attended += [window_keys[(row.branch, 0, 2)], anchor_keys[(row.branch, 0, 0)]]
                attended += [anchor_keys[(row.branch, 0, 9)]]
            key, value = torch.cat([k for k, _ in attended]), torch.cat([v for _, v in attended])
            expected = attn.to_out[0](_attention(attn.to_q(hidden_states[r]), key, value, heads=2))
            torch.testing.assert_close(output[r], expected)

        kept = state.window_keys["layer.attn1"]
        for r, row in enumerate(rows[2:], start=2):  # the target rows' keys and values, for the next window
            torch.testing.assert_close(kept[(row.branch, 0, row.frame)], (keys[r], values[r]))
        assert set(state.kept_inputs["layer.attn1"]) == {4, 5} and len(state.kept_outputs["layer.attn1"]) == 6

        state.anchor_pass, state.previous_window_keyframe, state.other_anchors = True, None, []
        state.kept_inputs, state.kept_outputs, state.anchor_keys = {}, {}, {}
        _ReferenceSelfAttention(state, "layer.attn1")(attn, hidden_states)
    assert set(state.anchor_keys["layer.attn1"]) == {(b, 0, f) for b in branches for f in (4, 5)}
    assert not state.kept_inputs and not state.kept_outputs
