"""diffusers (PyTorch) on a benchmark's random-weight model folder, in a process of its own,
started by `reference.py` from the repository's root:

    python -m benchmarks.reference_process MODEL_FOLDER INPUTS.npz OUTPUTS.npz REPEATS \
        DEVICE DTYPES MEMORY_FORMAT

DEVICE is `cpu` or `gpu` (CUDA, else Apple's MPS), DTYPES a comma-separated list of float32
and float16: the same work as the MLX side measured. MEMORY_FORMAT is `channels_last` (the
models' convolution weights and images in NHWC order, as diffusers' speed guide and Intel's
PyTorch extension set them up: on a CPU, oneDNN's convolutions then skip converting each
input; see docs/performance.md) or `contiguous` (PyTorch's default NCHW order).

Why a process of its own: in a process where `stable_diffusion` has loaded OpenBLAS with
global symbols, PyTorch's CPU matmuls bind to it and share its threads, and run 3-5x slower
(SD 1.5 UNet step: 5.3 s alone, 17 s after `import stable_diffusion`, 27 s after MLX work).
So this module imports nothing of `stable_diffusion`, nor does `benchmarks/__init__.py`.

INPUTS.npz holds the UNet inputs (NHWC latents, timestep, context, SDXL's text_embeds and
time_ids) and the VAE's latents; OUTPUTS.npz gets diffusers' float32 outputs on them (NHWC)
and, per dtype, its median timings ("float16_unet_step_s_batch2"): the UNet at batch 1 and 2
(the inputs repeated), the VAE decode at batch 1. OUTPUTS.json gets how PyTorch was set up
(threads, the cores it may use, BLAS, attention processors, the threading variables it saw),
for the report.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """measure.median_time, which this process cannot import (see above)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def torch_device(name: str) -> torch.device:
    if name == "cpu":
        torch.set_num_threads(usable_cores())
        return torch.device("cpu")
    if torch.cuda.is_available():
        # The same float32 arithmetic as MLX's on CUDA, which uses TF32 unless
        # MLX_ENABLE_TF32=0.
        tf32 = os.environ.get("MLX_ENABLE_TF32", "1") != "0"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    raise SystemExit(
        "MLX ran on a GPU but this PyTorch sees none (neither CUDA nor MPS): "
        "install a PyTorch build for the GPU, or run the benchmark on the CPU"
    )


def synchronized(fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], Any]:
    """`fn` finished on the device when it returns, as `mx.eval` is on the MLX side."""
    if device.type == "cuda":
        return lambda: (fn(), torch.cuda.synchronize())
    if device.type == "mps":
        return lambda: (fn(), torch.mps.synchronize())
    return fn


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where and how the models run: device, dtype, and the memory format of 4-d tensors."""

    device: torch.device
    dtype: torch.dtype
    memory_format: torch.memory_format


def load(cls: Any, folder: Path, target: Target) -> Any:
    """`from_config` + `load_state_dict` of the same safetensors file the MLX side loaded
    (built on the meta device: no random init to pay for or hold)."""
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder))
    weights = load_file(folder / "diffusion_pytorch_model.safetensors", device=str(target.device))
    model.load_state_dict({k: v.to(target.dtype) for k, v in weights.items()}, assign=True)
    return model.to(memory_format=target.memory_format).eval()


def as_tensor(array: np.ndarray, batch: int, target: Target, nhwc: bool = False) -> torch.Tensor:
    """`array` repeated `batch` times on the target (an NHWC image as NCHW if `nhwc`, laid
    out in the target's memory format)."""
    if nhwc:
        array = array.transpose(0, 3, 1, 2)
    tensor = torch.from_numpy(np.concatenate([array] * batch)).to(target.device, target.dtype)
    return tensor.contiguous(memory_format=target.memory_format) if nhwc else tensor


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().cpu().numpy().transpose(0, 2, 3, 1)


def run_unet(folder: Path, inputs: Any, repeats: int, target: Target) -> dict[str, Any]:
    unet = load(UNet2DConditionModel, folder, target)

    def call(batch: int) -> Callable[[], torch.Tensor]:
        def tensor(name: str, nhwc: bool = False) -> torch.Tensor:
            return as_tensor(inputs[name], batch, target, nhwc)

        added = None
        if "text_embeds" in inputs:
            added = {"text_embeds": tensor("text_embeds"), "time_ids": tensor("time_ids")}
        sample, context = tensor("latents", nhwc=True), tensor("context")
        timestep = float(inputs["timestep"])
        return lambda: unet(sample, timestep, context, added_cond_kwargs=added).sample

    results = {
        f"unet_step_s_batch{batch}": median_time(synchronized(call(batch), target.device), repeats)
        for batch in (1, 2)
    }
    if target.dtype == torch.float32:
        results["unet_output"] = as_numpy(call(1)())
    return results


def run_vae(folder: Path, latents: np.ndarray, repeats: int, target: Target) -> dict[str, Any]:
    vae = load(AutoencoderKL, folder, target)
    sample = as_tensor(latents, 1, target, nhwc=True)
    results = {
        "vae_decode_s": median_time(
            synchronized(lambda: vae.decode(sample).sample, target.device), repeats
        )
    }
    if target.dtype == torch.float32:
        results["vae_decoded"] = as_numpy(vae.decode(sample).sample)
    return results


def setup(model: Path, memory_format: str) -> dict[str, Any]:
    """How PyTorch runs here: what would show a handicapped reference (fewer threads than
    cores, an inherited thread or BLAS variable, a slow attention processor)."""
    processors = set()
    for cls, folder in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        with torch.device("meta"):
            built = cls.from_config(cls.load_config(model / folder))
        processors |= {type(p).__name__ for p in built.attn_processors.values()}
    prefixes = ("OMP_", "MKL_", "OPENBLAS_", "GOMP_", "KMP_", "DNNL_", "ONEDNN_", "TORCH_")
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cores": usable_cores(),
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "attention_processors": sorted(processors),
        "memory_format": memory_format,
        "environment": {k: v for k, v in os.environ.items() if k.startswith(prefixes)},
        # On a busy machine PyTorch's OpenMP threads, which spin at every barrier by default
        # (OMP_WAIT_POLICY), lose far more than their share: see docs/performance.md.
        "load_average": os.getloadavg()[0],
    }


def main(
    model: Path,
    inputs_file: Path,
    outputs_file: Path,
    repeats: int,
    device_name: str,
    dtypes: list[str],
    memory_format: str,
) -> None:
    device = torch_device(device_name)
    inputs = dict(np.load(inputs_file))
    latents = inputs.pop("vae_latents")
    results: dict[str, Any] = {}
    with torch.inference_mode():
        for name in dtypes:
            target = Target(device, getattr(torch, name), MEMORY_FORMATS[memory_format])
            # One model in memory at a time.
            measured = run_unet(model / "unet", inputs, repeats, target)
            gc.collect()
            measured.update(run_vae(model / "vae", latents, repeats, target))
            gc.collect()
            for key, value in measured.items():
                results[key if isinstance(value, np.ndarray) else f"{name}_{key}"] = value
    np.savez(outputs_file, **results)
    outputs_file.with_suffix(".json").write_text(json.dumps(setup(model, memory_format)))


if __name__ == "__main__":
    model, inputs_file, outputs_file, repeats, device_name, dtypes, memory_format = sys.argv[1:]
    main(
        Path(model),
        Path(inputs_file),
        Path(outputs_file),
        int(repeats),
        device_name,
        dtypes.split(","),
        memory_format,
    )
