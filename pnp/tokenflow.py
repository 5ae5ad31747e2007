"""Consistent video edits with the same Plug-and-Play features (docs/algorithm.md §11): TokenFlow
(Geyer, Bar-Tal, Bagon, Dekel, ICLR 2024, arXiv 2307.10373) on the engine's own injection.

Each sampling step edits one keyframe per group of frames jointly, every target branch's self-attention
extended over all keyframes; then every frame takes its self-attention output from the keyframes' outputs
at the positions whose source tokens match its own (a nearest-neighbour field), blended between the two
nearest groups' keyframes. Past KEYFRAME_WINDOW groups (docs/algorithm.md §12) the keyframes go a window of
consecutive groups at a time, each window's also attending to the previous window's last keyframe and to
ANCHOR_KEYFRAMES anchors edited first. `FrameAttention` is the processor of every attn1 during a step,
`VideoDenoiser` the step: (frames' latents, step i) -> each group's guided ε, for every prompt at once, and
`sample_frames` the step loop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from .injection import RESNET_KEY, InjectionSteps, InjectionUNet, attend
from .progress import progress
from .schedules import NoiseSchedule, ddim_step, device_timesteps
from .stats import PhaseTimer
from .translation import Guidance

logger = logging.getLogger(__name__)

KEYFRAME_SOURCE, KEYFRAME_TARGETS, GROUP_SOURCE, GROUP_TARGETS = "keyframe source", "keyframes", "group source", "group"
ANCHOR_SOURCE, ANCHOR_TARGETS = "anchor source", "anchors"

KEYFRAME_WINDOW = 25
"""W: the most groups whose keyframes share one keyframe pass (docs/algorithm.md §12). A video of more groups runs
its keyframes a window of consecutive groups at a time, beside the anchors. Read when a video is sampled, so that a
test may try windows on a short video by setting it smaller."""

ANCHOR_KEYFRAMES = 8
"""A: the keyframes, evenly spread over a video of more than W groups, that every window's keyframes also attend to
(docs/algorithm.md §12), so that windows far apart still edit alike. At most KEYFRAME_WINDOW; read as it is."""

VIDEO_KEPT_FEATURES = InjectionSteps(0, 0)
"""A video keeps no source features between steps: its source branch runs at every sampling step (docs/algorithm.md
§11), so its cache entry holds the inversion only."""

SIMILARITY_CHUNK_SCORES = 1 << 24
"""Cosine similarities computed at once by the nearest-neighbour search: 64 MiB in float32, one frame's
(4096, 4096) at 512 px. Row chunks of that size give the same argmax as the whole (n, n) matrix and keep a
1024 px frame's 1 GiB from being held at once (docs/cost-model.md §9)."""


def frame_groups(num_frames: int, keyframe_interval: int) -> list[range]:
    """Groups of `keyframe_interval` consecutive frames; the last may be shorter (no frame is dropped)."""
    return [
        range(start, min(start + keyframe_interval, num_frames)) for start in range(0, num_frames, keyframe_interval)
    ]


def draw_keyframes(groups: list[range], keyframe_interval: int, seed: int, num_steps: int) -> list[list[int]]:
    """Each step's keyframes, one a group (docs/algorithm.md §11): r = randint(B, (G,)) drawn anew each step from one
    CPU generator seeded with `seed`, k_g = gB + (r_g mod |group g|)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    draws = []
    for _ in range(num_steps):
        offsets = torch.randint(keyframe_interval, (len(groups),), generator=generator).tolist()
        draws.append([group.start + offset % len(group) for group, offset in zip(groups, offsets, strict=True)])
    return draws


def keyframe_windows(groups: int, window: int) -> list[range]:
    """The windows of consecutive groups whose keyframes share a keyframe pass (docs/algorithm.md §12): all groups at
    once when there are at most `window` of them, else n_w = ceil(G / W) windows, window w from s_w = floor(w·G / n_w)
    (their sizes differ by at most one)."""
    count = math.ceil(groups / window)
    starts = [w * groups // count for w in range(count + 1)]
    return [range(start, stop) for start, stop in zip(starts[:-1], starts[1:], strict=True)]


def anchor_groups(groups: int, anchors: int, window: int) -> list[int]:
    """The groups whose keyframes are the anchors of a video of more than `window` groups (docs/algorithm.md §12),
    a_j = floor((2j + 1)·G / (2A)), evenly spread; none for a video of at most `window` groups."""
    if groups <= window:
        return []
    return [(2 * j + 1) * groups // (2 * anchors) for j in range(anchors)]


def window_layout(groups: int) -> tuple[list[range], list[int]]:
    """The windows and the anchor groups of a video of `groups` groups, by KEYFRAME_WINDOW and ANCHOR_KEYFRAMES as
    they are when it is called."""
    return keyframe_windows(groups, KEYFRAME_WINDOW), anchor_groups(groups, ANCHOR_KEYFRAMES, KEYFRAME_WINDOW)


@dataclass
class FrameAttention:
    """What every attn1 does in the pass under way (docs/algorithm.md §11-§12), and what the passes hand on per
    layer: the window's keyframes' source attn1 inputs S (G_w, n, C), their attn1 outputs A, the source's
    (G_w, n, C) and the target units' (U, G_w, n, C), a unit being one (branch, prompt); the anchors' and the
    window's last keyframe's keys and values; and the current frames' nearest keyframe positions. `units` are
    the target units of the call under way; `other_anchors` the anchors that the window's target rows attend to
    beside their own keyframes (`enter_window`); `group_keyframes` what the current group's passes read
    (`enter_group`)."""

    unet: InjectionUNet
    units_total: int
    mode: str = KEYFRAME_SOURCE
    units: range = range(1)
    blend: torch.Tensor | None = None  # w per frame of the current group (g > 0)
    keep_last_keys: bool = False  # a window with a successor keeps its last keyframe's keys and values
    sources: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    source_outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    last_keys: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    anchor_keys: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    anchor_count: int = 0
    other_anchors: torch.Tensor | None = None
    nearest: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    group_keyframes: dict[str, list[_Keyframe]] = field(default_factory=dict)
    window_start: int = 0
    previous: dict[str, _Keyframe] = field(default_factory=dict)

    def processor(self, layer: str, site: str | None) -> _LayerProcessor:
        return _LayerProcessor(self, layer, site)

    def keyframes(self, layer: str, site: str | None, attn: Attention, hidden: torch.Tensor) -> torch.Tensor:
        """A keyframe or anchor pass: the source attends within its frame (a keyframe pass keeps S and A); each
        target unit's rows attend to all its keyframes' keys and values (extended attention) and the window's
        extra ones, queries and keys injected at the eight sites where the step injects them."""
        if site is None:
            query, key = attn.to_q(hidden), attn.to_k(hidden)
        else:
            query = self.unet.site_projection(f"{site}.attn1.to_q", attn.to_q, hidden)
            key = self.unet.site_projection(f"{site}.attn1.to_k", attn.to_k, hidden)
        value = attn.to_v(hidden)
        if self.mode in (KEYFRAME_SOURCE, ANCHOR_SOURCE):
            output = attend(attn, query, key, value)
            if self.mode == KEYFRAME_SOURCE:
                self._kept(self.sources, layer).append(hidden)
                self._kept(self.source_outputs, layer).append(output)
            return output
        rows, positions, _ = hidden.shape
        units = len(self.units)
        query, key, value = (t.reshape(units, (rows // units) * positions, -1) for t in (query, key, value))
        if self.mode == ANCHOR_TARGETS:
            self.anchor_count = rows // units
            self._kept(self.anchor_keys, layer).append(torch.stack([key, value], dim=1))
        elif self.keep_last_keys:
            self._kept(self.last_keys, layer).append(torch.stack([key[:, -positions:], value[:, -positions:]], dim=1))
        extra = self._extra_keys(layer, self.units) if self.mode == KEYFRAME_TARGETS else None
        if extra is not None:
            key, value = torch.cat([key, extra[:, 0]], dim=1), torch.cat([value, extra[:, 1]], dim=1)
        output = attend(attn, query, key, value).reshape(rows, positions, -1)
        if self.mode == KEYFRAME_TARGETS:
            self._kept(self.outputs, layer).append(output.reshape(units, rows // units, positions, -1))
        return output

    @staticmethod
    def _kept(kept: dict[str, list[torch.Tensor]], layer: str) -> list[torch.Tensor]:
        return kept.setdefault(layer, [])

    def finish_keyframes(self) -> None:
        """Join what a keyframe or anchor pass's calls kept, each call a slice of the keyframes or of the units."""
        for kept in (self.sources, self.source_outputs, self.outputs, self.last_keys, self.anchor_keys):
            for layer, parts in kept.items():
                kept[layer] = [torch.cat(parts)]

    def enter_window(self, window: range, anchors: Sequence[int], has_next: bool) -> None:
        """Before the keyframe pass of the window of groups `window`: which of the anchors (groups `anchors`, in the
        anchor pass's order) its target rows attend to, those neither in the window nor the previous window's last
        keyframe (docs/algorithm.md §12)."""
        self.window_start, self.keep_last_keys = window.start, has_next
        self.sources, self.source_outputs, self.outputs, self.last_keys = {}, {}, {}, {}
        among = set(window) | ({window.start - 1} if self.previous else set())
        others = [j for j, group in enumerate(anchors) if group not in among]
        kept = next(iter(self.anchor_keys.values()), None)
        # An index tensor, not a list: a compiled UNet then has the same graph for every window with as many.
        self.other_anchors = None if not others or kept is None else torch.tensor(others, device=kept[0].device)

    def _extra_keys(self, layer: str, units: range) -> torch.Tensor | None:
        """The keys and values (U, 2, m·n, C) that a window's target units `units` attend to beside their own
        keyframes', in order: the previous window's last keyframe's, then the other anchors'. Gathered for one
        layer's call at a time, so that no window holds them for every layer."""
        parts = []
        if self.previous:
            parts.append(self.previous[layer].keys[units.start : units.stop])
        if self.other_anchors is not None:
            (kept,) = self.anchor_keys[layer]
            per_anchor = kept[units.start : units.stop].unflatten(2, (-1, kept.shape[2] // self.anchor_count))
            parts.append(per_anchor.index_select(2, self.other_anchors).flatten(2, 3))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def leave_window(self) -> None:
        """After a window's group passes: its last keyframe, kept for the next window (whose first group blends with
        it, and whose keyframe pass attends to its keys and values)."""
        self.previous = {
            layer: replace(self._window_keyframe(layer, len(kept[0]) - 1), keys=self.last_keys[layer][0])
            for layer, kept in self.sources.items()
        }

    def _window_keyframe(self, layer: str, index: int) -> _Keyframe:
        """The window's keyframe `index` (0 its first) as one layer's group passes read it."""
        return _Keyframe.of(index, *(kept[layer][0] for kept in (self.sources, self.source_outputs, self.outputs)))

    def enter_group(self, g: int) -> None:
        """Before group g's calls: per layer, its keyframe's kept tensors and (g > 0) group g - 1's, the previous
        window's last where g opens a window. Taken here, not in the calls, so that no group index enters them: a
        compiled UNet has the same graphs for every group."""
        index = g - self.window_start

        def keyframe(layer: str, i: int) -> _Keyframe:
            return self.previous[layer] if i < 0 else self._window_keyframe(layer, i)

        indices = [index, index - 1] if g > 0 else [index]
        self.group_keyframes = {layer: [keyframe(layer, i) for i in indices] for layer in self.sources}

    def propagate(self, layer: str, hidden: torch.Tensor) -> torch.Tensor:
        """A group pass: attn1 is not computed; each frame's output at position j is the keyframes' output at
        the position nearest its source token (found in the source pass, used by every branch)."""
        keyframes = self.group_keyframes[layer]
        if self.mode == GROUP_SOURCE:
            self.nearest[layer] = [nearest_positions(hidden, keyframe.source) for keyframe in keyframes]
        units = None if self.mode == GROUP_SOURCE else slice(self.units.start, self.units.stop)
        outputs = [
            keyframe.attn1_outputs(units)[:, positions]
            for keyframe, positions in zip(keyframes, self.nearest[layer], strict=True)
        ]
        if len(outputs) == 1:
            return outputs[0].flatten(0, 1)
        weight = self.blend.to(outputs[0].dtype)[None, :, None, None]
        return (weight * outputs[0] + (1 - weight) * outputs[1]).flatten(0, 1)


@dataclass(frozen=True)
class _Keyframe:
    """What one attn1 layer's group passes read of one keyframe: its source input S_k (n, C), the source's attn1
    output (n, C) and the target units' (U, n, C); for the previous window's last keyframe also the target units'
    keys and values (U, 2, n, C), which the next window's keyframe pass attends to."""

    source: torch.Tensor
    source_output: torch.Tensor
    outputs: torch.Tensor
    keys: torch.Tensor | None = None

    @classmethod
    def of(cls, k: int, sources: torch.Tensor, source_outputs: torch.Tensor, outputs: torch.Tensor) -> _Keyframe:
        """Keyframe k of the kept S (G, n, C), source outputs (G, n, C) and target outputs (U, G, n, C)."""
        return cls(sources[k], source_outputs[k], outputs[:, k])

    def attn1_outputs(self, units: slice | None) -> torch.Tensor:
        """The attn1 outputs a pass reads, (rows, n, C): the source's (a source pass: `units` None), else the call's
        target units'."""
        return self.source_output.unsqueeze(0) if units is None else self.outputs[units]


def nearest_positions(tokens: torch.Tensor, keyframe: torch.Tensor) -> torch.Tensor:
    """For each token of `tokens` (frames, n, C), the position of the most cosine-similar token of `keyframe`
    (n', C): (frames, n). Rows go SIMILARITY_CHUNK_SCORES similarities at a time; each row's argmax is its own."""
    keys = F.normalize(keyframe.float(), dim=-1).T
    rows = tokens.flatten(0, 1)
    chunk = max(1, SIMILARITY_CHUNK_SCORES // keys.shape[1])
    nearest = [(F.normalize(part.float(), dim=-1) @ keys).argmax(dim=-1) for part in rows.split(chunk)]
    return torch.cat(nearest).view(tokens.shape[:2])


@dataclass
class _LayerProcessor:
    """The attention processor of one attn1 layer during a video step: it asks the step's `FrameAttention`."""

    frames: FrameAttention
    layer: str
    site: str | None

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.frames.mode in (KEYFRAME_SOURCE, KEYFRAME_TARGETS, ANCHOR_SOURCE, ANCHOR_TARGETS):
            return self.frames.keyframes(self.layer, self.site, attn, hidden_states)
        return self.frames.propagate(self.layer, hidden_states)


@dataclass
class VideoDenoiser:
    """(latents (P, F, C, h, w), step i) -> each group's frames and their guided ε at step i, for every prompt
    (docs/algorithm.md §11-§12).

    `source_latents[i]` is z_src of every frame at t_i (F, C, h, w), wherever the inversion is kept (the host's
    memory): a window's frames go to the device when it starts. `keyframes[i]` are the step's keyframes, one per
    group of `groups`. The source branch runs with E("") (`guidance.unconditional`); the target branches are
    `guidance`'s, ResNet features injected at i < n_f and attention at i < n_a as `injection_steps` says. With
    more than KEYFRAME_WINDOW groups the keyframes go a window at a time, after the anchors. `timer` times the
    passes as the phases "anchors", "keyframes" and "groups".
    """

    unet: InjectionUNet
    schedule: NoiseSchedule
    timesteps: Sequence[int]
    guidance: Guidance
    injection_steps: InjectionSteps
    source_latents: list[torch.Tensor]
    groups: list[range]
    keyframes: list[list[int]]
    timer: PhaseTimer
    unet_batch: int
    windows: list[range] = field(init=False)
    anchors: list[int] = field(init=False)
    _device_timesteps: list[torch.Tensor] = field(init=False, repr=False)
    _blend_weights: list[torch.Tensor | None] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        device = self.guidance.conditional.device
        self.windows, self.anchors = window_layout(len(self.groups))  # read when the video is sampled
        self._device_timesteps = device_timesteps(list(self.timesteps), device)
        # The same at every step: made on the device once, not copied there for each group pass.
        self._blend_weights = [self._blend(g).to(device) if g > 0 else None for g in range(len(self.groups))]

    def __call__(self, x: torch.Tensor, step: int) -> Iterator[tuple[range, torch.Tensor]]:
        """Each group's frames and their guided ε (P, |group|, C, h, w), group by group: a group's frames may take
        their DDIM step before the next group's passes, which read no latent of theirs."""
        frames = FrameAttention(self.unet, units_total=len(self.guidance.branches(step)) * self.guidance.count)
        with self.unet.self_attention_processors(frames.processor):
            if self.anchors:
                with self.timer.phase("anchors", log=False):
                    self._anchor_pass(frames, x, step)
            for w, window in enumerate(self.windows):
                if len(self.windows) > 1:
                    args = (step, w + 1, len(self.windows), window.start, window.stop - 1)
                    logger.debug("step %d: window %d of %d, groups %d to %d", *args)
                frames.enter_window(window, self.anchors, has_next=w + 1 < len(self.windows))
                yield from self._window(frames, x, step, window)
                if w + 1 < len(self.windows):
                    frames.leave_window()

    def _window(
        self, frames: FrameAttention, x: torch.Tensor, step: int, window: range
    ) -> Iterator[tuple[range, torch.Tensor]]:
        """A window's keyframe pass, then its groups' passes, each group's guided ε as it is known. The window's
        z_src come to the device once, for all its passes."""
        first, last = self.groups[window.start].start, self.groups[window.stop - 1].stop
        source = self.source_latents[step][first:last].to(x.device)
        branches, alpha_bar = self.guidance.branches(step), self.schedule.alpha_bar(self.timesteps[step])
        with self.timer.phase("keyframes", log=False):
            keyframes = [self.keyframes[step][g] for g in window]
            self._keyframe_pass(frames, x, step, keyframes, source[[k - first for k in keyframes]])
        for g in window:
            group = self.groups[g]
            with self.timer.phase("groups", log=False):
                outputs = self._group_pass(frames, x, step, g, source[group.start - first : group.stop - first])
            latents = x[:, group.start : group.stop]
            eps = {b: self.schedule.epsilon(out, latents, alpha_bar) for b, out in zip(branches, outputs, strict=True)}
            yield group, self.guidance.combine(eps, step)

    def _source(self, frames: FrameAttention, step: int, latents: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
        """The source branch of frames whose z_src are `latents`, `unet_batch` frames a call, with E(""): its
        features, captured."""
        frames.mode = mode
        unet, timestep = self.unet, self._device_timesteps[step]
        with unet.capturing() as captured:
            for chunk in latents.split(self.unet_batch):
                text = self.guidance.unconditional.expand(len(chunk), -1, -1)
                unet(chunk.to(unet.dtype), timestep, text)
        return captured

    def _targets(
        self,
        frames: FrameAttention,
        step: int,
        captured: dict[str, torch.Tensor],
        latents: torch.Tensor,
        units: range,
        mode: str,
    ) -> torch.Tensor:
        """Target units `units` (unit = branch · P + prompt) on their frames' `latents` (P, R, C, h, w), the
        source's `captured` features injected, in one UNet call: each row's output, unit by unit."""
        frames.mode, frames.units = mode, units
        branches, rows = self.guidance.branches(step), latents.shape[1]
        texts = self.guidance.text(branches)[units.start : units.stop].repeat_interleave(rows, dim=0)
        targets = latents.repeat(len(branches), 1, 1, 1, 1)[units.start : units.stop].flatten(0, 1)
        injected = self._injected(captured, step, len(units))
        return self.unet(targets.to(self.unet.dtype), self._device_timesteps[step], texts, injected)

    def _injected(self, captured: dict[str, torch.Tensor], step: int, units: int) -> dict[str, torch.Tensor]:
        """The source's features, repeated for every target unit's rows: ResNet at i < n_f, the sites' queries
        and keys (captured in a keyframe pass only: a group pass computes no attention) at i < n_a."""
        steps = self.injection_steps
        injected = {
            key: value
            for key, value in captured.items()
            if step < (steps.feature_injection_steps if key == RESNET_KEY else steps.attention_injection_steps)
        }
        return {key: value.repeat(units, *[1] * (value.dim() - 1)) for key, value in injected.items()}

    def _anchor_pass(self, frames: FrameAttention, x: torch.Tensor, step: int) -> None:
        """The anchors' keyframes, as a keyframe pass of their own (docs/algorithm.md §12): every target unit's keys
        and values kept for the windows' passes, nothing else."""
        keyframes = [self.keyframes[step][g] for g in self.anchors]
        source = self.source_latents[step][keyframes].to(x.device)
        self._keyframe_pass(frames, x, step, keyframes, source, anchors=True)

    def _keyframe_pass(
        self,
        frames: FrameAttention,
        x: torch.Tensor,
        step: int,
        keyframes: list[int],
        source: torch.Tensor,
        anchors: bool = False,
    ) -> None:
        """`keyframes` (their z_src `source`), every target branch's attention extended over all of them (and over
        the window's other keys): what the group passes take their attention outputs from (its noise predictions
        are not used). A call carries whole units (all keyframes of a branch and prompt), as many as `unet_batch`
        holds, at least one."""
        captured = self._source(frames, step, source, ANCHOR_SOURCE if anchors else KEYFRAME_SOURCE)
        per_call = max(1, self.unet_batch // len(keyframes))
        for start in range(0, frames.units_total, per_call):
            units = range(start, min(start + per_call, frames.units_total))
            mode = ANCHOR_TARGETS if anchors else KEYFRAME_TARGETS
            self._targets(frames, step, captured, x[:, keyframes], units, mode)
        frames.finish_keyframes()

    def _group_pass(
        self, frames: FrameAttention, x: torch.Tensor, step: int, g: int, source: torch.Tensor
    ) -> torch.Tensor:
        """Group g's frames (their z_src `source`), as many a call as `unet_batch` holds with every unit's rows, else
        one frame a call and its units split as `unet_batch` holds: each target branch's UNet output (branches, P,
        |group|, C, h, w). A frame's rows depend on no other frame's here, so the split changes nothing."""
        group, total, weights = self.groups[g], frames.units_total, self._blend_weights[g]
        frames.enter_group(g)
        per_call = max(1, self.unet_batch // total)
        outputs = []
        for start in range(0, len(group), per_call):
            chunk = range(start, min(start + per_call, len(group)))
            frames.blend = None if weights is None else weights[chunk.start : chunk.stop]
            captured = self._source(frames, step, source[chunk.start : chunk.stop], GROUP_SOURCE)
            latents = x[:, group.start + chunk.start : group.start + chunk.stop]
            units_a_call = max(1, self.unet_batch // len(chunk))
            parts = [
                self._targets(frames, step, captured, latents, range(u, min(u + units_a_call, total)), GROUP_TARGETS)
                for u in range(0, total, units_a_call)
            ]
            outputs.append(torch.cat(parts).unflatten(0, (-1, self.guidance.count, len(chunk))))
        return torch.cat(outputs, dim=2)

    def _blend(self, g: int) -> torch.Tensor:
        """w = sigmoid(d2 / (d1 + d2)) per frame of group g, d1 and d2 its distances to group g's and g - 1's
        centres."""
        near = torch.tensor([abs(f - self._centre(g)) for f in self.groups[g]], dtype=torch.float32)
        far = torch.tensor([abs(f - self._centre(g - 1)) for f in self.groups[g]], dtype=torch.float32)
        return torch.sigmoid(far / (near + far))

    def _centre(self, g: int) -> int:
        """c_g = gB + B // 2, B = keyframe_interval (the first group's length whenever there are two)."""
        interval = len(self.groups[0])
        return g * interval + interval // 2


def sample_frames(
    denoiser: VideoDenoiser, x: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int]
) -> torch.Tensor:
    """DDIM of every frame of every prompt, `x` (P, F, C, h, w) on the device, from t_0 to the clean latents, in
    place: each group's frames take their step as soon as their ε is known, so a step holds one group's noise, not
    every frame's (docs/cost-model.md §9)."""
    alpha_bars = [schedule.alpha_bar(t) for t in timesteps] + [schedule.alpha_bar(None)]
    for step in progress(len(timesteps), "video"):
        for group, eps in denoiser(x, step):
            frames = x[:, group.start : group.stop]
            frames.copy_(ddim_step(frames, eps, alpha_bars[step], alpha_bars[step + 1]))
    return x
