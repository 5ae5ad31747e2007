"""The errors the engine reports to its callers: bad input, and numbers that went wrong."""


class InputError(ValueError):
    """A request input is missing, unreadable or out of its allowed range; the message names it."""

    def __init__(self, input_name: str, message: str):
        super().__init__(f"{input_name}: {message}")
        self.input_name = input_name


class NonFiniteError(RuntimeError):
    """A latent or image holds NaN or infinity, so the result would be garbage (often a black image)."""


class ModelError(RuntimeError):
    """The model, or a PNP_* setting of how to run it, is unusable; the message says what to do."""
