"""CPU subclasses of the models' layers, which `fast_cpu()` swaps in (`SUBCLASSES`).

On the CPU, MLX evaluates exp, erf and sigmoid one element at a time, which made softmax,
GELU and SiLU cost more than all the matmuls of a UNet step; its convolutions copy the
image nine times (im2col); its quantized matmul and float16 matmuls miss the optimized
BLAS. The subclasses avoid these: activations are rational approximations fused by
`mx.compile` into one loop, or numpy kernels on all cores (`kernels.py`); 3x3 convolutions
are shifted matmuls or Winograd's (`winograd.py`); quantized weights are dequantized as
each layer runs. Why each path and threshold was chosen, with the measurements:
docs/performance.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ..models import layers, unet
from . import kernels, onednn, winograd
from .store import kept, kept_from_second_use

# -- what oneDNN takes -----------------------------------------------------------------------


def _matmul_input_dtype() -> mx.Dtype:
    """The type in which to write an activation that only feeds matmuls or convolutions:
    bfloat16 where they compute in it, which would round it to that anyway (half the bytes,
    no conversion at each use); else float32."""
    return mx.bfloat16 if onednn.bfloat16_active() else mx.float32


def _onednn_takes(x: mx.array) -> bool:
    """Whether a matmul or convolution of `x` computes through oneDNN here: a float32 `x`
    where oneDNN is active, a bfloat16 one (`_matmul_input_dtype`) in bfloat16 blocks."""
    if x.dtype == mx.bfloat16:
        return onednn.bfloat16_active()
    return x.dtype == mx.float32 and onednn.active()


def _projection(layer: nn.Module, x: mx.array) -> mx.array:
    """layer(x), written in `_matmul_input_dtype` where oneDNN computes it: for outputs that
    only feed matmuls (attention's projections)."""
    if isinstance(layer, Linear) and _onednn_takes(x):
        return onednn.linear(
            x, layer.weight, layer.get("bias"), layer, output=_matmul_input_dtype()
        )
    return layer(x)


# -- activations ----------------------------------------------------------------------------
#
# Rational approximations (the coefficients of Eigen's float tanh and erf): max abs error
# 4e-7 against float64, as exact as MLX's own float32 kernels for the tests' tolerances.

_TANH_CLAMP = 7.90531110763549805  # tanh rounds to +-1 in float32 beyond this
_TANH_NUMERATOR = (
    -2.76076847742355e-16,
    2.00018790482477e-13,
    -8.60467152213735e-11,
    5.12229709037114e-08,
    1.48572235717979e-05,
    6.37261928875436e-04,
    4.89352455891786e-03,
)
_TANH_DENOMINATOR = (
    1.19825839466702e-06,
    1.18534705686654e-04,
    2.26843463243900e-03,
    4.89352518554385e-03,
)
_ERF_NUMERATOR = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_DENOMINATOR = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)


def _polynomial(x: mx.array, coefficients: tuple[float, ...]) -> mx.array:
    """Horner's rule, highest power first."""
    result = coefficients[0]
    for c in coefficients[1:]:
        result = result * x + c
    return result


def _odd_rational(
    x: mx.array, numerator: tuple[float, ...], denominator: tuple[float, ...]
) -> mx.array:
    x2 = x * x
    return x * _polynomial(x2, numerator) / _polynomial(x2, denominator)


def _sigmoid_rational(x: mx.array) -> mx.array:
    half = mx.clip(0.5 * x, -_TANH_CLAMP, _TANH_CLAMP)
    return 0.5 + 0.5 * _odd_rational(half, _TANH_NUMERATOR, _TANH_DENOMINATOR)


@partial(mx.compile, shapeless=True)
def gelu(x: mx.array) -> mx.array:
    """The exact (erf) GELU."""
    # erf rounds to +-1 in float32 beyond 4.
    scaled = mx.clip(x * (1 / math.sqrt(2)), -4.0, 4.0)
    return 0.5 * x * (1 + _odd_rational(scaled, _ERF_NUMERATOR, _ERF_DENOMINATOR))


@partial(mx.compile, shapeless=True)
def quick_gelu(x: mx.array) -> mx.array:
    return x * _sigmoid_rational(1.702 * x)


@mx.compile
def geglu(hidden: mx.array, gate: mx.array, hidden_bias: mx.array, gate_bias: mx.array) -> mx.array:
    """(hidden + hidden_bias) * gelu(gate + gate_bias) in one fused pass."""
    return (hidden + hidden_bias) * gelu(gate + gate_bias)


class GELU(layers.GELU):
    def __call__(self, x: mx.array) -> mx.array:
        return gelu(x)


class QuickGELU(layers.QuickGELU):
    def __call__(self, x: mx.array) -> mx.array:
        return quick_gelu(x)


class GEGLU(unet.GEGLU):
    def __call__(self, x: mx.array) -> mx.array:
        if not isinstance(self.proj, layers.Linear):  # quantized
            hidden, gate = mx.split(self.proj(x), 2, axis=-1)
            return hidden * gelu(gate)
        # One matmul per half of the weight: contiguous halves, so the biases and the
        # gating fuse into one pass instead of three over a strided split.
        biases = mx.split(self.proj.bias, 2)
        weight, half = self.proj.weight, self.proj.weight.shape[0] // 2
        if _onednn_takes(x):
            # Each half (packed in bfloat16) for an owner of its own (the projection is not
            # called here); the biases, GELU and product ride along in oneDNN's matmuls. In
            # bfloat16 the product is written in it: the next matmul's input.
            output = _matmul_input_dtype()
            gate = onednn.linear(
                x, weight, biases[1], self, slice(half, None), gelu=True, output=output
            )
            return onednn.linear(
                x, weight, biases[0], self.proj, slice(half), times=gate, output=output
            )
        hidden, gate = x @ weight[:half].T, x @ weight[half:].T
        if hidden.dtype == mx.float32:
            return kernels.geglu_(hidden, gate, *biases)
        return geglu(hidden, gate, *biases)


# -- normalization --------------------------------------------------------------------------


@mx.compile
def _normalize(x: mx.array, mean: mx.array, scale: mx.array, bias: mx.array) -> mx.array:
    return (x - mean) * scale + bias


class LayerNorm(layers.LayerNorm):
    """In numpy on all cores (float32 activations); in oneDNN where the layers compute
    there (`onednn.active()`), written in `_matmul_input_dtype` if `feeds_matmuls`."""

    def __call__(self, x: mx.array, feeds_matmuls: bool = False) -> mx.array:
        if x.dtype == mx.float32 and onednn.active():
            output = _matmul_input_dtype() if feeds_matmuls else mx.float32
            return onednn.layer_norm(x, self.weight, self.bias, self.eps, output)
        if x.dtype == mx.float32:
            return kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return super().__call__(x)


# Pixels from which group norm runs in numpy (`kernels.group_norm`): 1.2-1.4x faster on
# the VAE's 128px to 512px images, and exact to 1e-7 where MLX's float32 sums drifted to
# 3e-5; no faster on the UNets' latents (docs/performance.md), unless its normalizing pass
# runs in oneDNN (`onednn.active()`).
_NUMPY_GROUP_NORM_MIN_PIXELS = 128 * 128


class GroupNorm(layers.GroupNorm):
    """MLX's group norm transposes the image twice to gather each group; here the
    statistics come from per-channel sums over the pixels (the image stays in place) and
    one fused pass normalizes and scales, the SiLU after it in numpy; large images all in
    numpy, on all cores."""

    def __call__(self, x: mx.array, silu_after: bool = False) -> mx.array:
        large = x.shape[1] * x.shape[2] >= _NUMPY_GROUP_NORM_MIN_PIXELS
        if x.dtype == mx.float32 and (large or onednn.active()):
            return kernels.group_norm(
                x, self.num_groups, self.weight, self.bias, self.eps, silu_after
            )
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
        normalized = _normalize(pixels, mean, scale, self.bias)
        return (kernels.silu_(normalized) if silu_after else normalized).reshape(shape)


# -- attention ------------------------------------------------------------------------------


class Attention(unet.Attention):
    """In bfloat16 blocks the projections are written in bfloat16 (`_projection`), and so
    is the attention's output: they only feed matmuls."""

    def __call__(self, x: mx.array, context: mx.array | None = None) -> mx.array:
        if not onednn.bfloat16_active():
            return super().__call__(x, context)
        if context is None:
            keys, values = _projection(self.to_k, x), _projection(self.to_v, x)
        else:
            keys, values = self.context_keys_values(context)
        return self.to_out[0](layers.attention(_projection(self.to_q, x), keys, values, self.heads))

    def context_keys_values(self, context: mx.array) -> tuple[mx.array, mx.array]:
        """The text context is the same at every step: within a `fast_cpu()` block its keys
        and values are computed once."""
        return kept(
            self,
            (context, self.to_k.weight, self.to_v.weight),
            lambda: (_projection(self.to_k, context), _projection(self.to_v, context)),
        )


class BasicTransformerBlock(unet.BasicTransformerBlock):
    """The layer norms' outputs only feed matmuls (`LayerNorm`'s `feeds_matmuls`)."""

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        x = x + self.attn1(self.norm1(x, feeds_matmuls=True))
        x = x + self.attn2(self.norm2(x, feeds_matmuls=True), context)
        return x + self.ff(self.norm3(x, feeds_matmuls=True))


# -- linear ---------------------------------------------------------------------------------


class Linear(layers.Linear):
    """The bias added after the matmul: MLX's addmm on the CPU first copies the broadcast
    bias into the output, which is slower on the UNet's shapes."""

    def __call__(self, x: mx.array) -> mx.array:
        if _onednn_takes(x):
            return onednn.linear(x, self.weight, self.get("bias"), self)
        if "bias" in self:
            return x @ self.weight.T + self.bias
        return super().__call__(x)


@mx.compile
def _affine(quantized: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    return quantized.astype(mx.float32) * scales + biases


def dequantize(layer: nn.QuantizedLinear) -> mx.array:
    """The float32 weight of a 4- or 8-bit affine-quantized layer, in one fused pass over
    its bytes: faster on the CPU than mx.dequantize (which computes in the scales' float16
    there), and exact."""
    if layer.mode != "affine" or layer.bits not in (4, 8):
        return mx.dequantize(
            layer.weight,
            layer.scales,
            layer.get("biases"),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
    rows = layer.weight.shape[0]
    packed = mx.view(layer.weight, mx.uint8)  # little-endian: the first element lowest
    if layer.bits == 4:
        packed = mx.stack([packed & 15, packed >> 4], axis=-1)
    quantized = packed.reshape(rows, -1, layer.group_size)
    scales, biases = (a.astype(mx.float32)[..., None] for a in (layer.scales, layer.biases))
    return _affine(quantized, scales, biases).reshape(rows, -1)


class QuantizedLinear(layers.QuantizedLinear):
    """MLX's quantized matmul is slow on the CPU: the weight is dequantized as the layer
    runs (a float32 copy freed after the matmul) and multiplied by the optimized BLAS, with
    the same memory at rest."""

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ dequantize(self).T
        return y + self.bias if "bias" in self else y


# -- convolution ----------------------------------------------------------------------------

# Pixels from which a 3x3 convolution runs as shifted matmuls; on smaller images MLX's is
# as fast or faster.
_SHIFTED_CONV_MIN_PIXELS = 64 * 64


def _padded_rows(x: mx.array) -> mx.array:
    """x zero-padded by one pixel (two at the bottom: the extra row keeps the last taps'
    slices in bounds), flattened to (batch, pixels, channels) with rows of `width + 2`."""
    return mx.pad(x, [(0, 0), (1, 2), (1, 1), (0, 0)]).reshape(x.shape[0], -1, x.shape[-1])


def _shifted_matmuls(
    padded: mx.array, height: int, width: int, taps: Iterable[tuple[int, int, mx.array]]
) -> mx.array:
    """The sum over `taps` (dy, dx, (out, in) weight) of the image shifted by (dy - 1,
    dx - 1) times the weight, from `_padded_rows` of a (batch, height, width, in) image.

    In the flattened padded image the pixels under one tap for all outputs form one
    contiguous slice, so each tap is a matmul over a view (accumulated with addmm), with no
    im2col copy (nine times the image) as MLX's CPU convolution makes. The outputs of the
    two padding columns are computed too and dropped at the end."""
    row = width + 2
    out = None
    for dy, dx, weight in taps:
        view = padded[:, dy * row + dx : dy * row + dx + height * row]
        out = view @ weight.T if out is None else mx.addmm(out, view, weight.T)
    return out.reshape(padded.shape[0], height, row, -1)[:, :, :width]


def _conv3x3_shifted(x: mx.array, weight: mx.array) -> mx.array:
    """A 3x3, stride-1, padding-1 convolution as nine shifted matmuls."""
    taps = [(dy, dx, weight[:, dy, dx]) for dy in range(3) for dx in range(3)]
    return _shifted_matmuls(_padded_rows(x), x.shape[1], x.shape[2], taps)


# Where a 3x3 convolution runs by Winograd: both channel counts at least
# `_WINOGRAD_MIN_CHANNELS`; F(4x4, 3x3) on images of at least `_WINOGRAD_F4_MIN_PIXELS`,
# F(2x2, 3x3) on smaller ones of at least `_WINOGRAD_MIN_PIXELS`. F(4x4) is faster than the
# shifted matmuls on the UNets' 64x64 and 32x32 latents and the VAE's images; on the 16x16
# latents' 1280 channels F(2x2) is as fast for less than half of its kernels' memory. Left
# out: the VAE's 128 channels (no faster), and the 8x8 latents (a little faster, for much
# more kernel memory).
_WINOGRAD_MIN_CHANNELS = 256
_WINOGRAD_MIN_PIXELS = 16 * 16
_WINOGRAD_F4_MIN_PIXELS = 32 * 32
# Input pixels from which oneDNN's float32 convolution (`onednn.float32_by_default`) runs the
# convolutions that Winograd does not: faster there than the shifted matmuls and MLX's
# (2.7x on the VAE's 512x512 images, 1.4-1.9x on the UNets' strided and 1x1 ones); on
# smaller images the UNets' wide layers would gain a few ms for a packed copy of their
# weights (docs/performance.md).
_ONEDNN_FLOAT32_MIN_PIXELS = 64 * 64
# Pixels up to which, where oneDNN computes float32, a 3x3 stride-1 convolution runs as one
# matmul of its patches (`Conv2d._patches`): the UNets' 8x8 latents 1.6x faster than MLX's
# convolution, with no packed weight; Winograd is faster from 16x16 (docs/performance.md).
_PATCHES_MAX_PIXELS = _WINOGRAD_MIN_PIXELS - 1


class Conv2d(layers.Conv2d):
    def _winograd_kernel(self, algorithm: winograd.Algorithm) -> mx.array | None:
        """The weight's Winograd transform, made at the layer's first call in a `fast_cpu()`
        block and kept until the block ends: 16/9 or 4 times the weight's size, too much to
        keep for good; making it at every call would cost more than the convolution saves.
        Where oneDNN computes float32 it is not made at the first call (None): there oneDNN
        convolves directly, for less than making the kernel costs (a one-step image would
        make each for one use; docs/performance.md)."""
        sources = (self.weight, algorithm)
        make = lambda: winograd.transform_kernel(self.weight, algorithm)  # noqa: E731
        if onednn.active():
            return kept_from_second_use(self, sources, make)
        return kept(self, sources, make)

    @property
    def _same_size_3x3(self) -> bool:
        """A 3x3 kernel, stride 1, padding 1: the output the input's size."""
        return (self.weight.shape[1:3], self.stride, self.padding) == ((3, 3), (1, 1), (1, 1))

    def _winograd_algorithm(self, x: mx.array) -> winograd.Algorithm | None:
        """For a float32 image (checked by the caller): the Winograd algorithm that
        convolves it, if any (`_same_size_3x3` kernels)."""
        out_channels, _, _, in_channels = self.weight.shape
        pixels = x.shape[1] * x.shape[2]
        if (
            not self._same_size_3x3
            or self.weight.dtype != mx.float32
            or min(in_channels, out_channels) < _WINOGRAD_MIN_CHANNELS
            or pixels < _WINOGRAD_MIN_PIXELS
        ):
            return None
        return winograd.F4 if pixels >= _WINOGRAD_F4_MIN_PIXELS else winograd.F2

    def _by_onednn(self, x: mx.array) -> bool:
        """For a float32 image: whether oneDNN convolves it (see `_ONEDNN_FLOAT32_MIN_PIXELS`)."""
        if self.groups != 1 or not onednn.active():
            return False
        if onednn.bfloat16_active():
            return True
        pixels = x.shape[1] * x.shape[2]
        return pixels >= _ONEDNN_FLOAT32_MIN_PIXELS and self._winograd_algorithm(x) is None

    def _by_patches(self, x: mx.array) -> bool:
        """For a float32 image: whether it is convolved as one matmul of its 3x3 patches
        (see `_PATCHES_MAX_PIXELS`)."""
        return (
            onednn.active()
            and not onednn.bfloat16_active()
            and self.groups == 1
            and self.dilation in (1, (1, 1))
            and self._same_size_3x3
            and x.shape[1] * x.shape[2] <= _PATCHES_MAX_PIXELS
        )

    def _patches(self, x: mx.array) -> mx.array:
        """The convolution as one oneDNN matmul: each pixel's 3x3 patch of the padded image
        (nine times the image: small at these sizes) by the weight read as (out, 9 * in),
        in place."""
        height, width = x.shape[1:3]
        padded = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
        patches = mx.concatenate(
            [padded[:, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)],
            axis=-1,
        )
        weight = self.weight.reshape(self.weight.shape[0], -1)
        return onednn.linear(patches, weight, self.get("bias"), self)

    def _onednn(self, x: mx.array, owner: object | None) -> mx.array:
        return onednn.conv2d(
            x, self.weight, self.get("bias"), self.stride, self.padding, self.dilation, owner
        )

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype == mx.float32 and self._by_patches(x):
            return self._patches(x)
        if x.dtype == mx.float32 and self._by_onednn(x):
            return self._onednn(x, self)
        if not (x.dtype == mx.float32 and self.stride == (1, 1)):
            return super().__call__(x)
        if (self.weight.shape[1:3], self.padding) == ((1, 1), (0, 0)):
            # MLX's CPU convolution runs a 1x1 kernel slower than the same matmul, with
            # more memory.
            return self._with_bias(x @ self.weight.reshape(self.weight.shape[0], -1).T)
        if self._same_size_3x3:
            algorithm = self._winograd_algorithm(x)
            if algorithm is not None:
                kernel = self._winograd_kernel(algorithm)
                if kernel is None:  # the first call in a block, see _winograd_kernel
                    return self._onednn(x, None)
                return winograd.conv3x3(x, kernel, self.get("bias"), algorithm)
            if x.shape[1] * x.shape[2] >= _SHIFTED_CONV_MIN_PIXELS:
                return self._with_bias(_conv3x3_shifted(x, self.weight))
        return super().__call__(x)

    def _with_bias(self, y: mx.array) -> mx.array:
        return y + self.bias if "bias" in self else y


# Input pixels from which the upsampling convolution runs on the small image: below,
# summing the kernel's taps (16 weight-sized sums per call) costs more than the work it
# saves.
_UPSAMPLED_CONV_MIN_PIXELS = 16 * 16
# Upsampled pixels up to which a convolution that runs by Winograd runs on the upsampled
# image: F(4x4, 3x3) takes 9 multiply-adds per small-image pixel and channel pair, not 16
# (the UNets' upsamplers). The VAE's larger ones gained too little to see in a decode, and
# raised a 512px decode's peak memory by gigabytes.
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
        _shifted_matmuls(
            padded,
            height,
            width,
            [
                (dy, dx, sum(weight[:, ky, kx] for ky in kernel_rows for kx in kernel_columns))
                for dy, kernel_rows in row_taps
                for dx, kernel_columns in column_taps
            ],
        )
        for row_taps in _UPSAMPLED_TAPS
        for column_taps in _UPSAMPLED_TAPS
    ]
    # (a, b, batch, y, x, c) -> (batch, 2y + a, 2x + b, c)
    out = mx.stack(parities).reshape(2, 2, batch, height, width, -1)
    return out.transpose(2, 3, 0, 4, 1, 5).reshape(batch, 2 * height, 2 * width, -1)


class Upsample2D(layers.Upsample2D):
    def __call__(self, x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
        upsampled = layers.upsample_nearest(x, size)
        # On the small image only for exactly 2x: its taps assume each pixel copied twice
        # on every side, which the last row or column of an odd size is not.
        exactly_2x = upsampled.shape[1:3] == (2 * x.shape[1], 2 * x.shape[2])
        if (
            exactly_2x
            and x.dtype == mx.float32
            and not onednn.bfloat16_active()  # oneDNN's bfloat16 on the upsampled image is faster
            and x.shape[1] * x.shape[2] >= _UPSAMPLED_CONV_MIN_PIXELS
            and not self._by_winograd(upsampled)
        ):
            return _upsample2x_conv3x3(x, self.conv.weight) + self.conv.bias
        return self.conv(upsampled)

    def _by_winograd(self, upsampled: mx.array) -> bool:
        """For a float32 image: whether the convolution runs by Winograd on the upsampled
        image (see `_UPSAMPLED_WINOGRAD_MAX_PIXELS`)."""
        return (
            upsampled.shape[1] * upsampled.shape[2] <= _UPSAMPLED_WINOGRAD_MAX_PIXELS
            and self.conv._winograd_algorithm(upsampled) is not None
        )


# Each model class -> the CPU subclass that `fast_cpu()` gives its instances.
SUBCLASSES: dict[type[nn.Module], type[nn.Module]] = {
    cpu_class.__base__: cpu_class
    for cpu_class in (
        GELU,
        QuickGELU,
        GEGLU,
        LayerNorm,
        GroupNorm,
        Attention,
        BasicTransformerBlock,
        Linear,
        QuantizedLinear,
        Conv2d,
        Upsample2D,
    )
}
