"""The tiny autoencoder (TAESD for SD 1.x/2.x, TAESDXL for SDXL; diffusers' AutoencoderTiny).

A distilled stand-in for the VAE: plain 3x3 convolutions and ReLUs, no norms or attention,
so it decodes in a fraction of the full VAE's time and memory, at some cost in detail. Its
latents are the full VAE's *scaled* latents (its scaling factor is 1.0).

NHWC. The convolutions are the package's `Conv2d`, for its CPU paths (Winograd within
`fast_cpu()`): with `mlx.nn.Conv2d` a CPU decode took over twice the time and nine times
the memory (measured in the commit that made the switch). The layers are lists indexed
like diffusers' `nn.Sequential`s (activations and upsampling included) so that parameter
names match diffusers' key for key (`encoder.layers.1.conv.0.weight`);
`weights/tiny_autoencoder.py` only transposes the convolutions.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import TinyAutoencoderConfig
from .layers import Conv2d


def _run(layers: list[nn.Module], x: mx.array) -> mx.array:
    for layer in layers:
        x = layer(x)
    return x


class NearestUpsample(nn.Module):
    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, channels = x.shape
        f = self.factor
        x = mx.broadcast_to(x[:, :, None, :, None, :], (batch, height, f, width, f, channels))
        return x.reshape(batch, height * f, width * f, channels)


class AutoencoderTinyBlock(nn.Module):
    """Three convolutions with ReLUs between them, a residual connection, a ReLU. (diffusers'
    block has a 1x1 `skip` convolution for differing channel counts, which AutoencoderTiny
    never builds: its blocks keep their width.)"""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = [
            Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            Conv2d(channels, channels, 3, padding=1),
        ]

    def __call__(self, x: mx.array) -> mx.array:
        return nn.relu(_run(self.conv, x) + x)


class EncoderTiny(nn.Module):
    def __init__(self, config: TinyAutoencoderConfig):
        super().__init__()
        channels = config.encoder_block_out_channels
        self.layers: list[nn.Module] = []
        for i, count in enumerate(config.num_encoder_blocks):
            if i == 0:
                self.layers.append(Conv2d(config.in_channels, channels[0], 3, padding=1))
            else:
                # As diffusers: the stride-2 convolution keeps the block's own width.
                self.layers.append(
                    Conv2d(channels[i], channels[i], 3, stride=2, padding=1, bias=False)
                )
            self.layers += [AutoencoderTinyBlock(channels[i]) for _ in range(count)]
        self.layers.append(Conv2d(channels[-1], config.latent_channels, 3, padding=1))

    def __call__(self, images: mx.array) -> mx.array:
        return _run(self.layers, (images + 1) / 2)  # TAESD takes images in [0, 1]


class DecoderTiny(nn.Module):
    def __init__(self, config: TinyAutoencoderConfig):
        super().__init__()
        channels = config.decoder_block_out_channels
        self.layers: list[nn.Module] = [
            Conv2d(config.latent_channels, channels[0], 3, padding=1),
            nn.ReLU(),
        ]
        last = len(channels) - 1
        for i, count in enumerate(config.num_decoder_blocks):
            self.layers += [AutoencoderTinyBlock(channels[i]) for _ in range(count)]
            if i < last:
                self.layers.append(NearestUpsample(config.upsampling_scaling_factor))
            out = config.out_channels if i == last else channels[i]
            self.layers.append(Conv2d(channels[i], out, 3, padding=1, bias=i == last))

    def __call__(self, latents: mx.array) -> mx.array:
        # tanh(x / 3) * 3 softly clamps the latents to (-3, 3), as TAESD does.
        x = _run(self.layers, mx.tanh(latents / 3) * 3)
        return x * 2 - 1  # [0, 1] -> [-1, 1], diffusers' convention


class TinyAutoencoder(nn.Module):
    def __init__(self, config: TinyAutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = EncoderTiny(config)
        self.decoder = DecoderTiny(config)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.num_encoder_blocks) - 1)

    def encode(self, images: mx.array) -> mx.array:
        """NHWC images in [-1, 1] -> latents (as diffusers' `AutoencoderTiny.encode`)."""
        return self.encoder(images)

    def decode(self, latents: mx.array) -> mx.array:
        """NHWC latents -> images in about [-1, 1], unclamped (as diffusers' `decode`)."""
        return self.decoder(latents)
