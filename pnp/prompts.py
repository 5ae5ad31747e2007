"""The text side of a request (docs/algorithm.md §1, §5-§6): its prompts' embeddings from one text-encoder call,
and the classifier-free guidance they give a translation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import PnPConfig
from .models import StableDiffusion
from .schedules import negative_prompt_weights
from .translation import Guidance


@dataclass(frozen=True)
class PromptEmbeddings:
    """The text embeddings of a request (docs/algorithm.md §1): E(""), the source's text (the inversion
    prompt, or in generation mode the generation prompt), one per target prompt, and the negative
    prompt's (None without one); each (rows, 77, d)."""

    unconditional: torch.Tensor
    source: torch.Tensor
    targets: torch.Tensor
    negative: torch.Tensor | None


def encode_prompts(model: StableDiffusion, config: PnPConfig) -> PromptEmbeddings:
    """The request's text embeddings, from one text-encoder call."""
    source_text = config.generation_prompt if config.generation_mode else config.inversion_prompt
    negative = [config.negative_prompt] if config.negative_prompt.strip() else []
    embeddings = model.encode_text(["", source_text, *config.translation_prompts, *negative])
    targets_end = 2 + len(config.translation_prompts)
    return PromptEmbeddings(
        unconditional=embeddings[:1],
        source=embeddings[1:2],
        targets=embeddings[2:targets_end],
        negative=embeddings[targets_end:] if negative else None,
    )


def translation_guidance(config: PnPConfig, embeddings: PromptEmbeddings, num_steps: int) -> Guidance:
    """The target prompts' guidance: scale s, and the negative prompt blended in by its schedule's weights a_i
    (docs/algorithm.md §6; 1 throughout without a negative prompt)."""
    weights = (
        negative_prompt_weights(config.negative_prompt_schedule, config.negative_prompt_alpha, num_steps)
        if embeddings.negative is not None
        else [1.0] * num_steps
    )
    return Guidance(embeddings.unconditional, embeddings.targets, embeddings.negative, config.scale, tuple(weights))
