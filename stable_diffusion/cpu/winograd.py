"""3x3 convolutions by Winograd's minimal filtering F(m x m, 3x3), for the CPU.

Each m x m block of outputs needs an (m+2) x (m+2) tile of the input. Transformed by
constant matrices (B^T for the input, G for the kernel), the tile's convolution becomes
(m+2)^2 products of channel vectors instead of 9 m^2, so the convolution is (m+2)^2 matmuls
(tiles x in) @ (in x out) over 1/m^2 of the pixels instead of 9 over all of them, for the
transforms and a kernel (m+2)^2 / 9 times the weight's size. See Lavin and Gray, "Fast
Algorithms for Convolutional Neural Networks" (2015).

Two sizes: F(4x4, 3x3) does 4x fewer multiply-adds for a kernel 4x the weight's size;
F(2x2, 3x3) 2.25x fewer for 16/9 of it, and on small images (the UNets' 16x16 latents) it
is as fast, for less than half the memory. F(4x4)'s matrices come from Toom-Cook
interpolation at the points 0, 1, -1, 2, -1/2 and infinity (the usual 0, +-1, +-2 round
1.7x worse in float32); F(2x2)'s at 0, 1, -1 and infinity. Against a float64 convolution
they round to ~5e-6 and ~8e-7 of the output's scale, the direct one to ~3e-7. The
transforms are matmuls too: (B^T (x) B^T) over a copy of the tiles, and (A^T (x) A^T)
over the products.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

import mlx.core as mx
import numpy as np

from . import onednn


@dataclass(frozen=True, eq=False)
class Algorithm:
    """F(m x m, 3x3), as its exact 1-D matrices: B^T ((m+2) x (m+2)), G ((m+2) x 3) and
    A^T (m x (m+2))."""

    name: str
    input: tuple[tuple[Fraction | int, ...], ...]
    kernel: tuple[tuple[Fraction | int, ...], ...]
    output: tuple[tuple[Fraction | int, ...], ...]

    @property
    def output_tile(self) -> int:
        return len(self.output)

    @property
    def input_tile(self) -> int:
        return len(self.input)

    @cached_property
    def input_on_tiles(self) -> mx.array:
        return _on_tiles(self.input)

    @cached_property
    def kernel_on_tiles(self) -> mx.array:
        return _on_tiles(self.kernel)

    @cached_property
    def output_on_tiles(self) -> mx.array:
        return _on_tiles(self.output)


def _on_tiles(matrix: tuple[tuple[Fraction | int, ...], ...]) -> mx.array:
    """A 1-D transform applied to a tile's rows and columns at once: M (x) M, on the
    row-major flattened tile."""
    one_dimensional = np.array(matrix, np.float64)
    return mx.array(np.kron(one_dimensional, one_dimensional).astype(np.float32))


_half, _third, _fifteenth = Fraction(1, 2), Fraction(1, 3), Fraction(1, 15)
F2 = Algorithm(
    "F(2x2, 3x3)",
    input=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    kernel=((1, 0, 0), (_half, _half, _half), (_half, -_half, _half), (0, 0, 1)),
    output=((1, 1, 1, 0), (0, 1, -1, -1)),
)
F4 = Algorithm(
    "F(4x4, 3x3)",
    input=(
        (1, Fraction(3, 2), -2, Fraction(-3, 2), 1, 0),
        (0, -1, Fraction(-5, 2), Fraction(-1, 2), 1, 0),
        (0, 1, Fraction(1, 2), Fraction(-5, 2), 1, 0),
        (0, Fraction(-1, 2), -1, Fraction(1, 2), 1, 0),
        (0, 2, -1, -2, 1, 0),
        (0, 1, Fraction(3, 2), -2, Fraction(-3, 2), 1),
    ),
    kernel=(
        (1, 0, 0),
        (-_third, -_third, -_third),
        (_third, -_third, _third),
        (_fifteenth, 2 * _fifteenth, 4 * _fifteenth),
        (-16 * _fifteenth, 8 * _fifteenth, -4 * _fifteenth),
        (0, 0, 1),
    ),
    output=(
        (1, 1, 1, 1, 1, 0),
        (0, 1, -1, 2, Fraction(-1, 2), 0),
        (0, 1, 1, 4, Fraction(1, 4), 0),
        (0, 1, -1, 8, Fraction(-1, 8), 1),
    ),
)


def transform_kernel(weight: mx.array, algorithm: Algorithm) -> mx.array:
    """(out, 3, 3, in) MLX kernel -> ((m+2)^2, in, out): G g G^T, one matrix per tile
    position."""
    out_channels, _, _, in_channels = weight.shape
    taps = weight.transpose(1, 2, 3, 0).reshape(9, -1)
    return (algorithm.kernel_on_tiles @ taps).reshape(-1, in_channels, out_channels)


def conv3x3(x: mx.array, kernel: mx.array, bias: mx.array | None, algorithm: Algorithm) -> mx.array:
    """A 3x3, stride-1, padding-1 convolution of an NHWC image, from its
    `transform_kernel` by the same algorithm.

    Images whose sides are not multiples of the output tile are padded up to them, the
    extra outputs dropped."""
    batch, height, width, channels = x.shape
    output_tile, input_tile = algorithm.output_tile, algorithm.input_tile
    tiles_down, tiles_across = -(-height // output_tile), -(-width // output_tile)
    padded = mx.pad(
        x,
        [
            (0, 0),
            (1, 1 + tiles_down * output_tile - height),
            (1, 1 + tiles_across * output_tile - width),
            (0, 0),
        ],
    )
    row = padded.shape[2] * channels
    # (tile row, tile column, batch, tile index down, across, channel): overlapping tiles
    # read straight from the padded image, copied once by the transform's matmul.
    tiles = mx.as_strided(
        padded,
        (input_tile, input_tile, batch, tiles_down, tiles_across, channels),
        (row, channels, padded.shape[1] * row, output_tile * row, output_tile * channels, 1),
    )
    transformed = algorithm.input_on_tiles @ tiles.reshape(input_tile**2, -1)
    transformed = transformed.reshape(input_tile**2, -1, channels)
    if onednn.active():
        products = onednn.batched_matmul(transformed, kernel)
    else:
        products = transformed @ kernel
    outputs = algorithm.output_on_tiles @ products.reshape(input_tile**2, -1)
    outputs = outputs.reshape(output_tile, output_tile, batch, tiles_down, tiles_across, -1)
    # Each tile's outputs into place: one copy, which adding the bias makes anyway.
    outputs = outputs.transpose(2, 3, 0, 4, 1, 5)
    outputs = outputs + bias if bias is not None else mx.contiguous(outputs)
    outputs = outputs.reshape(batch, tiles_down * output_tile, tiles_across * output_tile, -1)
    return outputs[:, :height, :width]
