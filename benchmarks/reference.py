"""The PyTorch reference, as seen from the benchmark's process: it runs diffusers in a
process of its own (`reference_process.py`), checks that it computes what MLX did, and
alternates both sides' float32 timings over `--rounds`."""

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
from .measure import Parity, float32_timings, progress_line

REPOSITORY = Path(__file__).resolve().parent.parent


def _relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def reference_dtypes(dtypes: list[str]) -> list[str]:
    """What diffusers runs in, of what MLX ran in: float32, and float16 on a GPU."""
    return [d for d in ("float32", "float16") if d in dtypes and (d == "float32" or not on_cpu())]


def run_reference(
    name: str,
    folder: Path,
    args: argparse.Namespace,
    parity: Parity,
    dtypes: list[str] | None = None,
) -> dict[str, Any]:
    """diffusers (PyTorch) on the same weight files and device, in a process of its own (see
    reference_process.py), started in the environment the benchmark was started in: first
    that its float32 UNet and VAE compute what ours did, then their timings in each of
    `dtypes` (by default `reference_dtypes`), and how PyTorch was set up."""
    dtypes = dtypes or reference_dtypes(args.dtypes)
    folder = folder.resolve()
    inputs, outputs = folder / "reference_inputs.npz", folder / "reference_outputs.npz"
    unet_inputs = {k: v for k, v in dataclasses.asdict(parity.unet_inputs).items() if v is not None}
    np.savez(inputs, **unet_inputs, vae_latents=parity.latents)
    device = "cpu" if on_cpu() else "gpu"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.reference_process",
            str(folder),
            str(inputs),
            str(outputs),
            str(args.repeats),
            device,
            ",".join(dtypes),
            args.reference_memory_format,
        ],
        check=True,
        cwd=REPOSITORY,
        env=LAUNCH_ENVIRONMENT,
    )
    theirs = dict(np.load(outputs))
    setup = json.loads(outputs.with_suffix(".json").read_text())
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
        f"by {', '.join(setup['attention_processors'])}, {setup['memory_format']} tensors",
        flush=True,
    )
    print(progress_line({"dtype": "pytorch", **result}), flush=True)
    return {**result, "setup": setup}


def run_rounds(
    name: str,
    config: PipelineConfig,
    folder: Path,
    args: argparse.Namespace,
    parity: Parity,
    first: dict[str, dict[str, float]],
) -> list[dict[str, dict[str, float]]]:
    """The `first` round and the rest of `--rounds`: MLX's float32 timings, then the
    reference's, in turn."""
    rounds = [first]
    for number in range(2, args.rounds + 1):
        print(f"{name}: round {number} of {args.rounds}, float32", flush=True)
        ours = float32_timings(config, folder, args)
        print(progress_line({"model": name, "dtype": "float32", **ours}), flush=True)
        rounds.append(_round(ours, run_reference(name, folder, args, parity, ["float32"])))
    return rounds


def _round(ours: dict[str, float], reference: dict[str, Any]) -> dict[str, dict[str, float]]:
    """A round of `--rounds`: our float32 timings and the reference's of the same names."""
    return {"mlx": ours, "pytorch": {key: reference[f"float32_{key}"] for key in ours}}


def first_round(
    name: str, rows: list[dict[str, Any]], reference: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """The float32 timings of the full measurement, as a round of `--rounds`."""
    float32_rows = [r for r in rows if r["model"] == name and r["dtype"] == "float32"]
    ours = {f"unet_step_s_batch{r['batch']}": r["unet_step_s"] for r in float32_rows}
    ours["vae_decode_s"] = float32_rows[0]["vae_decode_s"]
    return _round(ours, reference)
