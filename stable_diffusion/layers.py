"""Building blocks shared by the UNet and the VAE.

Images are NHWC (MLX convolutions are channels-last). Attribute names mirror
diffusers' module names so that a diffusers state dict maps onto these modules
key for key (see `weights/diffusers.py`)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int) -> mx.array:
    """Multi-head attention over (B, L, heads * dim) inputs."""
    batch, q_len, width = q.shape
    dim = width // heads
    q, k, v = (x.reshape(batch, -1, heads, dim).transpose(0, 2, 1, 3) for x in (q, k, v))
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(dim))
    return out.transpose(0, 2, 1, 3).reshape(batch, q_len, width)


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
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, pytorch_compatible=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, pytorch_compatible=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array, temb: mx.array | None = None) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(nn.silu(temb))[:, None, None, :]
        h = self.conv2(nn.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if "conv_shortcut" in self else x
        return shortcut + h


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        # The VAE encoder pads only right/bottom (padding=0 plus a manual pad).
        self.asymmetric = padding == 0
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def __call__(self, x: mx.array) -> mx.array:
        if self.asymmetric:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, channels = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
        return self.conv(x.reshape(batch, height * 2, width * 2, channels))
