"""Model configurations: small frozen dataclasses read from each component's
`config.json` (diffusers/transformers layout), plus presets for the well-known
architectures, which single-file checkpoints need because they carry no config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build `cls` from a config dict, ignoring keys the dataclass does not model.

    Lists become tuples so that the frozen configs stay hashable."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in values.items()
        if k in names and v is not None
    }
    return cls(**kwargs)


def read_json(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download the model.") from e


def _per_block(value: int | tuple[int, ...], n_blocks: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n_blocks
    if len(value) != n_blocks:
        raise ValueError(f"UNet config: {name} has {len(value)} entries for {n_blocks} blocks")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """transformers' CLIPTextConfig (and CLIPTextModelWithProjection)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    eos_token_id: int = 2
    with_projection: bool = False

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TextEncoderConfig:
        with_projection = "CLIPTextModelWithProjection" in values.get("architectures", ())
        return _from_dict(cls, {**values, "with_projection": with_projection})


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """diffusers' UNet2DConditionModel config, normalised to per-block tuples."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    cross_attention_dim: int = 768
    # diffusers historically stores the number of heads in `attention_head_dim`;
    # `num_attention_heads`, when present, takes precedence (as in diffusers).
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    sample_size: int = 64

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("UNet config: block types do not match block_out_channels")
        known = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
        unknown = set(self.down_block_types + self.up_block_types) - known
        if unknown:
            raise ValueError(f"UNet config: unsupported block types {sorted(unknown)}")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(
                f"UNet config: addition_embed_type={self.addition_embed_type!r} is not supported"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> UNetConfig:
        return _from_dict(cls, values)

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        heads = self.num_attention_heads or self.attention_head_dim
        return _per_block(heads, len(self.block_out_channels), "attention heads")

    @property
    def resnets_per_block(self) -> tuple[int, ...]:
        return _per_block(self.layers_per_block, len(self.block_out_channels), "layers_per_block")

    @property
    def transformer_depth_per_block(self) -> tuple[int, ...]:
        return _per_block(
            self.transformer_layers_per_block,
            len(self.block_out_channels),
            "transformer_layers_per_block",
        )


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """diffusers' AutoencoderKL config."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AutoencoderConfig:
        return _from_dict(cls, values)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The noise schedule of diffusers' `scheduler_config.json`."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    # diffusers' DDIM and LCM default; SD configs set it to false explicitly.
    set_alpha_to_one: bool = True
    rescale_betas_zero_snr: bool = False
    # LCM-distilled models sample on a coarser grid of the training steps.
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0

    def __post_init__(self) -> None:
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(f"Scheduler config: unsupported beta_schedule {self.beta_schedule!r}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"Scheduler config: unsupported prediction_type {self.prediction_type!r}"
            )
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(
                f"Scheduler config: unsupported timestep_spacing {self.timestep_spacing!r}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SchedulerConfig:
        return _from_dict(cls, values)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """A whole architecture, for checkpoints that carry no config files
    (single files) and for building full-size models without downloads."""

    unet: UNetConfig
    vae: AutoencoderConfig
    text_encoders: tuple[TextEncoderConfig, ...]
    scheduler: SchedulerConfig
    # Tokenizer pad tokens, one per text encoder.
    pad_tokens: tuple[str, ...] = ("<|endoftext|>",)

    @property
    def is_xl(self) -> bool:
        return len(self.text_encoders) == 2


_CLIP_L = TextEncoderConfig()
_OPENCLIP_H = TextEncoderConfig(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
)
_OPENCLIP_BIGG = TextEncoderConfig(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
    with_projection=True,
)
_SD2_UNET = UNetConfig(
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
)
_SDXL_UNET = UNetConfig(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
)
_SDXL_VAE = AutoencoderConfig(scaling_factor=0.13025, sample_size=1024)
_SDXL_PADS = ("<|endoftext|>", "!")

PRESETS: dict[str, PipelineConfig] = {
    "sd-1.5": PipelineConfig(UNetConfig(), AutoencoderConfig(), (_CLIP_L,), SchedulerConfig()),
    "sd-2.1-base": PipelineConfig(
        _SD2_UNET, AutoencoderConfig(), (_OPENCLIP_H,), SchedulerConfig()
    ),
    "sd-2.1": PipelineConfig(
        dataclasses.replace(_SD2_UNET, sample_size=96),
        AutoencoderConfig(sample_size=768),
        (_OPENCLIP_H,),
        SchedulerConfig(prediction_type="v_prediction"),
    ),
    "sdxl": PipelineConfig(
        _SDXL_UNET, _SDXL_VAE, (_CLIP_L, _OPENCLIP_BIGG), SchedulerConfig(), _SDXL_PADS
    ),
    "sdxl-turbo": PipelineConfig(
        dataclasses.replace(_SDXL_UNET, sample_size=64),
        dataclasses.replace(_SDXL_VAE, sample_size=512),
        (_CLIP_L, _OPENCLIP_BIGG),
        SchedulerConfig(timestep_spacing="trailing"),
        _SDXL_PADS,
    ),
}


@dataclasses.dataclass(frozen=True)
class TinyAutoencoderConfig:
    """diffusers' AutoencoderTiny config (TAESD, TAESDXL)."""

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            numbers = value if isinstance(value, tuple) else (value,)
            if field.type in ("int", "tuple[int, ...]") and not (
                numbers and all(type(n) is int and n > 0 for n in numbers)
            ):
                raise ValueError(
                    f"AutoencoderTiny config: {field.name} must be "
                    f"{'positive integers' if isinstance(value, tuple) else 'a positive integer'}"
                    f" (got {value!r})"
                )
        if not (isinstance(self.scaling_factor, int | float) and self.scaling_factor > 0):
            raise ValueError(
                f"AutoencoderTiny config: scaling_factor must be positive "
                f"(got {self.scaling_factor!r})"
            )
        if len(self.encoder_block_out_channels) != len(self.num_encoder_blocks):
            raise ValueError("AutoencoderTiny config: encoder channels and blocks differ in length")
        if len(self.decoder_block_out_channels) != len(self.num_decoder_blocks):
            raise ValueError("AutoencoderTiny config: decoder channels and blocks differ in length")
        if self.act_fn != "relu" or self.upsample_fn != "nearest":
            raise ValueError(
                f"AutoencoderTiny config: act_fn {self.act_fn!r} / upsample_fn "
                f"{self.upsample_fn!r} are not supported (only relu / nearest, as TAESD ships)"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TinyAutoencoderConfig:
        return _from_dict(cls, values)
