"""Feature capture and injection: the Plug-and-Play sites of the UNet and the hooks that read or replace them.

The sites (docs/algorithm.md §4) are the residual branch of `up_blocks[1].resnets[1]` (the output of its `conv2`,
before the shortcut is added) and the query and key projections of eight decoder self-attention
layers. Forward hooks on `conv2`, `to_q` and `to_k` read or replace those outputs, so diffusers' own
ResNet and attention code (scaled-dot-product attention) runs unchanged around them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from .errors import ModelError

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


def locate_sites(unet: nn.Module) -> dict[str, nn.Module]:
    """The modules whose outputs are captured and injected, by key; a UNet without them is refused."""
    modules = dict(unet.named_modules())
    wanted = {RESNET_KEY: f"{RESNET_SITE}.conv2"}
    wanted.update({key: key.replace(".attn1.", ".transformer_blocks.0.attn1.") for key in attention_keys()})
    missing = [path for path in wanted.values() if path not in modules]
    if missing:
        raise ModelError(
            "the UNet lacks the Plug-and-Play injection sites of Stable Diffusion's layout "
            f"(missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); use an SD 1.x or 2.x checkpoint"
        )
    return {key: modules[path] for key, path in wanted.items()}


@dataclass(frozen=True)
class SourceFeatures:
    """Source features per key, stacked by sampling step: each tensor is (steps, sources, ...).

    `sources` is 1 for a real image (the inversion's forward pass) and 2 for a generated source (its
    unconditional and conditional halves). ResNet features are kept for the n_f steps they are injected
    and attention features for n_a (docs/algorithm.md §4), so a cache entry holds nothing unused.
    """

    features: dict[str, torch.Tensor]
    resnet_steps: int
    attention_steps: int

    @classmethod
    def keeping(cls, features: Mapping[str, torch.Tensor], resnet_steps: int, attention_steps: int) -> SourceFeatures:
        """The first `resnet_steps` steps of the ResNet features and `attention_steps` of the attention ones."""
        kept = {}
        for key, tensor in features.items():
            steps = resnet_steps if key == RESNET_KEY else attention_steps
            # A slice would keep the whole tensor's memory alive: copy what is kept.
            kept[key] = tensor if steps == len(tensor) else tensor[:steps].clone()
        return cls(kept, resnet_steps, attention_steps)

    def covers(self, resnet_steps: int, attention_steps: int) -> bool:
        """Whether these features serve a request injecting that many steps of each kind."""
        return resnet_steps <= self.resnet_steps and attention_steps <= self.attention_steps

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.features.values())

    def at_step(
        self, step: int, feature_injection_steps: int, attention_injection_steps: int
    ) -> dict[str, torch.Tensor]:
        """The features injected at sampling step `step`: ResNet while step < n_f, attention while step < n_a."""
        selected = {}
        if step < feature_injection_steps:
            selected[RESNET_KEY] = self.features[RESNET_KEY][step]
        if step < attention_injection_steps:
            selected.update({key: self.features[key][step] for key in attention_keys()})
        return selected


class FeatureInjector:
    """Forward hooks at the injection sites that capture their outputs or replace them with the source's."""

    def __init__(self, unet: nn.Module):
        self._sites = locate_sites(unet)
        self._attentions = {site: unet.get_submodule(f"{site}.transformer_blocks.0.attn1") for site in ATTENTION_SITES}
        self._captured: dict[str, list[torch.Tensor]] | None = None
        self._injected: Mapping[str, torch.Tensor] = {}
        for key, module in self._sites.items():
            module.register_forward_hook(self._hook(key))
        self.check_attention_processors()

    def check_attention_processors(self) -> None:
        """Refuse attention that would bypass the hooks on `to_q` and `to_k`.

        The injection rests on one rule: the self-attention at each site computes its queries and keys
        by calling its own `to_q` and `to_k` modules. diffusers' `AttnProcessor2_0` (the one
        `pnp.models.load_model` sets; scaled-dot-product attention) does. Fused QKV projections
        (`fuse_qkv_projections`, one `to_qkv` matmul) or another processor (xformers, a custom one)
        may not, and would silently switch the injection off, so they are refused.
        """
        for site, attention in self._attentions.items():
            # Exactly this type: fused QKV projections run through FusedAttnProcessor2_0, a sibling class.
            if type(attention.processor) is not AttnProcessor2_0:
                raise ModelError(
                    f"the self-attention at {site} runs {type(attention.processor).__name__}; Plug-and-Play "
                    "injection needs AttnProcessor2_0, which calls to_q and to_k (fused QKV projections or "
                    "other processors would bypass the injection)"
                )

    def _hook(self, key: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self._captured is not None:
                self._captured[key].append(output.detach())
            replacement = self._injected.get(key)
            return output if replacement is None else replacement.to(output.dtype)

        return hook

    @contextmanager
    def capturing(self) -> Iterator[dict[str, torch.Tensor]]:
        """Record the site outputs of the UNet calls made inside; the dict is filled on exit,
        each key's outputs concatenated along the batch in call order."""
        result: dict[str, torch.Tensor] = {}
        self._captured = {key: [] for key in self._sites}
        try:
            yield result
            result.update({key: torch.cat(parts) for key, parts in self._captured.items() if parts})
        finally:
            self._captured = None

    @contextmanager
    def injecting(self, features: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Replace the outputs of the keyed sites with `features` (already laid out as the batch)."""
        self._injected = features
        try:
            yield
        finally:
            self._injected = {}
