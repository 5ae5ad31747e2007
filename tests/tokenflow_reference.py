"""The deliberately naive reference of SPEC §7.3-7.4 (video: Plug-and-Play with TokenFlow's keyframes and
token propagation), for tests to check the engine's optimised video path against.

It is written from the SPEC alone, not from the engine's code, and favours plainness over speed: Python
loops over frames, branches, heads and token positions, softmax attention and cosine similarity written
out, one UNet call per pass with every row of that pass. Only torch and diffusers are used.

Per sampling step i (SPEC §7.4):
1. keyframe pass: the UNet on the G keyframes, every branch; each attn1 of a target branch attends to the
   keys and values of all G keyframes of its branch and prompt; S_k (the source branch's attn1 inputs) and
   A_k (attn1's outputs, every branch) are kept for every attn1;
2. group passes: the UNet on each group's frames, every branch; attn1 is replaced by the keyframes' A at
   the positions whose S best match the frame's own source tokens (blended over two keyframes for g > 0);
3. guidance (SPEC §4.4-§4.5, §4.8) on the group passes' outputs, then the DDIM step of every frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

# Branch kinds. The source branch has no prompt; the others have one each (SPEC §7.4).
SOURCE, UNCONDITIONAL, CONDITIONAL, NEGATIVE = "source", "unconditional", "conditional", "negative"

# SPEC §4.3's injection sites, by diffusers module name.
RESNET_CONV2 = "up_blocks.1.resnets.1.conv2"
ATTENTION_SITES = tuple(
    f"up_blocks.{block}.attentions.{index}.transformer_blocks.0.attn1"
    for block, index in ((1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2))
)


@dataclass(frozen=True)
class ReferenceSchedule:
    """The sampling timesteps t_0 > ... > t_{N-1}, ᾱ of the scheduler, and what the UNet predicts."""

    timesteps: tuple[int, ...]
    alphas_cumprod: tuple[float, ...] = field(repr=False)
    final_alpha_cumprod: float
    prediction_type: str = "epsilon"

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any], num_steps: int) -> ReferenceSchedule:
        """SPEC §4: `DDIMScheduler.from_config` with clip_sample=False, set_alpha_to_one=False, then
        `set_timesteps(num_steps)`."""
        scheduler = DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)
        scheduler.set_timesteps(num_steps)
        return cls(
            timesteps=tuple(int(t) for t in scheduler.timesteps),
            alphas_cumprod=tuple(float(a) for a in scheduler.alphas_cumprod),
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            prediction_type=scheduler.config.prediction_type,
        )

    def alpha_bar(self, step: int) -> float:
        """ᾱ at sampling step `step`; ᾱ_final after the last one (step == N)."""
        if step == len(self.timesteps):
            return self.final_alpha_cumprod
        return self.alphas_cumprod[self.timesteps[step]]


@dataclass(frozen=True)
class ReferenceTexts:
    """Text embeddings: E("") (1, 77, d), one target per prompt (P, 77, d), E(negative) (1, 77, d) or None."""

    unconditional: torch.Tensor
    targets: torch.Tensor
    negative: torch.Tensor | None = None


@dataclass(frozen=True)
class ReferenceSettings:
    """Guidance scale s, a_i per step (SPEC §4.5), n_f and n_a (SPEC §4.3), keyframe_interval B and seed."""

    scale: float
    negative_prompt_weights: tuple[float, ...]
    feature_steps: int
    attention_steps: int
    keyframe_interval: int
    seed: int = 0


def frame_groups(num_frames: int, keyframe_interval: int) -> list[list[int]]:
    """SPEC §7.3: group g holds frames gB .. min(gB + B, F) - 1; the last group may be shorter."""
    return [
        list(range(start, min(start + keyframe_interval, num_frames)))
        for start in range(0, num_frames, keyframe_interval)
    ]


def keyframe_draws(num_frames: int, keyframe_interval: int, num_steps: int, seed: int) -> list[list[int]]:
    """Each step's keyframe of each group (SPEC §7.3): one generator seeded once, r drawn anew each step,
    k_g = gB + (r_g mod |group g|)."""
    groups = frame_groups(num_frames, keyframe_interval)
    generator = torch.Generator("cpu").manual_seed(seed)
    draws = []
    for _ in range(num_steps):
        r = torch.randint(keyframe_interval, (len(groups),), generator=generator)
        draws.append([group[0] + int(r[g]) % len(group) for g, group in enumerate(groups)])
    return draws


def blend_weight(frame: int, group: int, keyframe_interval: int) -> float:
    """w of SPEC §7.4 for `frame` of `group` > 0: the weight of the group's own keyframe against the previous
    group's. d2 / (d1 + d2) and its sigmoid are float32 tensor operations, as in TokenFlow's code."""
    center, previous_center = (c * keyframe_interval + keyframe_interval // 2 for c in (group, group - 1))
    d1 = torch.tensor(abs(frame - center), dtype=torch.float32)
    d2 = torch.tensor(abs(frame - previous_center), dtype=torch.float32)
    return float(torch.sigmoid(d2 / (d1 + d2)))


def nearest_positions(tokens: torch.Tensor, keyframe_tokens: torch.Tensor) -> list[int]:
    """For each row j of `tokens` (n, d): the position m of `keyframe_tokens` (n', d) of highest cosine
    similarity (the first such m on ties, as torch.argmax)."""
    positions = []
    for j in range(tokens.shape[0]):
        dots = keyframe_tokens @ tokens[j]
        cosine = dots / (keyframe_tokens.norm(dim=-1) * tokens[j].norm())
        positions.append(int(torch.argmax(cosine)))
    return positions


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, for one row: query (n, heads*d), key and value (n', heads*d)."""
    head_dim = query.shape[-1] // heads
    outputs = []
    for h in range(heads):
        part = slice(h * head_dim, (h + 1) * head_dim)
        scores = query[:, part] @ key[:, part].T / math.sqrt(head_dim)
        outputs.append(torch.softmax(scores, dim=-1) @ value[:, part])
    return torch.cat(outputs, dim=-1)


@dataclass(frozen=True)
class _Row:
    """One row of a UNet batch: a frame's branch (with its prompt, None for the source branch)."""

    frame: int
    branch: str
    prompt: int | None


def _same_branch(row: _Row, other: _Row) -> bool:
    """Whether two rows are the same branch of the same prompt (frames aside)."""
    return row.branch == other.branch and row.prompt == other.prompt


@dataclass
class _PassState:
    """What the attn1 processors and the ResNet hook read during one UNet call, and what the keyframe pass
    keeps for the group passes of the same step."""

    rows: list[_Row] = field(default_factory=list)
    keyframe_pass: bool = True
    inject_attention: bool = False
    inject_resnet: bool = False
    # Group passes only: the group, its keyframe and the previous group's keyframe (None for g = 0).
    group: int = 0
    keyframe: int = 0
    previous_keyframe: int | None = None
    keyframe_interval: int = 1
    # Kept by the keyframe pass, per attn1 layer name: S_k by keyframe, A_k by (branch, prompt, keyframe).
    kept_inputs: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    kept_outputs: dict[str, dict[tuple[str, int | None, int], torch.Tensor]] = field(default_factory=dict)

    def source_row(self, frame: int) -> int:
        """The batch index of `frame`'s source branch."""
        return next(r for r, row in enumerate(self.rows) if row.branch == SOURCE and row.frame == frame)


class _ReferenceSelfAttention:
    """An attn1 processor: extended attention in the keyframe pass, token propagation in the group passes."""

    def __init__(self, state: _PassState, name: str):
        self.state = state
        self.name = name

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.state.keyframe_pass:
            return self._keyframes(attn, hidden_states)
        return self._group(hidden_states)

    def _keyframes(self, attn: Any, hidden_states: torch.Tensor) -> torch.Tensor:
        state = self.state
        queries = [attn.to_q(h) for h in hidden_states]
        keys = [attn.to_k(h) for h in hidden_states]
        values = [attn.to_v(h) for h in hidden_states]
        if self.name in ATTENTION_SITES and state.inject_attention:
            # Targets take the same frame's source q and k, before any keys are concatenated.
            for r, row in enumerate(state.rows):
                if row.branch != SOURCE:
                    source = state.source_row(row.frame)
                    queries[r], keys[r] = queries[source], keys[source]
        outputs = []
        for r, row in enumerate(state.rows):
            if row.branch == SOURCE:
                attended = [r]  # the source branch attends within its own frame
            else:  # all keyframes of this branch and prompt, in frame order
                attended = [s for s, other in enumerate(state.rows) if _same_branch(other, row)]
            key = torch.cat([keys[s] for s in attended])
            value = torch.cat([values[s] for s in attended])
            outputs.append(attn.to_out[1](attn.to_out[0](attention(queries[r], key, value, attn.heads))))
        inputs, kept = state.kept_inputs.setdefault(self.name, {}), state.kept_outputs.setdefault(self.name, {})
        for r, row in enumerate(state.rows):
            if row.branch == SOURCE:
                inputs[row.frame] = hidden_states[r]
            kept[(row.branch, row.prompt, row.frame)] = outputs[r]
        return torch.stack(outputs)

    def _group(self, hidden_states: torch.Tensor) -> torch.Tensor:
        state = self.state
        inputs, kept = state.kept_inputs[self.name], state.kept_outputs[self.name]
        # Nearest keyframe positions, once per frame: from the frame's source-branch tokens of this pass.
        matches: dict[int, tuple[list[int], list[int] | None]] = {}
        for row in state.rows:
            if row.frame not in matches:
                tokens = hidden_states[state.source_row(row.frame)]
                n1 = nearest_positions(tokens, inputs[state.keyframe])
                previous = state.previous_keyframe
                n2 = None if previous is None else nearest_positions(tokens, inputs[previous])
                matches[row.frame] = (n1, n2)
        outputs = []
        for row in state.rows:
            n1, n2 = matches[row.frame]
            own = kept[(row.branch, row.prompt, state.keyframe)][n1]
            if n2 is None:
                outputs.append(own)
                continue
            previous = kept[(row.branch, row.prompt, state.previous_keyframe)][n2]
            w = blend_weight(row.frame, state.group, state.keyframe_interval)
            outputs.append(w * own + (1 - w) * previous)
        return torch.stack(outputs)


@contextmanager
def _installed(unet: UNet2DConditionModel, state: _PassState) -> Iterator[None]:
    """The reference's processor on every attn1 and its ResNet hook, for the duration; the UNet's own after."""
    modules = dict(unet.named_modules())
    self_attention = {name: module for name, module in modules.items() if name.endswith(".attn1")}
    for name, module in self_attention.items():
        # The processor computes to_out(attention(to_q, to_k, to_v)) and nothing else, as SD's attn1 does.
        extras = (module.group_norm, module.spatial_norm, module.norm_q, module.norm_k)
        if module.residual_connection or module.rescale_output_factor != 1 or any(e is not None for e in extras):
            raise ValueError(f"{name}: not a Stable Diffusion self-attention layout")
    originals = {name: module.processor for name, module in self_attention.items()}

    def resnet_hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        # conv2's output is the residual branch before the shortcut and output_scale_factor (SPEC §4.3).
        if not state.inject_resnet:
            return output
        injected = output.clone()
        for r, row in enumerate(state.rows):
            if row.branch != SOURCE:
                injected[r] = output[state.source_row(row.frame)]
        return injected

    handle = modules[RESNET_CONV2].register_forward_hook(resnet_hook)
    try:
        for name, module in self_attention.items():
            module.set_processor(_ReferenceSelfAttention(state, name))
        yield
    finally:
        handle.remove()
        for name, module in self_attention.items():
            module.set_processor(originals[name])


def _target_branches(texts: ReferenceTexts, weight: float) -> list[str]:
    """The target branches that can change a step's result (SPEC §4.4): the unconditional one unless a_i = 0
    with a negative prompt, the negative one with a negative prompt and a_i != 1, and the conditional one."""
    has_negative = texts.negative is not None
    branches = [] if has_negative and weight == 0 else [UNCONDITIONAL]
    if has_negative and weight != 1:
        branches.append(NEGATIVE)
    return branches + [CONDITIONAL]


def _rows(frames: list[int], branches: list[str], prompts: int) -> list[_Row]:
    """A pass's rows: the frames' source branches first, then each target branch of each prompt and frame."""
    rows = [_Row(f, SOURCE, None) for f in frames]
    return rows + [_Row(f, branch, p) for branch in branches for p in range(prompts) for f in frames]


def _unet_pass(
    unet: UNet2DConditionModel,
    state: _PassState,
    source: torch.Tensor,
    latents: dict[tuple[int, int], torch.Tensor],
    texts: ReferenceTexts,
    timestep: int,
) -> torch.Tensor:
    """One UNet call over `state.rows`: a source row on `source` (F, C, h, w) with E(""), a target row on
    its prompt's `latents[(prompt, frame)]` with its branch's text."""
    text_of = {SOURCE: texts.unconditional[0], UNCONDITIONAL: texts.unconditional[0], NEGATIVE: None}
    if texts.negative is not None:
        text_of[NEGATIVE] = texts.negative[0]
    samples, embeddings = [], []
    for row in state.rows:
        if row.branch == SOURCE:
            samples.append(source[row.frame])
        else:
            samples.append(latents[(row.prompt, row.frame)])
        embeddings.append(texts.targets[row.prompt] if row.branch == CONDITIONAL else text_of[row.branch])
    return unet(torch.stack(samples), timestep, encoder_hidden_states=torch.stack(embeddings)).sample


def _epsilon(schedule: ReferenceSchedule, output: torch.Tensor, latent: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """SPEC §4.8: a v-prediction turned into noise, ε = sqrt(ᾱ) v + sqrt(1 - ᾱ) z; ε itself otherwise."""
    if schedule.prediction_type == "v_prediction":
        return alpha_bar**0.5 * output + (1 - alpha_bar) ** 0.5 * latent
    return output


def reference_video_latents(
    unet: UNet2DConditionModel,
    schedule: ReferenceSchedule,
    source_latents: dict[int, torch.Tensor],
    texts: ReferenceTexts,
    settings: ReferenceSettings,
) -> torch.Tensor:
    """Each prompt's final latents (P, F, C, h, w) of SPEC §7.4, from z_src^f[t] (`source_latents[t]`,
    (F, C, h, w) at every sampling timestep t). `unet` is used in float32 as given; its processors and hooks
    are its own again afterwards."""
    timesteps = schedule.timesteps
    num_frames = source_latents[timesteps[0]].shape[0]
    prompts = texts.targets.shape[0]
    interval = settings.keyframe_interval
    groups = frame_groups(num_frames, interval)
    draws = keyframe_draws(num_frames, interval, len(timesteps), settings.seed)
    # x^f = z_src^f[t_0] for every prompt.
    x = {(p, f): source_latents[timesteps[0]][f].clone() for p in range(prompts) for f in range(num_frames)}
    state = _PassState(keyframe_interval=interval)
    with torch.no_grad(), _installed(unet, state):
        for i, t in enumerate(timesteps):
            weight = settings.negative_prompt_weights[i]
            branches = _target_branches(texts, weight)
            state.inject_attention = i < settings.attention_steps
            state.inject_resnet = i < settings.feature_steps
            keyframes = draws[i]

            # 1. Keyframe pass: keeps S_k and A_k; its noise predictions are not used.
            state.rows = _rows(keyframes, branches, prompts)
            state.keyframe_pass = True
            state.kept_inputs, state.kept_outputs = {}, {}
            _unet_pass(unet, state, source_latents[t], x, texts, t)

            # 2. Group passes: their target rows give each frame's predictions.
            eps: dict[tuple[str, int, int], torch.Tensor] = {}
            state.keyframe_pass = False
            for g, group in enumerate(groups):
                state.rows = _rows(group, branches, prompts)
                state.group, state.keyframe = g, keyframes[g]
                state.previous_keyframe = keyframes[g - 1] if g > 0 else None
                output = _unet_pass(unet, state, source_latents[t], x, texts, t)
                for r, row in enumerate(state.rows):
                    if row.branch != SOURCE:
                        latent = x[(row.prompt, row.frame)]
                        eps[(row.branch, row.prompt, row.frame)] = _epsilon(
                            schedule, output[r], latent, schedule.alpha_bar(i)
                        )

            # 3. Guidance (SPEC §4.4) and the DDIM step of every frame.
            a_t, a_next = schedule.alpha_bar(i), schedule.alpha_bar(i + 1)
            for p in range(prompts):
                for f in range(num_frames):
                    conditional = eps[(CONDITIONAL, p, f)]
                    if UNCONDITIONAL in branches and NEGATIVE in branches:
                        unconditional = weight * eps[(UNCONDITIONAL, p, f)] + (1 - weight) * eps[(NEGATIVE, p, f)]
                    elif UNCONDITIONAL in branches:
                        unconditional = eps[(UNCONDITIONAL, p, f)]
                    else:
                        unconditional = eps[(NEGATIVE, p, f)]
                    guided = unconditional + settings.scale * (conditional - unconditional)
                    x0 = (x[(p, f)] - (1 - a_t) ** 0.5 * guided) / a_t**0.5
                    x[(p, f)] = a_next**0.5 * x0 + (1 - a_next) ** 0.5 * guided
    return torch.stack([torch.stack([x[(p, f)] for f in range(num_frames)]) for p in range(prompts)])
