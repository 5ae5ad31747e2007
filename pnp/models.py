"""Model loading: where the weights come from, device and dtype, and the checks that a checkpoint fits.

`PNP_MODEL` names a local diffusers directory or a hub id; unset, the default model lives under
`weights/` (filled by `script/download-weights`, or downloaded there on first use where the network
allows). Only the UNet, VAE, text encoder, tokenizer and scheduler are loaded: no safety checker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTokenizer

from .compilation import Compilable
from .errors import CallOutOfMemoryError, ModelError, NonFiniteError
from .injection import InjectionUNet, locate_sites
from .stats import RunStats

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "stable-diffusion-v1-5"
COMPONENTS = ("unet", "vae", "text_encoder")
# What the UNet may predict: the noise ε, or v (SD 2.x 768-v models), which the engine turns into ε.
PREDICTION_TYPES = ("epsilon", "v_prediction")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class StableDiffusion:
    """The loaded components the engine drives, on one device in one dtype: the UNet with Plug-and-Play's
    feature injection (installed once per UNet: every engine on this model shares it), and the VAE's
    decode as it runs, eagerly or compiled (`compile`)."""

    name: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    injection_unet: InjectionUNet = field(init=False, repr=False)
    vae_decode: Compilable = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.injection_unet = InjectionUNet(self.unet)
        self.vae_decode = Compilable(self.vae.decode, "VAE decoder")

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent position along each side (8 in SD)."""
        return vae_scale_factor(self.vae.config)

    @property
    def latent_channels(self) -> int:
        """Channels of the UNet's latents (4 in SD)."""
        return self.unet.config.in_channels

    def compile(self, backend: str | Callable = "inductor") -> None:
        """Run the UNet (with its sites) and the VAE decoder under torch.compile, compiled on first use."""
        self.injection_unet.unet_forward.compile(backend)
        self.vae_decode.compile(backend)

    @property
    def compiled(self) -> bool:
        return self.injection_unet.unet_forward.compiled or self.vae_decode.compiled

    def stop_compiling(self) -> None:
        """Compile no more graphs: shapes without one run eagerly (see `pnp.compilation`)."""
        self.injection_unet.unet_forward.stop_compiling()
        self.vae_decode.stop_compiling()

    def use_channels_last(self) -> None:
        """Lay out the UNet's and the VAE's 4-D weights as NHWC (channels_last), which their convolutions'
        outputs then follow. The numbers are the same; whether it is faster depends on the GPU and its
        convolution kernels, which `bench/run.py --channels-last` measures. torch.compile's inductor
        picks convolution layouts by itself."""
        for module in (self.unet, self.vae):
            module.to(memory_format=torch.channels_last)

    @property
    def channels_last(self) -> bool:
        return self.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    @contextmanager
    def in_float32(self) -> Iterator[None]:
        """Run the models in float32 inside the block, eagerly (compiled graphs are for the model's own
        dtype), and in their own dtype again after it."""
        original = self.dtype
        modules = (self.unet, self.vae, self.text_encoder)
        try:
            # Inside the `try`: a conversion that fails halfway (float32 doubles the weights' memory) is undone.
            for module in modules:
                module.to(torch.float32)
            self.dtype = torch.float32
            with self.injection_unet.unet_forward.eager(), self.vae_decode.eager():
                yield
        finally:
            for module in modules:
                module.to(original)
            self.dtype = original

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """E(p): the text encoder's last hidden state of each prompt, padded and truncated to 77 tokens."""
        limit = self.tokenizer.model_max_length
        for prompt in prompts:
            length = len(self.tokenizer(prompt).input_ids)
            if length > limit:
                logger.warning("prompt truncated to %d of its %d tokens: %r", limit, length, prompt)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """The latent of pixels in [-1, 1]: the posterior mean times the VAE's scaling factor."""
        posterior = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return posterior.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, vae_batch: int) -> torch.Tensor:
        """VAE decoding of latents, `vae_batch` at a time; values are roughly in [-1, 1]. A call that runs out
        of memory says how many latents it carried."""
        decoded = []
        for chunk in (latents / self.vae.config.scaling_factor).split(vae_batch):
            try:
                decoded.append(self.vae_decode(chunk.to(self.dtype)).sample)
            except torch.OutOfMemoryError as error:
                raise CallOutOfMemoryError(error, "vae", len(chunk)) from error
        return torch.cat(decoded)


def run_with_float32_retry(model: StableDiffusion, stats: RunStats, run: Callable[..., T], *args: object) -> T:
    """`run(*args)`; where it meets NaN or infinity in float16 or bfloat16, `run(*args)` once more with the model in
    float32 (docs/conventions.md §8), marked in `stats`."""
    try:
        return run(*args)
    except NonFiniteError as error:
        if model.dtype == torch.float32:
            raise
        logger.warning("%s in %s; running the request again in float32", error, model.dtype)
        stats.float32_retry = True
        with model.in_float32():
            return run(*args)


def vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    """Image pixels per latent position along each side of a VAE of this configuration: 2 per block after the
    first (8 in SD)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def select_device(device: str | None = None) -> torch.device:
    """`device`, else `PNP_DEVICE`, else CUDA when present, else the CPU."""
    name = device or os.environ.get("PNP_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ModelError(f"PNP_DEVICE: {name!r} is not a torch device ({error})") from None


def select_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """`dtype`, else `PNP_DTYPE`, else float16 on CUDA and float32 elsewhere."""
    name = dtype or os.environ.get("PNP_DTYPE") or ("float16" if device.type == "cuda" else "float32")
    if name not in DTYPES:
        raise ModelError(f"PNP_DTYPE: {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def select_compile(compile: bool | None = None) -> bool:
    """`compile`, else `PNP_COMPILE` ("1": the UNet and VAE decoder under torch.compile; "0" or unset: eagerly)."""
    if compile is not None:
        return compile
    value = os.environ.get("PNP_COMPILE", "0")
    if value not in ("0", "1"):
        raise ModelError(f"PNP_COMPILE: {value!r} is not 0 or 1")
    return value == "1"


def _weights_missing(path: Path) -> list[str]:
    return [c for c in COMPONENTS if not any((path / c).glob("*.safetensors"))]


def download_weights(model_id: str = DEFAULT_MODEL_ID, local_dir: Path | None = DEFAULT_WEIGHTS) -> Path:
    """Fetch the configs, the tokenizer and fp16 safetensors of `model_id` (resumable); returns the directory.

    Components without an fp16 file fall back to their full-precision safetensors. With `local_dir`
    None the files go to the Hugging Face cache.
    """
    from huggingface_hub import snapshot_download

    configs = ["model_index.json", "scheduler/*.json", "tokenizer/*", *(f"{c}/config.json" for c in COMPONENTS)]
    try:
        path = Path(
            snapshot_download(
                model_id,
                local_dir=local_dir,
                allow_patterns=[*configs, *(f"{c}/*.fp16.safetensors" for c in COMPONENTS)],
            )
        )
        missing = _weights_missing(path)
        if missing:
            path = Path(
                snapshot_download(
                    model_id,
                    local_dir=local_dir,
                    allow_patterns=[
                        f"{c}/{'model' if c == 'text_encoder' else 'diffusion_pytorch_model'}.safetensors"
                        for c in missing
                    ],
                )
            )
    except Exception as error:  # the hub client raises many kinds: offline, not found, gated, HTTP
        raise ModelError(
            f"could not download {model_id!r} ({type(error).__name__}: {error}). Run script/download-weights "
            f"on a machine with network access to fill {local_dir or DEFAULT_WEIGHTS}, or set PNP_MODEL to a local "
            "diffusers directory."
        ) from error
    if _weights_missing(path):
        raise ModelError(f"{model_id!r} has no safetensors weights for {', '.join(_weights_missing(path))}")
    return path


def resolve_model(model: str | None = None) -> Path:
    """The local directory of `model`, else of `PNP_MODEL`, else of the default weights (downloaded if absent)."""
    name = model or os.environ.get("PNP_MODEL")
    if name is None:
        if _weights_missing(DEFAULT_WEIGHTS):
            logger.info("no weights in %s; downloading %s there", DEFAULT_WEIGHTS, DEFAULT_MODEL_ID)
            return download_weights(DEFAULT_MODEL_ID, DEFAULT_WEIGHTS)
        return DEFAULT_WEIGHTS
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(f"PNP_MODEL: {name!r} is neither a diffusers directory nor a hub id like 'owner/name'")
    return download_weights(name, local_dir=None)


def _variant(component_dir: Path) -> str | None:
    """'fp16' where a component ships only fp16 weights (as script/download-weights leaves it)."""
    has_fp16 = any(component_dir.glob("*.fp16.safetensors"))
    has_full = any(p for p in component_dir.glob("*.safetensors") if ".fp16." not in p.name)
    return "fp16" if has_fp16 and not has_full else None


def check_model(unet: UNet2DConditionModel, scheduler_config: dict[str, Any]) -> None:
    """Refuse what Plug-and-Play cannot drive: a prediction other than ε or v, no 4-channel latent, no SD sites."""
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ModelError(
            f"the model predicts {prediction!r}; only epsilon- and v-predicting Stable Diffusion models "
            f"({', '.join(PREDICTION_TYPES)}) are supported"
        )
    if unet.config.in_channels != 4:
        raise ModelError(
            f"the UNet takes {unet.config.in_channels} input channels; Plug-and-Play needs a text-to-image "
            "UNet with 4 (not an inpainting or depth model)"
        )
    locate_sites(unet)


def load_model(
    model: str | None = None, device: str | None = None, dtype: str | None = None, compile: bool | None = None
) -> StableDiffusion:
    """Load and check a Stable Diffusion checkpoint for the engine (see the module docstring)."""
    target_device = select_device(device)
    target_dtype = select_dtype(target_device, dtype)
    compiled = select_compile(compile)
    path = resolve_model(model)
    if _weights_missing(path) or not (path / "scheduler" / "scheduler_config.json").is_file():
        raise ModelError(
            f"{path} is not a complete diffusers Stable Diffusion directory (it needs unet/, vae/, text_encoder/, "
            "tokenizer/ and scheduler/); run script/download-weights or point PNP_MODEL at one"
        )
    scheduler_config = dict(DDIMScheduler.load_config(path / "scheduler"))
    unet = UNet2DConditionModel.from_pretrained(
        path / "unet", variant=_variant(path / "unet"), torch_dtype=target_dtype
    )
    check_model(unet, scheduler_config)
    vae = AutoencoderKL.from_pretrained(path / "vae", variant=_variant(path / "vae"), torch_dtype=target_dtype)
    text_encoder = CLIPTextModel.from_pretrained(
        path / "text_encoder", variant=_variant(path / "text_encoder"), dtype=target_dtype
    )
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    # Scaled-dot-product attention everywhere; InjectionUNet then sets its own processor (the same attention,
    # with injection) on the eight self-attention sites.
    unet.set_attn_processor(AttnProcessor2_0())
    for module in (unet, vae, text_encoder):
        module.to(target_device).eval().requires_grad_(False)
    loaded = StableDiffusion(
        name=str(path.resolve()),
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        device=target_device,
        dtype=target_dtype,
    )
    if compiled:
        loaded.compile()
    logger.info(
        "loaded %s on %s in %s%s",
        path,
        target_device,
        str(target_dtype).removeprefix("torch."),
        ", UNet and VAE decoder compiled on first use" if compiled else "",
    )
    return loaded
