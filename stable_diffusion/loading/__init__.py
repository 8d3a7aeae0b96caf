"""The one door to loading a model: `load_components` takes an alias, a Hugging Face repo
id, a diffusers folder (`folder`, through `hub`) or a single-file checkpoint
(`single_file`) and returns the same `Components` for each."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from ..config import PipelineConfig
from .components import Components, check_native_size
from .folder import load_folder
from .hub import resolve_model
from .single_file import PREDICTION_TYPES, is_single_file, load_single_file

__all__ = ["Components", "load_components", "quantize"]


def load_components(
    model: str | os.PathLike[str],
    dtype: mx.Dtype,
    *,
    prediction_type: str | None = None,
    image_size: int | None = None,
    config: PipelineConfig | None = None,
) -> Components:
    """Load `model` with its weights in `dtype` (the VAE stays float32 where its config
    says float16 overflows). `prediction_type` ("epsilon"/"v_prediction") and `image_size`
    (native size in pixels) override what the model says or, for single files, what the
    keys cannot tell; `config` replaces the preset a single file's architecture picks."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}"
        )
    if image_size is not None:
        check_native_size(image_size)  # and its multiple once the VAE's config is read
    model = os.fspath(model)
    if is_single_file(model):
        return load_single_file(
            model, dtype, config, prediction_type=prediction_type, image_size=image_size
        )
    if config is not None:
        raise ValueError("config is only for single-file checkpoints")
    folder = resolve_model(model, prefer_float16=dtype == mx.float16)
    return load_folder(folder, dtype, prediction_type=prediction_type, image_size=image_size)


def quantize(model: nn.Module, bits: int) -> None:
    """Quantize the linear layers whose input width fits a supported group size."""

    def group_size(module: nn.Module) -> int | None:
        if not isinstance(module, nn.Linear):
            return None
        return next((g for g in (64, 32) if module.weight.shape[1] % g == 0), None)

    for size in (64, 32):
        nn.quantize(
            model,
            group_size=size,
            bits=bits,
            class_predicate=lambda _, m, size=size: group_size(m) == size,
        )
