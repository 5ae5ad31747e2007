"""Randomly initialised Stable Diffusion models for tests and benchmarks.

The models have SD's module layout (the UNet, VAE, CLIP text encoder, tokenizer and scheduler of a
diffusers checkpoint) so that they load through the production loader; only their widths differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# SD 1.5's own UNet configuration; "tiny" shrinks only the widths.
_SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=_DOWN,
    up_block_types=_UP,
    cross_attention_dim=768,
    attention_head_dim=8,
)
_TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(16, 32, 32, 32),
    down_block_types=_DOWN,
    up_block_types=_UP,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)

# SD 1.5's own VAE configuration; "tiny" shrinks only the widths and depth.
_SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
_TINY_VAE = {
    **_SD15_VAE,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}


def _byte_level_vocab() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for raw bytes (GPT-2's table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def make_tokenizer(path: Path) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is single bytes plus a few common merges."""
    path.mkdir(parents=True, exist_ok=True)
    chars = _byte_level_vocab()
    merges = [("h", "o"), ("r", "o"), ("ho", "r"), ("s", "e</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tokenizer.save_pretrained(path)
    return tokenizer


def make_random_model(
    path: str | Path,
    *,
    layout: str = "sd1",
    size: str = "tiny",
    prediction_type: str = "epsilon",
    seed: int = 0,
) -> Path:
    """Write a random diffusers checkpoint of SD layout to `path` and return it.

    layout: "sd1" (attention heads by count, conv projections) or "sd2" (linear projections).
    size: "tiny" for tests, "full" for SD 1.5's real widths (benchmarks of speed, not quality).
    """
    path = Path(path)
    torch.manual_seed(seed)
    unet_config = _unet_config(layout, size)
    UNet2DConditionModel(**unet_config).save_pretrained(path / "unet")
    _write_vae(path / "vae", tiny=size == "tiny")
    _write_text_encoder(path, unet_config["cross_attention_dim"], tiny=size == "tiny")
    DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    ).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"],
            }
        )
    )
    return path


def _unet_config(layout: str, size: str) -> dict:
    config = dict(_TINY_UNET if size == "tiny" else _SD15_UNET)
    if layout == "sd2":
        config.update(
            use_linear_projection=True, attention_head_dim=(2, 4, 8, 8) if size == "tiny" else (5, 10, 20, 20)
        )
        if size == "full":
            config["cross_attention_dim"] = 1024
    elif layout != "sd1":
        raise ValueError(f"layout must be 'sd1' or 'sd2', not {layout!r}")
    return config


def _write_vae(path: Path, tiny: bool) -> None:
    AutoencoderKL(**(_TINY_VAE if tiny else _SD15_VAE)).save_pretrained(path)


def _write_text_encoder(path: Path, hidden_size: int, tiny: bool) -> None:
    """The tokenizer and a CLIP text encoder whose width is the UNet's cross-attention width."""
    tokenizer = make_tokenizer(path / "tokenizer")
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37 if tiny else 3072,
        num_hidden_layers=2 if tiny else 12,
        num_attention_heads=4 if tiny else 12,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    CLIPTextModel(text_config).save_pretrained(path / "text_encoder")
