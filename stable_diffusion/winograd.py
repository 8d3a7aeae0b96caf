"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3), for the CPU.

Each 4x4 block of outputs needs a 6x6 tile of the input. Transformed by constant matrices
(B^T for the input, G for the kernel), the tile's convolution becomes 36 products of channel
vectors instead of 144, so the convolution is 36 matmuls (tiles x in) @ (in x out) over
a sixteenth of the pixels instead of 9 over all of them: 4x fewer multiply-adds, for the
transforms and a kernel four times the weight's size (36 matrices instead of 9). See Lavin
and Gray, "Fast Algorithms for Convolutional Neural Networks" (2015).

The matrices come from Toom-Cook interpolation at the points 0, 1, -1, 2, -1/2 and
infinity: the usual 0, +-1, +-2 round 1.7x worse in float32. The error against a direct
convolution is ~5e-6 of the output's scale, against ~3e-7 for the direct one itself.
The transforms are matmuls too: (36 x 36) @ (36 x tiles * channels) over a copy of the
tiles, and (16 x 36) over the products.
"""

from __future__ import annotations

from fractions import Fraction

import mlx.core as mx
import numpy as np

OUTPUT_TILE = 4
INPUT_TILE = OUTPUT_TILE + 2

_third, _fifteenth = Fraction(1, 3), Fraction(1, 15)
_INPUT = [  # B^T
    [1, Fraction(3, 2), -2, Fraction(-3, 2), 1, 0],
    [0, -1, Fraction(-5, 2), Fraction(-1, 2), 1, 0],
    [0, 1, Fraction(1, 2), Fraction(-5, 2), 1, 0],
    [0, Fraction(-1, 2), -1, Fraction(1, 2), 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 1, Fraction(3, 2), -2, Fraction(-3, 2), 1],
]
_KERNEL = [  # G
    [1, 0, 0],
    [-_third, -_third, -_third],
    [_third, -_third, _third],
    [_fifteenth, 2 * _fifteenth, 4 * _fifteenth],
    [-16 * _fifteenth, 8 * _fifteenth, -4 * _fifteenth],
    [0, 0, 1],
]
_OUTPUT = [  # A^T
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, Fraction(-1, 2), 0],
    [0, 1, 1, 4, Fraction(1, 4), 0],
    [0, 1, -1, 8, Fraction(-1, 8), 1],
]


def _on_tiles(matrix: list[list]) -> mx.array:
    """A 1-D transform applied to a tile's rows and columns at once: M (x) M, on the
    row-major flattened tile."""
    one_dimensional = np.array(matrix, np.float64)
    return mx.array(np.kron(one_dimensional, one_dimensional).astype(np.float32))


_INPUT_ON_TILES = _on_tiles(_INPUT)
_KERNEL_ON_TILES = _on_tiles(_KERNEL)
_OUTPUT_ON_TILES = _on_tiles(_OUTPUT)


def transform_kernel(weight: mx.array) -> mx.array:
    """(out, 3, 3, in) MLX kernel -> (36, in, out): G g G^T, one matrix per tile position."""
    out_channels, _, _, in_channels = weight.shape
    taps = weight.transpose(1, 2, 3, 0).reshape(9, -1)
    return (_KERNEL_ON_TILES @ taps).reshape(-1, in_channels, out_channels)


def conv3x3(x: mx.array, kernel: mx.array, bias: mx.array | None) -> mx.array:
    """A 3x3, stride-1, padding-1 convolution of an NHWC image, from its `transform_kernel`.

    Images whose sides are not multiples of 4 are padded up to them, the extra outputs
    dropped."""
    batch, height, width, channels = x.shape
    tiles_down, tiles_across = -(-height // OUTPUT_TILE), -(-width // OUTPUT_TILE)
    padded = mx.pad(x, [(0, 0), (1, 1 + tiles_down * OUTPUT_TILE - height),
                        (1, 1 + tiles_across * OUTPUT_TILE - width), (0, 0)])
    row = padded.shape[2] * channels
    # (tile row, tile column, batch, tile index down, across, channel): overlapping tiles
    # read straight from the padded image, copied once by the transform's matmul.
    tiles = mx.as_strided(
        padded, (INPUT_TILE, INPUT_TILE, batch, tiles_down, tiles_across, channels),
        (row, channels, padded.shape[1] * row, OUTPUT_TILE * row, OUTPUT_TILE * channels, 1))
    transformed = _INPUT_ON_TILES @ tiles.reshape(INPUT_TILE ** 2, -1)
    products = transformed.reshape(INPUT_TILE ** 2, -1, channels) @ kernel
    outputs = _OUTPUT_ON_TILES @ products.reshape(INPUT_TILE ** 2, -1)
    outputs = outputs.reshape(OUTPUT_TILE, OUTPUT_TILE, batch, tiles_down, tiles_across, -1)
    # Each tile's 4x4 outputs into place: one copy, which adding the bias makes anyway.
    outputs = outputs.transpose(2, 3, 0, 4, 1, 5)
    outputs = outputs + bias if bias is not None else mx.contiguous(outputs)
    outputs = outputs.reshape(batch, tiles_down * OUTPUT_TILE, tiles_across * OUTPUT_TILE, -1)
    return outputs[:, :height, :width]
