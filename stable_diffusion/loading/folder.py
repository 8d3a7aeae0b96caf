"""Build a model's components from a diffusers-format folder."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .. import cpu
from ..config import (
    AutoencoderConfig,
    SchedulerConfig,
    TextEncoderConfig,
    TinyAutoencoderConfig,
    UNetConfig,
    read_json,
)
from ..models.clip import CLIPTextModel
from ..models.tiny_autoencoder import TinyAutoencoder
from ..models.unet import UNetModel
from ..models.vae import Autoencoder
from ..samplers import default_sampler
from ..tokenizer import Tokenizer
from ..weights import diffusers as diffusers_keys
from ..weights.files import load_weights
from ..weights.tiny_autoencoder import map_tiny_autoencoder
from .components import Components, check_native_size
from .hub import weight_files

Mapping = Callable[[dict[str, mx.array]], dict[str, mx.array]]


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the model folder is incomplete.")
    return read_json(path)


def load_into(
    model: nn.Module, weights: dict[str, mx.array], dtype: mx.Dtype, source: str
) -> nn.Module:
    """Load already-mapped weights into `model`, cast to `dtype`, with an error
    that says which checkpoint does not fit which model."""
    expected = dict(nn.utils.tree_flatten(model.parameters()))
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    wrong_shape = [
        k for k in expected.keys() & weights.keys() if expected[k].shape != weights[k].shape
    ]
    if missing or unexpected or wrong_shape:
        details = "; ".join(
            f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", sorted(wrong_shape)),
            )
            if keys
        )
        raise ValueError(
            f"the weights of {source} do not match the model built from its config ({details}). "
            "The checkpoint and config.json belong to different architectures."
        )
    # Contiguous: a convolution weight mapped from OIHW is a transposed view, which every
    # convolution would otherwise copy again (CPU UNet steps were 3-13% slower).
    model.load_weights([(k, mx.contiguous(v.astype(dtype))) for k, v in weights.items()])
    model.eval()
    cpu.track(model)  # fast_cpu() gives it the CPU paths
    return model


def _load_component(
    folder: Path, model: nn.Module, mapping: Mapping, dtype: mx.Dtype, prefer_float16: bool
) -> nn.Module:
    weights: dict[str, mx.array] = {}
    for path in weight_files(folder, prefer_float16):
        weights.update(load_weights(path))
    return load_into(model, mapping(weights), dtype, str(folder))


def load_unet(folder: Path, dtype: mx.Dtype) -> UNetModel:
    config = UNetConfig.from_dict(_read_config(folder))
    model = UNetModel(config)
    return _load_component(folder, model, diffusers_keys.map_unet, dtype, dtype == mx.float16)


def load_vae(folder: Path, dtype: mx.Dtype) -> Autoencoder:
    """The VAE in `dtype`, or in float32 where its config says float16 overflows
    (`force_upcast`, as the SDXL VAE does: black images)."""
    config = AutoencoderConfig.from_dict(_read_config(folder))
    if config.force_upcast:
        dtype = mx.float32
    model = Autoencoder(config)
    return _load_component(folder, model, diffusers_keys.map_vae, dtype, dtype == mx.float16)


def load_tiny_autoencoder(folder: Path, dtype: mx.Dtype) -> TinyAutoencoder:
    """TAESD / TAESDXL from a diffusers AutoencoderTiny folder."""
    config = TinyAutoencoderConfig.from_dict(_read_config(folder))
    model = TinyAutoencoder(config)
    return _load_component(folder, model, map_tiny_autoencoder, dtype, dtype == mx.float16)


def load_text_encoder(folder: Path, dtype: mx.Dtype) -> CLIPTextModel:
    config = TextEncoderConfig.from_dict(_read_config(folder))
    model = CLIPTextModel(config)
    return _load_component(
        folder, model, diffusers_keys.map_text_encoder, dtype, dtype == mx.float16
    )


def load_tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(folder)


def load_scheduler_config(folder: Path) -> tuple[SchedulerConfig, str]:
    """The noise schedule and the sampler matching the model's own scheduler."""
    path = folder / "scheduler_config.json"
    values = read_json(path) if path.is_file() else {}
    return SchedulerConfig.from_dict(values), default_sampler(values)


def load_folder(
    folder: Path,
    dtype: mx.Dtype,
    *,
    prediction_type: str | None = None,
    image_size: int | None = None,
) -> Components:
    """All components of the diffusers model in `folder`, one or two text encoders as its
    model_index.json says."""
    model_index = read_json(folder / "model_index.json")
    is_xl = "text_encoder_2" in model_index and model_index["text_encoder_2"][0] is not None
    force_zeros = is_xl and model_index.get("force_zeros_for_empty_prompt", True)
    scheduler_config, sampler = load_scheduler_config(folder / "scheduler")
    if prediction_type is not None:
        scheduler_config = dataclasses.replace(scheduler_config, prediction_type=prediction_type)
    suffixes = ["", "_2"] if is_xl else [""]
    tokenizers = [load_tokenizer(folder / f"tokenizer{suffix}") for suffix in suffixes]
    text_encoders = [load_text_encoder(folder / f"text_encoder{s}", dtype) for s in suffixes]
    unet = load_unet(folder / "unet", dtype)
    vae = load_vae(folder / "vae", dtype)
    if image_size is not None:
        check_native_size(image_size, vae.downscale)
    return Components(
        path=folder,
        architecture=None,
        is_xl=is_xl,
        force_zeros_for_empty_prompt=force_zeros,
        scheduler_config=scheduler_config,
        default_sampler=sampler,
        native_size=image_size or unet.config.sample_size * vae.downscale,
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        unet=unet,
        vae=vae,
    )
