"""FLOPs of the UNet, the VAE decode and the text encoder, counted from their configs.

Multiply-adds of the convolutions, linear layers and attention matmuls (QK^T and PV),
times two; norms, activations and additions are left out (a few percent at most).
"""

from __future__ import annotations

from stable_diffusion.config import AutoencoderConfig, TextEncoderConfig, UNetConfig

from .architectures import CONTEXT_TOKENS


def _half(size: int) -> int:
    return (size + 1) // 2  # a stride-2, padding-1 convolution


def unet_flops(
    config: UNetConfig, batch: int, height: int, width: int, context_tokens: int = CONTEXT_TOKENS
) -> int:
    """FLOPs of one UNet call on (batch, height, width) latents."""
    channels = config.block_out_channels
    time_dims = 4 * channels[0]

    def conv(pixels: int, cin: int, cout: int, kernel: int = 3) -> int:
        return pixels * cin * cout * kernel * kernel

    def resnet(pixels: int, cin: int, cout: int) -> int:
        shortcut = conv(pixels, cin, cout, 1) if cin != cout else 0
        return conv(pixels, cin, cout) + conv(pixels, cout, cout) + shortcut + time_dims * cout

    def transformer(pixels: int, dims: int, depth: int) -> int:
        context = config.cross_attention_dim
        self_attention = 4 * pixels * dims * dims + 2 * pixels * pixels * dims
        cross_attention = (
            2 * pixels * dims * dims
            + 2 * context_tokens * context * dims
            + 2 * pixels * context_tokens * dims
        )
        feed_forward = pixels * dims * 8 * dims + pixels * 4 * dims * dims
        return 2 * pixels * dims * dims + depth * (self_attention + cross_attention + feed_forward)

    macs = channels[0] * time_dims + time_dims * time_dims
    if config.addition_embed_type == "text_time":
        assert config.projection_class_embeddings_input_dim is not None  # SDXL's configs set it
        macs += config.projection_class_embeddings_input_dim * time_dims + time_dims * time_dims
    heads_depth = config.transformer_depth_per_block
    resnets = config.resnets_per_block
    h, w = height, width
    macs += conv(h * w, config.in_channels, channels[0])
    for i, block_type in enumerate(config.down_block_types):
        for j in range(resnets[i]):
            cin = channels[max(i - 1, 0)] if j == 0 else channels[i]
            macs += resnet(h * w, cin, channels[i])
            if block_type.startswith("Cross"):
                macs += transformer(h * w, channels[i], heads_depth[i])
        if i < len(channels) - 1:
            h, w = _half(h), _half(w)
            macs += conv(h * w, channels[i], channels[i])
    mid = channels[-1]
    macs += 2 * resnet(h * w, mid, mid) + transformer(h * w, mid, heads_depth[-1])
    n = len(channels)
    for i, block_type in enumerate(config.up_block_types):
        level = n - 1 - i
        cout, prev = channels[level], channels[min(level + 1, n - 1)]
        count = resnets[level] + 1
        for j in range(count):
            skip = channels[max(level - 1, 0)] if j == count - 1 else cout
            macs += resnet(h * w, (prev if j == 0 else cout) + skip, cout)
            if block_type.startswith("Cross"):
                macs += transformer(h * w, cout, heads_depth[level])
        if level > 0:
            h, w = 2 * h, 2 * w
            macs += conv(h * w, cout, cout)
    macs += conv(h * w, channels[0], config.out_channels)
    return 2 * batch * macs


def vae_decode_flops(config: AutoencoderConfig, batch: int, height: int, width: int) -> int:
    """FLOPs of decoding (batch, height, width) latents."""
    channels = config.block_out_channels[::-1]
    pixels = height * width
    latent = config.latent_channels

    def resnet(cin: int, cout: int) -> int:
        return pixels * 9 * (cin * cout + cout * cout) + (pixels * cin * cout if cin != cout else 0)

    macs = pixels * latent * latent if config.use_post_quant_conv else 0
    macs += pixels * latent * channels[0] * 9 + 2 * resnet(channels[0], channels[0])
    if config.mid_block_add_attention:
        macs += 4 * pixels * channels[0] ** 2 + 2 * pixels * pixels * channels[0]
    for i, cout in enumerate(channels):
        for j in range(config.layers_per_block + 1):
            macs += resnet(channels[max(i - 1, 0)] if j == 0 else cout, cout)
        if i < len(channels) - 1:
            pixels *= 4
            macs += pixels * cout * cout * 9
    macs += pixels * channels[-1] * config.out_channels * 9
    return 2 * batch * macs


def text_encoder_flops(config: TextEncoderConfig, batch: int, tokens: int = CONTEXT_TOKENS) -> int:
    """FLOPs of encoding `batch` prompts of `tokens` tokens."""
    dims = config.hidden_size
    layer = 4 * tokens * dims * dims + 2 * tokens * tokens * dims
    layer += 2 * tokens * dims * config.intermediate_size
    projection = dims * config.projection_dim if config.with_projection else 0
    return 2 * batch * (config.num_hidden_layers * layer + projection)
