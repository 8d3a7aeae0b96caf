"""Load a whole pipeline from one .safetensors or .ckpt file (A1111/ComfyUI/civitai style).

Such files carry the weights of all components in the original CompVis/SGM layout, and no
config: the architecture is detected from the keys, the configs come from `PRESETS`, and the
tokenizers from the CLIP vocabulary shipped with the package, so nothing is downloaded.
What the keys cannot tell (epsilon or v prediction, the native size) the user states.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..config import PRESETS, PipelineConfig, TextEncoderConfig
from ..models.clip import CLIPTextModel
from ..models.unet import UNetModel
from ..models.vae import Autoencoder
from ..tokenizer import Tokenizer, clip_vocabulary
from ..weights import diffusers as diffusers_keys
from ..weights import original
from ..weights.files import SUPPORTED_SUFFIXES, load_weights
from .components import Components, check_native_size
from .folder import load_into

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")

ARCHITECTURES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
PREDICTION_TYPES = ("epsilon", "v_prediction")

# An inpainting UNet's input: the latents, the mask and the masked image's latents.
INPAINTING_CHANNELS = 9

# 256 byte tokens, their 256 end-of-word variants, and the two special tokens.
_CLIP_NON_MERGE_TOKENS = 514


class SingleFileError(ValueError):
    """A single file is not a supported Stable Diffusion checkpoint; says what it is instead."""


def is_single_file(model: str) -> bool:
    """Whether `model` names a checkpoint file rather than a folder, alias or repo id."""
    path = Path(model).expanduser()
    return path.is_file() or path.suffix.lower() in SUPPORTED_SUFFIXES


def _examples(keys: list[str], n: int = 3) -> str:
    return ", ".join(sorted(keys)[:n]) + (" ..." if len(keys) > n else "")


def _top_level_names(keys: list[str]) -> str:
    return ", ".join(sorted({k.split(".")[0] for k in keys})[:8])


def detect_architecture(weights: dict[str, mx.array]) -> str:
    """The architecture of a single-file checkpoint from its keys: "sd1", "sd2" or "sdxl".
    Anything else raises a SingleFileError naming what the file is instead."""
    keys = list(weights)

    def having(*parts: str) -> list[str]:
        return [k for k in keys if any(p in k for p in parts)]

    if lora := having("lora_down", "lora_up", "lora_A.", "lora_B.", "hada_w", "lokr_w"):
        raise SingleFileError(
            f"this is a LoRA ({_examples(lora)}), not a model: load a model and pass the "
            "file with --lora (API: StableDiffusion(..., loras=[(path, strength)]))"
        )
    unet = [k for k in keys if k.startswith(UNET)]
    if dit := having("joint_blocks", "double_blocks", "single_blocks", "single_transformer"):
        raise SingleFileError(
            f"this is a transformer (MMDiT/DiT) model such as SD3 or Flux ({_examples(dit)}); "
            "only the UNet models SD 1.x, SD 2.x and SDXL are supported"
        )
    if control := having("control_model.", "controlnet_"):
        raise SingleFileError(f"this is a ControlNet ({_examples(control)}), not a base model")
    if not unet:
        if having("encoder.down.", "decoder.up."):
            raise SingleFileError(
                "this is a VAE-only file (encoder.*/decoder.* keys and no UNet); "
                "load a full model checkpoint"
            )
        if having("down_blocks.", "text_model.", "up_blocks."):
            raise SingleFileError(
                "this is one component in the diffusers layout (found "
                f"{_top_level_names(keys)}); pass the diffusers model folder instead"
            )
        raise SingleFileError(
            f"this is not a Stable Diffusion checkpoint: it has no UNet ({UNET}*); its keys "
            f"start with {_top_level_names(keys)}"
        )
    if not having(f"{UNET}input_blocks."):
        raise SingleFileError(
            f"its UNet is not in the original SD layout ({_examples(unet)}); only SD 1.x, "
            "SD 2.x and SDXL UNets are supported"
        )
    channels = unet_input_channels(weights)
    if channels not in (4, INPAINTING_CHANNELS):
        kind = {8: "an instruct-pix2pix (image editing) model"}
        raise SingleFileError(
            f"its UNet takes {channels} input channels "
            f"({kind.get(channels, 'not a text-to-image model')}); only text-to-image models "
            f"(4 latent channels) and inpainting models ({INPAINTING_CHANNELS}) are supported"
        )
    if having("conditioner.embedders.0.model.") and not having(SDXL_TEXT[1]):
        raise SingleFileError(
            "this is the SDXL refiner (one OpenCLIP text encoder in conditioner.embedders.0), "
            "which is not supported; use the SDXL base model"
        )
    if having(SDXL_TEXT[1]):
        architecture = "sdxl"
    elif having(SD2_TEXT):
        architecture = "sd2"
    elif having(SD1_TEXT):
        architecture = "sd1"
    else:
        raise SingleFileError(
            "it has a UNet but no text encoder (cond_stage_model.* or conditioner.embedders.*); "
            "UNet-only files are not supported"
        )
    if not having(VAE):
        raise SingleFileError(
            f"this {ARCHITECTURES[architecture]} checkpoint has no VAE ({VAE}*); "
            "UNet-only files are not supported"
        )
    return architecture


def unet_input_channels(weights: dict[str, mx.array]) -> int:
    """The UNet's input channels, from its first convolution (4 when the key is missing,
    which loading then reports)."""
    conv_in = weights.get(f"{UNET}input_blocks.0.0.weight")
    return conv_in.shape[1] if conv_in is not None and conv_in.ndim == 4 else 4


def preset_for(architecture: str, prediction_type: str | None = None) -> PipelineConfig:
    """The full-size config of a detected architecture. SD 2.x files look the same for the
    512 base model (epsilon) and the 768 one (v-prediction): v-prediction at 768 unless
    epsilon is asked for."""
    if architecture == "sd2":
        return PRESETS["sd-2.1-base" if prediction_type == "epsilon" else "sd-2.1"]
    return PRESETS["sd-1.5" if architecture == "sd1" else "sdxl"]


def with_overrides(
    config: PipelineConfig, prediction_type: str | None = None, image_size: int | None = None
) -> PipelineConfig:
    """`config` predicting `prediction_type` and with `image_size` pixels as native size."""
    if prediction_type is not None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, "
                f"got {prediction_type!r}"
            )
        scheduler = dataclasses.replace(config.scheduler, prediction_type=prediction_type)
        config = dataclasses.replace(config, scheduler=scheduler)
    if image_size is not None:
        downscale = 2 ** (len(config.vae.block_out_channels) - 1)
        check_native_size(image_size, downscale)
        config = dataclasses.replace(
            config,
            unet=dataclasses.replace(config.unet, sample_size=image_size // downscale),
            vae=dataclasses.replace(config.vae, sample_size=image_size),
        )
    return config


def tokenizer_for(config: TextEncoderConfig, pad_token: str) -> Tokenizer:
    """The CLIP tokenizer of a text encoder, from the shipped vocabulary. A smaller
    vocabulary (test models) is its first merges, as `clip_vocabulary` lays them out."""
    vocab, merges = clip_vocabulary(max_merges=config.vocab_size - _CLIP_NON_MERGE_TOKENS)
    return Tokenizer(vocab, merges, pad_token=pad_token, max_length=config.max_position_embeddings)


def _component(weights: dict[str, mx.array], prefix: str) -> dict[str, mx.array]:
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def _text_encoder_mappings(
    architecture: str, configs: tuple[TextEncoderConfig, ...]
) -> list[tuple[str, Callable[[dict[str, mx.array]], dict[str, mx.array]]]]:
    """(key prefix, mapping to transformers names) of each text encoder."""
    if architecture == "sd1":
        return [(SD1_TEXT, original.map_clip)]
    if architecture == "sd2":
        return [(SD2_TEXT, lambda w: original.map_open_clip(w, configs[0]))]
    return [
        (SDXL_TEXT[0], original.map_clip),
        (SDXL_TEXT[1], lambda w: original.map_open_clip(w, configs[1])),
    ]


def load_single_file(
    path: str | Path,
    dtype: mx.Dtype,
    config: PipelineConfig | None = None,
    prediction_type: str | None = None,
    image_size: int | None = None,
) -> Components:
    """Build all components from a single-file checkpoint.

    `config` replaces the preset picked from the detected architecture (it must be the same
    kind: one or two text encoders); `prediction_type` ("epsilon" / "v_prediction") and
    `image_size` (native size in pixels) override it. Loads only through `load_weights`, so
    a pickled .ckpt never runs code. The VAE stays float32 where the config says float16
    overflows (`force_upcast`)."""
    path = Path(path).expanduser()
    weights = load_weights(path)
    try:
        architecture = detect_architecture(weights)
    except SingleFileError as e:
        raise SingleFileError(f"{path} cannot be loaded as a model: {e}") from None
    config = config or preset_for(architecture, prediction_type)
    if config.is_xl != (architecture == "sdxl"):
        raise SingleFileError(
            f"{path} is an {ARCHITECTURES[architecture]} checkpoint but the given config has "
            f"{len(config.text_encoders)} text encoder(s)"
        )
    config = with_overrides(config, prediction_type, image_size)
    # Inpainting checkpoints differ from their architecture's preset by this alone.
    unet_config = dataclasses.replace(config.unet, in_channels=unet_input_channels(weights))
    config = dataclasses.replace(config, unet=unet_config)

    def build(model: nn.Module, mapped: dict[str, mx.array], what: str, dtype: mx.Dtype):
        try:
            return load_into(model, mapped, dtype, f"{path} ({what})")
        except ValueError as e:
            raise SingleFileError(
                f"{e} (detected an {ARCHITECTURES[architecture]} checkpoint; a model with a "
                "non-standard architecture cannot be loaded from a single file)"
            ) from None

    try:
        unet_weights = original.map_unet(_component(weights, UNET), config.unet)
    except ValueError as e:
        raise SingleFileError(f"{path}: {e}") from None
    unet = build(UNetModel(config.unet), diffusers_keys.map_unet(unet_weights), "UNet", dtype)
    vae_weights = diffusers_keys.map_vae(original.map_vae(_component(weights, VAE), config.vae))
    vae_dtype = mx.float32 if config.vae.force_upcast else dtype
    vae = build(Autoencoder(config.vae), vae_weights, "VAE", vae_dtype)

    text_encoders = []
    mappings = _text_encoder_mappings(architecture, config.text_encoders)
    for index, ((prefix, mapping), encoder_config) in enumerate(
        zip(mappings, config.text_encoders, strict=True)
    ):
        mapped = diffusers_keys.map_text_encoder(mapping(_component(weights, prefix)))
        name = f"text encoder {index + 1}" if config.is_xl else "text encoder"
        text_encoders.append(build(CLIPTextModel(encoder_config), mapped, name, dtype))
    tokenizers = [
        tokenizer_for(encoder_config, pad)
        for encoder_config, pad in zip(config.text_encoders, config.pad_tokens, strict=True)
    ]
    return Components(
        path=path,
        architecture=architecture,
        is_xl=config.is_xl,
        force_zeros_for_empty_prompt=config.is_xl,
        scheduler_config=config.scheduler,
        # A1111's default; single files name no scheduler.
        default_sampler="dpm++2m_karras",
        native_size=config.unet.sample_size * vae.downscale,
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        unet=unet,
        vae=vae,
    )
