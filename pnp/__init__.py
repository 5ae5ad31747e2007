"""Plug-and-Play diffusion features for text-driven image translation (Tumanyan et al., CVPR 2023) on diffusers."""

from .config import PnPConfig, load_preset
from .engine import PnPEngine, PnPResult
from .errors import InputError, ModelError, NonFiniteError, PnPError

__all__ = [
    "InputError",
    "ModelError",
    "NonFiniteError",
    "PnPConfig",
    "PnPEngine",
    "PnPError",
    "PnPResult",
    "load_preset",
]
