"""diffusers (PyTorch, float32) on a benchmark's random-weight model folder, in a process of
its own: run by path, never imported, from `benchmark.py`.

    python stable_diffusion/benchmark_reference.py MODEL_FOLDER INPUTS.npz OUTPUTS.npz REPEATS

Why a process of its own: in a process where `stable_diffusion` has loaded OpenBLAS with
global symbols, PyTorch's CPU matmuls bind to it and share its threads, and run 3-5x slower
(SD 1.5 UNet step: 5.3 s alone, 17 s after `import stable_diffusion`, 27 s after MLX work).

INPUTS.npz holds the UNet inputs (NHWC latents, timestep, context, SDXL's text_embeds and
time_ids) and the VAE's latents; OUTPUTS.npz gets diffusers' outputs on them (NHWC) and its
median timings: the UNet at batch 1 and 2 (the inputs repeated), the VAE decode at batch 1.
"""

from __future__ import annotations

import gc
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
    """benchmark.median_time, which this process cannot import (see above)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load(cls: Any, folder: Path) -> Any:
    """`from_config` + `load_state_dict` of the same safetensors file the MLX side loaded
    (built on the meta device: no random init to pay for or hold)."""
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder))
    model.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), assign=True)
    return model.eval()


def nchw(array: np.ndarray, batch: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([array.transpose(0, 3, 1, 2)] * batch))


def repeated(array: np.ndarray, batch: int) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([array] * batch))


def run_unet(folder: Path, inputs: Any, repeats: int) -> dict[str, Any]:
    unet = load(UNet2DConditionModel, folder)

    def call(batch: int) -> Callable[[], torch.Tensor]:
        added = None
        if "text_embeds" in inputs:
            added = {"text_embeds": repeated(inputs["text_embeds"], batch),
                     "time_ids": repeated(inputs["time_ids"], batch)}
        sample, context = nchw(inputs["latents"], batch), repeated(inputs["context"], batch)
        timestep = float(inputs["timestep"])
        return lambda: unet(sample, timestep, context, added_cond_kwargs=added).sample

    return {"unet_output": call(1)().numpy().transpose(0, 2, 3, 1),
            "unet_step_s_batch1": median_time(call(1), repeats),
            "unet_step_s_batch2": median_time(call(2), repeats)}


def run_vae(folder: Path, latents: np.ndarray, repeats: int) -> dict[str, Any]:
    vae = load(AutoencoderKL, folder)
    sample = nchw(latents)
    return {"vae_decoded": vae.decode(sample).sample.numpy().transpose(0, 2, 3, 1),
            "vae_decode_s": median_time(lambda: vae.decode(sample).sample, repeats)}


def main(model: Path, inputs_file: Path, outputs_file: Path, repeats: int) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    inputs = dict(np.load(inputs_file))
    with torch.inference_mode():
        results = run_unet(model / "unet", inputs, repeats)
        gc.collect()  # one model in memory at a time
        results.update(run_vae(model / "vae", inputs.pop("vae_latents"), repeats))
    np.savez(outputs_file, **results)


if __name__ == "__main__":
    model, inputs_file, outputs_file, repeats = sys.argv[1:]
    main(Path(model), Path(inputs_file), Path(outputs_file), int(repeats))
