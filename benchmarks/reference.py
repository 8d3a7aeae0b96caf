"""The references, as seen from the benchmark's process: diffusers on PyTorch
(`reference_process.py`) and OpenVINO's CPU runtime (`openvino_process.py`), each in a
process of its own; they check that they compute what MLX did, and `--rounds` alternates
the sides' float32 timings."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from stable_diffusion.config import PipelineConfig
from stable_diffusion.cpu import on_cpu

from . import LAUNCH_ENVIRONMENT
from .measure import Parity, progress_line, round_timings

REPOSITORY = Path(__file__).resolve().parent.parent


def _relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def reference_dtypes(dtypes: list[str]) -> list[str]:
    """What diffusers runs in, of what MLX ran in: float32, and float16 on a GPU."""
    return [d for d in ("float32", "float16") if d in dtypes and (d == "float32" or not on_cpu())]


def _start(module: str, folder: Path, parity: Parity, *arguments: str) -> tuple[dict, dict]:
    """Run `benchmarks.<module>` on the parity inputs (and MLX's outputs on them, for a side
    that checks parity before timing) in a process of its own, started in the environment
    the benchmark was started in: its outputs and timings, and its setup."""
    inputs, outputs = folder / "reference_inputs.npz", folder / f"{module}_outputs.npz"
    unet_inputs = {k: v for k, v in dataclasses.asdict(parity.unet_inputs).items() if v is not None}
    np.savez(
        inputs,
        **unet_inputs,
        vae_latents=parity.latents,
        expected_unet_output=parity.unet_output,
        expected_vae_decoded=parity.decoded,
    )
    subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", str(folder), str(inputs), str(outputs),
         *arguments],
        check=True,
        cwd=REPOSITORY,
        env=LAUNCH_ENVIRONMENT,
    )  # fmt: skip
    return dict(np.load(outputs)), json.loads(outputs.with_suffix(".json").read_text())


def run_reference(
    name: str,
    folder: Path,
    args: argparse.Namespace,
    parity: Parity,
    dtypes: list[str] | None = None,
) -> dict[str, Any]:
    """diffusers (PyTorch) on the same weight files and device, in a process of its own (see
    reference_process.py): first that its float32 UNet and VAE compute what ours did, then
    their timings in each of `dtypes` (by default `reference_dtypes`), and how PyTorch was
    set up."""
    dtypes = dtypes or reference_dtypes(args.dtypes)
    folder = folder.resolve()
    device = "cpu" if on_cpu() else "gpu"
    theirs, setup = _start(
        "reference_process",
        folder,
        parity,
        str(args.repeats),
        device,
        ",".join(dtypes),
        args.reference_memory_format,
    )
    result = {
        "model": name,
        "unet_max_rel_error": _relative_error(parity.unet_output, theirs.pop("unet_output")),
        "vae_max_rel_error": _relative_error(parity.decoded, theirs.pop("vae_decoded")),
        **{key: float(value) for key, value in theirs.items()},
    }
    print(
        f"  {name}: MLX vs diffusers on the same weights and inputs: max |difference| / "
        f"max |diffusers| = {result['unet_max_rel_error']:.1e} (UNet), "
        f"{result['vae_max_rel_error']:.1e} (VAE decode)",
        flush=True,
    )
    print(
        f"  PyTorch ran {setup['threads']} threads on {setup['cores']} cores, attention "
        f"by {', '.join(setup['attention_processors'])}, {setup['memory_format']} tensors; "
        f"machine load {setup['load_average']:.1f} (1-minute average, its own included)",
        flush=True,
    )
    if setup["load_average"] > setup["threads"] + 1:
        print(
            "  warning: the machine was busy besides PyTorch's own threads, whose OpenMP "
            "barriers then wait far more than their share: measure on a quiet machine, or "
            "start the benchmark with OMP_WAIT_POLICY=PASSIVE (docs/performance.md)",
            flush=True,
        )
    print(progress_line({"dtype": "pytorch", **result}), flush=True)
    return {**result, "setup": setup}


def run_openvino(
    name: str, folder: Path, args: argparse.Namespace, parity: Parity
) -> dict[str, Any]:
    """OpenVINO's CPU runtime on diffusers' UNet and decoder converted from the same weight
    files, in a process of its own (see openvino_process.py), in float32 and in its default
    precision: the differences from ours (the float32 ones checked before timing), the
    timings, and its setup (which precision it picked)."""
    theirs, setup = _start("openvino_process", folder.resolve(), parity, str(args.repeats))
    result: dict[str, Any] = {"model": name}
    for prefix in ("", "default_"):
        result[f"{prefix}unet_max_rel_error"] = _relative_error(
            parity.unet_output, theirs.pop(f"{prefix}unet_output")
        )
        result[f"{prefix}vae_max_rel_error"] = _relative_error(
            parity.decoded, theirs.pop(f"{prefix}vae_decoded")
        )
    result |= {key: float(value) for key, value in theirs.items()}
    print(
        f"  {name}: MLX vs OpenVINO {setup['openvino']} on the same weights and inputs: max "
        f"|difference| / max |MLX| = {result['unet_max_rel_error']:.1e} (UNet), "
        f"{result['vae_max_rel_error']:.1e} (VAE decode) in float32; in its default "
        f"precision on this CPU, {setup['default_precision']}: "
        f"{result['default_unet_max_rel_error']:.1e}, {result['default_vae_max_rel_error']:.1e}",
        flush=True,
    )
    print(progress_line({"dtype": "openvino", **result}), flush=True)
    return {**result, "setup": setup}


def run_rounds(
    name: str,
    config: PipelineConfig,
    folder: Path,
    args: argparse.Namespace,
    parity: Parity,
    first: dict[str, dict[str, float]],
) -> list[dict[str, dict[str, float]]]:
    """The `first` round and the rest of `--rounds`: MLX's float32 timings (and bfloat16's,
    if measured), then each reference's (PyTorch's, OpenVINO's), in turn."""
    rounds = [first]
    for number in range(2, args.rounds + 1):
        print(f"{name}: round {number} of {args.rounds}", flush=True)
        ours = {}
        for dtype in [d for d in ("float32", "bfloat16") if d in args.dtypes]:
            ours[dtype] = round_timings(config, folder, args, dtype)
            print(progress_line({"model": name, "dtype": dtype, **ours[dtype]}), flush=True)
        pytorch = run_reference(name, folder, args, parity, ["float32"]) if args.reference else None
        openvino = run_openvino(name, folder, args, parity) if args.openvino else None
        rounds.append(_round(ours, pytorch, openvino))
    return rounds


def _round(
    ours: dict[str, dict[str, float]],
    pytorch: dict[str, Any] | None,
    openvino: dict[str, Any] | None,
) -> dict[str, dict[str, float]]:
    """A round of `--rounds`: our float32 timings ("mlx"; bfloat16's as "mlx_bfloat16") and
    the references' of the same names (OpenVINO's in float32 and in its default
    precision)."""
    sides = {"pytorch": (pytorch, "float32"), "openvino": (openvino, "float32")}
    sides["openvino_default"] = (openvino, "default")
    each = {"mlx": ours["float32"]}
    if "bfloat16" in ours:
        each["mlx_bfloat16"] = ours["bfloat16"]
    for side, (measured, prefix) in sides.items():
        if measured is not None:
            each[side] = {key: measured[f"{prefix}_{key}"] for key in ours["float32"]}
    return each


def first_round(
    name: str,
    rows: list[dict[str, Any]],
    pytorch: dict[str, Any] | None,
    openvino: dict[str, Any] | None,
) -> dict[str, dict[str, float]]:
    """The float32 (and bfloat16) timings of the full measurement, as a round of
    `--rounds`."""
    ours = {}
    for dtype in ("float32", "bfloat16"):
        measured = [r for r in rows if r["model"] == name and r["dtype"] == dtype]
        if measured:
            ours[dtype] = {f"unet_step_s_batch{r['batch']}": r["unet_step_s"] for r in measured}
            ours[dtype]["vae_decode_s"] = measured[0]["vae_decode_s"]
    return _round(ours, pytorch, openvino)
