"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3), for the CPU.

Each 2x2 block of outputs needs a 4x4 tile of the input. Transformed by constant matrices
of 0s, 1s and halves (B for the input, G for the kernel), the tile's convolution becomes 16
products of channel vectors instead of 36, so the convolution is 16 matmuls
(tiles x in) @ (in x out) instead of 9 over all pixels: 2.25x fewer multiply-adds, for
additions and a kernel four-ninths larger (16 instead of 9 matrices). See Lavin and Gray,
"Fast Algorithms for Convolutional Neural Networks" (2015).

The transforms are element-wise passes over the image, so this pays where the matmuls are
large against them: wide channels, on the UNet's latents and the VAE's smaller images.
Rounding stays near float32's: 1e-6 of the output's scale against a direct convolution.
"""

from __future__ import annotations

import mlx.core as mx


def _input_combinations(r0: mx.array, r1: mx.array, r2: mx.array,
                        r3: mx.array) -> list[mx.array]:
    """B^T applied to four rows (or columns) of a tile."""
    return [r0 - r2, r1 + r2, r2 - r1, r1 - r3]


def _kernel_combinations(k0: mx.array, k1: mx.array, k2: mx.array) -> list[mx.array]:
    """G applied to three rows (or columns) of a kernel."""
    half_sum = 0.5 * (k0 + k2)
    return [k0, half_sum + 0.5 * k1, half_sum - 0.5 * k1, k2]


def _output_combinations(m0: mx.array, m1: mx.array, m2: mx.array,
                         m3: mx.array) -> list[mx.array]:
    """A^T applied to four rows (or columns) of a transformed product."""
    return [m0 + m1 + m2, m1 - m2 - m3]


@mx.compile
def transform_kernel(weight: mx.array) -> mx.array:
    """(out, 3, 3, in) MLX kernel -> (16, in, out): G g G^T, one matrix per tile position."""
    rows = _kernel_combinations(*(weight[:, r] for r in range(3)))
    tile = [u for row in rows for u in _kernel_combinations(*(row[:, c] for c in range(3)))]
    return mx.stack(tile).swapaxes(1, 2)


@mx.compile
def _transform_input(padded: mx.array) -> mx.array:
    """(batch, height + 2, width + 2, in) padded image -> (16, tiles, in): B^T d B for every
    4x4 tile d at even offsets, the tiles' rows and columns gathered by strided slices."""
    height, width = padded.shape[1] - 2, padded.shape[2] - 2
    rows = _input_combinations(*(padded[:, r:r + height:2] for r in range(4)))
    tile = [v for row in rows
            for v in _input_combinations(*(row[:, :, c:c + width:2] for c in range(4)))]
    return mx.stack(tile).reshape(16, -1, padded.shape[-1])


@mx.compile
def _transform_output(products: mx.array, bias: mx.array) -> mx.array:
    """(4, 4, batch, height / 2, width / 2, out) products -> (batch, height / 2, 2,
    width / 2, 2, out): A^T m A plus the bias, each tile's 2x2 outputs in place."""
    columns = _output_combinations(*(products[:, c] for c in range(4)))
    outputs = [_output_combinations(*(column[r] for r in range(4))) for column in columns]
    return mx.stack([mx.stack([outputs[dx][dy] + bias for dx in range(2)], axis=3)
                     for dy in range(2)], axis=2)


def conv3x3(x: mx.array, kernel: mx.array, bias: mx.array | None) -> mx.array:
    """A 3x3, stride-1, padding-1 convolution of an NHWC image of even height and width,
    from its `transform_kernel`."""
    batch, height, width, _ = x.shape
    if bias is None:
        bias = mx.zeros(kernel.shape[-1], x.dtype)
    padded = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    products = _transform_input(padded) @ kernel
    products = products.reshape(4, 4, batch, height // 2, width // 2, -1)
    return _transform_output(products, bias).reshape(batch, height, width, -1)
