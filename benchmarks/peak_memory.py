"""Peak memory (the process's maximum resident set) of blocked attention and of VAE decodes,
each in a process of its own, as docs/performance.md reports them. Run from the root:

    python -m benchmarks.peak_memory attention --tokens 16384 --channels 512 --budget 64
    python -m benchmarks.peak_memory attention --tokens 36864 --channels 320 --heads 8 --fast
    python -m benchmarks.peak_memory decode FOLDER --size 1024 --tile 256
    python -m benchmarks.peak_memory seams FOLDER --size 384 --tile 256

FOLDER is a diffusers-format pipeline (random weights: `benchmarks.random_weights`); only
its VAE is computed. `decode` runs as the scripts do, within `fast_cpu()`.
"""

from __future__ import annotations

import argparse
import resource
import time

import stable_diffusion  # noqa: F401  (before MLX, so that MLX gets the optimized BLAS)

# isort: split
import mlx.core as mx
import numpy as np

from stable_diffusion import StableDiffusion
from stable_diffusion.cpu import fast_cpu, kernels
from stable_diffusion.models import layers


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def attention(args: argparse.Namespace) -> str:
    layers.ATTENTION_SCORE_BUDGET = args.budget * 2**20
    q, k, v = (mx.random.normal((1, args.tokens, args.channels)) for _ in range(3))
    mx.eval(q, k, v)
    start = time.perf_counter()
    backend = kernels.attention if args.fast else layers.scaled_dot_product_attention
    mx.eval(backend(q, k, v, args.heads, False))
    scores = args.heads * args.tokens**2 * 4 / 2**30
    how = "fast_cpu" if args.fast else f"blocks of {args.budget} MiB"
    return (
        f"attention, {args.tokens} tokens x {args.heads} heads ({scores:.1f} GiB of scores), "
        f"{how}: {time.perf_counter() - start:.0f} s"
    )


def _vae_only(folder: str, tile: int | None) -> StableDiffusion:
    sd = StableDiffusion(folder, float16=False, tiled_vae=tile is not None, vae_tile_size=tile)
    sd.release_unet()
    sd.release_text_encoders()
    return sd


def _latents(size: int) -> mx.array:
    rng = np.random.default_rng(0)
    return mx.array(rng.standard_normal((1, size // 8, size // 8, 4), np.float32))


def decode(args: argparse.Namespace) -> str:
    sd = _vae_only(args.folder, args.tile)
    start = time.perf_counter()
    with fast_cpu():
        mx.eval(sd.decode(_latents(args.size)))
    return f"decode {args.size}px, tiles {args.tile}: {time.perf_counter() - start:.0f} s"


def seams(args: argparse.Namespace) -> str:
    """Tiled against untiled decoding of the same latents, in [0, 1] pixels."""
    images = [
        np.array(_vae_only(args.folder, t).decode(_latents(args.size))) for t in (None, args.tile)
    ]
    difference = np.abs(images[1] - images[0])
    return (
        f"{args.size}px, {args.tile}px tiles against none: max |difference| "
        f"{difference.max():.4f}, mean {difference.mean():.5f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("attention")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--budget", type=int, default=2048, help="MiB of scores per block")
    p.add_argument("--fast", action="store_true", help="fast_cpu's numpy attention")
    for name in ("decode", "seams"):
        p = commands.add_parser(name)
        p.add_argument("folder")
        p.add_argument("--size", type=int, default=1024)
        p.add_argument("--tile", type=int, default=None if name == "decode" else 256)
    args = parser.parse_args()
    line = {"attention": attention, "decode": decode, "seams": seams}[args.command](args)
    print(f"{line}; peak RSS {_peak_gib():.2f} GiB")


if __name__ == "__main__":
    main()
