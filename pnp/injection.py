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


@dataclass
class SourceFeatures:
    """Source features per key, stacked by sampling step: each tensor is (steps, sources, ...).

    `sources` is 1 for a real image (the inversion's forward pass) and 2 for a generated source
    (its unconditional and conditional halves). ResNet and attention features cover their own number
    of leading steps, since they are injected for different lengths.
    """

    features: dict[str, torch.Tensor]

    def steps(self, key: str) -> int:
        return self.features[key].shape[0] if key in self.features else 0

    @property
    def resnet_steps(self) -> int:
        return self.steps(RESNET_KEY)

    @property
    def attention_steps(self) -> int:
        return min(self.steps(key) for key in attention_keys())

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

    @staticmethod
    def stack(per_step: list[dict[str, torch.Tensor]]) -> SourceFeatures:
        """Stack captures of consecutive steps, each key (sources, ...), into (steps, sources, ...)."""
        if not per_step:
            return SourceFeatures({})
        return SourceFeatures({key: torch.stack([step[key] for step in per_step]) for key in per_step[0]})

    def extended(self, later: SourceFeatures, first_step: int) -> SourceFeatures:
        """These features followed by `later`'s, which start at sampling step `first_step`.

        A key whose cached steps stop short of `first_step` keeps what it has: its steps were not asked for.
        """
        merged = dict(self.features)
        for key, tensor in later.features.items():
            have = self.steps(key)
            if have >= first_step:
                parts = [t for t in (self.features.get(key), tensor[have - first_step :]) if t is not None]
                merged[key] = torch.cat(parts)
        return SourceFeatures(merged)


class FeatureInjector:
    """Forward hooks at the injection sites that capture their outputs or replace them with the source's."""

    def __init__(self, unet: nn.Module):
        self._sites = locate_sites(unet)
        self._captured: dict[str, list[torch.Tensor]] | None = None
        self._injected: Mapping[str, torch.Tensor] = {}
        for key, module in self._sites.items():
            module.register_forward_hook(self._hook(key))

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
