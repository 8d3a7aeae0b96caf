"""Time UNet steps in float32 and with bfloat16 compute (`fast_cpu(bfloat16=True)`),
alternately, on one full-size pipeline with random weights.

    python -m benchmarks.bfloat16 --model sd-1.5 --rounds 3

Each round runs, per batch size and mode, one `fast_cpu()` block: two warm-up steps (the
second packs the bfloat16 weights and makes the Winograd kernels, kept from a layer's
second call: `measure.WARMUP`), then `--steps` timed steps;
float32 and bfloat16 alternate within each round, so that a shared machine's drift lands
on both. Prints each side's median step, the median of the rounds' speed-ups and how far
bfloat16's UNet output is from float32's (largest difference over the largest magnitude).
"""

from __future__ import annotations

# First, so that MLX binds to the optimized BLAS before anything imports mlx.core.
import stable_diffusion  # noqa: F401

# isort: split

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from stable_diffusion import StableDiffusion, fast_cpu
from stable_diffusion.cpu import unavailable_bfloat16

from .architectures import ARCHITECTURES
from .measure import WARMUP, UNetInputs
from .random_weights import write_random_pipeline


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bfloat16", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default="sd-1.5", choices=sorted(ARCHITECTURES))
    parser.add_argument("--size", type=int, default=512, help="image width and height")
    parser.add_argument("--batches", default="1,2", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per block")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--workdir", help="where to write the weights (default: a temporary one)")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.rounds < 1 or args.steps < 1 or not args.batches or min(args.batches) < 1:
        parser.error("--rounds, --steps and the --batches must be at least 1")
    reason = unavailable_bfloat16()
    if reason is not None:
        parser.error(reason)
    return args


def step_seconds(sd: StableDiffusion, inputs: dict, bfloat16: bool, steps: int) -> tuple:
    """(median seconds of `steps` timed steps after a warm-up, the last output)."""
    unet = sd.unet
    assert unet is not None  # loaded on first use, never released here
    with fast_cpu(bfloat16=bfloat16):
        for _ in range(WARMUP):
            mx.eval(unet(**inputs))
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            out = unet(**inputs)
            mx.eval(out)
            times.append(time.perf_counter() - start)
    return statistics.median(times), np.array(out)


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    args = parse_args(argv)
    config = ARCHITECTURES[args.model]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sd-bfloat16-"))
    folder = workdir / args.model
    results = {}
    try:
        write_random_pipeline(config, folder, args.seed)
        sd = StableDiffusion(str(folder), float16=False)
        latent = args.size // sd.vae.downscale
        for batch in args.batches:
            inputs = UNetInputs.random(config.unet, batch, latent, latent).mlx(mx.float32)
            times: dict[bool, list[float]] = {False: [], True: []}
            outputs = {}
            for _ in range(args.rounds):
                for bfloat16 in (False, True):
                    seconds, outputs[bfloat16] = step_seconds(sd, inputs, bfloat16, args.steps)
                    times[bfloat16].append(seconds)
            reference = outputs[False]
            difference = np.abs(outputs[True] - reference).max() / np.abs(reference).max()
            speedups = [f / b for f, b in zip(times[False], times[True], strict=True)]
            results[batch] = {
                "float32_s": statistics.median(times[False]),
                "bfloat16_s": statistics.median(times[True]),
                "speedup": statistics.median(speedups),
                "difference": float(difference),
            }
            row = results[batch]
            print(
                f"{args.model} {args.size}px batch {batch}: UNet step float32 "
                f"{row['float32_s']:.2f} s, bfloat16 {row['bfloat16_s']:.2f} s"
                f" (medians of {args.rounds}; rounds' speed-ups "
                f"{', '.join(f'{s:.2f}x' for s in speedups)}); bfloat16 output off by "
                f"{difference:.1e} of its largest magnitude",
                flush=True,
            )
    finally:
        shutil.rmtree(folder if args.workdir else workdir, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
