"""The benchmark's report: the machine it ran on, and its results as markdown tables."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from stable_diffusion.cpu import on_cpu

from .measure import GIB


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
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(memory / GIB, 1),
        "device": str(mx.default_device()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,  # type: ignore[attr-defined]  # missing from MLX's stubs
    }
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
    rates = ", ".join(
        f"{rate:.0f} GFLOP/s in {dtype}" for dtype, rate in results["matmul_gflops"].items()
    )
    gpu = f" ({machine['gpu']})" if "gpu" in machine else ""
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GiB; "
        f"MLX {machine['mlx']} on {machine['device']}{gpu}; {results['settings']['size']}px; "
        f"single matmul {rates}"
        + (
            ("; lazy, without fast_cpu()" if results["settings"]["lazy"] else "; within fast_cpu()")
            if "gpu" not in machine
            else ""
        ),
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
            f"| {_cell(r['weights_gb'], 2)} |"
        )
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
                    f"| {ref['unet_max_rel_error']:.1e} / {ref['vae_max_rel_error']:.1e} |"
                )
        rounds = max((len(ref.get("rounds", ())) for ref in results["reference"]), default=0)
        if rounds:
            lines += [
                "",
                f"float32 over {rounds} rounds, MLX and PyTorch alternately: each "
                "side's median time, and the median of the rounds' speed-ups (each "
                "round's in brackets).",
            ]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Compared:
    """One timing on both sides, as the comparison table's three cells."""

    ours: float
    theirs: float
    speed_ups: tuple[float, ...] = ()

    def __str__(self) -> str:
        speed_up = statistics.median(self.speed_ups) if self.speed_ups else self.theirs / self.ours
        each = " (" + " / ".join(f"{x:.2f}" for x in self.speed_ups) + ")" if self.speed_ups else ""
        return f"{_cell(self.ours)} | {_cell(self.theirs)} | {speed_up:.2f}x{each}"


def _over_rounds(rounds: list[dict[str, dict[str, float]]], key: str) -> _Compared:
    ours = [r["mlx"][key] for r in rounds]
    theirs = [r["pytorch"][key] for r in rounds]
    return _Compared(
        statistics.median(ours),
        statistics.median(theirs),
        tuple(b / a for a, b in zip(ours, theirs, strict=True)),
    )
