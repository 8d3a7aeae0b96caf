"""Benchmark the full-size models with random weights, without the hub, and optionally
diffusers/PyTorch on the very same weights.

    python -m stable_diffusion.benchmark --models sd-1.5,sdxl-turbo --dtypes float32 --reference

For each architecture of `config.PRESETS` it writes a diffusers-format model folder with
random weights (a fixed seed), loads it through the pipeline as a user would, and measures
per dtype and batch (2 = classifier-free guidance): load time, text encoding, one UNet step
(median after a warm-up), the VAE decode, a whole image, peak memory and the UNet's achieved
GFLOP/s (FLOPs counted from the config) against this machine's single-matmul rate.
`--reference` then runs diffusers' UNet and VAE on the same files and the same device (in a
process of its own: see benchmark_reference.py), checks that they compute what ours did in
float32, and prints the speed-ups: float32 on a CPU (where PyTorch's float16 is no contender),
float32 and float16 on a GPU. `--rounds N` then times both sides' float32 UNet steps and
decodes N - 1 more times, alternately, and reports each side's median over the rounds and the
median of the rounds' speed-ups: on a shared machine, whose speed drifts by 10-25% from one
minute to the next, one side measured minutes after the other inherits that drift.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import StableDiffusion
from .config import (
    PRESETS,
    AutoencoderConfig,
    PipelineConfig,
    SchedulerConfig,
    TextEncoderConfig,
    UNetConfig,
)
from .cpu import compute_dtype, fast_cpu, on_cpu
from .models.clip import CLIPTextModel
from .models.unet import UNetModel
from .models.vae import Autoencoder
from .tokenizer import clip_vocabulary

CONTEXT_TOKENS = 77
PROMPT = "a photo of an astronaut riding a horse on mars"
GIB = 1024**3

# Small architectures with the real structure, for tests and quick runs; not user presets.
_TINY_TEXT = TextEncoderConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    projection_dim=32,
)  # fmt: skip
_TINY_VAE = AutoencoderConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                              norm_num_groups=4, sample_size=64)
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
        SchedulerConfig(),
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
        SchedulerConfig(timestep_spacing="trailing"),
        ("<|endoftext|>", "!"),
    ),
}
ARCHITECTURES = {**PRESETS, **TINY_PRESETS}


# -- FLOPs --------------------------------------------------------------------------------
#
# Multiply-adds of the convolutions, linear layers and attention matmuls (QK^T and PV),
# times two; norms, activations and additions are left out (a few percent at most).


def _half(size: int) -> int:
    return (size + 1) // 2  # a stride-2, padding-1 convolution


def unet_flops(config: UNetConfig, batch: int, height: int, width: int,
               context_tokens: int = CONTEXT_TOKENS) -> int:
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
        cross_attention = (2 * pixels * dims * dims + 2 * context_tokens * context * dims
                           + 2 * pixels * context_tokens * dims)
        feed_forward = pixels * dims * 8 * dims + pixels * 4 * dims * dims
        return 2 * pixels * dims * dims + depth * (self_attention + cross_attention + feed_forward)

    macs = channels[0] * time_dims + time_dims * time_dims
    if config.addition_embed_type == "text_time":
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


def text_encoder_flops(config: TextEncoderConfig, batch: int,
                       tokens: int = CONTEXT_TOKENS) -> int:
    """FLOPs of encoding `batch` prompts of `tokens` tokens."""
    dims = config.hidden_size
    layer = 4 * tokens * dims * dims + 2 * tokens * tokens * dims
    layer += 2 * tokens * dims * config.intermediate_size
    projection = dims * config.projection_dim if config.with_projection else 0
    return 2 * batch * (config.num_hidden_layers * layer + projection)


# -- random-weight model folders ----------------------------------------------------------


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
    norms = {name for name, m in model.named_modules()
             if isinstance(m, nn.GroupNorm | nn.LayerNorm)}

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

    yield from _in_order(parameter, enumerate(nn.utils.tree_flatten(model.parameters())))


def _write_safetensors(paths: dict[str, Path], tensors: list[tuple[str, tuple[int, ...]]],
                       arrays: Iterator[tuple[str, np.ndarray]]) -> None:
    """Stream tensors into one safetensors file per dtype ("F32", "F16") without holding
    them all in memory (the SDXL UNet is 10 GB in float32)."""
    sizes = {"F32": 4, "F16": 2}
    files = {}
    for dtype, path in paths.items():
        header, offset = {}, 0
        for name, shape in tensors:
            nbytes = int(np.prod(shape, dtype=np.int64)) * sizes[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
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


def _write_component(folder: Path, stem: str, model: nn.Module, config: dict[str, Any],
                     seed: int, float16: bool, conv_projections: bool = False) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    shapes = [(key, _diffusers_shape(key, value.shape, conv_projections))
              for key, value in nn.utils.tree_flatten(model.parameters())]
    paths = {"F32": folder / f"{stem}.safetensors"}
    if float16:
        paths["F16"] = folder / f"{stem}.fp16.safetensors"
    _write_safetensors(paths, shapes, _random_parameters(model, seed, conv_projections))


def _config_dict(config: Any, class_name: str, **extra: Any) -> dict[str, Any]:
    values = {k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(config).items()}
    return {"_class_name": class_name, **values, **extra}


def _write_tokenizer(folder: Path, pad_token: str) -> None:
    vocab, merges = clip_vocabulary()
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"pad_token": pad_token, "model_max_length": CONTEXT_TOKENS}))


def write_random_pipeline(config: PipelineConfig, folder: Path, seed: int = 0,
                          float16: bool = False) -> Path:
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
        _write_component(folder / name, "model", CLIPTextModel(text),
                         {**values, "architectures": [architecture]}, seed + 1 + i, float16)
        _write_tokenizer(folder / name.replace("text_encoder", "tokenizer"),
                         config.pad_tokens[i])
    blocks = len(config.vae.block_out_channels)
    vae_config = _config_dict(config.vae, "AutoencoderKL",
                              down_block_types=["DownEncoderBlock2D"] * blocks,
                              up_block_types=["UpDecoderBlock2D"] * blocks)
    _write_component(folder / "vae", "diffusion_pytorch_model", Autoencoder(config.vae),
                     vae_config, seed + 3, float16)
    _write_component(folder / "unet", "diffusion_pytorch_model", UNetModel(config.unet),
                     _config_dict(config.unet, "UNet2DConditionModel"), seed, float16,
                     conv_projections=not config.unet.use_linear_projection)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(_config_dict(config.scheduler, "EulerDiscreteScheduler")))
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def weights_on_disk(config: PipelineConfig, float16: bool) -> int:
    """The bytes of weights `write_random_pipeline` writes for `config`, counted from the
    models' shapes before any weight is made."""
    models = [*map(CLIPTextModel, config.text_encoders), Autoencoder(config.vae),
              UNetModel(config.unet)]
    values = sum(value.size for model in models
                 for _, value in nn.utils.tree_flatten(model.parameters()))
    return values * (4 + 2 * float16)


def check_disk_space(args: argparse.Namespace) -> None:
    """Stop, before anything is measured, where the largest model's random weights (written
    and removed one model at a time) do not fit in the working folder's disk."""
    float16 = any(_dtype_options(d)[0] for d in args.dtypes)
    needed = {name: weights_on_disk(ARCHITECTURES[name], float16) for name in args.models}
    largest = max(needed, key=needed.__getitem__)
    workdir = Path(args.workdir or tempfile.gettempdir()).absolute()
    existing = next(folder for folder in (workdir, *workdir.parents) if folder.exists())
    free = shutil.disk_usage(existing).free
    if needed[largest] > free:
        raise SystemExit(
            f"{largest}'s random weights need {needed[largest] / GIB:.1f} GiB on disk, but "
            f"{existing} has {free / GIB:.1f} GiB free: free some space there, or pass "
            "--workdir on a disk with more")


# -- measurements -------------------------------------------------------------------------


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(dtype: mx.Dtype = mx.float32, repeats: int = 10) -> float:
    """This machine's rate on one large matmul (4096x1280 @ 1280x1280) in `dtype`, the
    ceiling the UNet's sustained rate in that dtype is compared with. On a GPU the matmul
    runs 100 times per timing, to be well clear of the launch overhead."""
    a = mx.random.normal((4096, 1280)).astype(dtype)
    b = mx.random.normal((1280, 1280)).astype(dtype)
    mx.eval(a, b)
    calls = 1 if on_cpu() else 100
    seconds = median_time(lambda: mx.eval([a @ b for _ in range(calls)]), repeats, warmup=2)
    return calls * 2 * 4096 * 1280 * 1280 / seconds / 1e9


def matmul_rates(dtypes: list[str]) -> dict[str, float]:
    """The single-matmul GFLOP/s of each compute dtype that `dtypes` run in."""
    computed = {compute_dtype(mx.float16 if _dtype_options(d)[0] else mx.float32)
                for d in dtypes}
    return {_dtype_name(dtype): matmul_gflops(dtype)
            for dtype in sorted(computed, key=_dtype_name, reverse=True)}


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


@dataclasses.dataclass
class UNetInputs:
    latents: np.ndarray  # NHWC
    timestep: float
    context: np.ndarray
    text_embeds: np.ndarray | None
    time_ids: np.ndarray | None

    @classmethod
    def random(cls, config: UNetConfig, batch: int, height: int, width: int,
               seed: int = 1) -> UNetInputs:
        rng = np.random.default_rng(seed)

        def normal(*shape: int) -> np.ndarray:
            return rng.standard_normal(shape, dtype=np.float32)

        text_embeds = time_ids = None
        if config.addition_embed_type == "text_time":
            time_dims = 6 * config.addition_time_embed_dim
            text_embeds = normal(batch, config.projection_class_embeddings_input_dim - time_dims)
            size = [8 * height, 8 * width]
            time_ids = np.array([[*size, 0, 0, *size]] * batch, np.float32)
        return cls(normal(batch, height, width, config.in_channels), 500.0,
                   normal(batch, CONTEXT_TOKENS, config.cross_attention_dim), text_embeds, time_ids)

    def mlx(self, dtype: mx.Dtype) -> dict[str, Any]:
        def cast(a: np.ndarray | None) -> mx.array | None:
            return None if a is None else mx.array(a).astype(dtype)

        return {"x": cast(self.latents), "timesteps": mx.array([self.timestep]),
                "encoder_hidden_states": cast(self.context), "text_embeds": cast(self.text_embeds),
                "time_ids": None if self.time_ids is None else mx.array(self.time_ids)}


def _weights_bytes(sd: StableDiffusion) -> int:
    modules = [*sd.text_encoders, sd.unet, sd.vae]
    return sum(v.nbytes for m in modules for _, v in nn.utils.tree_flatten(m.parameters()))


def _encode(sd: StableDiffusion, texts: list[str]) -> None:
    """The pipeline's own text conditioning, one 77-token chunk per prompt."""
    hidden, pooled = sd._encode_texts(texts, n_chunks=1)
    mx.eval(hidden if pooled is None else (hidden, pooled))


def _phase(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """One `fast_cpu()` block per phase (unless --lazy), as the scripts run: leaving it
    frees the phase's Winograd kernels and empties MLX's buffer cache, so that the buffers
    of one phase do not crowd out the next's (a UNet step after a 512px decode in the same
    block took 20% longer)."""
    return contextlib.nullcontext() if args.lazy else fast_cpu()


def _image_as_the_scripts_run(folder: Path, dtype: str, batch: int,
                              args: argparse.Namespace) -> tuple[float, float]:
    """Seconds and peak GiB of one image from a fresh pipeline, made as txt2image.py makes
    it: weights loaded lazily, text encoders released before the first step and the UNet
    before decoding."""
    float16, quantize = _dtype_options(dtype)
    mx.reset_peak_memory()
    start = time.perf_counter()
    sd = StableDiffusion(str(folder), float16=float16, quantize=quantize)
    latents = sd.generate_latents(PROMPT, num_steps=args.steps, seed=0, width=args.size,
                                  height=args.size, cfg_weight=7.5 if batch == 2 else 0.0,
                                  sampler="euler")
    with _phase(args):
        latents.compute_conditioning()
        sd.release_text_encoders()
        for x in latents:
            mx.eval(x)
    sd.release_unet()
    with _phase(args):
        mx.eval(sd.decode(x))
    return time.perf_counter() - start, mx.get_peak_memory() / GIB


def _dtype_options(name: str) -> tuple[bool, bool]:
    """--dtypes entry -> (float16, quantize). q8: 4-bit text encoders and 8-bit UNet linear
    layers over float16 weights. On a CPU everything computes in float32 (float16 matmuls
    miss the BLAS there): float16 and q8 weights only save memory."""
    options = {"float32": (False, False), "float16": (True, False), "q8": (True, True)}
    if name not in options:
        raise SystemExit(f"unknown dtype {name!r}; choose from {', '.join(options)}")
    return options[name]


@dataclasses.dataclass
class Parity:
    """What the float32 MLX models computed on fixed inputs, for the reference to match."""

    unet_inputs: UNetInputs
    unet_output: np.ndarray  # NHWC
    latents: np.ndarray  # NHWC, unscaled
    decoded: np.ndarray  # NHWC


def _decode_seconds(sd: StableDiffusion, config: PipelineConfig, latent: int,
                    repeats: int) -> float:
    noise = mx.random.normal((1, latent, latent, config.unet.in_channels))
    return median_time(lambda: mx.eval(sd.decode(noise)), repeats)


def _measure(sd: StableDiffusion, config: PipelineConfig, batch: int,
             args: argparse.Namespace, matmul_rates: dict[str, float]) -> dict[str, Any]:
    """Text encoding and UNet timings of one batch size, all models loaded; the UNet's rate
    against the single matmul's in the dtype it computes in."""
    latent = args.size // sd.vae.downscale
    row: dict[str, Any] = {"batch": batch}
    row["text_s"] = median_time(lambda: _encode(sd, [PROMPT] * batch), args.repeats)
    row["unet_step_s"] = _unet_step_seconds(sd, config, batch, args)
    flops = unet_flops(config.unet, batch, latent, latent)
    row["unet_gflops"] = flops / row["unet_step_s"] / 1e9
    activations = _dtype_name(compute_dtype(sd.dtype))
    row["unet_matmul_pct"] = 100 * row["unet_gflops"] / matmul_rates[activations]
    return row


def _unet_step_seconds(sd: StableDiffusion, config: PipelineConfig, batch: int,
                       args: argparse.Namespace) -> float:
    latent = args.size // sd.vae.downscale
    unet_inputs = UNetInputs.random(config.unet, batch, latent, latent)
    unet_inputs = unet_inputs.mlx(compute_dtype(sd.dtype))
    return median_time(lambda: mx.eval(sd.unet(**unet_inputs)), args.repeats)


def _parity(sd: StableDiffusion, config: PipelineConfig, latent: int) -> Parity:
    inputs = UNetInputs.random(config.unet, 1, latent, latent)
    latents = np.random.default_rng(2).standard_normal(
        (1, latent, latent, config.vae.latent_channels), np.float32)
    return Parity(inputs, np.array(sd.unet(**inputs.mlx(mx.float32))), latents,
                  np.array(sd.vae.decode(mx.array(latents))))


def run_mlx(
    name: str, config: PipelineConfig, folder: Path, dtype: str, args: argparse.Namespace,
    matmul_rates: dict[str, float],
) -> tuple[list[dict[str, Any]], Parity | None]:
    """Load the pipeline from `folder` in `dtype` and measure it at batch 1 and 2; with
    --reference, also what float32 computes on the parity inputs. Then one image per batch
    size as the scripts make it, from a fresh pipeline: its time and peak memory."""
    float16, quantize = _dtype_options(dtype)
    start = time.perf_counter()
    sd = StableDiffusion(str(folder), float16=float16, quantize=quantize)
    sd.preload()
    common = {"model": name, "dtype": dtype, "load_s": time.perf_counter() - start,
              "weights_gb": _weights_bytes(sd) / GIB}
    # The UNet before the decode, as the scripts (and the reference) run them.
    measured = []
    for batch in (1, 2):
        with _phase(args):
            measured.append(_measure(sd, config, batch, args, matmul_rates))
    # One image per decode whatever the UNet's batch: measured once.
    latent = args.size // sd.vae.downscale
    with _phase(args):
        common["vae_decode_s"] = _decode_seconds(sd, config, latent, args.repeats)
    common["vae_gflops"] = vae_decode_flops(config.vae, 1, latent, latent) / common[
        "vae_decode_s"] / 1e9
    rows = [{**common, **row} for row in measured]
    parity = None
    if dtype == "float32" and args.reference:
        with _phase(args):
            parity = _parity(sd, config, latent)
    del sd
    gc.collect()
    mx.clear_cache()
    for row in rows:
        row["image_s"], row["peak_gb"] = _image_as_the_scripts_run(folder, dtype, row["batch"],
                                                                  args)
        gc.collect()
        mx.clear_cache()
        print(_progress(row), flush=True)
    return rows, parity


def float32_timings(config: PipelineConfig, folder: Path,
                    args: argparse.Namespace) -> dict[str, float]:
    """One more round of the float32 UNet steps (batch 1 and 2) and decode, from a fresh
    pipeline: the timings `--rounds` alternates with the reference's."""
    sd = StableDiffusion(str(folder), float16=False)
    sd.preload()
    timings = {}
    for batch in (1, 2):
        with _phase(args):
            timings[f"unet_step_s_batch{batch}"] = _unet_step_seconds(sd, config, batch, args)
    with _phase(args):
        timings["vae_decode_s"] = _decode_seconds(sd, config, args.size // sd.vae.downscale,
                                                  args.repeats)
    del sd
    gc.collect()
    mx.clear_cache()
    return timings


def run_rounds(name: str, config: PipelineConfig, folder: Path, args: argparse.Namespace,
               parity: Parity, first: dict[str, dict[str, float]],
               ) -> list[dict[str, dict[str, float]]]:
    """The `first` round and the rest of `--rounds`: MLX's float32 timings, then the
    reference's, in turn."""
    rounds = [first]
    for number in range(2, args.rounds + 1):
        print(f"{name}: round {number} of {args.rounds}, float32", flush=True)
        ours = float32_timings(config, folder, args)
        print(_progress({"model": name, "dtype": "float32", **ours}), flush=True)
        rounds.append(_round(ours, run_reference(name, folder, args, parity, ["float32"])))
    return rounds


def _round(ours: dict[str, float], reference: dict[str, Any]) -> dict[str, dict[str, float]]:
    """A round of `--rounds`: our float32 timings and the reference's of the same names."""
    return {"mlx": ours, "pytorch": {key: reference[f"float32_{key}"] for key in ours}}


def _first_round(name: str, rows: list[dict[str, Any]],
                 reference: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The float32 timings of the full measurement, as a round of `--rounds`."""
    float32_rows = [r for r in rows if r["model"] == name and r["dtype"] == "float32"]
    ours = {f"unet_step_s_batch{r['batch']}": r["unet_step_s"] for r in float32_rows}
    ours["vae_decode_s"] = float32_rows[0]["vae_decode_s"]
    return _round(ours, reference)


def _progress(row: dict[str, Any]) -> str:
    values = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in row.items() if v is not None and k not in ("model", "dtype"))
    return f"  {row['model']} {row['dtype']}: {values}"


# -- the PyTorch reference ----------------------------------------------------------------


def _relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def reference_dtypes(dtypes: list[str]) -> list[str]:
    """What diffusers runs in, of what MLX ran in: float32, and float16 on a GPU."""
    return [d for d in ("float32", "float16") if d in dtypes and (d == "float32" or not on_cpu())]


def run_reference(name: str, folder: Path, args: argparse.Namespace, parity: Parity,
                  dtypes: list[str] | None = None) -> dict[str, Any]:
    """diffusers (PyTorch) on the same weight files and device, in a process of its own (see
    benchmark_reference.py): first that its float32 UNet and VAE compute what ours did, then
    their timings in each of `dtypes` (by default `reference_dtypes`)."""
    dtypes = dtypes or reference_dtypes(args.dtypes)
    inputs, outputs = folder / "reference_inputs.npz", folder / "reference_outputs.npz"
    unet_inputs = {k: v for k, v in dataclasses.asdict(parity.unet_inputs).items()
                   if v is not None}
    np.savez(inputs, **unet_inputs, vae_latents=parity.latents)
    script = Path(__file__).with_name("benchmark_reference.py")
    device = "cpu" if on_cpu() else "gpu"
    subprocess.run([sys.executable, str(script), str(folder), str(inputs), str(outputs),
                    str(args.repeats), device, ",".join(dtypes)],
                   check=True)
    theirs = dict(np.load(outputs))
    result = {"model": name,
              "unet_max_rel_error": _relative_error(parity.unet_output, theirs.pop("unet_output")),
              "vae_max_rel_error": _relative_error(parity.decoded, theirs.pop("vae_decoded")),
              **{key: float(value) for key, value in theirs.items()}}
    print(f"  {name}: MLX vs diffusers on the same weights and inputs: max |difference| / "
          f"max |diffusers| = {result['unet_max_rel_error']:.1e} (UNet), "
          f"{result['vae_max_rel_error']:.1e} (VAE decode)", flush=True)
    print(_progress({"dtype": "pytorch", **result}), flush=True)
    return result


# -- report -------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(memory / GIB, 1),
            "device": str(mx.default_device()), "platform": platform.platform(),
            "python": platform.python_version(), "mlx": mx.__version__}
    if not on_cpu():
        info["gpu"] = mx.device_info().get("device_name", "GPU")
    for package in ("torch", "diffusers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    return info


def _cell(value: Any, digits: int | None = None) -> str:
    """A table cell: `digits` decimals, or by default 3 significant digits (no exponent)."""
    if value is None:
        return "-"
    if not isinstance(value, float):
        return str(value)
    if digits is None:
        digits = max(0, 2 - int(np.floor(np.log10(abs(value))))) if value else 0
    return f"{value:.{digits}f}"


def markdown_tables(results: dict[str, Any]) -> str:
    steps, machine = results["settings"]["steps"], results["machine"]
    rates = ", ".join(f"{rate:.0f} GFLOP/s in {dtype}"
                      for dtype, rate in results["matmul_gflops"].items())
    gpu = f" ({machine['gpu']})" if "gpu" in machine else ""
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GiB; "
        f"MLX {machine['mlx']} on {machine['device']}{gpu}; {results['settings']['size']}px; "
        f"single matmul {rates}"
        + (("; lazy, without fast_cpu()" if results["settings"]["lazy"] else
            "; within fast_cpu()") if "gpu" not in machine else ""),
        "",
        f"| model | dtype | batch | load s | text s | UNet step s | UNet GFLOP/s | % of matmul "
        f"| VAE decode s | image s ({steps} steps, load included) | peak GiB | weights GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['batch']} | {_cell(r['load_s'])} "
            f"| {_cell(r.get('text_s'))} | {_cell(r.get('unet_step_s'))} "
            f"| {_cell(r.get('unet_gflops'), 0)} | {_cell(r.get('unet_matmul_pct'), 0)} "
            f"| {_cell(r.get('vae_decode_s'))} | {_cell(r.get('image_s'))} "
            f"| {_cell(r.get('peak_gb'), 2)} "
            f"| {_cell(r['weights_gb'], 2)} |")
    if results["reference"]:
        lines += [
            "",
            f"vs diffusers {machine.get('diffusers')} / PyTorch {machine.get('torch')} (same "
            "weights, same device; speed-up = PyTorch time / MLX time; the difference is "
            "float32's):",
            "",
            "| model | dtype | batch | MLX UNet step s | PyTorch UNet step s | speed-up "
            "| MLX VAE decode s | PyTorch VAE decode s | speed-up | max rel. difference "
            "UNet / VAE |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for ref in results["reference"]:
            for r in results["rows"]:
                unet_key = f"{r['dtype']}_unet_step_s_batch{r['batch']}"
                if r["model"] != ref["model"] or unet_key not in ref:
                    continue
                if r["dtype"] == "float32" and "rounds" in ref:
                    unet = _over_rounds(ref["rounds"], f"unet_step_s_batch{r['batch']}")
                    vae = _over_rounds(ref["rounds"], "vae_decode_s")
                else:
                    unet = _Compared(r["unet_step_s"], ref[unet_key])
                    vae = _Compared(r["vae_decode_s"], ref[f"{r['dtype']}_vae_decode_s"])
                lines.append(
                    f"| {r['model']} | {r['dtype']} | {r['batch']} | {unet} | {vae} "
                    f"| {ref['unet_max_rel_error']:.1e} / {ref['vae_max_rel_error']:.1e} |")
        rounds = max((len(ref.get("rounds", ())) for ref in results["reference"]), default=0)
        if rounds:
            lines += ["", f"float32 over {rounds} rounds, MLX and PyTorch alternately: each "
                          "side's median time, and the median of the rounds' speed-ups (each "
                          "round's in brackets)."]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Compared:
    """One timing on both sides, as the comparison table's three cells."""

    ours: float
    theirs: float
    speed_ups: tuple[float, ...] = ()

    def __str__(self) -> str:
        speed_up = (statistics.median(self.speed_ups) if self.speed_ups
                    else self.theirs / self.ours)
        each = (" (" + " / ".join(f"{x:.2f}" for x in self.speed_ups) + ")"
                if self.speed_ups else "")
        return f"{_cell(self.ours)} | {_cell(self.theirs)} | {speed_up:.2f}x{each}"


def _over_rounds(rounds: list[dict[str, dict[str, float]]], key: str) -> _Compared:
    ours = [r["mlx"][key] for r in rounds]
    theirs = [r["pytorch"][key] for r in rounds]
    return _Compared(statistics.median(ours), statistics.median(theirs),
                     tuple(b / a for a, b in zip(ours, theirs, strict=True)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m stable_diffusion.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd-1.5,sd-2.1-base,sdxl-turbo",
                        help=f"comma-separated, from: {', '.join(PRESETS)}")
    parser.add_argument("--dtypes", default="float32,float16,q8",
                        help="comma-separated, from: float32, float16, q8 (4-bit text encoders, "
                             "8-bit UNet over float16)")
    parser.add_argument("--size", type=int, default=512, help="image width and height")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the image timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--reference", action="store_true",
                        help="also run diffusers/PyTorch on the same weights and device: float32 "
                             "(and float16 on a GPU)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --reference: time both sides' float32 steps and decodes this "
                             "many times, alternately (medians, and the median speed-up)")
    parser.add_argument("--output", default="results.json", help="JSON results file")
    parser.add_argument("--workdir", help="where to write the random-weight models "
                        "(default: a temporary folder, removed afterwards)")
    parser.add_argument("--lazy", action="store_true",
                        help="run MLX fully lazy, not within fast_cpu() (on a CPU: MLX's own "
                             "softmax and SiLU, its default buffer cache)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for model in args.models:
        if model not in ARCHITECTURES:
            parser.error(f"unknown model {model!r}; choose from {', '.join(PRESETS)}")
    for dtype in args.dtypes:
        _dtype_options(dtype)
    if args.reference and "float32" not in args.dtypes:
        parser.error("--reference compares float32 runs: include float32 in --dtypes")
    if args.rounds < 1 or (args.rounds > 1 and not args.reference):
        parser.error("--rounds alternates MLX's float32 timings with diffusers': give a "
                     "number of at least 1, and --reference")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    check_disk_space(args)
    rates = matmul_rates(args.dtypes)
    for dtype, rate in rates.items():
        print(f"single matmul (4096x1280 @ 1280x1280, {dtype}): {rate:.0f} GFLOP/s", flush=True)
    rows, references = [], []
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sd-benchmark-"))
    try:
        for name in args.models:
            config = ARCHITECTURES[name]
            folder = workdir / name
            shutil.rmtree(folder, ignore_errors=True)
            start = time.perf_counter()
            write_random_pipeline(config, folder, args.seed,
                                  float16=any(_dtype_options(d)[0] for d in args.dtypes))
            print(f"{name}: random weights written in {time.perf_counter() - start:.1f} s",
                  flush=True)
            parity = None
            for dtype in args.dtypes:
                dtype_rows, dtype_parity = run_mlx(name, config, folder, dtype, args, rates)
                rows += dtype_rows
                parity = parity or dtype_parity
                gc.collect()
                mx.clear_cache()
            if parity is not None:
                reference = run_reference(name, folder, args, parity)
                if args.rounds > 1:
                    reference["rounds"] = run_rounds(name, config, folder, args, parity,
                                                     _first_round(name, rows, reference))
                references.append(reference)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    results = {"machine": machine_info(), "matmul_gflops": rates,
               "settings": {k: v for k, v in vars(args).items() if k != "workdir"},
               "rows": rows, "reference": references}
    Path(args.output).write_text(json.dumps(results, indent=1))
    print()
    print(markdown_tables(results))
    return results


if __name__ == "__main__":
    main()
