"""Feature capture and injection: the Plug-and-Play sites of the UNet, run by the engine's own code.

The sites (docs/algorithm.md §4) are the residual branch of `up_blocks[1].resnets[1]` (the output of
its `conv2`, before the shortcut is added) and the query and key projections of eight decoder
self-attention layers. `InjectionUNet` installs, once, a forward for the ResNet block and an attention
processor for the eight `attn1` modules. At an injected step they take the source's residual, queries
and keys instead of computing them (the residual branch and `to_q`, `to_k` are skipped); while
capturing they record what they computed. No forward hook is involved, so nothing is computed only to
be thrown away, and torch.compile sees plain module code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from .compilation import Compilable
from .errors import CallOutOfMemoryError, ModelError

RESNET_SITE = "up_blocks.1.resnets.1"
ATTENTION_SITES = (
    "up_blocks.1.attentions.1",
    "up_blocks.1.attentions.2",
    "up_blocks.2.attentions.0",
    "up_blocks.2.attentions.1",
    "up_blocks.2.attentions.2",
    "up_blocks.3.attentions.0",
    "up_blocks.3.attentions.1",
    "up_blocks.3.attentions.2",
)
RESNET_KEY = f"{RESNET_SITE}.conv2"


def attention_keys() -> list[str]:
    """Keys of the attention features: the query and key projection of each site's self-attention."""
    return [f"{site}.attn1.{proj}" for site in ATTENTION_SITES for proj in ("to_q", "to_k")]


def _site_module(unet: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return unet.get_submodule(path)
    except AttributeError:
        raise ModelError(
            f"the UNet lacks the Plug-and-Play injection sites of Stable Diffusion's layout (missing {path}); "
            "use an SD 1.x or 2.x checkpoint"
        ) from None


def locate_sites(unet: torch.nn.Module) -> tuple[ResnetBlock2D, dict[str, Attention]]:
    """The ResNet block and the self-attention modules (by site) of the injection; others are refused."""
    resnet = _site_module(unet, RESNET_SITE)
    attentions = {site: _site_module(unet, f"{site}.transformer_blocks.0.attn1") for site in ATTENTION_SITES}
    if not isinstance(resnet, ResnetBlock2D) or resnet.upsample is not None or resnet.downsample is not None:
        raise ModelError(f"{RESNET_SITE} is not a plain ResNet block of Stable Diffusion's layout")
    if resnet.time_embedding_norm != "default":
        raise ModelError(f"{RESNET_SITE} uses time_embedding_norm={resnet.time_embedding_norm!r}, not SD's 'default'")
    for site, attention in attentions.items():
        plain = (
            isinstance(attention, Attention)
            and not attention.is_cross_attention
            and attention.spatial_norm is None
            and attention.group_norm is None
            and attention.norm_q is None
            and attention.norm_k is None
            and not attention.residual_connection
            and attention.rescale_output_factor == 1.0
        )
        if not plain:
            raise ModelError(
                f"the self-attention at {site} is not the plain self-attention of Stable Diffusion's layout"
            )
    return resnet, attentions


@dataclass(frozen=True)
class InjectionSteps:
    """How many sampling steps, from the first, get the source's features (docs/algorithm.md §4): the
    ResNet site's at steps i < n_f (`feature_injection_steps`), the attention sites' at i < n_a."""

    feature_injection_steps: int
    attention_injection_steps: int

    @property
    def capture_steps(self) -> int:
        """max(n_f, n_a): the steps whose source features are needed at all."""
        return max(self.feature_injection_steps, self.attention_injection_steps)

    def covers(self, other: InjectionSteps) -> bool:
        """Whether features kept for these steps serve a request injecting `other`'s."""
        return (
            other.feature_injection_steps <= self.feature_injection_steps
            and other.attention_injection_steps <= self.attention_injection_steps
        )

    def union(self, other: InjectionSteps) -> InjectionSteps:
        """The longer of both, for each kind of site."""
        return InjectionSteps(
            max(self.feature_injection_steps, other.feature_injection_steps),
            max(self.attention_injection_steps, other.attention_injection_steps),
        )


@dataclass(frozen=True)
class SourceFeatures:
    """Source features per key, stacked by sampling step: each tensor is (steps, rows, ...).

    A real image's features have one row a step (the inversion's unguided forward pass); a generated
    source's have two, `guidance_halves`: the unconditional and the conditional half of its guided pass.
    ResNet features are kept for the n_f steps they are injected and attention features for n_a
    (docs/algorithm.md §4), so a cache entry holds nothing unused.
    """

    features: dict[str, torch.Tensor]
    injection_steps: InjectionSteps
    guidance_halves: bool

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.features.values())

    def at_step(self, step: int, injected: InjectionSteps) -> dict[str, torch.Tensor]:
        """The features injected at sampling step `step`: ResNet while step < n_f, attention while step < n_a."""
        selected = {}
        if step < injected.feature_injection_steps:
            selected[RESNET_KEY] = self.features[RESNET_KEY][step]
        if step < injected.attention_injection_steps:
            selected.update({key: self.features[key][step] for key in attention_keys()})
        return selected


class FeatureRecorder:
    """Builds `SourceFeatures` from the captures of consecutive UNet calls, written into tensors of their
    final size: the ResNet site's first n_f steps and the attention sites' first n_a. What a call captured
    beyond those steps is dropped once recorded, so at most one call's capture is held beside the
    features: at 512x512 the attention sites' 15 steps between n_a = 25 and n_f = 40 alone are 0.4 GB."""

    def __init__(self, injection_steps: InjectionSteps, guidance_halves: bool):
        self.injection_steps, self.guidance_halves = injection_steps, guidance_halves
        self._features: dict[str, torch.Tensor] = {}

    def record(self, first_step: int, captured: Mapping[str, torch.Tensor]) -> None:
        """Store one call's capture: for each key, one row a step (two with `guidance_halves`), for the
        steps from `first_step` on."""
        rows_per_step = 2 if self.guidance_halves else 1
        for key, rows in captured.items():
            steps = self.injection_steps
            kept = steps.feature_injection_steps if key == RESNET_KEY else steps.attention_injection_steps
            values = rows.unflatten(0, (-1, rows_per_step))[: max(0, kept - first_step)]
            if len(values) == 0:
                continue
            if key not in self._features:
                self._features[key] = values.new_empty((kept, *values.shape[1:]))
            self._features[key][first_step : first_step + len(values)] = values

    def features(self) -> SourceFeatures:
        return SourceFeatures(dict(self._features), self.injection_steps, self.guidance_halves)


class _SiteState:
    """What the sites do during the current UNet call: inject these features, capture into these lists."""

    def __init__(self) -> None:
        self.injected: Mapping[str, torch.Tensor] = {}
        self.captured: dict[str, list[torch.Tensor]] | None = None

    def capture(self, key: str, value: torch.Tensor) -> None:
        if self.captured is not None:
            self.captured[key].append(value)

    def project(self, key: str, project: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """A site's query or key projection (`key`): the injected source's at an injected step, else computed
        and, while capturing, recorded."""
        source = self.injected.get(key)
        if source is None:
            projected = project(hidden_states)
            self.capture(key, projected)
            return projected
        # One source for every row broadcasts (an expanded view, no copy).
        return source.to(hidden_states.dtype).expand(hidden_states.shape[0], -1, -1)


class _ResidualSite:
    """The forward of the ResNet site: (shortcut(x) + h) / output_scale_factor, where h is the residual
    branch's output, or at an injected step the source's (the branch is then not computed)."""

    def __init__(self, block: ResnetBlock2D, state: _SiteState):
        self.block, self.state = block, state

    def __call__(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        block = self.block
        residual = self.state.injected.get(RESNET_KEY)
        if residual is None:
            # ResnetBlock2D's residual branch for SD's configuration (no resampling, "default" time norm).
            hidden = block.conv1(block.nonlinearity(block.norm1(input_tensor)))
            if block.time_emb_proj is not None:
                time = temb if block.skip_time_act else block.nonlinearity(temb)
                hidden = hidden + block.time_emb_proj(time)[:, :, None, None]
            residual = block.conv2(block.dropout(block.nonlinearity(block.norm2(hidden))))
            self.state.capture(RESNET_KEY, residual)
        else:
            residual = residual.to(input_tensor.dtype)
        shortcut = input_tensor if block.conv_shortcut is None else block.conv_shortcut(input_tensor)
        return (shortcut + residual) / block.output_scale_factor


class _SelfAttentionSite:
    """The attention processor of a site: scaled-dot-product self-attention as diffusers'
    AttnProcessor2_0 computes it, with the source's query and key at an injected step."""

    def __init__(self, site: str, state: _SiteState):
        self.query_key, self.key_key = f"{site}.attn1.to_q", f"{site}.attn1.to_k"
        self.state = state

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        query = self.state.project(self.query_key, attn.to_q, hidden_states)
        key = self.state.project(self.key_key, attn.to_k, hidden_states)
        return attend(attn, query, key, attn.to_v(hidden_states))


def attend(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """attn's output for projected queries (B, L, C) over keys and values (B, L', C): scaled-dot-product
    attention per head, as diffusers' AttnProcessor2_0 computes it, then the output projection."""
    batch, head_dim = query.shape[0], value.shape[-1] // attn.heads

    def heads(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    attended = F.scaled_dot_product_attention(heads(query), heads(key), heads(value), dropout_p=0.0, is_causal=False)
    attended = attended.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    return attn.to_out[1](attn.to_out[0](attended))


class InjectionUNet:
    """The UNet with Plug-and-Play's feature injection: runs it, counting the latents it evaluates, with
    source features injected or the sites' own features captured (`capturing`). `unet_forward` is the
    UNet's forward as it runs, eagerly or under torch.compile."""

    def __init__(self, unet: UNet2DConditionModel):
        self.unet = unet
        self.evals = 0
        self._state = _SiteState()
        # The sites are plain module code inside the UNet, so torch.compile traces them with it.
        self.unet_forward = Compilable(unet, "UNet")
        resnet, attentions = locate_sites(unet)
        # An instance attribute: nn.Module.__call__ runs it instead of ResnetBlock2D.forward.
        resnet.forward = _ResidualSite(resnet, self._state)
        for site, attention in attentions.items():
            attention.set_processor(_SelfAttentionSite(site, self._state))
        self._attentions = attentions

    def check_processors(self) -> None:
        """Refuse a UNet whose site processors were replaced (for example by `set_attn_processor` or
        `fuse_qkv_projections`): the injection would then be silently off."""
        for site, attention in self._attentions.items():
            if not (isinstance(attention.processor, _SelfAttentionSite) and attention.processor.state is self._state):
                raise ModelError(
                    f"the self-attention at {site} runs {type(attention.processor).__name__}, not the engine's "
                    "injection processor; load the model again instead of changing its attention processors"
                )

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def idle(self) -> bool:
        """Whether the sites are neither injecting nor capturing (between UNet calls, always)."""
        return not self._state.injected and self._state.captured is None

    def __call__(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        injected: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The UNet's output for `latents` (B, 4, h, w) with the `injected` features of this call, each one
        row per latent or one row for all. A call that runs out of memory evaluates nothing and is not
        counted; its error says how many latents it carried."""
        self._state.injected = injected or {}
        try:
            output = self.unet_forward(latents, timesteps, encoder_hidden_states=text).sample
        except torch.OutOfMemoryError as error:
            raise CallOutOfMemoryError(error, "unet", latents.shape[0]) from error
        finally:
            self._state.injected = {}
        self.evals += latents.shape[0]
        return output

    def site_projection(self, key: str, project: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """A site's query or key projection (keys of `attention_keys()`) as the sites make it: injected at an
        injected step, else computed and, while capturing, recorded."""
        return self._state.project(key, project, hidden_states)

    @contextmanager
    def self_attention_processors(self, processor_for: Callable[[str, str | None], object]) -> Iterator[None]:
        """Inside, every transformer block's self-attention (attn1) runs `processor_for(layer, site)` (`site`
        the injection site it is, or None); the engine's processors come back on exit."""
        layers = {
            name: module
            for name, module in self.unet.named_modules()
            if name.endswith(".attn1") and isinstance(module, Attention)
        }
        sites = {f"{site}.transformer_blocks.0.attn1": site for site in ATTENTION_SITES}
        originals = {name: module.processor for name, module in layers.items()}
        try:
            for name, module in layers.items():
                module.set_processor(processor_for(name, sites.get(name)))
            yield
        finally:
            for name, module in layers.items():
                module.set_processor(originals[name])

    @contextmanager
    def capturing(self) -> Iterator[dict[str, torch.Tensor]]:
        """Record the site outputs of the UNet calls made inside; the dict is filled on exit,
        each key's outputs concatenated along the batch in call order."""
        result: dict[str, torch.Tensor] = {}
        self._state.captured = {key: [] for key in [RESNET_KEY, *attention_keys()]}
        try:
            yield result
            for key, parts in self._state.captured.items():
                if parts:
                    result[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
        finally:
            self._state.captured = None
