"""Building blocks shared by the UNet, the VAE and the text encoders, in plain MLX.

Images are NHWC (MLX convolutions are channels-last). Attribute names mirror
diffusers' module names so that a diffusers state dict maps onto these modules
key for key (see `weights/diffusers.py`).

These are the reference implementations, lazy on every device. `stable_diffusion.cpu`
swaps in CPU subclasses of them within `fast_cpu()` (as `nn.quantize` swaps in
`QuantizedLinear`), and selects another attention backend with `attention_backend()`.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

# -- activations ----------------------------------------------------------------------------
#
# Modules, as transformers' ACT2FN, so that a backend can swap in its own.


class GELU(nn.Module):
    """The exact (erf) GELU."""

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu(x)


class QuickGELU(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return x * mx.sigmoid(1.702 * x)


# -- normalization --------------------------------------------------------------------------


class LayerNorm(nn.LayerNorm):
    pass


class GroupNorm(nn.GroupNorm):
    """PyTorch-compatible group norm over NHWC images, optionally followed by SiLU (one
    call, so that a backend can fuse the two)."""

    def __init__(self, groups: int, dims: int, eps: float):
        super().__init__(groups, dims, eps=eps, pytorch_compatible=True)

    def __call__(self, x: mx.array, silu_after: bool = False) -> mx.array:
        x = super().__call__(x)
        return nn.silu(x) if silu_after else x


# -- attention ------------------------------------------------------------------------------

AttentionBackend = Callable[[mx.array, mx.array, mx.array, int, bool], mx.array]


# Bytes of float32 scores (batch * heads * queries * keys * 4) one attention call may
# hold at once. Above it the queries go through in blocks, each within it, so that the
# memory of attention no longer grows with the square of the image (the VAE's over a
# 1024px image: 1 GiB of scores, 16 GiB at 2048px). The native sizes stay in one block (SD
# 1.5 at 512px with CFG: 1 GiB; SDXL at 1024px: 1.25 GiB), where blocks would only add
# calls on a GPU, whose fused kernel holds no score matrix.
ATTENTION_SCORE_BUDGET = 2 * 2**30


def query_block_rows(batch_heads: int, q_len: int, k_len: int, budget: int) -> int:
    """Queries per block so that a block's float32 scores fit `budget` (all of them when
    they fit; at least one)."""
    return min(q_len, max(1, budget // (batch_heads * k_len * 4)))


def scaled_dot_product_attention(
    q: mx.array, k: mx.array, v: mx.array, heads: int, causal: bool
) -> mx.array:
    """MLX's fused attention over (B, L, heads * dim) inputs, in blocks of queries where
    the scores would exceed `ATTENTION_SCORE_BUDGET` (each query's softmax runs over all
    keys either way, so the blocks compute what one call would)."""
    batch, q_len, width = q.shape
    k_len, dim = k.shape[1], width // heads
    q, k, v = (x.reshape(batch, -1, heads, dim).transpose(0, 2, 1, 3) for x in (q, k, v))
    scale = 1 / math.sqrt(dim)
    rows = query_block_rows(batch * heads, q_len, k_len, ATTENTION_SCORE_BUDGET)
    if rows == q_len:
        # A "causal" mask instead of an additive -inf matrix: no NaN in float16.
        out = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=scale, mask="causal" if causal else None
        )
    else:
        blocks: list[mx.array] = []
        for start in range(0, q_len, rows):
            block = q[:, :, start : start + rows]
            if blocks:
                # Each block after the one before: MLX would otherwise evaluate the blocks'
                # score matrices side by side, holding them all at once.
                block = mx.depends(block, blocks[-1])
            mask = None
            if causal:
                # MLX's "causal" aligns the last query with the last key; a block's boolean
                # mask keeps the same keys for its queries (no -inf: no NaN in float16).
                first = start + k_len - q_len
                query = mx.arange(first, first + block.shape[2])[:, None]
                mask = mx.arange(k_len)[None] <= query
            blocks.append(mx.fast.scaled_dot_product_attention(block, k, v, scale=scale, mask=mask))
        out = mx.concatenate(blocks, axis=2)
    return out.transpose(0, 2, 1, 3).reshape(batch, q_len, width)


_ATTENTION_BACKEND: contextvars.ContextVar[AttentionBackend] = contextvars.ContextVar(
    "attention_backend", default=scaled_dot_product_attention
)


@contextmanager
def attention_backend(backend: AttentionBackend) -> Iterator[None]:
    """Within this block, `attention` runs `backend` (as diffusers' `attention_backend()`)."""
    token = _ATTENTION_BACKEND.set(backend)
    try:
        yield
    finally:
        _ATTENTION_BACKEND.reset(token)


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int, causal: bool = False) -> mx.array:
    """Multi-head softmax attention over (B, L, heads * dim) inputs, by the current
    backend (`scaled_dot_product_attention` unless `attention_backend` chose another)."""
    return _ATTENTION_BACKEND.get()(q, k, v, heads, causal)


# -- linear and convolution -----------------------------------------------------------------


class Linear(nn.Linear):
    def to_quantized(
        self, group_size: int | None = None, bits: int | None = None, mode: str = "affine"
    ) -> QuantizedLinear:
        """What `nn.quantize` turns this layer into."""
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedLinear(nn.QuantizedLinear):
    pass


class Conv2d(nn.Conv2d):
    pass


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
            h = h + self.time_emb_proj(nn.silu(temb))[:, None, None, :]
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


def _nearest_indices(size: int, out_size: int) -> mx.array:
    """The input index of each output index, as torch's nearest interpolation computes it:
    floor(i * (size / out_size)) in float32."""
    scale = mx.array(size, mx.float32) / out_size
    indices = mx.floor(mx.arange(out_size, dtype=mx.float32) * scale).astype(mx.int32)
    return mx.minimum(indices, size - 1)


def upsample_nearest(x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
    """Nearest-neighbour upsampling of an NHWC image: 2x, or to `size` (height, width) as
    torch's `F.interpolate(mode="nearest", size=size)`."""
    batch, height, width, channels = x.shape
    if size is None or tuple(size) == (2 * height, 2 * width):
        x = mx.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
        return x.reshape(batch, height * 2, width * 2, channels)
    rows, columns = (_nearest_indices(n, out) for n, out in zip((height, width), size, strict=True))
    return x[:, rows][:, :, columns]


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
        """Upsampled 2x, or to `size` (height, width): the UNet passes its skip
        connection's size, which is odd where the latent's side does not divide by the
        UNet's total downsampling (as diffusers' `upsample_size`)."""
        return self.conv(upsample_nearest(x, size))
