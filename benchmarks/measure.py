"""The MLX side's measurements: timings of the pipeline's phases, as the scripts run them,
and what float32 computes on fixed inputs, for the reference to match."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from stable_diffusion import StableDiffusion, fast_cpu, keep_freed_memory
from stable_diffusion.config import PipelineConfig, UNetConfig
from stable_diffusion.cpu import compute_dtype, on_cpu
from stable_diffusion.models.layers import Linear

from .architectures import CONTEXT_TOKENS
from .flops import unet_flops, vae_decode_flops
from .random_weights import flat_parameters

PROMPT = "a photo of an astronaut riding a horse on mars"
GIB = 1024**3


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


def fast_cpu_matmul_gflops(bfloat16: bool, repeats: int = 10) -> float:
    """`matmul_gflops` for the linear layers of `fast_cpu()` on the CPU, as the models run
    them: in bfloat16 (oneDNN's, the float32 activations' conversion included) or float32
    (oneDNN's where `onednn.float32_by_default()`, else OpenBLAS's through MLX)."""
    layer = Linear(1280, 1280, bias=False)
    a = mx.random.normal((4096, 1280))
    mx.eval(a, layer.parameters())
    with fast_cpu(layer, bfloat16=bfloat16):
        seconds = median_time(lambda: mx.eval(layer(a)), repeats, warmup=2)
    return 2 * 4096 * 1280 * 1280 / seconds / 1e9


def matmul_rates(dtypes: list[str], lazy: bool = False) -> dict[str, float]:
    """The single-matmul GFLOP/s of each compute dtype that `dtypes` run in (on the CPU,
    float32's as `fast_cpu()` runs it unless `lazy`)."""
    rates = {}
    for dtype in sorted({_computes_in(d) for d in dtypes}, key=_dtype_name, reverse=True):
        in_fast_cpu = dtype == mx.float32 and on_cpu() and not lazy
        rates[_dtype_name(dtype)] = (
            fast_cpu_matmul_gflops(bfloat16=False) if in_fast_cpu else matmul_gflops(dtype)
        )
    if "bfloat16" in dtypes:
        rates["bfloat16"] = fast_cpu_matmul_gflops(bfloat16=True)
    return rates


def _computes_in(dtype: str) -> mx.Dtype:
    """The activations' dtype of a --dtypes entry (bfloat16's are float32, its matmuls
    bfloat16)."""
    return compute_dtype(mx.float16 if dtype_options(dtype)[0] else mx.float32)


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
    def random(
        cls, config: UNetConfig, batch: int, height: int, width: int, seed: int = 1
    ) -> UNetInputs:
        rng = np.random.default_rng(seed)

        def normal(*shape: int) -> np.ndarray:
            return rng.standard_normal(shape, dtype=np.float32)

        text_embeds = time_ids = None
        if config.addition_embed_type == "text_time":
            assert config.addition_time_embed_dim is not None  # SDXL's configs set both
            assert config.projection_class_embeddings_input_dim is not None
            time_dims = 6 * config.addition_time_embed_dim
            text_embeds = normal(batch, config.projection_class_embeddings_input_dim - time_dims)
            size = [8 * height, 8 * width]
            time_ids = np.array([[*size, 0, 0, *size]] * batch, np.float32)
        return cls(
            normal(batch, height, width, config.in_channels),
            500.0,
            normal(batch, CONTEXT_TOKENS, config.cross_attention_dim),
            text_embeds,
            time_ids,
        )

    def mlx(self, dtype: mx.Dtype) -> dict[str, Any]:
        def cast(a: np.ndarray | None) -> mx.array | None:
            return None if a is None else mx.array(a).astype(dtype)

        return {
            "x": cast(self.latents),
            "timesteps": mx.array([self.timestep]),
            "encoder_hidden_states": cast(self.context),
            "text_embeds": cast(self.text_embeds),
            "time_ids": None if self.time_ids is None else mx.array(self.time_ids),
        }


def _weights_bytes(sd: StableDiffusion) -> int:
    modules = [*sd.text_encoders, sd.unet, sd.vae]
    return sum(v.nbytes for m in modules for _, v in flat_parameters(m))


def _encode(sd: StableDiffusion, texts: list[str]) -> None:
    """The pipeline's own text conditioning, one 77-token chunk per prompt."""
    hidden, pooled = sd._encode_texts(texts, n_chunks=1)
    mx.eval(hidden if pooled is None else (hidden, pooled))


def _phase(args: argparse.Namespace, dtype: str = "float32") -> contextlib.AbstractContextManager:
    """One `fast_cpu()` block per phase (unless --lazy), as the scripts run: leaving it
    frees the phase's Winograd kernels and empties MLX's buffer cache, so that the buffers
    of one phase do not crowd out the next's (a UNet step after a 512px decode in the same
    block took 20% longer). The bfloat16 dtype computes in bfloat16 within it (--bfloat16)."""
    if args.lazy:
        return contextlib.nullcontext()
    return fast_cpu(bfloat16=dtype == "bfloat16")


def _image_as_the_scripts_run(
    folder: Path, dtype: str, batch: int, args: argparse.Namespace
) -> tuple[float, float]:
    """Seconds and peak GiB of one image from a fresh pipeline, made as txt2image.py makes
    it: weights loaded lazily, text encoders released before the first step and the UNet
    before decoding, freed memory kept between the phases."""
    with keep_freed_memory():
        return _image_in_phases(folder, dtype, batch, args)


def _image_in_phases(
    folder: Path, dtype: str, batch: int, args: argparse.Namespace
) -> tuple[float, float]:
    float16, quantize = dtype_options(dtype)
    mx.reset_peak_memory()
    start = time.perf_counter()
    sd = StableDiffusion(str(folder), float16=float16, quantize=quantize)
    latents = sd.generate_latents(
        PROMPT,
        num_steps=args.steps,
        seed=0,
        width=args.size,
        height=args.size,
        cfg_weight=7.5 if batch == 2 else 0.0,
        sampler="euler",
    )
    with _phase(args, dtype):
        latents.compute_conditioning()
        sd.release_text_encoders()
        for x in latents:
            mx.eval(x)
    sd.release_unet()
    with _phase(args, dtype):
        mx.eval(sd.decode(x))
    return time.perf_counter() - start, mx.get_peak_memory() / GIB


def dtype_options(name: str) -> tuple[bool, bool]:
    """--dtypes entry -> (float16, quantize). q8: 4-bit text encoders and 8-bit UNet linear
    layers over float16 weights. On a CPU everything computes in float32 (float16 matmuls
    miss the BLAS there): float16 and q8 weights only save memory. bfloat16: float32
    weights, the matmuls, convolutions and attention in bfloat16 (`--bfloat16`)."""
    options = {
        "float32": (False, False),
        "float16": (True, False),
        "q8": (True, True),
        "bfloat16": (False, False),
    }
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


# Untimed calls before a UNet step or decode is timed: `fast_cpu()` keeps what it makes
# (Winograd kernels, packed bfloat16 weights) from a layer's second call, so the third is
# the first to run as every later step of an image does.
WARMUP = 2


def _decode_seconds(
    sd: StableDiffusion, config: PipelineConfig, latent: int, repeats: int
) -> float:
    noise = mx.random.normal((1, latent, latent, config.unet.in_channels))
    return median_time(lambda: mx.eval(sd.decode(noise)), repeats, WARMUP)


def _measure(
    sd: StableDiffusion,
    config: PipelineConfig,
    batch: int,
    args: argparse.Namespace,
    matmul_rates: dict[str, float],
    dtype: str,
) -> dict[str, Any]:
    """Text encoding and UNet timings of one batch size, all models loaded; the UNet's rate
    against the single matmul's in the dtype its matmuls compute in."""
    latent = args.size // sd.vae.downscale
    row: dict[str, Any] = {"batch": batch}
    row["text_s"] = median_time(lambda: _encode(sd, [PROMPT] * batch), args.repeats)
    row["unet_step_s"] = _unet_step_seconds(sd, config, batch, args)
    flops = unet_flops(config.unet, batch, latent, latent)
    row["unet_gflops"] = flops / row["unet_step_s"] / 1e9
    matmuls = "bfloat16" if dtype == "bfloat16" else _dtype_name(_computes_in(dtype))
    row["unet_matmul_pct"] = 100 * row["unet_gflops"] / matmul_rates[matmuls]
    return row


def _unet_step_seconds(
    sd: StableDiffusion, config: PipelineConfig, batch: int, args: argparse.Namespace
) -> float:
    latent = args.size // sd.vae.downscale
    unet_inputs = UNetInputs.random(config.unet, batch, latent, latent).mlx(compute_dtype(sd.dtype))
    return median_time(lambda: mx.eval(sd.unet(**unet_inputs)), args.repeats, WARMUP)


def _parity(sd: StableDiffusion, config: PipelineConfig, latent: int) -> Parity:
    inputs = UNetInputs.random(config.unet, 1, latent, latent)
    latents = np.random.default_rng(2).standard_normal(
        (1, latent, latent, config.vae.latent_channels), np.float32
    )
    return Parity(
        inputs,
        np.array(sd.unet(**inputs.mlx(mx.float32))),
        latents,
        np.array(sd.vae.decode(mx.array(latents))),
    )


def run_mlx(
    name: str,
    config: PipelineConfig,
    folder: Path,
    dtype: str,
    args: argparse.Namespace,
    matmul_rates: dict[str, float],
) -> tuple[list[dict[str, Any]], Parity | None]:
    """Load the pipeline from `folder` in `dtype` and measure it at batch 1 and 2; with
    --reference or --openvino, also what float32 computes on the parity inputs. Then one
    image per batch size as the scripts make it, from a fresh pipeline: its time and peak
    memory."""
    float16, quantize = dtype_options(dtype)
    start = time.perf_counter()
    sd = StableDiffusion(str(folder), float16=float16, quantize=quantize)
    sd.preload()
    common: dict[str, Any] = {
        "model": name,
        "dtype": dtype,
        "load_s": time.perf_counter() - start,
        "weights_gb": _weights_bytes(sd) / GIB,
    }
    # The UNet before the decode, as the scripts (and the reference) run them.
    measured = []
    for batch in (1, 2):
        with _phase(args, dtype):
            measured.append(_measure(sd, config, batch, args, matmul_rates, dtype))
    # One image per decode whatever the UNet's batch: measured once.
    latent = args.size // sd.vae.downscale
    with _phase(args, dtype):
        common["vae_decode_s"] = _decode_seconds(sd, config, latent, args.repeats)
    common["vae_gflops"] = (
        vae_decode_flops(config.vae, 1, latent, latent) / common["vae_decode_s"] / 1e9
    )
    rows = [{**common, **row} for row in measured]
    parity = None
    if dtype == "float32" and (args.reference or args.openvino):
        with _phase(args):
            parity = _parity(sd, config, latent)
    del sd
    gc.collect()
    mx.clear_cache()
    for row in rows:
        row["image_s"], row["peak_gb"] = _image_as_the_scripts_run(
            folder, dtype, row["batch"], args
        )
        gc.collect()
        mx.clear_cache()
        print(progress_line(row), flush=True)
    return rows, parity


def round_timings(
    config: PipelineConfig, folder: Path, args: argparse.Namespace, dtype: str = "float32"
) -> dict[str, float]:
    """One more round of the float32 (or bfloat16) UNet steps (batch 1 and 2) and decode,
    from a fresh pipeline: the timings `--rounds` alternates with the references'."""
    sd = StableDiffusion(str(folder), float16=False)
    sd.preload()
    timings = {}
    for batch in (1, 2):
        with _phase(args, dtype):
            timings[f"unet_step_s_batch{batch}"] = _unet_step_seconds(sd, config, batch, args)
    with _phase(args, dtype):
        timings["vae_decode_s"] = _decode_seconds(
            sd, config, args.size // sd.vae.downscale, args.repeats
        )
    del sd
    gc.collect()
    mx.clear_cache()
    return timings


def progress_line(row: dict[str, Any]) -> str:
    values = ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in row.items()
        if v is not None and k not in ("model", "dtype")
    )
    return f"  {row['model']} {row['dtype']}: {values}"
