"""float16 and quantized pipelines: finite, and close to float32.

Tolerances (pixels in [0, 1], against the float32 pipeline on the same noise):
float16 0.01 max abs; quantized (4-bit text encoders, 8-bit UNet) 0.02 mean abs,
since 4-bit text encoders move the conditioning noticeably."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from stable_diffusion import StableDiffusion
from tests.conftest import FIXTURES


def image(sd: StableDiffusion) -> np.ndarray:
    for x in sd.generate_latents("a red sign", num_steps=3, cfg_weight=5.0, seed=7):
        mx.eval(x)
    return np.array(sd.decode(x))


@pytest.fixture(scope="module", params=["tiny-sd2", "tiny-sdxl"])
def float32_image(request):
    folder = str(FIXTURES / "models" / request.param)
    return folder, image(StableDiffusion(folder, float16=False))


def test_float16_is_finite_and_close_to_float32(float32_image):
    folder, reference = float32_image
    sd = StableDiffusion(folder, float16=True)
    assert sd.unet.conv_in.weight.dtype == mx.float16
    result = image(sd)
    assert np.isfinite(result).all()
    assert np.abs(result - reference).max() < 0.01


def test_quantized_model_generates_finite_close_output(float32_image):
    folder, reference = float32_image
    sd = StableDiffusion(folder, float16=False, quantize=True)
    quantized = [m for _, m in sd.unet.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert quantized and all(m.bits == 8 for m in quantized)
    encoder_layers = [
        m for _, m in sd.text_encoders[0].named_modules() if isinstance(m, nn.QuantizedLinear)
    ]
    assert encoder_layers and all(m.bits == 4 for m in encoder_layers)
    result = image(sd)
    assert np.isfinite(result).all()
    assert np.abs(result - reference).mean() < 0.02
