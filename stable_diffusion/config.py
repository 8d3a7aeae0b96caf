"""Model configurations: small frozen dataclasses read from each component's
`config.json` (diffusers/transformers layout), plus presets for the well-known
architectures, which single-file checkpoints need because they carry no config."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import limits

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


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
    """A config file's JSON object, within the budgets of `limits.read_json`."""
    values = limits.read_json(path, "config")
    if not isinstance(values, dict):
        raise ValueError(f"{path} is not a JSON object; re-download the model.")
    return values


def _check_range(config: str, values: object, ranges: dict[str, tuple[float, float]]) -> None:
    """Refuse fields (of the dataclass `values`) outside [low, high]: an integer field when
    both bounds are ints, else any finite number. Absurd values would otherwise allocate
    without bound (a 1e13-step noise schedule) or overflow. None (unset) passes; tuples are
    checked element by element."""
    for name, (low, high) in ranges.items():
        value = getattr(values, name)
        integer = isinstance(low, int) and isinstance(high, int)
        for item in value if isinstance(value, tuple) else (value,):
            if item is None:
                continue
            kinds = int if integer else (int, float)
            # NaN fails the comparison, infinities the bounds.
            if isinstance(item, bool) or not isinstance(item, kinds) or not low <= item <= high:
                kind = "an integer" if integer else "a number"
                raise ValueError(
                    f"{config} config: {name} is {value!r}, expected {kind} in [{low}, {high}]; "
                    "the config file is damaged or not for this model"
                )


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

    def __post_init__(self) -> None:
        _check_range(
            "Text encoder",
            self,
            {
                "vocab_size": (1, 1_000_000),
                "hidden_size": (1, 16384),
                "intermediate_size": (1, 65536),
                "num_hidden_layers": (1, 256),
                "num_attention_heads": (1, 1024),
                "max_position_embeddings": (2, limits.MAX_SEQUENCE_LENGTH),
                "layer_norm_eps": (0.0, 1.0),
                "projection_dim": (1, 16384),
                "eos_token_id": (0, self.vocab_size - 1),
            },
        )

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
        _check_range(
            "UNet",
            self,
            {
                "in_channels": (1, 64),
                "out_channels": (1, 64),
                "block_out_channels": (1, 8192),
                "layers_per_block": (1, 16),
                "cross_attention_dim": (1, 16384),
                "attention_head_dim": (1, 1024),
                "num_attention_heads": (1, 1024),
                "transformer_layers_per_block": (1, 64),
                "norm_num_groups": (1, 1024),
                "norm_eps": (0.0, 1.0),
                "freq_shift": (0, 16),
                "addition_time_embed_dim": (1, 16384),
                "projection_class_embeddings_input_dim": (1, 65536),
                "sample_size": (1, 1024),
            },
        )
        n = len(self.block_out_channels)
        if not 1 <= n <= 8:
            raise ValueError(f"UNet config: {n} blocks in block_out_channels, expected 1 to 8")
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

    def __post_init__(self) -> None:
        _check_range(
            "VAE",
            self,
            {
                "in_channels": (1, 64),
                "out_channels": (1, 64),
                "latent_channels": (1, 64),
                "block_out_channels": (1, 8192),
                "layers_per_block": (1, 16),
                "norm_num_groups": (1, 1024),
                "scaling_factor": (1e-6, 1e3),
                "shift_factor": (-1e3, 1e3),
                "sample_size": (1, 16384),
            },
        )
        if not 1 <= len(self.block_out_channels) <= 8:
            raise ValueError("VAE config: block_out_channels must have 1 to 8 entries")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AutoencoderConfig:
        return _from_dict(cls, values)


_SCHEDULER_CHOICES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "final_sigmas_type": ("zero", "sigma_min"),
    "timestep_type": ("discrete", "continuous"),
    # diffusers' "log_linear" gives one sigma more than it has timesteps.
    "interpolation_type": ("linear",),
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The noise schedule of diffusers' `scheduler_config.json`, as the file gives it.

    A field is None where the file lacks the key (hub configs written by old diffusers
    versions lack several): diffusers' `SchedulerClass.from_config` then applies that
    class's own default, which differs between schedulers (Euler's timestep_spacing is
    "linspace", DDIM's "leading"), so each sampler resolves the missing fields with its
    class's defaults (`resolved`)."""

    num_train_timesteps: int | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None
    prediction_type: str | None = None
    timestep_spacing: str | None = None
    steps_offset: int | None = None
    set_alpha_to_one: bool | None = None
    rescale_betas_zero_snr: bool | None = None
    clip_sample: bool | None = None
    clip_sample_range: float | None = None
    # The k-diffusion and DPM-Solver schedules.
    use_karras_sigmas: bool | None = None
    use_exponential_sigmas: bool | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str | None = None
    timestep_type: str | None = None
    interpolation_type: str | None = None
    lower_order_final: bool | None = None
    euler_at_final: bool | None = None
    # LCM-distilled models sample on a coarser grid of the training steps.
    original_inference_steps: int | None = None
    timestep_scaling: float | None = None

    def __post_init__(self) -> None:
        # Ranges, where given; a missing key takes the sampler's default (`resolved`), for
        # num_train_timesteps 1000 in every diffusers scheduler.
        total = self.num_train_timesteps or 1000
        _check_range(
            "Scheduler",
            self,
            {
                # The schedule tables have one entry per training step (real models: 1000).
                "num_train_timesteps": (1, 100_000),
                "beta_start": (0.0, 1.0),
                "beta_end": (0.0, 1.0),
                "steps_offset": (0, total),
                "original_inference_steps": (1, total),
                "timestep_scaling": (0.0, 1e4),
                "clip_sample_range": (0.0, 1e4),
                "sigma_min": (0.0, 1e6),
                "sigma_max": (0.0, 1e6),
            },
        )
        self._check(("beta_schedule", "prediction_type", "timestep_spacing"))

    def _check(self, names: Iterable[str]) -> None:
        for name in names:
            value = getattr(self, name)
            supported = _SCHEDULER_CHOICES.get(name, (value,))
            if value is not None and value not in supported:
                raise ValueError(
                    f"Scheduler config: unsupported {name} {value!r} "
                    f"(supported: {', '.join(supported)})"
                )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SchedulerConfig:
        return _from_dict(cls, values)

    def resolved(self, defaults: dict[str, Any]) -> SchedulerConfig:
        """This config with its missing fields set from `defaults` (a diffusers
        scheduler class's `__init__` defaults)."""
        missing = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        config = dataclasses.replace(self, **missing)
        config._check(defaults)  # only what this scheduler reads may stop it
        if config.use_karras_sigmas and config.use_exponential_sigmas:
            raise ValueError(
                "Scheduler config: use_karras_sigmas and use_exponential_sigmas are both set"
            )
        return config


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

# The scheduler configs of the hub repos whose config diffusers' from_single_file gives
# a checkpoint of each architecture, with the keys they lack left out (see
# tests/reference/schedulers.py for the files, key for key).
_SD_SCHEDULE = SchedulerConfig(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
)
_SDXL_SCHEDULE = dataclasses.replace(
    _SD_SCHEDULE,
    prediction_type="epsilon",
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
)

PRESETS: dict[str, PipelineConfig] = {
    "sd-1.5": PipelineConfig(UNetConfig(), AutoencoderConfig(), (_CLIP_L,), _SD_SCHEDULE),
    "sd-2.1-base": PipelineConfig(
        _SD2_UNET,
        AutoencoderConfig(),
        (_OPENCLIP_H,),
        dataclasses.replace(_SD_SCHEDULE, prediction_type="epsilon"),
    ),
    "sd-2.1": PipelineConfig(
        dataclasses.replace(_SD2_UNET, sample_size=96),
        AutoencoderConfig(sample_size=768),
        (_OPENCLIP_H,),
        dataclasses.replace(_SD_SCHEDULE, prediction_type="v_prediction"),
    ),
    "sdxl": PipelineConfig(
        _SDXL_UNET, _SDXL_VAE, (_CLIP_L, _OPENCLIP_BIGG), _SDXL_SCHEDULE, _SDXL_PADS
    ),
    "sdxl-turbo": PipelineConfig(
        dataclasses.replace(_SDXL_UNET, sample_size=64),
        dataclasses.replace(_SDXL_VAE, sample_size=512),
        (_CLIP_L, _OPENCLIP_BIGG),
        dataclasses.replace(_SDXL_SCHEDULE, timestep_spacing="trailing"),
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
