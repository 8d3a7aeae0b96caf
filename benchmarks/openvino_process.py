"""OpenVINO's CPU runtime on a benchmark's random-weight model folder, in a process of its
own, started by `reference.py` from the repository's root:

    python -m benchmarks.openvino_process MODEL_FOLDER INPUTS.npz OUTPUTS.npz REPEATS

The converted models (OpenVINO IR) stay in MODEL_FOLDER/openvino for the next round.

The runtime FastSD CPU and optimum-intel run Stable Diffusion with: diffusers' UNet and VAE
decoder, loaded from the same files as the PyTorch reference (`reference_process.load`), are
converted by `openvino.convert_model` (traced on example inputs of the measured shapes,
static) and compiled for the CPU twice: in float32 (`INFERENCE_PRECISION_HINT` f32) and in
the precision OpenVINO picks by default for this CPU (bfloat16 where it has AVX-512 BF16 or
AMX, else f32), which `OUTPUTS.json` records.

INPUTS.npz is `reference_process`'s, plus what MLX computed in float32 on them
(`expected_unet_output`, `expected_vae_decoded`): before anything is timed, the float32
UNet and decoder must match those within `TOLERANCE` (else the process stops, saying by how
much). OUTPUTS.npz gets both precisions' outputs (`unet_output`, `vae_decoded`,
`default_unet_output`, `default_vae_decoded`, NHWC) for the report's differences, and their
median timings (`float32_unet_step_s_batch1`, `default_vae_decode_s`, ...): the UNet at
batch 1 and 2 (the inputs repeated), the decode at batch 1.

Why a process of its own: like PyTorch's, its threads must not share a process with
`stable_diffusion`'s OpenBLAS or MLX's memory; and one model is converted at a time, its
PyTorch copy freed before it is compiled (SDXL's UNet is 10 GiB in float32).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from .reference_process import MEMORY_FORMATS, Target, load, median_time, usable_cores

TOLERANCE = 1e-4  # float32 against MLX: max |difference| / max |MLX|, as the tests hold it
PRECISIONS = {"float32": {"INFERENCE_PRECISION_HINT": "f32"}, "default": {}}


class _UNetCall(torch.nn.Module):
    """diffusers' UNet as a function of tensors only, for the tracer."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        sample, timestep, context, *added = inputs
        extra = {"text_embeds": added[0], "time_ids": added[1]} if added else None
        return self.unet(sample, timestep, context, added_cond_kwargs=extra).sample


class _Decode(torch.nn.Module):
    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample


def relative_error(ours: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(ours - expected).max() / np.abs(expected).max())


def unet_inputs(inputs: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
    """The UNet's inputs at `batch` (NCHW latents), in `_UNetCall`'s order."""
    names = ["latents", "context"] + (
        ["text_embeds", "time_ids"] if "text_embeds" in inputs else []
    )
    arrays = {name: np.concatenate([inputs[name]] * batch) for name in names}
    arrays["latents"] = np.ascontiguousarray(arrays["latents"].transpose(0, 3, 1, 2))
    timestep = np.array(inputs["timestep"], np.float32)
    return [arrays["latents"], timestep, arrays["context"], *(arrays[n] for n in names[2:])]


def convert(module: torch.nn.Module, example: list[np.ndarray], path: Path) -> None:
    """`module` traced on `example` and saved as OpenVINO IR, float32 weights kept."""
    with torch.no_grad():
        model = ov.convert_model(module, example_input=tuple(map(torch.from_numpy, example)))
    ov.save_model(model, path, compress_to_fp16=False)


def compile_for(core: ov.Core, path: Path, precision: str) -> ov.CompiledModel:
    return core.compile_model(core.read_model(path), "CPU", PRECISIONS[precision])


def measure(
    core: ov.Core,
    path: Path,
    example: list[np.ndarray],
    expected: np.ndarray,
    repeats: int,
    precision: str,
    what: str,
) -> tuple[float, np.ndarray, str]:
    """Median seconds of the compiled model on `example`, after checking its float32 output
    against `expected`; its output (NHWC) and the precision it ran in."""
    compiled = compile_for(core, path, precision)
    request = compiled.create_infer_request()

    def call() -> np.ndarray:
        return np.asarray(request.infer(example)[0])

    output = call().transpose(0, 2, 3, 1)
    if len(example[0]) == len(expected):
        error = relative_error(output, expected)
        if precision == "float32" and not error <= TOLERANCE:
            raise SystemExit(
                f"OpenVINO's float32 {what} differs from MLX's by {error:.1e} of its scale "
                f"(max |difference| / max |MLX|), over the {TOLERANCE:.0e} the benchmark "
                "allows: not timed. Check the conversion (openvino and diffusers versions)."
            )
    seconds = median_time(call, repeats)
    picked = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    return seconds, output[: len(expected)], picked


def run(model: Path, inputs: dict[str, np.ndarray], repeats: int, work: Path) -> dict[str, Any]:
    """Convert, check and time the UNet, then the decoder, one model in memory at a time."""
    target = Target(torch.device("cpu"), torch.float32, MEMORY_FORMATS["contiguous"])
    core = ov.Core()
    results: dict[str, Any] = {}
    unet_examples = {f"unet_step_s_batch{b}": unet_inputs(inputs, b) for b in (1, 2)}
    for batch, example in enumerate(unet_examples.values(), 1):
        # Static shapes: one IR per batch size, converted from the same weights (once: the
        # later rounds of --rounds reuse it).
        if not (work / f"unet_batch{batch}.xml").exists():
            unet = load(UNet2DConditionModel, model / "unet", target)
            convert(_UNetCall(unet), example, work / f"unet_batch{batch}.xml")
            del unet
            gc.collect()
    for precision in PRECISIONS:
        for batch, key in enumerate(unet_examples, 1):
            seconds, output, picked = measure(
                core,
                work / f"unet_batch{batch}.xml",
                unet_examples[key],
                inputs["expected_unet_output"],
                repeats,
                precision,
                "UNet",
            )
            results[f"{precision}_{key}"] = seconds
            if batch == 1:
                results[("" if precision == "float32" else "default_") + "unet_output"] = output
            results[f"{precision}_precision"] = picked
            gc.collect()
    latents = [np.ascontiguousarray(inputs["vae_latents"].transpose(0, 3, 1, 2))]
    if not (work / "vae.xml").exists():
        convert(_Decode(load(AutoencoderKL, model / "vae", target)), latents, work / "vae.xml")
        gc.collect()
    for precision in PRECISIONS:
        seconds, output, _ = measure(
            core,
            work / "vae.xml",
            latents,
            inputs["expected_vae_decoded"],
            repeats,
            precision,
            "VAE decode",
        )
        results[f"{precision}_vae_decode_s"] = seconds
        results[("" if precision == "float32" else "default_") + "vae_decoded"] = output
        gc.collect()
    return results


def setup(core: ov.Core, precisions: dict[str, str]) -> dict[str, Any]:
    return {
        "openvino": ov.get_version(),
        "cores": usable_cores(),
        "threads": int(core.get_property("CPU", "INFERENCE_NUM_THREADS")) or usable_cores(),
        "default_precision": precisions["default"],
        "float32_precision": precisions["float32"],
        "cpu": str(core.get_property("CPU", "FULL_DEVICE_NAME")),
        "load_average": os.getloadavg()[0],
    }


def main(model: Path, inputs_file: Path, outputs_file: Path, repeats: int) -> None:
    inputs = dict(np.load(inputs_file))
    work = model / "openvino"
    work.mkdir(exist_ok=True)
    results = run(model, inputs, repeats, work)
    precisions = {p: results.pop(f"{p}_precision") for p in PRECISIONS}
    np.savez(outputs_file, **results)
    outputs_file.with_suffix(".json").write_text(json.dumps(setup(ov.Core(), precisions)))


if __name__ == "__main__":
    model, inputs_file, outputs_file, repeats = sys.argv[1:]
    main(Path(model), Path(inputs_file), Path(outputs_file), int(repeats))
