"""float16 and quantized pipelines: finite, and close to float32.

Tolerances (pixels in [0, 1], against the float32 pipeline on the same noise):
float16 0.01 max abs; quantized (4-bit text encoders, 8-bit UNet) 0.02 mean abs,
since 4-bit text encoders move the conditioning noticeably."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from stable_diffusion import StableDiffusion, fast_cpu
from tests.helpers import FIXTURES


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


def test_float16_and_quantized_weights_compute_in_float32_on_the_cpu(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("MLX's quantized matmul ran on the CPU (~90x slower)")

    monkeypatch.setattr(mx, "quantized_matmul", refuse)
    sd = StableDiffusion(str(FIXTURES / "models" / "tiny-sdxl"), float16=True, quantize=True)
    assert sd.unet.conv_in.weight.dtype == mx.float16
    with fast_cpu():
        context, pooled = sd._encode_texts(["a red sign"], 1)
    assert context.dtype == pooled.dtype == mx.float32
    unet_inputs = []

    class Spy(type(sd.unet)):
        def __call__(self, *args):
            unet_inputs.append([a.dtype for a in args if isinstance(a, mx.array)])
            return super().__call__(*args)

    sd.unet.__class__ = Spy
    with fast_cpu():
        for x in sd.generate_latents("a red sign", num_steps=1, cfg_weight=5.0, seed=7):
            mx.eval(x)
        assert unet_inputs == [[mx.float32] * 5]
        assert sd.decode(x).dtype == mx.float32


def test_cpu_defaults_float32_and_float16_weights_when_quantizing():
    folder = str(FIXTURES / "models" / "tiny-sd2")
    assert StableDiffusion(folder).unet.conv_in.weight.dtype == mx.float32
    quantized = StableDiffusion(folder, quantize=True)
    assert quantized.unet.conv_in.weight.dtype == mx.float16
    assert StableDiffusion(folder, float16=False, quantize=True).dtype == mx.float32
