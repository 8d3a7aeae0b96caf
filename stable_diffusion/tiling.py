"""Tiled VAE decoding and encoding: diffusers' `AutoencoderKL.enable_tiling()`, so that
large images decode in memory bounded by the tile size (the VAE's activations grow with
the pixels: tens of GiB for an untiled 2048px image).

The same tiles, overlap and blend as diffusers' `tiled_decode` / `_tiled_encode`: square
tiles of the VAE config's `sample_size` pixels (`sample_size / 8` latents) or of the size
asked for (diffusers' `tile_sample_min_size` and `tile_latent_min_size`), 25% overlap,
each tile blended linearly into the one above and the one to its left over the
overlap, then cropped to the stride. Tiles are computed one at a time (evaluated before
the next is built, which bounds memory under MLX's lazy evaluation).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

OVERLAP = 0.25


def _blend(previous: mx.array, tile: mx.array, extent: int, axis: int) -> mx.array:
    """diffusers' blend_v (axis 1) / blend_h (axis 2) in NHWC: the first `extent` rows
    (columns) of `tile` fade from `previous`'s last ones into its own."""
    extent = min(previous.shape[axis], tile.shape[axis], extent)
    if extent == 0:
        return tile
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    weight = (mx.arange(extent, dtype=mx.float32) / extent).reshape(shape).astype(tile.dtype)
    end = previous.shape[axis]
    old = mx.take(previous, mx.arange(end - extent, end), axis=axis)
    head = mx.take(tile, mx.arange(extent), axis=axis)
    rest = mx.take(tile, mx.arange(extent, tile.shape[axis]), axis=axis)
    return mx.concatenate([old * (1 - weight) + head * weight, rest], axis=axis)


def tiled(
    function: Callable[[mx.array], mx.array], x: mx.array, tile_in: int, tile_out: int
) -> mx.array:
    """`function` (NHWC -> NHWC, scaling sides by tile_out / tile_in: the VAE's decoder or
    encoder) applied to `x` tile by tile, as diffusers tiles it; `function(x)` whole when
    `x` fits in one tile."""
    height, width = x.shape[1:3]
    if height <= tile_in and width <= tile_in:
        return function(x)
    stride = int(tile_in * (1 - OVERLAP))
    extent = int(tile_out * OVERLAP)
    limit = tile_out - extent
    rows: list[list[mx.array]] = []
    for i in range(0, height, stride):
        row: list[mx.array] = []
        for j in range(0, width, stride):
            tile = function(x[:, i : i + tile_in, j : j + tile_in])
            # The tiles above and to the left are already blended, as diffusers' in-place
            # blending leaves them.
            if rows:
                tile = _blend(rows[-1][len(row)], tile, extent, axis=1)
            if row:
                tile = _blend(row[-1], tile, extent, axis=2)
            mx.eval(tile)
            row.append(tile)
        rows.append(row)
    return mx.concatenate(
        [mx.concatenate([t[:, :limit, :limit] for t in row], axis=2) for row in rows], axis=1
    )
