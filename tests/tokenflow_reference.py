"""The deliberately naive reference of docs/algorithm.md §11-§12 (video: Plug-and-Play with TokenFlow's keyframes
and token propagation, in keyframe windows with anchors for long videos), for tests to check the engine's
optimised video path against.

It is written from docs/algorithm.md alone, not from the engine's code, and favours plainness over speed: Python
loops over frames, branches, heads and token positions, softmax attention and cosine similarity written
out, one UNet call per pass with every row of that pass. Only torch and diffusers are used. Every § below is a
section of docs/algorithm.md.

Per sampling step i (§11), with the G groups in one window when G <= W:
1. keyframe pass: the UNet on the G keyframes, every branch; each attn1 of a target branch attends to the
   keys and values of all G keyframes of its branch and prompt; S_k (the source branch's attn1 inputs) and
   A_k (attn1's outputs, every branch) are kept for every attn1;
2. group passes: the UNet on each group's frames, every branch; attn1 is replaced by the keyframes' A at
   the positions whose S best match the frame's own source tokens (blended over two keyframes for g > 0);
3. guidance (§5-§6, §9) on the group passes' outputs, then the DDIM step of every frame.

With G > W (§12) the groups are cut into n_w = ceil(G / W) windows of consecutive groups, and step 1
becomes, before anything else, an anchor pass: §11's keyframe pass on the keyframes of the A anchor groups
a_j = floor((2j + 1) G / (2A)), keeping each target branch's keys (after injection) and values of every attn1.
Then, window by window, a keyframe pass on the window's keyframes whose target branches attend to the keys and
values of the window's own keyframes, then of the previous window's last keyframe (as its window's pass
computed them), then of the anchors not among those (from the anchor pass), keeping S_k and A_k; then the
window's group passes (step 2), the first group of a window w > 0 blending with the previous window's last
keyframe. The source branch always attends within its own frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

# Branch kinds. The source branch has no prompt; the others have one each (§11).
SOURCE, UNCONDITIONAL, CONDITIONAL, NEGATIVE = "source", "unconditional", "conditional", "negative"

# §4's injection sites, by diffusers module name.
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
        """§1: `DDIMScheduler.from_config` with clip_sample=False, set_alpha_to_one=False, then
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
    """Guidance scale s, a_i per step (§6), n_f and n_a (§4), keyframe_interval B and seed, and
    §12's keyframe window W and anchor count A (the engine's KEYFRAME_WINDOW and ANCHOR_KEYFRAMES)."""

    scale: float
    negative_prompt_weights: tuple[float, ...]
    feature_steps: int
    attention_steps: int
    keyframe_interval: int
    seed: int = 0
    keyframe_window: int = 25
    anchor_keyframes: int = 8


def frame_groups(num_frames: int, keyframe_interval: int) -> list[list[int]]:
    """§11: group g holds frames gB .. min(gB + B, F) - 1; the last group may be shorter."""
    return [
        list(range(start, min(start + keyframe_interval, num_frames)))
        for start in range(0, num_frames, keyframe_interval)
    ]


def keyframe_draws(num_frames: int, keyframe_interval: int, num_steps: int, seed: int) -> list[list[int]]:
    """Each step's keyframe of each group (§11): one generator seeded once, r drawn anew each step,
    k_g = gB + (r_g mod |group g|)."""
    groups = frame_groups(num_frames, keyframe_interval)
    generator = torch.Generator("cpu").manual_seed(seed)
    draws = []
    for _ in range(num_steps):
        r = torch.randint(keyframe_interval, (len(groups),), generator=generator)
        draws.append([group[0] + int(r[g]) % len(group) for g, group in enumerate(groups)])
    return draws


def keyframe_windows(num_groups: int, keyframe_window: int) -> list[list[int]]:
    """§12: n_w = ceil(G / W) windows of consecutive groups, window w holding groups s_w .. s_{w+1} - 1
    with s_w = floor(w G / n_w); a single window of every group when G <= W."""
    count = -(-num_groups // keyframe_window)
    starts = [w * num_groups // count for w in range(count + 1)]
    return [list(range(starts[w], starts[w + 1])) for w in range(count)]


def anchor_groups(num_groups: int, anchor_keyframes: int) -> list[int]:
    """§12: the A anchor groups a_j = floor((2j + 1) G / (2A)), j = 0 .. A - 1."""
    return [(2 * j + 1) * num_groups // (2 * anchor_keyframes) for j in range(anchor_keyframes)]


def blend_weight(frame: int, group: int, keyframe_interval: int) -> float:
    """w of §11 for `frame` of `group` > 0: the weight of the group's own keyframe against the previous
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


# Keys and values of one attn1 layer's target rows, by (branch, prompt, keyframe).
_KeyValues = dict[tuple[str, int | None, int], tuple[torch.Tensor, torch.Tensor]]


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
    # Kept by the keyframe passes (every window's, for the whole step), per attn1 layer name: S_k by keyframe,
    # A_k by (branch, prompt, keyframe).
    kept_inputs: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    kept_outputs: dict[str, dict[tuple[str, int | None, int], torch.Tensor]] = field(default_factory=dict)
    # §12's keyframe passes: the anchor pass keeps its keys and values, not S_k and A_k; a window's pass
    # also attends to the previous window's last keyframe (None for the first window, or without windows) and
    # to the anchors' keyframes `other_anchors`, all of its branch and prompt.
    anchor_pass: bool = False
    previous_window_keyframe: int | None = None
    other_anchors: list[int] = field(default_factory=list)
    # Target rows' keys (after injection) and values, per attn1 layer name: the anchor pass's and the windows'.
    anchor_keys: dict[str, _KeyValues] = field(default_factory=dict)
    window_keys: dict[str, _KeyValues] = field(default_factory=dict)

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
        queries, keys, values = self._projections(attn, hidden_states)
        outputs = []
        for r, row in enumerate(self.state.rows):
            key, value = self._attended(r, row, keys, values)
            outputs.append(attn.to_out[1](attn.to_out[0](attention(queries[r], key, value, attn.heads))))
        self._keep(hidden_states, keys, values, outputs)
        return torch.stack(outputs)

    def _projections(self, attn: Any, hidden_states: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
        """Every row's queries, keys and values; at the injection sites and steps, targets take the same frame's
        source q and k, before any keys are concatenated (§4, §11)."""
        state = self.state
        queries = [attn.to_q(h) for h in hidden_states]
        keys = [attn.to_k(h) for h in hidden_states]
        values = [attn.to_v(h) for h in hidden_states]
        if self.name in ATTENTION_SITES and state.inject_attention:
            for r, row in enumerate(state.rows):
                if row.branch != SOURCE:
                    source = state.source_row(row.frame)
                    queries[r], keys[r] = queries[source], keys[source]
        return queries, keys, values

    def _attended(
        self, r: int, row: _Row, keys: list[torch.Tensor], values: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values row `r` attends to, concatenated: the source branch its own frame's; a target
        branch, in this order, all keyframes of this pass of its branch and prompt (in frame order), the previous
        window's last keyframe (as its window's pass computed them), the other anchors (from the anchor pass)."""
        state = self.state
        if row.branch == SOURCE:
            attended = [(keys[r], values[r])]
        else:
            attended = [(keys[s], values[s]) for s, other in enumerate(state.rows) if _same_branch(other, row)]
            if state.previous_window_keyframe is not None:
                previous = (row.branch, row.prompt, state.previous_window_keyframe)
                attended.append(state.window_keys[self.name][previous])
            for anchor in state.other_anchors:
                attended.append(state.anchor_keys[self.name][(row.branch, row.prompt, anchor)])
        return torch.cat([key for key, _ in attended]), torch.cat([value for _, value in attended])

    def _keep(
        self,
        hidden_states: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        outputs: list[torch.Tensor],
    ) -> None:
        """Target rows' keys and values (the anchor pass's or the windows'); then, but for the anchor pass, S_k of
        the source rows and A_k of every row."""
        state = self.state
        kept_keys = (state.anchor_keys if state.anchor_pass else state.window_keys).setdefault(self.name, {})
        for r, row in enumerate(state.rows):
            if row.branch != SOURCE:
                kept_keys[(row.branch, row.prompt, row.frame)] = (keys[r], values[r])
        if state.anchor_pass:
            return
        inputs, kept = state.kept_inputs.setdefault(self.name, {}), state.kept_outputs.setdefault(self.name, {})
        for r, row in enumerate(state.rows):
            if row.branch == SOURCE:
                inputs[row.frame] = hidden_states[r]
            kept[(row.branch, row.prompt, row.frame)] = outputs[r]

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
        # conv2's output is the residual branch before the shortcut and output_scale_factor (§4).
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
    """The target branches that can change a step's result (§5): the unconditional one unless a_i = 0
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
    """§9: a v-prediction turned into noise, ε = sqrt(ᾱ) v + sqrt(1 - ᾱ) z; ε itself otherwise."""
    if schedule.prediction_type == "v_prediction":
        return alpha_bar**0.5 * output + (1 - alpha_bar) ** 0.5 * latent
    return output


@dataclass
class _Run:
    """One call of `reference_video_latents`: its inputs, the pass state the UNet's processors read, the frame
    groups and each prompt's latents x[(prompt, frame)]."""

    unet: UNet2DConditionModel
    schedule: ReferenceSchedule
    source_latents: dict[int, torch.Tensor]
    texts: ReferenceTexts
    settings: ReferenceSettings
    state: _PassState
    groups: list[list[int]]
    x: dict[tuple[int, int], torch.Tensor]


def _keyframe_pass(run: _Run, step: int, keyframes: list[int], branches: list[str]) -> None:
    """A keyframe pass on `keyframes`, every branch: §11 step 1, or §12's anchor or window pass as
    `run.state` says. Its noise predictions are not used."""
    t = run.schedule.timesteps[step]
    run.state.rows = _rows(keyframes, branches, run.texts.targets.shape[0])
    run.state.keyframe_pass = True
    _unet_pass(run.unet, run.state, run.source_latents[t], run.x, run.texts, t)


def _group_pass(
    run: _Run, step: int, group: int, keyframes: list[int], branches: list[str]
) -> dict[tuple[str, int, int], torch.Tensor]:
    """§11 step 2 on `group`: its target rows' noise predictions (§9) by (branch, prompt, frame)."""
    state, schedule = run.state, run.schedule
    t = schedule.timesteps[step]
    state.rows = _rows(run.groups[group], branches, run.texts.targets.shape[0])
    state.keyframe_pass = False
    state.group, state.keyframe = group, keyframes[group]
    state.previous_keyframe = keyframes[group - 1] if group > 0 else None
    output = _unet_pass(run.unet, state, run.source_latents[t], run.x, run.texts, t)
    eps = {}
    for r, row in enumerate(state.rows):
        if row.branch != SOURCE:
            latent = run.x[(row.prompt, row.frame)]
            eps[(row.branch, row.prompt, row.frame)] = _epsilon(schedule, output[r], latent, schedule.alpha_bar(step))
    return eps


def _step_predictions(
    run: _Run, step: int, keyframes: list[int], branches: list[str]
) -> dict[tuple[str, int, int], torch.Tensor]:
    """Every frame's target-branch noise predictions at `step`: §11 steps 1-2 in windows (§12 steps 1-3;
    one window and no anchor pass when G <= W). `keyframes`: k_g of this step."""
    state, settings = run.state, run.settings
    state.kept_inputs, state.kept_outputs, state.anchor_keys, state.window_keys = {}, {}, {}, {}
    windows = keyframe_windows(len(run.groups), settings.keyframe_window)
    anchors = anchor_groups(len(run.groups), settings.anchor_keyframes) if len(windows) > 1 else []
    if anchors:  # the anchor pass: §11's keyframe pass on the anchors' keyframes, keeping their keys and values
        state.anchor_pass, state.previous_window_keyframe, state.other_anchors = True, None, []
        _keyframe_pass(run, step, [keyframes[a] for a in anchors], branches)
    eps = {}
    for w, window in enumerate(windows):
        previous = window[0] - 1 if w > 0 else None  # the previous window's last group
        state.anchor_pass = False
        state.previous_window_keyframe = None if previous is None else keyframes[previous]
        state.other_anchors = [keyframes[a] for a in anchors if a not in window and a != previous]
        _keyframe_pass(run, step, [keyframes[g] for g in window], branches)
        for g in window:
            eps.update(_group_pass(run, step, g, keyframes, branches))
    return eps


def _ddim_step(run: _Run, step: int, eps: dict[tuple[str, int, int], torch.Tensor], branches: list[str]) -> None:
    """Guidance (§5-§6) on every frame's predictions, then its DDIM step, in `run.x`."""
    weight, scale = run.settings.negative_prompt_weights[step], run.settings.scale
    a_t, a_next = run.schedule.alpha_bar(step), run.schedule.alpha_bar(step + 1)
    for p, f in list(run.x):
        conditional = eps[(CONDITIONAL, p, f)]
        if UNCONDITIONAL in branches and NEGATIVE in branches:
            unconditional = weight * eps[(UNCONDITIONAL, p, f)] + (1 - weight) * eps[(NEGATIVE, p, f)]
        elif UNCONDITIONAL in branches:
            unconditional = eps[(UNCONDITIONAL, p, f)]
        else:
            unconditional = eps[(NEGATIVE, p, f)]
        guided = unconditional + scale * (conditional - unconditional)
        x0 = (run.x[(p, f)] - (1 - a_t) ** 0.5 * guided) / a_t**0.5
        run.x[(p, f)] = a_next**0.5 * x0 + (1 - a_next) ** 0.5 * guided


def _check_windows(num_groups: int, settings: ReferenceSettings) -> None:
    """W >= 1, and where windows apply (G > W), 1 <= A <= W as §12 has it (so the anchors are distinct)."""
    window, anchors = settings.keyframe_window, settings.anchor_keyframes
    if window < 1:
        raise ValueError(f"keyframe_window must be at least 1, not {window}")
    if num_groups > window and not 1 <= anchors <= window:
        raise ValueError(f"anchor_keyframes must be between 1 and keyframe_window ({window}), not {anchors}")


def reference_video_latents(
    unet: UNet2DConditionModel,
    schedule: ReferenceSchedule,
    source_latents: dict[int, torch.Tensor],
    texts: ReferenceTexts,
    settings: ReferenceSettings,
) -> torch.Tensor:
    """Each prompt's final latents (P, F, C, h, w) of §11 (in §12's windows when G > W), from z_src^f[t]
    (`source_latents[t]`, (F, C, h, w) at every sampling timestep t). `unet` is used in float32 as given; its
    processors and hooks are its own again afterwards."""
    timesteps = schedule.timesteps
    num_frames = source_latents[timesteps[0]].shape[0]
    prompts = texts.targets.shape[0]
    groups = frame_groups(num_frames, settings.keyframe_interval)
    _check_windows(len(groups), settings)
    draws = keyframe_draws(num_frames, settings.keyframe_interval, len(timesteps), settings.seed)
    # x^f = z_src^f[t_0] for every prompt.
    x = {(p, f): source_latents[timesteps[0]][f].clone() for p in range(prompts) for f in range(num_frames)}
    state = _PassState(keyframe_interval=settings.keyframe_interval)
    run = _Run(unet, schedule, source_latents, texts, settings, state, groups, x)
    with torch.no_grad(), _installed(unet, state):
        for i in range(len(timesteps)):
            branches = _target_branches(texts, settings.negative_prompt_weights[i])
            state.inject_attention = i < settings.attention_steps
            state.inject_resnet = i < settings.feature_steps
            _ddim_step(run, i, _step_predictions(run, i, draws[i], branches), branches)
    return torch.stack([torch.stack([x[(p, f)] for f in range(num_frames)]) for p in range(prompts)])
