"""Key mapping from the original single-file layouts to diffusers / transformers names.

Single-file checkpoints (.safetensors / .ckpt from A1111, ComfyUI, civitai) keep the
names of the code they were trained with: CompVis/LDM for SD 1.x and 2.x, Stability's
SGM for SDXL (the same UNet and VAE names). One function per component; each takes the
component's weights with the checkpoint prefix already removed (`model.diffusion_model.`,
`first_stage_model.`, ...) and returns diffusers/transformers names, in the diffusers
layout (1x1 convolutions stay 4-D; `weights/diffusers.py` adapts the layout after).
"""

from __future__ import annotations

import re

import mlx.core as mx

from ..config import AutoencoderConfig, TextEncoderConfig, UNetConfig

# -- UNet ----------------------------------------------------------------------------------

# Modules outside the input/middle/output blocks.
_UNET_TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# Inside a ResBlock; the indices are positions in LDM's nn.Sequential.
_RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_BLOCK_KEY = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.*))?")
_MIDDLE_KEY = re.compile(r"middle_block\.(\d+)(?:\.(.*))?")


def _replace_prefix(key: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return None


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def _input_block_positions(config: UNetConfig) -> list[tuple[int, int | None]]:
    """(down block, resnet index or None for the downsampler) of input_blocks 1, 2, ..."""
    positions: list[tuple[int, int | None]] = []
    counts = config.resnets_per_block
    for block, count in enumerate(counts):
        positions += [(block, layer) for layer in range(count)]
        if block < len(counts) - 1:
            positions.append((block, None))
    return positions


def _output_block_positions(config: UNetConfig) -> list[tuple[int, int]]:
    """(up block, layer) of output_blocks 0, 1, ...: up blocks run from the deepest level
    and have one resnet more than their down block."""
    counts = config.resnets_per_block[::-1]
    return [(block, layer) for block, count in enumerate(counts) for layer in range(count + 1)]


def _resnet(prefix: str, rest: str | None) -> str:
    return _join(prefix, _replace_prefix(rest or "", _RESNET_PARTS) or rest)


def unet_key(key: str, config: UNetConfig) -> str:
    """One LDM/SGM UNet parameter or module name -> its diffusers name.

    Raises KeyError for names that are not part of a UNet of this config."""
    top = _replace_prefix(key, _UNET_TOP_LEVEL)
    if top is not None:
        return top
    if match := _MIDDLE_KEY.fullmatch(key):
        index, rest = int(match[1]), match[2]
        if index == 1:
            return _join("mid_block.attentions.0", rest)
        if index in (0, 2):
            return _resnet(f"mid_block.resnets.{index // 2}", rest)
    elif match := _BLOCK_KEY.fullmatch(key):
        kind, index, part, rest = match[1], int(match[2]), int(match[3]), match[4]
        if kind == "input_blocks":
            positions = _input_block_positions(config)
            if 1 <= index <= len(positions):
                block, layer = positions[index - 1]
                prefix = f"down_blocks.{block}"
                if layer is None and part == 0 and (rest or "").startswith("op"):
                    return _join(f"{prefix}.downsamplers.0.conv", rest[len("op") + 1 :])
                if layer is not None and part == 0:
                    return _resnet(f"{prefix}.resnets.{layer}", rest)
                if layer is not None and part == 1:
                    return _join(f"{prefix}.attentions.{layer}", rest)
        else:
            up_positions = _output_block_positions(config)
            if index < len(up_positions):
                block, layer = up_positions[index]
                prefix = f"up_blocks.{block}"
                # The upsampler follows the resnet, and the transformer if the block has one.
                if part in (1, 2) and (rest or "").startswith("conv"):
                    return _join(f"{prefix}.upsamplers.0.conv", rest[len("conv") + 1 :])
                if part == 0:
                    return _resnet(f"{prefix}.resnets.{layer}", rest)
                if part == 1:
                    return _join(f"{prefix}.attentions.{layer}", rest)
    raise KeyError(key)


def map_unet(weights: dict[str, mx.array], config: UNetConfig) -> dict[str, mx.array]:
    """`model.diffusion_model.*` (prefix removed) -> diffusers UNet2DConditionModel names."""
    mapped, unknown = {}, []
    for key, value in weights.items():
        try:
            mapped[unet_key(key, config)] = value
        except KeyError:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"the UNet has {len(unknown)} weights that do not fit the expected architecture "
            f"({', '.join(sorted(unknown)[:5])}{' ...' if len(unknown) > 5 else ''})"
        )
    return mapped


# -- VAE -----------------------------------------------------------------------------------

_VAE_TOP_LEVEL = {
    "encoder.norm_out": "encoder.conv_norm_out",
    "decoder.norm_out": "decoder.conv_norm_out",
}
_VAE_ATTENTION_PARTS = {
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}
_VAE_BLOCK_KEY = re.compile(
    r"(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.*)"
)
_VAE_MID_KEY = re.compile(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)")


def _vae_key(key: str, n_blocks: int) -> str:
    top = _replace_prefix(key, _VAE_TOP_LEVEL)
    if top is not None:
        return top
    if match := _VAE_BLOCK_KEY.fullmatch(key):
        coder, direction, index, part, layer, rest = match.groups()
        # LDM indexes the decoder's `up` by resolution level, so up.0 runs last; diffusers'
        # up_blocks are in running order.
        block = int(index) if direction == "down" else n_blocks - 1 - int(index)
        kind = "down_blocks" if direction == "down" else "up_blocks"
        if layer is not None:
            rest = rest.replace("nin_shortcut", "conv_shortcut")
            return f"{coder}.{kind}.{block}.resnets.{layer}.{rest}"
        sampler = "downsamplers" if part == "downsample" else "upsamplers"
        return f"{coder}.{kind}.{block}.{sampler}.0.{rest}"
    if match := _VAE_MID_KEY.fullmatch(key):
        coder, part, rest = match.groups()
        if part == "attn_1":
            name, _, param = rest.rpartition(".")
            return f"{coder}.mid_block.attentions.0.{_VAE_ATTENTION_PARTS.get(name, name)}.{param}"
        rest = rest.replace("nin_shortcut", "conv_shortcut")
        return f"{coder}.mid_block.resnets.{int(part[-1]) - 1}.{rest}"
    # conv_in, conv_out, quant_conv and post_quant_conv keep their names.
    return key


def map_vae(weights: dict[str, mx.array], config: AutoencoderConfig) -> dict[str, mx.array]:
    """`first_stage_model.*` (prefix removed) -> diffusers AutoencoderKL names. The mid-block
    attention's q/k/v/proj_out stay 1x1 convolutions here. Some training checkpoints keep
    the autoencoder's training loss (LPIPS, discriminator) under `loss.`: not weights of
    the model."""
    n_blocks = len(config.block_out_channels)
    return {
        _vae_key(key, n_blocks): value
        for key, value in weights.items()
        if not key.startswith("loss.")
    }


# -- text encoders -------------------------------------------------------------------------

# Buffers and training leftovers that are not weights of the text model.
_CLIP_IGNORED = ("position_ids", "logit_scale", "attn_mask")


def map_clip(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """OpenAI CLIP as saved by transformers (`cond_stage_model.transformer.*` in SD 1.x,
    `conditioner.embedders.0.transformer.*` in SDXL; prefix removed) -> transformers names.
    Old SD 1.x files lack the `text_model.` level (transformers < 4.x)."""
    mapped = {}
    for key, value in weights.items():
        if key.rpartition(".")[2] in _CLIP_IGNORED:
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        mapped[key] = value
    return mapped


_OPEN_CLIP_TOP_LEVEL = {
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_LAYER_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPEN_CLIP_LAYER_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.*)")


def map_open_clip(weights: dict[str, mx.array], config: TextEncoderConfig) -> dict[str, mx.array]:
    """OpenCLIP's text tower (`cond_stage_model.model.*` in SD 2.x,
    `conditioner.embedders.1.model.*` in SDXL; prefix removed) -> transformers names.

    The fused attention input projection is split into q/k/v; `text_projection` is a
    matrix applied as `x @ P`, transposed into a linear layer's weight, and dropped for
    models without one (SD 2.x). Layers past `config.num_hidden_layers` are dropped: SD 2.x
    conditions on the penultimate layer, so diffusers' config leaves out the last one."""
    mapped = {}
    for key, value in weights.items():
        if key in _OPEN_CLIP_TOP_LEVEL:
            mapped[_OPEN_CLIP_TOP_LEVEL[key]] = value
        elif key == "text_projection":
            if config.with_projection:
                mapped["text_projection.weight"] = value.T
        elif match := _OPEN_CLIP_LAYER_KEY.fullmatch(key):
            layer, rest = int(match[1]), match[2]
            if layer >= config.num_hidden_layers:
                continue
            prefix = f"text_model.encoder.layers.{layer}"
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rpartition("_")[2]
                for name, part in zip(("q", "k", "v"), mx.split(value, 3, axis=0), strict=True):
                    mapped[f"{prefix}.self_attn.{name}_proj.{kind}"] = part
            else:
                mapped[_join(prefix, _replace_prefix(rest, _OPEN_CLIP_LAYER_PARTS) or rest)] = value
        elif key not in _CLIP_IGNORED:
            mapped[key] = value  # left for the loader to report as unexpected
    return mapped
