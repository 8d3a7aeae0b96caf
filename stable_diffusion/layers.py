"""Building blocks shared by the UNet, the VAE and the text encoders.

Images are NHWC (MLX convolutions are channels-last). Attribute names mirror
diffusers' module names so that a diffusers state dict maps onto these modules
key for key (see `weights/diffusers.py`).

On the CPU, MLX evaluates exp, erf and sigmoid one element at a time (about
50 million per second here, 20x slower than a vectorized loop), which made
softmax, GELU and SiLU cost more than all the matmuls of a UNet step. The CPU
paths below avoid them: activations are rational approximations fused by
`mx.compile` into one loop (GELU 2-6x faster than MLX's), and within `fast_cpu()`
attention and the SiLU after group norms run in numpy (`cpu_kernels.py`). GPUs
keep MLX's own kernels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from . import cpu_kernels, winograd


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def compute_dtype(weight_dtype: mx.Dtype) -> mx.Dtype:
    """The activations' dtype for weights stored in `weight_dtype`. On the CPU it is
    float32 whatever the weights: float16 matmuls miss the optimized BLAS there (about 50x
    slower), so float16 and quantized weights only save memory and are converted as each
    layer runs (the matmuls promote them)."""
    return mx.float32 if on_cpu() else weight_dtype


# -- activations ----------------------------------------------------------------------------
#
# Rational approximations (the coefficients of Eigen's float tanh and erf): max abs error
# 4e-7 against float64, as exact as MLX's own float32 kernels for the tests' tolerances.

_TANH_CLAMP = 7.90531110763549805  # tanh rounds to +-1 in float32 beyond this
_TANH_NUMERATOR = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                   5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                   4.89352455891786e-03)
_TANH_DENOMINATOR = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
                     4.89352518554385e-03)
_ERF_NUMERATOR = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
                  -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
                  -1.60960333262415e-02)
_ERF_DENOMINATOR = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
                    -7.37332916720468e-03, -1.42647390514189e-02)


def _polynomial(x: mx.array, coefficients: tuple[float, ...]) -> mx.array:
    """Horner's rule, highest power first."""
    result = coefficients[0]
    for c in coefficients[1:]:
        result = result * x + c
    return result


def _odd_rational(x: mx.array, numerator: tuple[float, ...],
                  denominator: tuple[float, ...]) -> mx.array:
    x2 = x * x
    return x * _polynomial(x2, numerator) / _polynomial(x2, denominator)


def _sigmoid_rational(x: mx.array) -> mx.array:
    half = mx.clip(0.5 * x, -_TANH_CLAMP, _TANH_CLAMP)
    return 0.5 + 0.5 * _odd_rational(half, _TANH_NUMERATOR, _TANH_DENOMINATOR)


@partial(mx.compile, shapeless=True)
def _silu_cpu(x: mx.array) -> mx.array:
    return x * _sigmoid_rational(x)


@partial(mx.compile, shapeless=True)
def _gelu_cpu(x: mx.array) -> mx.array:
    # erf rounds to +-1 in float32 beyond 4.
    scaled = mx.clip(x * (1 / math.sqrt(2)), -4.0, 4.0)
    return 0.5 * x * (1 + _odd_rational(scaled, _ERF_NUMERATOR, _ERF_DENOMINATOR))


@partial(mx.compile, shapeless=True)
def _quick_gelu_cpu(x: mx.array) -> mx.array:
    return x * _sigmoid_rational(1.702 * x)


@mx.compile
def geglu_cpu(hidden: mx.array, gate: mx.array, hidden_bias: mx.array,
              gate_bias: mx.array) -> mx.array:
    """(hidden + hidden_bias) * gelu(gate + gate_bias) in one fused pass, for the CPU."""
    return (hidden + hidden_bias) * _gelu_cpu(gate + gate_bias)


def silu(x: mx.array) -> mx.array:
    return _silu_cpu(x) if on_cpu() else nn.silu(x)


def gelu(x: mx.array) -> mx.array:
    """The exact (erf) GELU."""
    return _gelu_cpu(x) if on_cpu() else nn.gelu(x)


def quick_gelu(x: mx.array) -> mx.array:
    return _quick_gelu_cpu(x) if on_cpu() else x * mx.sigmoid(1.702 * x)


# -- group norm -----------------------------------------------------------------------------


@mx.compile
def _normalize(x: mx.array, mean: mx.array, scale: mx.array, bias: mx.array) -> mx.array:
    return (x - mean) * scale + bias


@mx.compile
def _normalize_silu(x: mx.array, mean: mx.array, scale: mx.array, bias: mx.array) -> mx.array:
    return _silu_cpu((x - mean) * scale + bias)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm; in numpy on all cores within `fast_cpu()` (float32 activations)."""

    def __call__(self, x: mx.array) -> mx.array:
        if cpu_kernels.enabled() and x.dtype == mx.float32:
            return cpu_kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return super().__call__(x)


class GroupNorm(nn.GroupNorm):
    """PyTorch-compatible group norm over NHWC images, optionally followed by SiLU.

    On the CPU, MLX's version transposes the image twice to gather each group; here the
    statistics come from per-channel sums over the pixels (the image stays in place) and
    one fused pass normalizes, scales and applies the SiLU: about 5x faster."""

    def __init__(self, groups: int, dims: int, eps: float):
        super().__init__(groups, dims, eps=eps, pytorch_compatible=True)

    def __call__(self, x: mx.array, silu_after: bool = False) -> mx.array:
        if not on_cpu():
            x = super().__call__(x)
            return nn.silu(x) if silu_after else x
        shape, channels = x.shape, x.shape[-1]
        group_size = channels // self.num_groups
        pixels = x.reshape(shape[0], -1, channels)
        count = pixels.shape[1] * group_size

        def per_channel(group_values: mx.array) -> mx.array:
            return mx.repeat(group_values, group_size, axis=1)[:, None, :]

        def group_sums(values: mx.array) -> mx.array:
            sums = values.astype(mx.float32).sum(axis=1)
            return sums.reshape(shape[0], self.num_groups, group_size).sum(axis=-1)

        # Two passes (mean, then centred squares): E[x^2] - E[x]^2 cancels badly.
        mean = per_channel(group_sums(pixels) / count)
        variance = per_channel(group_sums(mx.square(pixels - mean)) / count)
        scale = mx.rsqrt(variance + self.eps) * self.weight
        dtype = x.dtype
        mean, scale = mean.astype(dtype), scale.astype(dtype)
        if silu_after and cpu_kernels.enabled():
            return cpu_kernels.silu_(_normalize(pixels, mean, scale, self.bias)).reshape(shape)
        normalize = _normalize_silu if silu_after else _normalize
        return normalize(pixels, mean, scale, self.bias).reshape(shape)


# -- attention ------------------------------------------------------------------------------


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int,
              causal: bool = False) -> mx.array:
    """Multi-head attention over (B, L, heads * dim) inputs; lazy unless inside
    `fast_cpu()` on a CPU."""
    if cpu_kernels.enabled():
        return cpu_kernels.attention(q, k, v, heads, causal)
    batch, q_len, width = q.shape
    dim = width // heads
    q, k, v = (x.reshape(batch, -1, heads, dim).transpose(0, 2, 1, 3) for x in (q, k, v))
    # A "causal" mask instead of an additive -inf matrix: no NaN in float16.
    out = mx.fast.scaled_dot_product_attention(
        q, k, v, scale=1 / math.sqrt(dim), mask="causal" if causal else None
    )
    return out.transpose(0, 2, 1, 3).reshape(batch, q_len, width)


# -- linear and convolution -----------------------------------------------------------------


class Linear(nn.Linear):
    """nn.Linear; on the CPU the bias is added after the matmul, because MLX's addmm there
    first copies the broadcast bias into the output: 10-25% slower on the UNet's shapes."""

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self and on_cpu():
            return x @ self.weight.T + self.bias
        return super().__call__(x)

    def to_quantized(self, group_size: int | None = None, bits: int | None = None,
                     mode: str = "affine") -> QuantizedLinear:
        """What `nn.quantize` turns this layer into."""
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


@mx.compile
def _affine(quantized: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    return quantized.astype(mx.float32) * scales + biases


def _dequantize_cpu(layer: nn.QuantizedLinear) -> mx.array:
    """The float32 weight of a 4- or 8-bit affine-quantized layer, in one fused pass over
    its bytes: on the CPU 3-15x faster than mx.dequantize (which computes in the scales'
    float16 there), and exact."""
    if layer.mode != "affine" or layer.bits not in (4, 8):
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"),
                             group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    rows = layer.weight.shape[0]
    packed = mx.view(layer.weight, mx.uint8)  # little-endian: the first element lowest
    if layer.bits == 4:
        packed = mx.stack([packed & 15, packed >> 4], axis=-1)
    quantized = packed.reshape(rows, -1, layer.group_size)
    scales, biases = (a.astype(mx.float32)[..., None] for a in (layer.scales, layer.biases))
    return _affine(quantized, scales, biases).reshape(rows, -1)


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear; on the CPU, where MLX's quantized matmul runs at about 2 GFLOP/s,
    the weight is dequantized as the layer runs (a float32 copy freed after the matmul) and
    multiplied by the optimized BLAS: about 90x faster, with the same memory at rest."""

    def __call__(self, x: mx.array) -> mx.array:
        if not on_cpu():
            return super().__call__(x)
        y = x @ _dequantize_cpu(self).T
        return y + self.bias if "bias" in self else y


# Pixels from which a 3x3 convolution on the CPU runs as shifted matmuls: 1.5x faster than
# MLX's own on 64x64 latents, 10x on the UNet's 320-to-4 output convolution, up to 2x on the
# VAE's images; on smaller images MLX's is as fast or faster.
_SHIFTED_CONV_MIN_PIXELS = 64 * 64


def _padded_rows(x: mx.array) -> mx.array:
    """x zero-padded by one pixel (two at the bottom: the extra row keeps the last taps'
    slices in bounds), flattened to (batch, pixels, channels) with rows of `width + 2`."""
    return mx.pad(x, [(0, 0), (1, 2), (1, 1), (0, 0)]).reshape(x.shape[0], -1, x.shape[-1])


def _shifted_matmuls(padded: mx.array, height: int, width: int,
                     taps: Iterable[tuple[int, int, mx.array]]) -> mx.array:
    """The sum over `taps` (dy, dx, (out, in) weight) of the image shifted by (dy - 1,
    dx - 1) times the weight, from `_padded_rows` of a (batch, height, width, in) image.

    In the flattened padded image the pixels under one tap for all outputs form one
    contiguous slice, so each tap is a matmul over a view (accumulated with addmm), with no
    im2col copy (nine times the image) as MLX's CPU convolution makes. The outputs of the
    two padding columns are computed too and dropped at the end."""
    row = width + 2
    out = None
    for dy, dx, weight in taps:
        view = padded[:, dy * row + dx:dy * row + dx + height * row]
        out = view @ weight.T if out is None else mx.addmm(out, view, weight.T)
    return out.reshape(padded.shape[0], height, row, -1)[:, :, :width]


def _conv3x3_shifted(x: mx.array, weight: mx.array) -> mx.array:
    """A 3x3, stride-1, padding-1 convolution as nine shifted matmuls."""
    taps = [(dy, dx, weight[:, dy, dx]) for dy in range(3) for dx in range(3)]
    return _shifted_matmuls(_padded_rows(x), x.shape[1], x.shape[2], taps)


# Where a 3x3 convolution on the CPU runs by Winograd (`winograd.py`), within `fast_cpu()`:
# both channel counts at least `_WINOGRAD_MIN_CHANNELS`; F(4x4, 3x3) on images of at least
# `_WINOGRAD_F4_MIN_PIXELS`, F(2x2, 3x3) on smaller ones of at least `_WINOGRAD_MIN_PIXELS`.
# Per layer, against the shifted matmuls: F(4x4) 1.9-2.7x faster on the UNets' 64x64 and
# 32x32 latents (320 and 640 channels) and the VAE's 64x64 and 128x128 images (512
# channels), 1.2-1.5x on the VAE's 256x256 ones (256 channels); F(2x2) 1.7-1.9x on the
# 16x16 latents' 1280 channels, where it is as fast as F(4x4) (which is faster at batch 2,
# slower at batch 1) for less than half of its kernels' memory: 1.2 GiB for SD 1.5's UNet
# in float32, on top of F(4x4)'s 0.9 GiB. Left out: the VAE's 128 channels (no faster), and
# the 8x8 latents (1.1-1.4x, for another 1.7 GiB of kernels).
_WINOGRAD_MIN_CHANNELS = 256
_WINOGRAD_MIN_PIXELS = 16 * 16
_WINOGRAD_F4_MIN_PIXELS = 32 * 32


class Conv2d(nn.Conv2d):
    def _winograd_kernel(self, algorithm: winograd.Algorithm) -> mx.array:
        """The weight's Winograd transform, made at the layer's first call in a `fast_cpu()`
        block and kept until the block ends: 16/9 or 4 times the weight's size, too much to
        keep for good; making it at every call would cost more than the convolution saves."""
        return cpu_kernels.kept(self, (self.weight, algorithm),
                                lambda: winograd.transform_kernel(self.weight, algorithm))

    def _winograd_algorithm(self, x: mx.array) -> winograd.Algorithm | None:
        """For a float32 image (checked by the caller) that `__call__` convolves 3x3: the
        Winograd algorithm to run, if any."""
        out_channels, _, _, in_channels = self.weight.shape
        pixels = x.shape[1] * x.shape[2]
        if (self.weight.dtype != mx.float32
                or min(in_channels, out_channels) < _WINOGRAD_MIN_CHANNELS
                or pixels < _WINOGRAD_MIN_PIXELS):
            return None
        return winograd.F4 if pixels >= _WINOGRAD_F4_MIN_PIXELS else winograd.F2

    def __call__(self, x: mx.array) -> mx.array:
        if not (on_cpu() and x.dtype == mx.float32 and self.stride == (1, 1)):
            return super().__call__(x)
        shape = self.weight.shape[1:3], self.padding
        if shape == ((1, 1), (0, 0)):
            # MLX's CPU convolution runs a 1x1 kernel 1.1-2.7x slower than the same matmul,
            # with more memory (batch 2 of 64x64 latents, 960 -> 320 channels: 58 ms
            # against 29; the VAE's 512x512 shortcut in a decode: 297 ms against 114).
            return self._with_bias(x @ self.weight.reshape(self.weight.shape[0], -1).T)
        if shape == ((3, 3), (1, 1)):
            algorithm = self._winograd_algorithm(x) if cpu_kernels.enabled() else None
            if algorithm is not None:
                return winograd.conv3x3(x, self._winograd_kernel(algorithm), self.get("bias"),
                                        algorithm)
            if x.shape[1] * x.shape[2] >= _SHIFTED_CONV_MIN_PIXELS:
                return self._with_bias(_conv3x3_shifted(x, self.weight))
        return super().__call__(x)

    def _with_bias(self, y: mx.array) -> mx.array:
        return y + self.bias if "bias" in self else y


# -- blocks ---------------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int,
        eps: float,
        temb_channels: int | None = None,
    ):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array, temb: mx.array | None = None) -> mx.array:
        h = self.conv1(self.norm1(x, silu_after=True))
        if temb is not None:
            h = h + self.time_emb_proj(silu(temb))[:, None, None, :]
        h = self.conv2(self.norm2(h, silu_after=True))
        shortcut = self.conv_shortcut(x) if "conv_shortcut" in self else x
        return shortcut + h


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        # The VAE encoder pads only right/bottom (padding=0 plus a manual pad).
        self.asymmetric = padding == 0
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def __call__(self, x: mx.array) -> mx.array:
        if self.asymmetric:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


# Input pixels from which the upsampling convolution runs on the small image: below, summing
# the kernel's taps (16 weight-sized sums per call) costs more than the work it saves (at
# 8x8x1280: 58 ms against MLX's 43; from 16x16, 1.35-2.1x faster).
_UPSAMPLED_CONV_MIN_PIXELS = 16 * 16
# Upsampled pixels up to which a convolution that runs by Winograd runs on the upsampled
# image: F(4x4, 3x3) takes 9 multiply-adds per small-image pixel and channel pair, not 16
# (the UNets' upsamplers, batch 2: 16x16 -> 32x32 x 1280 in 104 ms, not 197; 64x64 ->
# 128x128 x 640 in 443 ms, not 588). The VAE's larger ones gained 0-19% per layer, too
# little to see in a decode, and raised a 512px decode's peak by 0.5-2.5 GiB.
_UPSAMPLED_WINOGRAD_MAX_PIXELS = 128 * 128
# For each output row (column) parity, the padded input rows (columns) that a 3x3 kernel
# after nearest 2x upsampling reads, with the kernel rows (columns) that land on each.
_UPSAMPLED_TAPS = (((0, (0,)), (1, (1, 2))), ((1, (0, 1)), (2, (2,))))


def _upsample2x_conv3x3(x: mx.array, weight: mx.array) -> mx.array:
    """conv3x3(nearest 2x upsampling of x), padding 1, computed on x itself.

    Each output pixel of parity (row, column) = (a, b) reads 3x3 upsampled pixels that are
    copies of only 2x2 input pixels; so each parity is a 2x2 convolution of x whose taps sum
    the kernel entries landing on the same input pixel, run as shifted matmuls (see
    `_shifted_matmuls`): 16 instead of 36 multiply-adds per input pixel and channel pair,
    and no upsampled copy of the image."""
    batch, height, width, _ = x.shape
    padded = _padded_rows(x)
    weight = weight.astype(x.dtype)  # sums of float16 entries would round twice
    parities = [
        _shifted_matmuls(padded, height, width, [
            (dy, dx, sum(weight[:, ky, kx] for ky in kernel_rows for kx in kernel_columns))
            for dy, kernel_rows in row_taps for dx, kernel_columns in column_taps])
        for row_taps in _UPSAMPLED_TAPS for column_taps in _UPSAMPLED_TAPS]
    # (a, b, batch, y, x, c) -> (batch, 2y + a, 2x + b, c)
    out = mx.stack(parities).reshape(2, 2, batch, height, width, -1)
    return out.transpose(2, 3, 0, 4, 1, 5).reshape(batch, 2 * height, 2 * width, -1)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, channels = x.shape
        upsampled = mx.broadcast_to(x[:, :, None, :, None, :],
                                    (batch, height, 2, width, 2, channels))
        upsampled = upsampled.reshape(batch, height * 2, width * 2, channels)
        if (on_cpu() and x.dtype == mx.float32 and height * width >= _UPSAMPLED_CONV_MIN_PIXELS
                and not self._by_winograd(upsampled)):
            return _upsample2x_conv3x3(x, self.conv.weight) + self.conv.bias
        return self.conv(upsampled)

    def _by_winograd(self, upsampled: mx.array) -> bool:
        """For a float32 image: whether the convolution runs by Winograd on the upsampled
        image (see `_UPSAMPLED_WINOGRAD_MAX_PIXELS`)."""
        return (cpu_kernels.enabled()
                and upsampled.shape[1] * upsampled.shape[2] <= _UPSAMPLED_WINOGRAD_MAX_PIXELS
                and self.conv._winograd_algorithm(upsampled) is not None)
