"""Models (pnp.models): loading local directories and fp16-only downloads, device and dtype rules, the
layouts that run, what is refused (other UNets, incomplete directories, attention that would bypass
the injection), and the text encoder's 77-token limit."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from transformers import CLIPTextModel

from pnp import ModelError, PnPEngine, models
from pnp.injection import ATTENTION_SITES, locate_sites
from pnp.models import load_model, select_dtype
from pnp.testing import make_random_model
from tests.helpers import HORSE, config


def test_loads_through_the_production_loader_on_the_cpu_in_float32(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PNP_MODEL", str(tiny_model_dir))
    monkeypatch.delenv("PNP_DTYPE", raising=False)
    monkeypatch.setenv("PNP_DEVICE", "cpu")
    model = load_model()
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.unet.dtype == model.vae.dtype == model.text_encoder.dtype == torch.float32
    assert not model.unet.training
    # torch's scaled_dot_product_attention everywhere; at the eight sites the engine's processor runs it.
    sites = {f"{site}.transformer_blocks.0.attn1.processor" for site in ATTENTION_SITES}
    processors = model.unet.attn_processors
    assert {type(p).__name__ for name, p in processors.items() if name not in sites} == {"AttnProcessor2_0"}
    assert {type(p).__name__ for name, p in processors.items() if name in sites} == {"_SelfAttentionSite"}


def test_dtype_rules(monkeypatch):
    monkeypatch.delenv("PNP_DTYPE", raising=False)
    assert select_dtype(torch.device("cuda")) == torch.float16
    assert select_dtype(torch.device("cpu")) == torch.float32
    assert select_dtype(torch.device("cuda"), "bfloat16") == torch.bfloat16
    monkeypatch.setenv("PNP_DTYPE", "bfloat16")
    assert select_dtype(torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelError, match="PNP_DTYPE"):
        select_dtype(torch.device("cpu"), "float8")


def test_bfloat16_on_request(tiny_model_dir):
    model = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert model.unet.dtype == torch.bfloat16


def test_fp16_only_checkpoint_as_the_download_script_leaves_it(tiny_model_dir, tmp_path):
    fp16_dir = tmp_path / "fp16"
    shutil.copytree(tiny_model_dir, fp16_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").save_pretrained(fp16_dir / "unet", variant="fp16")
    CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder").save_pretrained(
        fp16_dir / "text_encoder", variant="fp16"
    )
    shutil.copytree(tiny_model_dir / "vae", fp16_dir / "vae", dirs_exist_ok=True)
    assert list((fp16_dir / "unet").glob("*.safetensors"))[0].name == "diffusion_pytorch_model.fp16.safetensors"
    model = load_model(str(fp16_dir), device="cpu")
    reference = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    torch.testing.assert_close(model.unet.conv_in.weight, reference.conv_in.weight)


def test_v_prediction_loads_and_other_prediction_types_are_refused(tmp_path):
    path = make_random_model(tmp_path / "v", prediction_type="v_prediction")
    assert PnPEngine.from_pretrained(str(path), device="cpu").schedule.prediction_type == "v_prediction"
    sample = make_random_model(tmp_path / "sample", prediction_type="sample")
    with pytest.raises(ModelError, match="'sample'.*epsilon, v_prediction"):
        load_model(str(sample), device="cpu")


@pytest.mark.parametrize("in_channels, kind", [(9, "inpainting"), (5, "depth")])
def test_inpainting_and_depth_unets_are_refused(tiny_model_dir, tmp_path, in_channels, kind):
    other = tmp_path / kind
    shutil.copytree(tiny_model_dir, other, ignore=shutil.ignore_patterns("unet"))
    config = dict(UNet2DConditionModel.load_config(tiny_model_dir / "unet"))
    UNet2DConditionModel.from_config({**config, "in_channels": in_channels}).save_pretrained(other / "unet")
    with pytest.raises(ModelError, match=f"{in_channels} input channels"):
        load_model(str(other), device="cpu")


def test_unet_without_the_injection_sites_is_refused(tiny_model_dir, tmp_path):
    other = tmp_path / "shallow"
    shutil.copytree(tiny_model_dir, other, ignore=shutil.ignore_patterns("unet"))
    config = dict(UNet2DConditionModel.load_config(tiny_model_dir / "unet"))
    config["layers_per_block"] = 1  # up blocks then hold 2 ResNets and attentions, not 3
    UNet2DConditionModel.from_config(config).save_pretrained(other / "unet")
    with pytest.raises(ModelError, match="injection sites"):
        load_model(str(other), device="cpu")


def test_incomplete_directory_is_refused(tiny_model_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, partial, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(ModelError, match="vae"):
        load_model(str(partial), device="cpu")


def test_offline_without_local_weights_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv("PNP_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(models, "DEFAULT_WEIGHTS", tmp_path / "weights" / "sd")
    with pytest.raises(ModelError) as error:
        load_model(device="cpu")
    assert "script/download-weights" in str(error.value) and "PNP_MODEL" in str(error.value)


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="could not download 'someone/some-model'"):
        load_model("someone/some-model", device="cpu")


def test_missing_local_path_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(ModelError, match="neither a diffusers directory nor a hub id"):
        load_model(str(tmp_path / "no" / "such" / "dir"), device="cpu")


def test_engine_from_pretrained_reads_the_environment(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PNP_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("PNP_DEVICE", "cpu")
    monkeypatch.setenv("PNP_CACHE_BYTES", "12345")
    engine = PnPEngine.from_pretrained()
    assert engine.model.name == str(tiny_model_dir.resolve())
    assert engine.cache.max_bytes == 12345


def test_a_bad_cache_bound_is_a_clear_error(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PNP_CACHE_BYTES", "2GB")
    with pytest.raises(ModelError, match="PNP_CACHE_BYTES"):
        PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu")


def test_attention_that_would_bypass_the_injection_is_refused(tiny_model_dir):
    engine = PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu")  # its own: the test changes its UNet
    request = config()
    unet = engine.model.unet
    unet.fuse_qkv_projections()
    # With fused projections the self-attention never calls to_q: the injection would be silently off.
    _, attentions = locate_sites(unet)
    calls = []
    handle = next(iter(attentions.values())).to_q.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        unet(torch.zeros(1, 4, 16, 16), 1, encoder_hidden_states=torch.zeros(1, 77, unet.config.cross_attention_dim))
    handle.remove()
    assert calls == []
    with pytest.raises(ModelError, match="runs FusedAttnProcessor2_0, not the engine's injection processor"):
        engine(request, HORSE)
    unet.unfuse_qkv_projections()
    unet.set_attn_processor(AttnProcessor())
    with pytest.raises(ModelError, match="runs AttnProcessor, not the engine's injection processor"):
        engine(request, HORSE)
    assert engine.unet_evals == 0  # refused before any work


def test_the_engine_registers_no_hooks_and_counts_evaluations_itself(tiny_model_dir):
    engine = PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu")
    modules = [*engine.model.unet.modules(), *engine.model.vae.modules(), *engine.model.text_encoder.modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    calls = []
    handle = engine.model.unet.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    try:
        result = engine(config(), HORSE)
    finally:
        handle.remove()
    # 10 inversion calls of 1 latent, one extraction call of 8, 10 translation calls of 2.
    assert calls == [1] * 10 + [8] + [2] * 10
    assert engine.unet_evals == result.stats.unet_evals == sum(calls) == 38


def test_channels_last_weights_give_the_same_images(tiny_model_dir, engine):
    nhwc = PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu")
    nhwc.model.use_channels_last()
    assert nhwc.model.channels_last and not engine.model.channels_last
    assert nhwc.model.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    request = config(translation_prompts="a cat; a robot horse")
    expected = engine(request, HORSE).images
    for result in (nhwc(request, HORSE), nhwc(request, HORSE)):  # features captured, then from the cache
        for a, b in zip(expected, result.images, strict=True):
            assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 1
    assert result.stats.cache_hit


def test_sd2_layout_with_linear_projections_runs(tiny_sd2_model_dir):
    sd2 = PnPEngine.from_pretrained(str(tiny_sd2_model_dir), device="cpu")
    result = sd2(config(translation_prompts="a cat"), HORSE)
    assert result.images[0].size == (128, 128)
    assert result.stats.unet_evals == 10 + 8 + 20


def test_a_prompt_over_77_tokens_is_truncated_with_a_warning(engine, pnp_logs):
    long_prompt = "a photo of a horse " * 20  # ~380 byte-level tokens with the tiny tokenizer
    tokenizer = engine.model.tokenizer
    assert len(tokenizer(long_prompt).input_ids) > tokenizer.model_max_length == 77
    embeddings = engine.model.encode_text(["a cat", long_prompt])
    assert embeddings.shape[:2] == (2, 77) and torch.isfinite(embeddings).all()
    warnings = [r for r in pnp_logs.records if r.name == "pnp.models" and r.levelno == logging.WARNING]
    assert warnings and all(
        "truncated to 77" in r.getMessage() and "a photo of a horse" in r.getMessage() for r in warnings
    )
