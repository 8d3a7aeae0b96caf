"""Benchmark the full-size models with random weights, without the hub, and optionally
diffusers/PyTorch on the very same weights.

    python -m benchmarks.run --models sd-1.5,sdxl-turbo --dtypes float32 --reference

For each architecture of `config.PRESETS` it writes a diffusers-format model folder with
random weights (a fixed seed, `random_weights.py`), loads it through the pipeline as a user
would, and measures per dtype and batch (2 = classifier-free guidance): load time, text
encoding, one UNet step (median after a warm-up), the VAE decode, a whole image, peak memory
and the UNet's achieved GFLOP/s (FLOPs counted from the config, `flops.py`) against this
machine's single-matmul rate (`measure.py`). `--reference` then runs diffusers' UNet and VAE
on the same files and the same device (in a process of its own: `reference_process.py`),
checks that they compute what ours did in float32, and prints the speed-ups: float32 on a
CPU (where PyTorch's float16 is no contender), float32 and float16 on a GPU. `--rounds N`
then times both sides' float32 UNet steps and decodes N - 1 more times, alternately, and
reports each side's median over the rounds and the median of the rounds' speed-ups: on a
shared machine, whose speed drifts by 10-25% from one minute to the next, one side measured
minutes after the other inherits that drift. Results go to a JSON file and print as
markdown tables (`report.py`).
"""

from __future__ import annotations

# First, so that MLX binds to the optimized BLAS before anything imports mlx.core
# (stable_diffusion/blas.py); not in benchmarks/__init__.py, which the PyTorch side imports.
import stable_diffusion  # noqa: F401

# isort: split
import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from stable_diffusion.config import PRESETS
from stable_diffusion.cpu import on_cpu, unavailable_bfloat16

from .architectures import ARCHITECTURES, WHOLE_IMAGE
from .measure import GIB, dtype_options, matmul_rates, run_mlx
from .random_weights import weights_on_disk, write_random_pipeline, write_random_tiny_autoencoder
from .reference import first_round, run_openvino, run_reference, run_rounds
from .report import machine_info, markdown_tables
from .whole_image import run_whole_image


def check_disk_space(args: argparse.Namespace) -> None:
    """Stop, before anything is measured, where the largest model's random weights (written
    and removed one model at a time) do not fit in the working folder's disk."""
    float16 = any(dtype_options(d)[0] for d in args.dtypes)
    needed = {name: weights_on_disk(ARCHITECTURES[name], float16) for name in args.models}
    largest = max(needed, key=needed.__getitem__)
    workdir = Path(args.workdir or tempfile.gettempdir()).absolute()
    existing = next(folder for folder in (workdir, *workdir.parents) if folder.exists())
    free = shutil.disk_usage(existing).free
    if needed[largest] > free:
        raise SystemExit(
            f"{largest}'s random weights need {needed[largest] / GIB:.1f} GiB on disk, but "
            f"{existing} has {free / GIB:.1f} GiB free: free some space there, or pass "
            "--workdir on a disk with more"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--models",
        default="sd-1.5,sd-2.1-base,sdxl-turbo",
        help=f"comma-separated, from: {', '.join(PRESETS)}",
    )
    parser.add_argument(
        "--dtypes",
        default="float32,float16,q8",
        help="comma-separated, from: float32, float16, q8 (4-bit text encoders, "
        "8-bit UNet over float16), bfloat16 (float32 weights, bfloat16 compute as "
        "--bfloat16: CPUs with AVX512_BF16 or AMX)",
    )
    parser.add_argument("--size", type=int, default=512, help="image width and height")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the image timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also run diffusers/PyTorch on the same weights and device: float32 "
        "(and float16 on a GPU)",
    )
    parser.add_argument(
        "--reference-memory-format",
        choices=["channels_last", "contiguous"],
        default="channels_last",
        help="with --reference: PyTorch's layout of images and convolution weights "
        "(channels_last: NHWC, its fast layout for convolutions; contiguous: its default "
        "NCHW, as the runs before 2026-12-04 measured it)",
    )
    parser.add_argument(
        "--openvino",
        action="store_true",
        help="also run OpenVINO's CPU runtime on diffusers' UNet and decoder converted from "
        "the same weights: float32, and its default precision on this CPU",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --reference or --openvino: time every side's float32 (and MLX's "
        "bfloat16) steps and decodes this many times, alternately (medians, and the median "
        "speed-ups)",
    )
    parser.add_argument(
        "--whole-image",
        action="store_true",
        help="instead: time whole float32 images (and bfloat16's, with --dtypes "
        "float32,bfloat16: text encoding, steps, decode; sdxl-turbo and sd-turbo 1 step with "
        "the tiny decoder, sd-1.5 20 steps), against the references asked for, alternately "
        "over --rounds",
    )
    parser.add_argument("--output", default="results.json", help="JSON results file")
    parser.add_argument(
        "--workdir",
        help="where to write the random-weight models "
        "(default: a temporary folder, removed afterwards)",
    )
    parser.add_argument(
        "--lazy",
        action="store_true",
        help="run MLX fully lazy, not within fast_cpu() (on a CPU: MLX's own "
        "softmax and SiLU, its default buffer cache)",
    )
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for model in args.models:
        if model not in ARCHITECTURES:
            parser.error(f"unknown model {model!r}; choose from {', '.join(PRESETS)}")
    for dtype in args.dtypes:
        dtype_options(dtype)
    if "bfloat16" in args.dtypes:
        reason = unavailable_bfloat16() if on_cpu() else "bfloat16 compute is for the CPU"
        if reason is not None:
            parser.error(reason)
    if (args.reference or args.openvino) and "float32" not in args.dtypes:
        parser.error("--reference and --openvino compare float32 runs: include float32 in --dtypes")
    if args.openvino and not on_cpu():
        parser.error("--openvino measures OpenVINO's CPU runtime: run the benchmark on the CPU")
    if args.whole_image:
        if args.dtypes not in (["float32"], ["float32", "bfloat16"]) or args.lazy:
            parser.error(
                "--whole-image times float32 images (and bfloat16's) within fast_cpu(): "
                "--dtypes float32 or float32,bfloat16"
            )
        for model in args.models:
            if model not in WHOLE_IMAGE:
                parser.error(f"--whole-image times {', '.join(WHOLE_IMAGE)}, not {model!r}")
    compared = args.reference or args.openvino or (args.whole_image and "bfloat16" in args.dtypes)
    if args.rounds < 1 or (args.rounds > 1 and not compared):
        parser.error(
            "--rounds alternates MLX's float32 timings with the references' (whole images "
            "also with its bfloat16 ones): give a number of at least 1, and --reference or "
            "--openvino (or --whole-image --dtypes float32,bfloat16)"
        )
    return args


def whole_images(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """`--whole-image`: each model's random weights (and a random TAESD where its image
    takes the tiny decoder), then its rounds of whole images."""
    measured = []
    for name in args.models:
        folder, decoder = workdir / name, workdir / f"{name}-taesd"
        for each in (folder, decoder):
            shutil.rmtree(each, ignore_errors=True)
        write_random_pipeline(ARCHITECTURES[name], folder, args.seed)
        if WHOLE_IMAGE[name].tiny_decoder:
            write_random_tiny_autoencoder(decoder, args.seed + 4)
        measured.append(run_whole_image(name, folder, decoder if decoder.exists() else None, args))
        for each in (folder, decoder):
            shutil.rmtree(each, ignore_errors=True)
    return {"machine": machine_info(), "settings": _settings(args), "whole_image": measured}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "workdir"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    check_disk_space(args)
    if args.whole_image:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sd-benchmark-"))
        try:
            results = whole_images(args, workdir)
        finally:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
        Path(args.output).write_text(json.dumps(results, indent=1))
        print()
        print(markdown_tables(results))
        return results
    rates = matmul_rates(args.dtypes, args.lazy)
    for dtype, rate in rates.items():
        print(f"single matmul (4096x1280 @ 1280x1280, {dtype}): {rate:.0f} GFLOP/s", flush=True)
    rows: list[dict[str, Any]] = []
    references: list[dict[str, Any]] = []
    openvino: list[dict[str, Any]] = []
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sd-benchmark-"))
    try:
        for name in args.models:
            config = ARCHITECTURES[name]
            folder = workdir / name
            shutil.rmtree(folder, ignore_errors=True)
            start = time.perf_counter()
            write_random_pipeline(
                config, folder, args.seed, float16=any(dtype_options(d)[0] for d in args.dtypes)
            )
            print(
                f"{name}: random weights written in {time.perf_counter() - start:.1f} s", flush=True
            )
            parity = None
            for dtype in args.dtypes:
                dtype_rows, dtype_parity = run_mlx(name, config, folder, dtype, args, rates)
                rows += dtype_rows
                parity = parity or dtype_parity
                gc.collect()
                mx.clear_cache()
            if parity is not None:
                pytorch = run_reference(name, folder, args, parity) if args.reference else None
                ov = run_openvino(name, folder, args, parity) if args.openvino else None
                if args.rounds > 1:
                    first = first_round(name, rows, pytorch, ov)
                    rounds = run_rounds(name, config, folder, args, parity, first)
                    for measured in (pytorch, ov):
                        if measured is not None:
                            measured["rounds"] = rounds
                references += [pytorch] if pytorch else []
                openvino += [ov] if ov else []
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    results = {
        "machine": machine_info(),
        "matmul_gflops": rates,
        "settings": _settings(args),
        "rows": rows,
        "reference": references,
        "openvino": openvino,
    }
    Path(args.output).write_text(json.dumps(results, indent=1))
    print()
    print(markdown_tables(results))
    return results


if __name__ == "__main__":
    main()
