"""The architectures the benchmark measures: the user presets at full size, and small ones
with the real structure for tests and quick runs (not user presets)."""

from __future__ import annotations

import dataclasses
from typing import Any

from stable_diffusion.config import (
    PRESETS,
    AutoencoderConfig,
    PipelineConfig,
    TextEncoderConfig,
    UNetConfig,
)

CONTEXT_TOKENS = 77  # CLIP's context: the tokens of one prompt

_TINY_TEXT = TextEncoderConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    projection_dim=32,
)  # fmt: skip
_TINY_VAE = AutoencoderConfig(
    block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64
)
TINY_PRESETS: dict[str, PipelineConfig] = {
    "tiny": PipelineConfig(
        UNetConfig(
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            norm_num_groups=8,
            sample_size=8,
        ),
        _TINY_VAE,
        (_TINY_TEXT,),
        PRESETS["sd-1.5"].scheduler,
    ),
    "tiny-xl": PipelineConfig(
        UNetConfig(
            block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            norm_num_groups=8,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            sample_size=8,
        ),
        _TINY_VAE,
        (_TINY_TEXT, dataclasses.replace(_TINY_TEXT, with_projection=True, hidden_act="gelu")),
        PRESETS["sdxl-turbo"].scheduler,
        ("<|endoftext|>", "!"),
    ),
}
# stabilityai/sd-turbo: SD 2.1 base's architecture, its timesteps spaced "trailing" (made for
# one step without guidance; the benchmarks pass --steps 1 --cfg 0 as its model card says).
SD_TURBO = dataclasses.replace(
    PRESETS["sd-2.1-base"],
    scheduler=dataclasses.replace(PRESETS["sd-2.1-base"].scheduler, timestep_spacing="trailing"),
)
ARCHITECTURES = {**PRESETS, "sd-turbo": SD_TURBO, **TINY_PRESETS}

# madebyollin/taesd's config.json, key for key (the hub's current revision, as
# tests/reference/tiny_autoencoder.py has it); madebyollin/taesdxl ships the same one.
TAESD_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderTiny",
    "_diffusers_version": "0.30.0",
    "act_fn": "relu",
    "decoder_block_out_channels": [64, 64, 64, 64],
    "encoder_block_out_channels": [64, 64, 64, 64],
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 3, 1],
    "num_encoder_blocks": [1, 3, 3, 3],
    "out_channels": 3,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "upsample_fn": "nearest",
    "upsampling_scaling_factor": 2,
}


@dataclasses.dataclass(frozen=True)
class WholeImage:
    """How `--whole-image` makes a model's image: steps, decoder, classifier-free guidance."""

    steps: int
    tiny_decoder: bool
    cfg: float  # 0: none (batch 1); else the guidance scale, the UNet at batch 2


# What issue 22 measures: the turbo models in one step with the tiny decoder, SD 1.5 in 20
# steps with its VAE; the tiny architectures one of each, for tests.
WHOLE_IMAGE = {
    "sdxl-turbo": WholeImage(1, True, 0.0),
    "sd-turbo": WholeImage(1, True, 0.0),
    "sd-1.5": WholeImage(20, False, 7.5),
    "tiny": WholeImage(2, False, 7.5),
    "tiny-xl": WholeImage(1, True, 0.0),
}
