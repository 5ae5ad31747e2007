"""Consistent video edits with the same Plug-and-Play features (SPEC 7.3-7.4; docs/algorithm.md §11): TokenFlow
(Geyer, Bar-Tal, Bagon, Dekel, ICLR 2024, arXiv 2307.10373) on the engine's own injection.

Each sampling step edits one keyframe per group of frames jointly, every target branch's self-attention
extended over all keyframes; then every frame takes its self-attention output from the keyframes' outputs
at the positions whose source tokens match its own (a nearest-neighbour field), blended between the two
nearest groups' keyframes. `FrameAttention` is the processor of every attn1 during a step, `VideoDenoiser`
the step: (frames' latents, step i) -> each frame's guided ε, for every prompt at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from .injection import RESNET_KEY, InjectionSteps, InjectionUNet, attend
from .schedules import NoiseSchedule, device_timesteps
from .stats import PhaseTimer
from .translation import Guidance

KEYFRAME_SOURCE, KEYFRAME_TARGETS, GROUP_SOURCE, GROUP_TARGETS = "keyframe source", "keyframes", "group source", "group"

VIDEO_KEPT_FEATURES = InjectionSteps(0, 0)
"""A video keeps no source features between steps: its source branch runs at every sampling step (SPEC 7.4), so
its cache entry holds the inversion only."""

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
    """Each step's keyframes, one a group (SPEC 7.3): r = randint(B, (G,)) drawn anew each step from one CPU
    generator seeded with `seed`, k_g = gB + (r_g mod |group g|)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    draws = []
    for _ in range(num_steps):
        offsets = torch.randint(keyframe_interval, (len(groups),), generator=generator).tolist()
        draws.append([group.start + offset % len(group) for group, offset in zip(groups, offsets, strict=True)])
    return draws


@dataclass
class FrameAttention:
    """What every attn1 does in the pass under way (SPEC 7.4), and what the passes hand on per layer: the
    keyframes' source attn1 inputs S (G, n, C), their attn1 outputs A, the source's (G, n, C) and the target
    units' (U, G, n, C), a unit being one (branch, prompt), and the current frames' nearest keyframe positions.
    `units` are the target units of the call under way; `group_keyframes` what the current group's passes read
    of the kept tensors (`enter_group`)."""

    unet: InjectionUNet
    units_total: int
    mode: str = KEYFRAME_SOURCE
    units: range = range(1)
    blend: torch.Tensor | None = None  # w per frame of the current group (g > 0)
    sources: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    source_outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    nearest: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    group_keyframes: dict[str, list[_Keyframe]] = field(default_factory=dict)

    def processor(self, layer: str, site: str | None) -> _LayerProcessor:
        return _LayerProcessor(self, layer, site)

    def keyframes(self, layer: str, site: str | None, attn: Attention, hidden: torch.Tensor) -> torch.Tensor:
        """A keyframe pass: the source attends within its frame (S and A kept); each target unit's rows
        attend to all its keyframes' keys and values (extended attention), queries and keys injected at
        the eight sites where the step injects them."""
        if site is None:
            query, key = attn.to_q(hidden), attn.to_k(hidden)
        else:
            query = self.unet.site_projection(f"{site}.attn1.to_q", attn.to_q, hidden)
            key = self.unet.site_projection(f"{site}.attn1.to_k", attn.to_k, hidden)
        value = attn.to_v(hidden)
        if self.mode == KEYFRAME_SOURCE:
            output = attend(attn, query, key, value)
            self._kept(self.sources, layer).append(hidden)
            self._kept(self.source_outputs, layer).append(output)
            return output
        rows, positions, channels = hidden.shape
        units = len(self.units)
        extended = [t.reshape(units, (rows // units) * positions, -1) for t in (query, key, value)]
        output = attend(attn, *extended).reshape(rows, positions, -1)
        self._kept(self.outputs, layer).append(output.reshape(units, rows // units, positions, -1))
        return output

    @staticmethod
    def _kept(kept: dict[str, list[torch.Tensor]], layer: str) -> list[torch.Tensor]:
        return kept.setdefault(layer, [])

    def finish_keyframes(self) -> None:
        """Join what the keyframe pass's calls kept, each call a slice of the keyframes or of the units."""
        for kept in (self.sources, self.source_outputs, self.outputs):
            for layer, parts in kept.items():
                kept[layer] = [torch.cat(parts)]

    def enter_group(self, g: int) -> None:
        """Before group g's calls: per layer, its keyframe's kept tensors and (g > 0) group g - 1's. Taken here, not
        in the calls, so that no group index enters them: a compiled UNet has the same graphs for every group."""
        kept, groups = (self.sources, self.source_outputs, self.outputs), [g, g - 1] if g > 0 else [g]
        self.group_keyframes = {
            layer: [_Keyframe.of(k, *(tensors[layer][0] for tensors in kept)) for k in groups] for layer in self.sources
        }

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
    output (n, C) and the target units' (U, n, C)."""

    source: torch.Tensor
    source_output: torch.Tensor
    outputs: torch.Tensor

    @classmethod
    def of(cls, k: int, sources: torch.Tensor, source_outputs: torch.Tensor, outputs: torch.Tensor) -> _Keyframe:
        """Group k's keyframe in the kept S (G, n, C), source outputs (G, n, C) and target outputs (U, G, n, C)."""
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
        if self.frames.mode in (KEYFRAME_SOURCE, KEYFRAME_TARGETS):
            return self.frames.keyframes(self.layer, self.site, attn, hidden_states)
        return self.frames.propagate(self.layer, hidden_states)


@dataclass
class VideoDenoiser:
    """(latents (P, F, C, h, w), step i) -> the guided ε of every frame and prompt at step i (SPEC 7.4).

    `source_latents[i]` is z_src of every frame at t_i (F, C, h, w); `keyframes[i]` the step's keyframes, one
    per group of `groups`. The source branch runs with E("") (`guidance.unconditional`); the target branches
    are `guidance`'s, ResNet features injected at i < n_f and attention at i < n_a as `injection_steps` says.
    `timer` times the keyframe passes and the group passes as the phases "keyframes" and "groups".
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
    _device_timesteps: list[torch.Tensor] = field(init=False, repr=False)
    _blend_weights: list[torch.Tensor | None] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        device = self.guidance.conditional.device
        self._device_timesteps = device_timesteps(list(self.timesteps), device)
        # The same at every step: made on the device once, not copied there for each group pass.
        self._blend_weights = [self._blend(g).to(device) if g > 0 else None for g in range(len(self.groups))]

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        branches = self.guidance.branches(step)
        frames = FrameAttention(self.unet, units_total=len(branches) * self.guidance.count)
        with self.unet.self_attention_processors(frames.processor):
            with self.timer.phase("keyframes", log=False):
                self._keyframe_pass(frames, x, step)
            with self.timer.phase("groups", log=False):
                outputs = [self._group_pass(frames, x, step, g) for g in range(len(self.groups))]
        eps_by_branch = torch.cat(outputs, dim=2)  # (branches, P, F, C, h, w)
        alpha_bar = self.schedule.alpha_bar(self.timesteps[step])
        eps = {b: self.schedule.epsilon(out, x, alpha_bar) for b, out in zip(branches, eps_by_branch, strict=True)}
        return self.guidance.combine(eps, step)

    def _source(self, frames: FrameAttention, step: int, rows: list[int], keyframes: bool) -> dict[str, torch.Tensor]:
        """The source branch of frames `rows` (z_src, E("")), `unet_batch` frames a call: its features, captured."""
        frames.mode = KEYFRAME_SOURCE if keyframes else GROUP_SOURCE
        unet, timestep = self.unet, self._device_timesteps[step]
        with unet.capturing() as captured:
            for start in range(0, len(rows), self.unet_batch):
                chunk = rows[start : start + self.unet_batch]
                text = self.guidance.unconditional.expand(len(chunk), -1, -1)
                unet(self.source_latents[step][chunk].to(unet.dtype), timestep, text)
        return captured

    def _targets(
        self,
        frames: FrameAttention,
        step: int,
        captured: dict[str, torch.Tensor],
        latents: torch.Tensor,
        units: range,
        keyframes: bool,
    ) -> torch.Tensor:
        """Target units `units` (unit = branch · P + prompt) on their frames' `latents` (P, R, C, h, w), the
        source's `captured` features injected, in one UNet call: each row's output, unit by unit."""
        frames.mode, frames.units = KEYFRAME_TARGETS if keyframes else GROUP_TARGETS, units
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

    def _keyframe_pass(self, frames: FrameAttention, x: torch.Tensor, step: int) -> None:
        """The step's keyframes, every target branch's attention extended over all of them: what the group
        passes take their attention outputs from (its noise predictions are not used). A call carries whole
        units (all keyframes of a branch and prompt), as many as `unet_batch` holds, at least one."""
        keyframes = self.keyframes[step]
        captured = self._source(frames, step, keyframes, keyframes=True)
        per_call = max(1, self.unet_batch // len(keyframes))
        for start in range(0, frames.units_total, per_call):
            units = range(start, min(start + per_call, frames.units_total))
            self._targets(frames, step, captured, x[:, keyframes], units, keyframes=True)
        frames.finish_keyframes()

    def _group_pass(self, frames: FrameAttention, x: torch.Tensor, step: int, g: int) -> torch.Tensor:
        """Group g's frames, as many a call as `unet_batch` holds with every unit's rows, else one frame a call
        and its units split as `unet_batch` holds: each target branch's UNet output (branches, P, |group|, C, h,
        w). A frame's rows depend on no other frame's here, so the split changes nothing."""
        group, total, weights = self.groups[g], frames.units_total, self._blend_weights[g]
        frames.enter_group(g)
        per_call = max(1, self.unet_batch // total)
        outputs = []
        for start in range(group.start, group.stop, per_call):
            chunk = range(start, min(start + per_call, group.stop))
            frames.blend = None if weights is None else weights[chunk.start - group.start : chunk.stop - group.start]
            captured = self._source(frames, step, list(chunk), keyframes=False)
            latents, units_a_call = x[:, chunk.start : chunk.stop], max(1, self.unet_batch // len(chunk))
            parts = [
                self._targets(frames, step, captured, latents, range(u, min(u + units_a_call, total)), keyframes=False)
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
