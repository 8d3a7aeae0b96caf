"""`--whole-image`: one whole image (text encoding, the steps, the decode) per side, MLX as
the scripts make it and diffusers' pipeline on PyTorch and on OpenVINO
(`whole_image_process.py`), on the same random weights, alternately over `--rounds`."""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from stable_diffusion import StableDiffusion, keep_freed_memory

from . import LAUNCH_ENVIRONMENT
from .architectures import WHOLE_IMAGE, WholeImage
from .measure import PROMPT, _phase
from .reference import REPOSITORY


def mlx_image_seconds(
    folder: Path, decoder: Path | None, plan: WholeImage, args: argparse.Namespace, dtype: str
) -> float:
    """Median seconds of one image from a loaded pipeline, each phase in a `fast_cpu()`
    block as the scripts run them (freed memory kept between them; bfloat16 compute for the
    bfloat16 dtype, as --bfloat16), after a one-step image that warms every phase up. The
    memory goes back to the system before the references run."""
    with keep_freed_memory():
        seconds = _mlx_images(folder, decoder, plan, args, dtype)
        gc.collect()
    return seconds


def _mlx_images(
    folder: Path, decoder: Path | None, plan: WholeImage, args: argparse.Namespace, dtype: str
) -> float:
    sd = StableDiffusion(str(folder), decoder=str(decoder) if decoder else "full")
    sd.preload()

    def image(steps: int) -> None:
        latents = sd.generate_latents(
            PROMPT,
            num_steps=steps,
            seed=0,
            width=args.size,
            height=args.size,
            cfg_weight=plan.cfg,
            sampler="euler",
        )
        with _phase(args, dtype):
            latents.compute_conditioning()
            for x in latents:
                mx.eval(x)
        with _phase(args, dtype):
            mx.eval(sd.decode(x))

    image(1)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        image(plan.steps)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _reference_images(
    side: str, folder: Path, decoder: Path | None, plan: WholeImage, args: argparse.Namespace
) -> dict[str, Any]:
    spec = {
        "folder": str(folder.resolve()),
        "decoder": str(decoder.resolve()) if decoder else None,
        "steps": plan.steps,
        "cfg": plan.cfg,
        "size": args.size,
        "prompt": PROMPT,
        "repeats": args.repeats,
    }
    spec_file, output = folder / "whole_image.json", folder / f"whole_image_{side}.json"
    spec_file.write_text(json.dumps(spec))
    subprocess.run(
        [sys.executable, "-m", "benchmarks.whole_image_process", side, str(spec_file), str(output)],
        check=True,
        cwd=REPOSITORY,
        env=LAUNCH_ENVIRONMENT,
    )
    return json.loads(output.read_text())


def run_whole_image(
    name: str, folder: Path, decoder: Path | None, args: argparse.Namespace
) -> dict[str, Any]:
    """`--rounds` rounds of one image per side, in turn: MLX (float32, then bfloat16 if in
    --dtypes), then PyTorch (--reference), then OpenVINO in float32 and in its default
    precision (--openvino)."""
    plan = WHOLE_IMAGE[name]
    result: dict[str, Any] = {
        "model": name,
        "steps": plan.steps,
        "decoder": "tiny" if plan.tiny_decoder else "full",
        "cfg": plan.cfg,
        "rounds": [],
    }
    sides = ["pytorch"] * args.reference + ["openvino"] * args.openvino
    for number in range(1, args.rounds + 1):
        print(f"{name}: whole image, round {number} of {args.rounds}", flush=True)
        each = {"mlx": mlx_image_seconds(folder, decoder, plan, args, "float32")}
        if "bfloat16" in args.dtypes:
            each["mlx_bfloat16"] = mlx_image_seconds(folder, decoder, plan, args, "bfloat16")
        gc.collect()  # the pipeline, out of MLX's memory before the references load
        mx.clear_cache()
        for side in sides:
            measured = _reference_images(side, folder, decoder, plan, args)
            result["setup"] = {**result.get("setup", {}), **measured}
            each |= {
                k: v
                for k, v in measured.items()
                if k in ("pytorch", "openvino", "openvino_default")
            }
        print(
            "  " + ", ".join(f"{side} {seconds:.3g} s" for side, seconds in each.items()),
            flush=True,
        )
        result["rounds"].append(each)
    for side in ("pytorch", "openvino", "openvino_default"):
        result["setup"] = {k: v for k, v in result.get("setup", {}).items() if k != side}
    return result
