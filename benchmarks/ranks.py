"""Images per second with one process and with two `mlx.launch` ranks, the cost of gathering a
finished image, and the scaling they predict for N machines.

    python -m benchmarks.ranks --model sd-turbo --size 512 --steps 1 --cfg 0 --n-images 4

One model folder (by default a full-size architecture with random weights, written once to
--workdir and reused) makes the same --n-images images twice with `txt2image.py`: in one
process, and under `mlx.launch -n 2 --backend ring` on this machine (loopback), each command
timed whole and by the scripts' own report (-v). The two runs' images must be the same
pixels. Then rank 0's time for `distributed.gather` of one image per rank (`gather_rank.py`,
many repetitions, median) and for saving one image as a PNG, from which the expected rate on
N machines follows:

    images/s(N) = N / (c + N * s + (N - 1) * B / W)

c: one image's denoising and decoding (measured in the one-process run), s: rank 0's saving
of one image (PNG), B: an image's bytes (size^2 * 3, uint8), W: the link's bandwidth. A
prompt's n images split in N blocks: every rank makes n / N (n c / N), rank 0 saves all n
(n s: it saves every file), and the all_gather moves the N - 1 other blocks over each link
((N - 1) n B / (N W) on a ring); the model's load (each rank loads its own copy, at the same
time) comes once per run and is left out. Assumed: the same machines, the same per-image
time on each, n a multiple of N, and the link's full bandwidth."""

from __future__ import annotations

# First, so that MLX binds to the optimized BLAS before anything imports mlx.core.
import stable_diffusion  # noqa: F401

# isort: split
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stable_diffusion.images import read_parameters, save_image

from .report import machine_info
from .scripts import (
    ROOT,
    Run,
    add_model_options,
    check_model_options,
    job_arguments,
    model_folder,
    pixels,
    timed,
    txt2image,
)

# mlx.launch with this interpreter (its `mlx.launch` entry point need not be on PATH).
LAUNCH = [
    sys.executable,
    "-c",
    "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())",
]
# What mlx.launch prints when a rank fails: it still exits 0 (MLX 0.32.4).
RANK_FAILED = ("exited with code", "was killed")
BANDWIDTHS = {"1 Gbit/s Ethernet": 1e9 / 8, "10 Gbit/s Ethernet": 10e9 / 8}
MACHINES = (1, 2, 4, 8, 16)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ranks", description=__doc__.split("\n\n")[0]
    )
    add_model_options(parser, model="sd-turbo", steps=1, cfg=0.0)
    parser.add_argument(
        "--n-images", type=int, default=4, help="images of the job (default 4: 2 per rank)"
    )
    parser.add_argument(
        "--ranks", type=int, default=2, help="ranks of the mlx.launch run (default 2)"
    )
    parser.add_argument(
        "--repeats", type=int, default=50, help="timed gathers of one image (default 50)"
    )
    parser.add_argument(
        "--extra",
        default="",
        help="more txt2image.py options for both runs, e.g. '--vae PATH' (the tiny decoder)",
    )
    parser.add_argument("--output", default="ranks-results.json", help="JSON results file")
    args = parser.parse_args(argv)
    check_model_options(parser, args)
    if args.n_images < args.ranks:
        parser.error(f"--n-images must be at least --ranks ({args.ranks}): every rank makes one")
    if args.ranks < 2 or args.repeats < 2:
        parser.error("--ranks and --repeats must be at least 2")
    return args


def launcher(ranks: int) -> list[str]:
    return [*LAUNCH, "-n", str(ranks), "--backend", "ring", "--python", sys.executable]


def check_ranks(run: Run) -> None:
    """mlx.launch exits 0 when a rank fails: its warning is the sign."""
    failed = [line for line in run.output.splitlines() if any(s in line for s in RANK_FAILED)]
    if failed:
        raise SystemExit("a rank failed:\n" + "\n".join(failed) + f"\n\n{run.output}")


def rates(run: Run, n_images: int) -> dict[str, float]:
    generation = run.total("denoise_s") + run.total("decode_s")
    return {
        "wall_s": run.wall_s,
        "load_s": run.total("load_s"),
        "generation_s": generation,  # the slowest rank's
        "images_per_s": n_images / run.wall_s,
        "images_per_s_generation": n_images / generation,
    }


def save_seconds(path: Path, work: Path, repeats: int) -> float:
    """Rank 0's cost of saving one finished image (PNG encoding and writing), median."""
    image, parameters = pixels(path), read_parameters(path)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        save_image(image, work / "saved.png", parameters, overwrite=True)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def expected_rate(machines: int, c: float, s: float, transfer: float) -> float:
    """Images per second on `machines` ranks (the formula in this module's description)."""
    return machines / (c + machines * s + (machines - 1) * transfer)


def scaling(c: float, s: float, image_bytes: int) -> dict[str, list[dict[str, float]]]:
    table = {}
    for link, bandwidth in BANDWIDTHS.items():
        transfer = image_bytes / bandwidth
        one = expected_rate(1, c, s, transfer)
        table[link] = [
            {
                "machines": n,
                "images_per_s": expected_rate(n, c, s, transfer),
                "speedup": expected_rate(n, c, s, transfer) / one,
            }
            for n in MACHINES
        ]
    return table


def measure(args: argparse.Namespace, folder: Path, work: Path) -> dict[str, Any]:
    job = [
        *job_arguments(args, folder),
        "--seed",
        str(args.seed),
        "--n_images",
        str(args.n_images),
        *args.extra.split(),
    ]
    one = txt2image([*job, "--save-individual", "--output", str(work / "one.png")], args.timeout)
    print(f"one process: {one.wall_s:.2f} s", flush=True)
    several = txt2image(
        [*job, "--output", str(work / "two.png")], args.timeout, launcher(args.ranks)
    )
    check_ranks(several)
    print(f"{args.ranks} ranks: {several.wall_s:.2f} s", flush=True)
    equal = all(
        (work / f"two-{i}.png").is_file()
        and (pixels(work / f"one-{i}.png") == pixels(work / f"two-{i}.png")).all()
        for i in range(args.n_images)
    )
    script = str(ROOT / "benchmarks" / "gather_rank.py")
    gathered = timed(
        [*launcher(args.ranks), script, str(args.size), str(args.repeats)], args.timeout
    )
    check_ranks(gathered)
    line = next((x for x in gathered.output.splitlines() if x.startswith("GATHER ")), None)
    if line is None:
        raise SystemExit(f"the gather measurement printed nothing:\n{gathered.output}")
    gather = json.loads(line.removeprefix("GATHER "))
    save = save_seconds(work / "one-0.png", work, args.repeats)
    single = rates(one, args.n_images)
    c = single["generation_s"] / args.n_images
    return {
        "one_process": single,
        "ranks": {"count": args.ranks, **rates(several, args.n_images)},
        "equal": equal,
        "gather": gather,
        "save_s": save,
        "per_image_s": c,
        "scaling": scaling(c, save, gather["image_bytes"]),
    }


def markdown(results: dict[str, Any]) -> str:
    settings, machine = results["settings"], results["machine"]
    n, count = settings["n_images"], results["ranks"]["count"]
    lines = [
        f"{settings['model']}, {n} images of {settings['size']}px, {settings['steps']} steps, "
        f"CFG {settings['cfg']}; {machine['cpu']}, {machine['cores']} cores, "
        f"MLX {machine['mlx']}",
        "",
        "| run | wall s | images/s | model load s | denoise + decode s | images/s, "
        "generation only |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in (
        ("one process", results["one_process"]),
        (f"mlx.launch -n {count} --backend ring", results["ranks"]),
    ):
        lines.append(
            f"| {name} | {row['wall_s']:.2f} | {row['images_per_s']:.3f} | {row['load_s']:.2f} "
            f"| {row['generation_s']:.2f} | {row['images_per_s_generation']:.3f} |"
        )
    gather = results["gather"]
    lines += [
        "",
        ("Same pixels in both runs." if results["equal"] else "THE RUNS' IMAGES DIFFER.")
        + f" Rank 0's gather of one {gather['image_bytes'] / 1e6:.2f} MB image per rank over "
        f"{gather['ranks']} local ranks: median {gather['median_s'] * 1e3:.2f} ms "
        f"(p10-p90 {gather['p10_s'] * 1e3:.2f}-{gather['p90_s'] * 1e3:.2f} ms, "
        f"{gather['repeats']} repetitions); saving one image "
        f"{results['save_s'] * 1e3:.1f} ms; one image's denoising and decoding "
        f"c = {results['per_image_s']:.2f} s.",
        "",
        "Expected images/s on N machines, N / (c + N s + (N - 1) B / W):",
        "",
        "| link | " + " | ".join(f"N = {m}" for m in MACHINES) + " |",
        "|---|" + "---|" * len(MACHINES),
    ]
    for link, rows in results["scaling"].items():
        cells = [f"{r['images_per_s']:.3g} ({r['speedup']:.2f}x)" for r in rows]
        lines.append(f"| {link} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    folder = model_folder(args)
    with tempfile.TemporaryDirectory(prefix="sd-ranks-benchmark-") as work:
        results = measure(args, folder, Path(work))
    results["settings"] = {
        "model": args.model if args.folder is None else str(args.folder),
        "folder": str(folder),
        "size": args.size,
        "steps": args.steps,
        "cfg": args.cfg,
        "seed": args.seed,
        "n_images": args.n_images,
        "extra": args.extra,
    }
    results["machine"] = machine_info()
    Path(args.output).write_text(json.dumps(results, indent=1))
    print()
    print(markdown(results))
    if not results["equal"]:
        raise SystemExit("the runs over ranks saved other pixels than the one process")
    return results


if __name__ == "__main__":
    main()
