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

from stable_diffusion.cpu import on_cpu, onednn

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
    if on_cpu():
        # fast_cpu()'s float32 layers run in oneDNN or in OpenBLAS, Winograd and numpy.
        info["float32_through_onednn"] = onednn.float32_by_default()
    else:
        info["gpu"] = mx.device_info().get("device_name", "GPU")
    for package in ("torch", "diffusers", "openvino", onednn.PACKAGE):
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
    if "whole_image" in results:
        return _whole_image_table(results)
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
        )
        + (", float32 through oneDNN" if machine.get("float32_through_onednn") else ""),
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
                    unet = _over_rounds(ref["rounds"], f"unet_step_s_batch{r['batch']}", "pytorch")
                    vae = _over_rounds(ref["rounds"], "vae_decode_s", "pytorch")
                else:
                    unet = _Compared(r["unet_step_s"], ref[unet_key])
                    vae = _Compared(r["vae_decode_s"], ref[f"{r['dtype']}_vae_decode_s"])
                lines.append(
                    f"| {r['model']} | {r['dtype']} | {r['batch']} | {unet} | {vae} "
                    f"| {ref['unet_max_rel_error']:.1e} / {ref['vae_max_rel_error']:.1e} |"
                )
    lines += _openvino_table(results)
    measured = [*results["reference"], *results.get("openvino", [])]
    rounds = max((len(ref.get("rounds", ())) for ref in measured), default=0)
    if rounds:
        lines += [
            "",
            f"float32 (and MLX's bfloat16) over {rounds} rounds, MLX and the references "
            "alternately: each "
            "side's median time, and the median of the rounds' speed-ups (each "
            "round's in brackets).",
        ]
    return "\n".join(lines)


def _whole_image_table(results: dict[str, Any]) -> str:
    """Seconds per whole image on each side (medians over the rounds) and MLX's speed-up
    against each (the median of the rounds'; each round's in brackets); MLX's bfloat16
    images, where measured, against OpenVINO's default precision (or alone)."""
    machine, size = results["machine"], results["settings"]["size"]
    measured = results["whole_image"]
    sides = [
        s for s in ("pytorch", "openvino", "openvino_default") if s in measured[0]["rounds"][0]
    ]
    names = {"pytorch": "PyTorch", "openvino": "OpenVINO f32"}
    names["openvino_default"] = f"OpenVINO {measured[0]['setup'].get('openvino_default_precision')}"
    rounds = len(measured[0]["rounds"])
    bfloat16 = "mlx_bfloat16" in measured[0]["rounds"][0]
    against = "openvino_default" if "openvino_default" in sides else None
    columns = ["model", "image", "MLX s"]
    columns += [column for side in sides for column in (f"{names[side]} s", "speed-up")]
    if bfloat16:
        columns += ["MLX bfloat16 s"] + ([f"speed-up vs {names[against]}"] if against else [])
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GiB; "
        f"MLX {machine['mlx']}; whole {size}px images in float32"
        + (" (through oneDNN)" if machine.get("float32_through_onednn") else "")
        + f"{' and bfloat16' * bfloat16} (text encoding, steps, "
        f"decode; load excluded), {rounds} rounds, the sides alternately: medians, and the "
        "median of the rounds' speed-ups (PyTorch or OpenVINO time / MLX time)",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for each in measured:
        image = (
            f"{each['steps']} step{'s' * (each['steps'] > 1)}"
            + (f", CFG {each['cfg']:g}" if each["cfg"] else "")
            + (", tiny decoder" if each["decoder"] == "tiny" else ", VAE")
        )
        cells = [_cell(statistics.median(r["mlx"] for r in each["rounds"]))]
        cells += [
            str(_over_rounds(each["rounds"], None, side)).split(" | ", 1)[1] for side in sides
        ]
        if bfloat16 and against:
            both = _over_rounds(each["rounds"], None, against, "mlx_bfloat16")
            cells.append(" | ".join(str(both).split(" | ")[::2]))
        elif bfloat16:
            cells.append(_cell(statistics.median(r["mlx_bfloat16"] for r in each["rounds"])))
        lines.append(f"| {each['model']} | {image} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _openvino_table(results: dict[str, Any]) -> list[str]:
    """MLX's float32 timings against OpenVINO's in float32 and in its default precision;
    where MLX's bfloat16 was measured, its timings against OpenVINO's default precision."""
    if not results.get("openvino"):
        return []
    setup = results["openvino"][0]["setup"]
    default = setup["default_precision"]
    bfloat16 = any(r["dtype"] == "bfloat16" for r in results["rows"])
    low_columns = f"OpenVINO {default} s | speed-up"
    if bfloat16:
        low_columns += f" | MLX bfloat16 s | speed-up vs OpenVINO {default}"
    lines = [
        "",
        f"vs OpenVINO {setup['openvino']} on the CPU (diffusers' UNet and decoder converted "
        "from the same weights; speed-up = OpenVINO time / MLX time; max rel. "
        f"difference from MLX's float32 outputs; default precision here: {default}):",
        "",
        f"| model | batch | MLX UNet step s | OpenVINO f32 s | speed-up | {low_columns} "
        f"| MLX VAE decode s | OpenVINO f32 s | speed-up | {low_columns} "
        f"| max rel. difference UNet / VAE, f32 | {default} |",
        "|---|---|" + "---|" * (10 + 4 * bfloat16) + "---|---|",
    ]
    for ov in results["openvino"]:
        for r in results["rows"]:
            if r["model"] != ov["model"] or r["dtype"] != "float32":
                continue
            ours_bfloat16 = next(
                (
                    b
                    for b in results["rows"]
                    if (b["model"], b["dtype"], b["batch"]) == (r["model"], "bfloat16", r["batch"])
                ),
                None,
            )
            cells = []
            for key, ours in ((f"unet_step_s_batch{r['batch']}", r["unet_step_s"]),
                              ("vae_decode_s", r["vae_decode_s"])):  # fmt: skip
                f32 = _Compared(ours, ov[f"float32_{key}"])
                low = _Compared(ours, ov[f"default_{key}"])
                if ours_bfloat16 is not None:
                    low_key = key if key == "vae_decode_s" else "unet_step_s"
                    both = _Compared(ours_bfloat16[low_key], ov[f"default_{key}"])
                if "rounds" in ov:
                    f32 = _over_rounds(ov["rounds"], key, "openvino")
                    low = _over_rounds(ov["rounds"], key, "openvino_default")
                    if ours_bfloat16 is not None:
                        both = _over_rounds(ov["rounds"], key, "openvino_default", "mlx_bfloat16")
                cells.append(f"{f32} | {str(low).split(' | ', 1)[1]}")
                if ours_bfloat16 is not None:
                    cells.append(" | ".join(str(both).split(" | ")[::2]))
            errors = [
                f"{ov[f'{p}unet_max_rel_error']:.1e} / {ov[f'{p}vae_max_rel_error']:.1e}"
                for p in ("", "default_")
            ]
            lines.append(
                f"| {r['model']} | {r['batch']} | {' | '.join(cells)} | {' | '.join(errors)} |"
            )
    return lines


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


def _over_rounds(
    rounds: list[dict[str, Any]], key: str | None, side: str, ours_side: str = "mlx"
) -> _Compared:
    """Both sides' medians over `rounds` of their `key` timing (of their one timing if
    `key` is None), and the rounds' speed-ups."""
    ours = [r[ours_side] if key is None else r[ours_side][key] for r in rounds]
    theirs = [r[side] if key is None else r[side][key] for r in rounds]
    return _Compared(
        statistics.median(ours),
        statistics.median(theirs),
        tuple(b / a for a, b in zip(ours, theirs, strict=True)),
    )
