"""The CPU's convolution paths (shifted matmuls for 3x3 convolutions on large images, the
2x upsampling convolution computed on the small image) against a float64 convolution in
numpy."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion import layers


def conv3x3_float64(image: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """NHWC image, (out, 3, 3, in) weight, padding 1, stride 1."""
    image = np.asarray(image, np.float64)
    weight = np.asarray(weight, np.float64)
    height, width = image.shape[1:3]
    padded = np.pad(image, [(0, 0), (1, 1), (1, 1), (0, 0)])
    out = np.zeros((*image.shape[:3], weight.shape[0]))
    for dy in range(3):
        for dx in range(3):
            out += padded[:, dy:dy + height, dx:dx + width] @ weight[:, dy, dx].T
    return out + bias


def random_conv(rng: np.random.Generator, channels: int, out_channels: int, dtype=mx.float32):
    weight = rng.standard_normal((out_channels, 3, 3, channels)).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    return mx.array(weight).astype(dtype), mx.array(bias).astype(dtype)


@pytest.mark.parametrize("weight_dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 5, 7, 6), (1, 16, 9, 8)])
@pytest.mark.parametrize("on_small_image", [True, False])  # False: MLX's convolution
def test_upsampling_convolution_matches_float64(monkeypatch, shape, weight_dtype,
                                                on_small_image):
    monkeypatch.setattr(layers, "_UPSAMPLED_CONV_MIN_PIXELS", 1 if on_small_image else 10**9)
    computed_on_small_image = []
    small_image_path = layers._upsample2x_conv3x3
    monkeypatch.setattr(layers, "_upsample2x_conv3x3",
                        lambda *a: computed_on_small_image.append(1) or small_image_path(*a))
    rng = np.random.default_rng(0)
    upsample = layers.Upsample2D(shape[-1])
    upsample.conv.weight, upsample.conv.bias = random_conv(rng, shape[-1], shape[-1],
                                                           weight_dtype)
    x = rng.standard_normal(shape).astype(np.float32)
    with mx.stream(mx.cpu):
        out = np.array(upsample(mx.array(x)))
    upsampled = x.repeat(2, axis=1).repeat(2, axis=2)
    expected = conv3x3_float64(upsampled, np.array(upsample.conv.weight.astype(mx.float32)),
                               np.array(upsample.conv.bias.astype(mx.float32)))
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert bool(computed_on_small_image) == on_small_image


def test_shifted_convolution_on_large_images_matches_float64():
    rng = np.random.default_rng(1)
    conv = layers.Conv2d(4, 5, 3, padding=1)
    conv.weight, conv.bias = random_conv(rng, 4, 5)
    x = rng.standard_normal((2, 64, 80, 4)).astype(np.float32)  # above the shifted threshold
    assert layers._SHIFTED_CONV_MIN_PIXELS <= 64 * 80
    with mx.stream(mx.cpu):
        out = np.array(conv(mx.array(x)))
    expected = conv3x3_float64(x, np.array(conv.weight), np.array(conv.bias))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
