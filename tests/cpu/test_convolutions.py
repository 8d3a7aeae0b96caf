"""The CPU's convolution paths (shifted matmuls for 3x3 convolutions on large images,
Winograd for wide ones, the 2x upsampling convolution computed on the small image) against a
float64 convolution in numpy."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from stable_diffusion import fast_cpu
from stable_diffusion.cpu import layers as cpu_layers
from stable_diffusion.cpu import winograd
from stable_diffusion.models import layers


def conv3x3_float64(image: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """NHWC image, (out, 3, 3, in) weight, padding 1, stride 1."""
    image = np.asarray(image, np.float64)
    weight = np.asarray(weight, np.float64)
    height, width = image.shape[1:3]
    padded = np.pad(image, [(0, 0), (1, 1), (1, 1), (0, 0)])
    out = np.zeros((*image.shape[:3], weight.shape[0]))
    for dy in range(3):
        for dx in range(3):
            out += padded[:, dy : dy + height, dx : dx + width] @ weight[:, dy, dx].T
    return out + bias


def random_conv(rng: np.random.Generator, channels: int, out_channels: int, dtype=mx.float32):
    weight = rng.standard_normal((out_channels, 3, 3, channels)).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    return mx.array(weight).astype(dtype), mx.array(bias).astype(dtype)


def upsample(
    monkeypatch,
    shape: tuple[int, ...],
    weight_dtype: mx.Dtype,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """An upsampler's output on a random image, the float64 convolution of the image
    upsampled, and whether the convolution ran on the small image."""
    computed_on_small_image = []
    small_image_path = cpu_layers._upsample2x_conv3x3
    monkeypatch.setattr(
        cpu_layers,
        "_upsample2x_conv3x3",
        lambda *a: computed_on_small_image.append(1) or small_image_path(*a),
    )
    rng = np.random.default_rng(0)
    upsample = layers.Upsample2D(shape[-1])
    upsample.conv.weight, upsample.conv.bias = random_conv(rng, shape[-1], shape[-1], weight_dtype)
    x = rng.standard_normal(shape).astype(np.float32)
    with mx.stream(mx.cpu), fast_cpu(upsample):
        out = np.array(upsample(mx.array(x)))
    upsampled = x.repeat(2, axis=1).repeat(2, axis=2)
    expected = conv3x3_float64(
        upsampled,
        np.array(upsample.conv.weight.astype(mx.float32)),
        np.array(upsample.conv.bias.astype(mx.float32)),
    )
    assert out.shape == expected.shape
    return out, expected, bool(computed_on_small_image)


@pytest.mark.parametrize("weight_dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 5, 7, 6), (1, 16, 9, 8)])
@pytest.mark.parametrize("on_small_image", [True, False])  # False: MLX's convolution
def test_upsampling_convolution_matches_float64(monkeypatch, shape, weight_dtype, on_small_image):
    monkeypatch.setattr(cpu_layers, "_UPSAMPLED_CONV_MIN_PIXELS", 1 if on_small_image else 10**9)
    out, expected, computed_on_small_image = upsample(monkeypatch, shape, weight_dtype)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert computed_on_small_image == on_small_image


@pytest.mark.parametrize(
    ("weight_dtype", "max_pixels", "by_winograd"),
    [
        (mx.float32, 10 * 14, True),
        (mx.float16, 10 * 14, False),  # float16 weights: no Winograd
        (mx.float32, 10 * 14 - 1, False),  # an upsampled image above the limit
    ],
)
def test_upsampling_convolution_by_winograd_where_it_applies(
    winograd_everywhere, monkeypatch, weight_dtype, max_pixels, by_winograd
):
    """Where the upsampler's convolution runs by Winograd, on upsampled images up to the
    limit, it runs on the upsampled image (fewer multiply-adds than on the small one);
    otherwise on the small image."""
    monkeypatch.setattr(cpu_layers, "_UPSAMPLED_CONV_MIN_PIXELS", 1)
    monkeypatch.setattr(cpu_layers, "_UPSAMPLED_WINOGRAD_MAX_PIXELS", max_pixels)
    shape = (2, 5, 7, 6)
    out, expected, computed_on_small_image = upsample(monkeypatch, shape, weight_dtype)
    if by_winograd:
        assert_winograd_close(out, expected)
    else:
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert computed_on_small_image != by_winograd
    assert winograd_everywhere == ([(2, 10, 14, 6)] if by_winograd else [])


@pytest.mark.parametrize("weight_dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_pointwise_convolution_matches_float64(monkeypatch, weight_dtype, with_bias):
    """1x1 convolutions on the CPU run as one matmul, not by MLX's convolution."""
    monkeypatch.setattr(nn.Conv2d, "__call__", lambda *_: pytest.fail("MLX's convolution ran"))
    rng = np.random.default_rng(7)
    conv = layers.Conv2d(6, 5, 1, bias=with_bias)
    weight = rng.standard_normal((5, 1, 1, 6)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32) if with_bias else np.zeros(5, np.float32)
    conv.weight = mx.array(weight).astype(weight_dtype)
    if with_bias:
        conv.bias = mx.array(bias).astype(weight_dtype)
    x = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
    with mx.stream(mx.cpu), fast_cpu(conv):
        out = np.array(conv(mx.array(x)))
    stored = np.array(conv.weight.astype(mx.float32))[:, 0, 0]
    stored_bias = np.array(conv.bias.astype(mx.float32)) if with_bias else 0
    expected = x.astype(np.float64) @ stored.T.astype(np.float64) + stored_bias
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_shifted_convolution_on_large_images_matches_float64(monkeypatch):
    rng = np.random.default_rng(1)
    conv = layers.Conv2d(4, 5, 3, padding=1)
    conv.weight, conv.bias = random_conv(rng, 4, 5)
    x = rng.standard_normal((2, 64, 80, 4)).astype(np.float32)  # above the shifted threshold
    assert cpu_layers._SHIFTED_CONV_MIN_PIXELS <= 64 * 80
    shifted = cpu_layers._conv3x3_shifted
    monkeypatch.setattr(cpu_layers, "_conv3x3_shifted", lambda *a: ran.append(1) or shifted(*a))
    ran = []
    with mx.stream(mx.cpu), fast_cpu(conv):
        out = np.array(conv(mx.array(x)))
    assert ran == [1]
    expected = conv3x3_float64(x, np.array(conv.weight), np.array(conv.bias))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algorithm", [winograd.F2, winograd.F4], ids=lambda a: a.name)
def test_winograd_matrices_are_exact(algorithm):
    """In exact arithmetic, A^T [(G g) * (B^T d)] is the 1-D correlation of any tile d with
    any kernel g: for each output i, kernel tap k and input position s, the transforms
    combine d[s] g[k] exactly when s = i + k."""
    output, kernel, input_ = algorithm.output, algorithm.kernel, algorithm.input
    assert (len(output), len(kernel), len(input_)) == (
        algorithm.output_tile,
        algorithm.input_tile,
        algorithm.input_tile,
    )
    for i in range(algorithm.output_tile):
        for k in range(3):
            for s in range(algorithm.input_tile):
                weight = sum(
                    output[i][j] * kernel[j][k] * input_[j][s] for j in range(algorithm.input_tile)
                )
                assert weight == (1 if s == i + k else 0), (i, k, s)


def assert_winograd_close(out: np.ndarray, expected: np.ndarray) -> None:
    """F(4x4, 3x3) rounds to ~5e-6 of the output's scale, F(2x2, 3x3) to ~8e-7
    (`winograd.py`)."""
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() <= 2e-5 * np.abs(expected).max()


# Sides that are multiples of the output tiles (2x2, 4x4) and sides that are not (padded).
@pytest.mark.parametrize("shape", [(1, 2, 2, 3), (2, 8, 12, 4), (1, 16, 18, 5), (1, 5, 7, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_winograd_convolution_matches_float64(winograd_everywhere, shape, with_bias):
    rng = np.random.default_rng(2)
    conv = layers.Conv2d(shape[-1], 7, 3, padding=1, bias=with_bias)
    conv.weight, bias = random_conv(rng, shape[-1], 7)
    if with_bias:
        conv.bias = bias
    x = rng.standard_normal(shape).astype(np.float32)
    with mx.stream(mx.cpu), fast_cpu(conv):
        out = np.array(conv(mx.array(x)))
    expected = conv3x3_float64(x, np.array(conv.weight), np.array(bias) if with_bias else 0)
    assert_winograd_close(out, expected)
    assert winograd_everywhere == [shape]


@pytest.mark.parametrize(("side", "algorithm"), [(32, winograd.F4), (16, winograd.F2)])
def test_winograd_on_wide_channels_matches_float64(side, algorithm):
    """At the real thresholds, on as many channels as the UNets' and VAEs' layers sum."""
    rng = np.random.default_rng(4)
    channels = cpu_layers._WINOGRAD_MIN_CHANNELS
    conv = layers.Conv2d(channels, channels, 3, padding=1)
    conv.weight, conv.bias = random_conv(rng, channels, channels)
    conv.weight = conv.weight / math.sqrt(9 * channels)
    x = rng.standard_normal((1, side, side + 4, channels)).astype(np.float32)
    with mx.stream(mx.cpu), fast_cpu(conv):
        assert conv._winograd_algorithm(mx.array(x)) is algorithm
        out = np.array(conv(mx.array(x)))
    assert_winograd_close(out, conv3x3_float64(x, np.array(conv.weight), np.array(conv.bias)))


@pytest.fixture
def transforms(monkeypatch) -> list[int]:
    """One entry per Winograd kernel made."""
    made = []
    transform = winograd.transform_kernel
    monkeypatch.setattr(
        winograd, "transform_kernel", lambda w, algorithm: made.append(1) or transform(w, algorithm)
    )
    return made


def test_winograd_kernel_follows_a_replaced_weight(winograd_everywhere, transforms):
    """The transformed kernel is kept from its second call on, and made again when the
    weight is replaced, as merging a LoRA does."""
    rng = np.random.default_rng(3)
    conv = layers.Conv2d(4, 5, 3, padding=1)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    with mx.stream(mx.cpu), fast_cpu(conv):
        for _ in range(2):
            conv.weight, conv.bias = random_conv(rng, 4, 5)
            for _ in range(3):
                out = np.array(conv(mx.array(x)))
                expected = conv3x3_float64(x, np.array(conv.weight), np.array(conv.bias))
                assert_winograd_close(out, expected)
    assert len(transforms) == 4  # two per weight: its first call's, and the kept one
    assert len(winograd_everywhere) == 6


def test_winograd_kernels_live_as_long_as_the_fast_cpu_block(monkeypatch, transforms):
    """Each `fast_cpu()` block keeps a layer's kernel from its second call and frees it at
    its end; outside a block the convolution is MLX's and keeps nothing."""
    monkeypatch.setattr(cpu_layers, "_WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(cpu_layers, "_WINOGRAD_MIN_PIXELS", 1)
    rng = np.random.default_rng(5)
    conv = layers.Conv2d(4, 5, 3, padding=1)
    conv.weight, conv.bias = random_conv(rng, 4, 5)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    expected = conv3x3_float64(x, np.array(conv.weight), np.array(conv.bias))
    with mx.stream(mx.cpu):
        for _ in range(2):
            with fast_cpu(conv):
                for _ in range(3):
                    assert_winograd_close(np.array(conv(mx.array(x))), expected)
        np.testing.assert_allclose(np.array(conv(mx.array(x))), expected, rtol=1e-5, atol=1e-5)
    assert len(transforms) == 4


def test_winograd_kernel_follows_the_image_size(monkeypatch, transforms):
    """A layer that convolves images on both sides of the F(4x4) threshold in one block
    keeps the kernel of the algorithm its image takes."""
    monkeypatch.setattr(cpu_layers, "_WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(cpu_layers, "_WINOGRAD_MIN_PIXELS", 1)
    monkeypatch.setattr(cpu_layers, "_WINOGRAD_F4_MIN_PIXELS", 8 * 8)
    rng = np.random.default_rng(6)
    conv = layers.Conv2d(4, 5, 3, padding=1)
    conv.weight, conv.bias = random_conv(rng, 4, 5)
    with mx.stream(mx.cpu), fast_cpu(conv):
        for side in (4, 8, 8, 8, 4):
            x = rng.standard_normal((1, side, side, 4)).astype(np.float32)
            expected = conv3x3_float64(x, np.array(conv.weight), np.array(conv.bias))
            assert_winograd_close(np.array(conv(mx.array(x))), expected)
    # F(2x2) once, F(4x4) at its first two calls (the third reuses it), F(2x2) again.
    assert len(transforms) == 4


@pytest.mark.parametrize(
    ("case", "side", "channels_short", "algorithm"),
    [
        ("large image", 32, 0, winograd.F4),
        ("16x16 latents", 16, 0, winograd.F2),
        ("float16 weight", 32, 0, None),
        ("few channels", 32, 1, None),
        ("8x8 latents", 8, 0, None),
    ],
)
def test_winograd_only_where_it_pays(case, side, channels_short, algorithm):
    """float16 weights (a float32 kernel would double their memory) take the other paths;
    so do the convolutions the thresholds leave out."""
    channels = cpu_layers._WINOGRAD_MIN_CHANNELS
    shape = (1, side, side, channels - channels_short)
    conv = layers.Conv2d(shape[-1], channels, 3, padding=1)
    if case == "float16 weight":
        conv.weight = conv.weight.astype(mx.float16)
    with fast_cpu(conv):
        assert conv._winograd_algorithm(mx.zeros(shape)) is algorithm
