"""A Cog predictor for tests/test_http.py: the service's own, on a "GPU" that holds at most the number of
latents per UNet call written in the file that PNP_TEST_LATENT_LIMIT names ("none": no limit), raising
CUDA's out-of-memory error for larger calls, as a small GPU does."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from predict import Predictor as ServicePredictor


class Predictor(ServicePredictor):
    def setup(self) -> None:
        super().setup()
        unet = self.engine.model.injection_unet
        forward, limit_file = unet.unet_forward, Path(os.environ["PNP_TEST_LATENT_LIMIT"])

        def limited(latents: torch.Tensor, *args, **kwargs):
            limit = limit_file.read_text().strip()
            if limit != "none" and latents.shape[0] > int(limit):
                raise torch.OutOfMemoryError(f"CUDA out of memory (a call of {latents.shape[0]} latents)")
            return forward(latents, *args, **kwargs)

        unet.unet_forward = limited
