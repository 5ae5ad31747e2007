"""The errors the engine reports to its callers: bad input, an unusable model, numbers that went wrong, and a
UNet or VAE call that ran out of memory.

Every error a caller should show its user derives from `PnPError`; the front ends catch that one type.
"""

import torch


class PnPError(Exception):
    """An error of the engine whose message is meant for the user: it names what to change."""


class InputError(PnPError, ValueError):
    """A request input is missing, unreadable or out of its allowed range; the message names it."""

    def __init__(self, input_name: str, message: str):
        super().__init__(f"{input_name}: {message}")
        self.input_name = input_name


class NonFiniteError(PnPError, RuntimeError):
    """A latent or image holds NaN or infinity, so the result would be garbage (often a black image)."""


class ModelError(PnPError, RuntimeError):
    """The model, or a PNP_* setting of how to run it, is unusable; the message says what to do."""


class CallOutOfMemoryError(torch.OutOfMemoryError):
    """CUDA ran out of memory in one UNet or VAE decoder call (`call`: "unet" or "vae") of `batch` latents:
    what the memory policy halves (docs/cost-model.md §7)."""

    def __init__(self, error: torch.OutOfMemoryError, call: str, batch: int):
        super().__init__(str(error))
        self.call = call
        self.batch = batch
