"""Diffusers-format pipeline folders with deterministic random weights: the full-size
architectures without a download, in the layout and file format hub repos ship."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from stable_diffusion.config import PipelineConfig, TinyAutoencoderConfig
from stable_diffusion.models.clip import CLIPTextModel
from stable_diffusion.models.tiny_autoencoder import TinyAutoencoder
from stable_diffusion.models.unet import UNetModel
from stable_diffusion.models.vae import Autoencoder
from stable_diffusion.tokenizer import clip_vocabulary

from .architectures import CONTEXT_TOKENS, TAESD_CONFIG


def flat_parameters(model: nn.Module) -> list[tuple[str, mx.array]]:
    """`model`'s parameters as (dotted name, array) pairs."""
    return cast("list[tuple[str, mx.array]]", nn.utils.tree_flatten(model.parameters()))


def _is_conv_projection(key: str, conv_projections: bool) -> bool:
    return conv_projections and key.endswith(("proj_in.weight", "proj_out.weight"))


def _diffusers_shape(key: str, shape: tuple[int, ...], conv_projections: bool) -> tuple[int, ...]:
    if len(shape) == 4:
        return (shape[0], shape[3], shape[1], shape[2])  # OHWI -> OIHW
    if _is_conv_projection(key, conv_projections):
        return (*shape, 1, 1)  # SD 1.x transformer projections are 1x1 convolutions
    return shape


def _in_order(function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
    """`function` of each item, computed on all cores in threads (numpy's random generators
    and arithmetic release the GIL), yielded in order, a few per core computed ahead."""
    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:
        pending: collections.deque[Future] = collections.deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _random_parameters(
    model: nn.Module, seed: int, conv_projections: bool
) -> Iterator[tuple[str, np.ndarray]]:
    """Deterministic random parameters in diffusers' layout: norms at weight 1 / bias 0,
    everything else normal * 0.02 (keeps activations finite through the deep networks,
    float16 included). Each tensor has a generator of its own, so they can be made in
    parallel."""
    norms = {
        name for name, m in model.named_modules() if isinstance(m, nn.GroupNorm | nn.LayerNorm)
    }

    def parameter(indexed: tuple[int, tuple[str, mx.array]]) -> tuple[str, np.ndarray]:
        index, (key, value) = indexed
        module, _, kind = key.rpartition(".")
        if module in norms:
            array = np.full(value.shape, 1.0 if kind == "weight" else 0.0, np.float32)
        else:
            array = np.random.default_rng([seed, index]).standard_normal(value.shape, np.float32)
            array *= 0.02
        if array.ndim == 4:
            array = np.ascontiguousarray(array.transpose(0, 3, 1, 2))
        return key, array.reshape(_diffusers_shape(key, value.shape, conv_projections))

    yield from _in_order(parameter, enumerate(flat_parameters(model)))


def _write_safetensors(
    paths: dict[str, Path],
    tensors: list[tuple[str, tuple[int, ...]]],
    arrays: Iterator[tuple[str, np.ndarray]],
) -> None:
    """Stream tensors into one safetensors file per dtype ("F32", "F16") without holding
    them all in memory (the SDXL UNet is 10 GB in float32)."""
    sizes = {"F32": 4, "F16": 2}
    files = {}
    for dtype, path in paths.items():
        header, offset = {}, 0
        for name, shape in tensors:
            nbytes = int(np.prod(shape, dtype=np.int64)) * sizes[dtype]
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        files[dtype] = path.open("wb")
        files[dtype].write(struct.pack("<Q", len(encoded)) + encoded)
    try:
        for _, array in arrays:
            for dtype, file in files.items():
                file.write((array.astype(np.float16) if dtype == "F16" else array).data)
    finally:
        for file in files.values():
            file.close()


def _write_component(
    folder: Path,
    stem: str,
    model: nn.Module,
    config: dict[str, Any],
    seed: int,
    float16: bool,
    conv_projections: bool = False,
) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    shapes = [
        (key, _diffusers_shape(key, value.shape, conv_projections))
        for key, value in flat_parameters(model)
    ]
    paths = {"F32": folder / f"{stem}.safetensors"}
    if float16:
        paths["F16"] = folder / f"{stem}.fp16.safetensors"
    _write_safetensors(paths, shapes, _random_parameters(model, seed, conv_projections))


def _config_dict(config: Any, class_name: str, **extra: Any) -> dict[str, Any]:
    values = {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }
    return {"_class_name": class_name, **values, **extra}


def _write_tokenizer(folder: Path, pad_token: str) -> None:
    vocab, merges = clip_vocabulary()
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"pad_token": pad_token, "model_max_length": CONTEXT_TOKENS})
    )


def write_random_pipeline(
    config: PipelineConfig, folder: Path, seed: int = 0, float16: bool = False
) -> Path:
    """A diffusers-format pipeline folder for `config` with random weights (`float16` adds
    the .fp16 weight variants, as hub repos have)."""
    xl = config.is_xl
    encoders = ["text_encoder", "text_encoder_2"][: len(config.text_encoders)]
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for i, (name, text) in enumerate(zip(encoders, config.text_encoders, strict=True)):
        architecture = "CLIPTextModelWithProjection" if text.with_projection else "CLIPTextModel"
        index[name] = ["transformers", architecture]
        index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
        values = {k: v for k, v in dataclasses.asdict(text).items() if k != "with_projection"}
        _write_component(
            folder / name,
            "model",
            CLIPTextModel(text),
            {**values, "architectures": [architecture]},
            seed + 1 + i,
            float16,
        )
        _write_tokenizer(folder / name.replace("text_encoder", "tokenizer"), config.pad_tokens[i])
    blocks = len(config.vae.block_out_channels)
    vae_config = _config_dict(
        config.vae,
        "AutoencoderKL",
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
    )
    _write_component(
        folder / "vae",
        "diffusion_pytorch_model",
        Autoencoder(config.vae),
        vae_config,
        seed + 3,
        float16,
    )
    _write_component(
        folder / "unet",
        "diffusion_pytorch_model",
        UNetModel(config.unet),
        _config_dict(config.unet, "UNet2DConditionModel"),
        seed,
        float16,
        conv_projections=not config.unet.use_linear_projection,
    )
    (folder / "scheduler").mkdir()
    # The keys a hub config lacks stay out, as in the hub's files.
    scheduler = _config_dict(config.scheduler, "EulerDiscreteScheduler")
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({k: v for k, v in scheduler.items() if v is not None})
    )
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def reuse_or_write(config: PipelineConfig, folder: Path, seed: int = 0) -> bool:
    """Make `folder` a random-weight pipeline for `config`, unless a complete one is there
    already (from an earlier run: `model_index.json` is written last, into a folder renamed
    into place once complete). Whether it was written now."""
    if (folder / "model_index.json").is_file():
        return False
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_random_pipeline(config, partial, seed)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return True


def weights_on_disk(config: PipelineConfig, float16: bool) -> int:
    """The bytes of weights `write_random_pipeline` writes for `config`, counted from the
    models' shapes before any weight is made."""
    models = [
        *map(CLIPTextModel, config.text_encoders),
        Autoencoder(config.vae),
        UNetModel(config.unet),
    ]
    values = sum(value.size for model in models for _, value in flat_parameters(model))
    return values * (4 + 2 * float16)


def write_random_tiny_autoencoder(folder: Path, seed: int = 0) -> Path:
    """A diffusers AutoencoderTiny folder (TAESD's architecture and config.json) with random
    weights: its module names are diffusers' own (see weights/tiny_autoencoder.py)."""
    model = TinyAutoencoder(TinyAutoencoderConfig.from_dict(TAESD_CONFIG))
    _write_component(folder, "diffusion_pytorch_model", model, TAESD_CONFIG, seed, False)
    return folder
