"""The conditional UNet (diffusers' UNet2DConditionModel) for SD 1.x, 2.x and SDXL.

One config covers all three: conv or linear transformer projections (a 1x1
convolution in NHWC is a linear layer, so both are `Linear` here), per-block
head counts and transformer depths, and SDXL's `text_time` added embedding."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..config import UNetConfig
from .layers import (
    Conv2d,
    Downsample2D,
    GroupNorm,
    LayerNorm,
    Linear,
    ResnetBlock2D,
    Upsample2D,
    attention,
)


def timestep_embedding(
    timesteps: mx.array, dims: int, flip_sin_to_cos: bool = True, freq_shift: float = 0
) -> mx.array:
    half = dims // 2
    exponent = -math.log(10000) * mx.arange(half, dtype=mx.float32) / (half - freq_shift)
    angles = timesteps.astype(mx.float32)[:, None] * mx.exp(exponent)[None]
    sin, cos = mx.sin(angles), mx.cos(angles)
    return mx.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = Linear(in_channels, time_embed_dim)
        self.linear_2 = Linear(time_embed_dim, time_embed_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class Attention(nn.Module):
    def __init__(self, dims: int, heads: int, context_dims: int | None = None):
        super().__init__()
        context_dims = context_dims or dims
        self.heads = heads
        self.to_q = Linear(dims, dims, bias=False)
        self.to_k = Linear(context_dims, dims, bias=False)
        self.to_v = Linear(context_dims, dims, bias=False)
        self.to_out = [Linear(dims, dims)]

    def __call__(self, x: mx.array, context: mx.array | None = None) -> mx.array:
        if context is None:
            keys, values = self.to_k(x), self.to_v(x)
        else:
            keys, values = self.context_keys_values(context)
        return self.to_out[0](attention(self.to_q(x), keys, values, self.heads))

    def context_keys_values(self, context: mx.array) -> tuple[mx.array, mx.array]:
        """The keys and values of a cross-attention's (text) context."""
        return self.to_k(context), self.to_v(context)


class GEGLU(nn.Module):
    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.proj = Linear(dims, hidden_dims * 2)

    def __call__(self, x: mx.array) -> mx.array:
        hidden, gate = mx.split(self.proj(x), 2, axis=-1)
        return hidden * nn.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        # diffusers' net is [GEGLU, Dropout, Linear]; the index of the last layer is its key.
        self.net = [GEGLU(dims, 4 * dims), nn.Dropout(0.0), Linear(4 * dims, dims)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dims: int, heads: int, context_dims: int):
        super().__init__()
        self.norm1 = LayerNorm(dims)
        self.attn1 = Attention(dims, heads)
        self.norm2 = LayerNorm(dims)
        self.attn2 = Attention(dims, heads, context_dims)
        self.norm3 = LayerNorm(dims)
        self.ff = FeedForward(dims)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    def __init__(self, dims: int, heads: int, depth: int, context_dims: int, groups: int):
        super().__init__()
        self.norm = GroupNorm(groups, dims, eps=1e-6)
        self.proj_in = Linear(dims, dims)
        self.transformer_blocks = [
            BasicTransformerBlock(dims, heads, context_dims) for _ in range(depth)
        ]
        self.proj_out = Linear(dims, dims)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        batch, height, width, channels = x.shape
        h = self.proj_in(self.norm(x).reshape(batch, height * width, channels))
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h).reshape(batch, height, width, channels)


class UNetBlock(nn.Module):
    """A down, mid or up block: resnets, the first `n_attentions` of them followed
    by a transformer."""

    def __init__(
        self,
        resnet_channels: list[tuple[int, int]],
        config: UNetConfig,
        heads: int,
        depth: int,
        n_attentions: int,
    ):
        super().__init__()
        time_dims = config.block_out_channels[0] * 4
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = [
            ResnetBlock2D(cin, cout, groups, eps, time_dims) for cin, cout in resnet_channels
        ]
        if n_attentions:
            self.attentions = [
                Transformer2DModel(cout, heads, depth, config.cross_attention_dim, groups)
                for _, cout in resnet_channels[:n_attentions]
            ]

    def layers(self):
        """(resnet, transformer or None) pairs in order."""
        attentions = self.get("attentions", [])
        padding = [None] * (len(self.resnets) - len(attentions))
        return zip(self.resnets, attentions + padding, strict=True)


def _run(resnet, transformer, x, temb, context):
    x = resnet(x, temb)
    return x if transformer is None else transformer(x, context)


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        heads, depths = config.heads_per_block, config.transformer_depth_per_block
        resnets = config.resnets_per_block
        time_dims = channels[0] * 4

        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], time_dims)
        if config.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(
                config.projection_class_embeddings_input_dim, time_dims
            )

        self.down_blocks = []
        for i, block_type in enumerate(config.down_block_types):
            cin = channels[max(i - 1, 0)]
            pairs = [(cin if j == 0 else channels[i], channels[i]) for j in range(resnets[i])]
            n_attentions = len(pairs) if block_type.startswith("Cross") else 0
            block = UNetBlock(pairs, config, heads[i], depths[i], n_attentions)
            if i < len(channels) - 1:
                block.downsamplers = [Downsample2D(channels[i])]
            self.down_blocks.append(block)

        mid = channels[-1]
        self.mid_block = UNetBlock([(mid, mid), (mid, mid)], config, heads[-1], depths[-1], 1)

        self.up_blocks = []
        n = len(channels)
        for i, block_type in enumerate(config.up_block_types):
            level = n - 1 - i
            cout, prev = channels[level], channels[min(level + 1, n - 1)]
            skip_in = channels[max(level - 1, 0)]
            count = resnets[level] + 1
            pairs = [
                ((prev if j == 0 else cout) + (skip_in if j == count - 1 else cout), cout)
                for j in range(count)
            ]
            n_attentions = len(pairs) if block_type.startswith("Cross") else 0
            block = UNetBlock(pairs, config, heads[level], depths[level], n_attentions)
            if level > 0:
                block.upsamplers = [Upsample2D(cout)]
            self.up_blocks.append(block)

        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[0], config.norm_eps)
        self.conv_out = Conv2d(channels[0], config.out_channels, 3, padding=1)

    def time_conditioning(
        self,
        timesteps: mx.array,
        batch: int,
        dtype: mx.Dtype,
        text_embeds: mx.array | None,
        time_ids: mx.array | None,
    ) -> mx.array:
        """The time embedding, in the latents' `dtype` (as diffusers casts it)."""
        config = self.config
        timesteps = mx.broadcast_to(mx.array(timesteps).reshape(-1), (batch,))
        t = timestep_embedding(
            timesteps, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift
        )
        temb = self.time_embedding(t.astype(dtype))
        if "add_embedding" in self:
            if text_embeds is None or time_ids is None:
                raise ValueError("This UNet (SDXL) needs text_embeds and time_ids conditioning")
            time_embeds = timestep_embedding(
                time_ids.reshape(-1),
                config.addition_time_embed_dim,
                config.flip_sin_to_cos,
                config.freq_shift,
            ).reshape(batch, -1)
            added = mx.concatenate([text_embeds, time_embeds.astype(text_embeds.dtype)], axis=-1)
            temb = temb + self.add_embedding(added)
        return temb

    def __call__(
        self,
        x: mx.array,
        timesteps: mx.array,
        encoder_hidden_states: mx.array,
        text_embeds: mx.array | None = None,
        time_ids: mx.array | None = None,
    ) -> mx.array:
        """Predict the noise (or v) for NHWC latents `x` at `timesteps`."""
        temb = self.time_conditioning(timesteps, x.shape[0], x.dtype, text_embeds, time_ids)
        context = encoder_hidden_states

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            for resnet, transformer in block.layers():
                x = _run(resnet, transformer, x, temb, context)
                skips.append(x)
            if "downsamplers" in block:
                x = block.downsamplers[0](x)
                skips.append(x)

        for resnet, transformer in self.mid_block.layers():
            x = _run(resnet, transformer, x, temb, context)

        for block in self.up_blocks:
            for resnet, transformer in block.layers():
                x = mx.concatenate([x, skips.pop()], axis=-1)
                x = _run(resnet, transformer, x, temb, context)
            if "upsamplers" in block:
                x = block.upsamplers[0](x, skips[-1].shape[1:3])

        return self.conv_out(self.conv_norm_out(x, silu_after=True))
