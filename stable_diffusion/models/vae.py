"""The variational autoencoder (diffusers' AutoencoderKL): images <-> latents."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import AutoencoderConfig
from .layers import Conv2d, Downsample2D, GroupNorm, Linear, ResnetBlock2D, Upsample2D, attention

EPS = 1e-6


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels, with its own group norm."""

    def __init__(self, dims: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, dims, EPS)
        self.to_q = Linear(dims, dims)
        self.to_k = Linear(dims, dims)
        self.to_v = Linear(dims, dims)
        self.to_out = [Linear(dims, dims)]

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, channels = x.shape
        h = self.group_norm(x).reshape(batch, height * width, channels)
        h = attention(self.to_q(h), self.to_k(h), self.to_v(h), heads=1)
        return x + self.to_out[0](h).reshape(batch, height, width, channels)


class MidBlock(nn.Module):
    def __init__(self, dims: int, groups: int, with_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(dims, dims, groups, EPS) for _ in range(2)]
        if with_attention:
            self.attentions = [VAEAttention(dims, groups)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        if "attentions" in self:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class ResnetStack(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, count: int, groups: int):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, EPS)
            for i in range(count)
        ]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
        if "upsamplers" in self:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = []
        for i, cout in enumerate(channels):
            block = ResnetStack(channels[max(i - 1, 0)], cout, config.layers_per_block, groups)
            if i < len(channels) - 1:
                block.downsamplers = [Downsample2D(cout, padding=0)]
            self.down_blocks.append(block)
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, channels[-1], EPS)
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, silu_after=True))


class Decoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        channels, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, config.mid_block_add_attention)
        self.up_blocks = []
        for i, cout in enumerate(channels):
            block = ResnetStack(channels[max(i - 1, 0)], cout, config.layers_per_block + 1, groups)
            if i < len(channels) - 1:
                block.upsamplers = [Upsample2D(cout)]
            self.up_blocks.append(block)
        self.conv_norm_out = GroupNorm(groups, channels[-1], EPS)
        self.conv_out = Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, silu_after=True))


class Autoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = Conv2d(2 * latent, 2 * latent, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = Conv2d(latent, latent, 1)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, images: mx.array) -> tuple[mx.array, mx.array]:
        """NHWC images in [-1, 1] -> mean and standard deviation of the latent posterior
        (unscaled: the pipeline applies the scaling factor)."""
        moments = self.encoder(images)
        if "quant_conv" in self:
            moments = self.quant_conv(moments)
        mean, logvar = mx.split(moments, 2, axis=-1)
        return mean, mx.exp(0.5 * mx.clip(logvar, -30.0, 20.0))

    def decode(self, latents: mx.array) -> mx.array:
        """Unscaled NHWC latents -> images in about [-1, 1]."""
        if "post_quant_conv" in self:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)
