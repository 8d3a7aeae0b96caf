"""What the whole-run benchmarks share (`server.py`, `ranks.py`): a full-size model folder with
random weights, and `txt2image.py` run as a user runs it, timed from outside and by its own
`-v` report."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .architectures import ARCHITECTURES
from .measure import GIB
from .random_weights import reuse_or_write, weights_on_disk

ROOT = Path(__file__).resolve().parent.parent
# Where the random-weight models stay between runs (written once, reused after).
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "sd-benchmark-models"
_TIMINGS = {
    "load_s": re.compile(r"Model loaded in ([0-9.]+) s"),
    "denoise_s": re.compile(r"Denoised in ([0-9.]+) s"),
    "decode_s": re.compile(r"Decoded in ([0-9.]+) s"),
}


def add_model_options(parser: argparse.ArgumentParser, model: str, steps: int, cfg: float) -> None:
    """The options naming the model and the job: the same on both sides of a comparison."""
    parser.add_argument(
        "--model",
        default=model,
        help=f"architecture written with random weights, from: {', '.join(ARCHITECTURES)} "
        f"(default {model})",
    )
    parser.add_argument(
        "--folder", type=Path, help="an existing diffusers model folder instead of --model"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help=f"where the random-weight model is written, and reused by later runs "
        f"(default {DEFAULT_WORKDIR})",
    )
    parser.add_argument("--size", type=int, default=512, help="image width and height")
    parser.add_argument("--steps", type=int, default=steps, help=f"denoising steps ({steps})")
    parser.add_argument("--cfg", type=float, default=cfg, help=f"guidance weight ({cfg})")
    parser.add_argument("--seed", type=int, default=1, help="the first image's seed")
    parser.add_argument("--prompt", default="a lighthouse on a cliff at dusk")
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds any one command may take"
    )


def check_model_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.folder is None and args.model not in ARCHITECTURES:
        parser.error(f"unknown --model {args.model!r}; choose from {', '.join(ARCHITECTURES)}")
    if args.folder is not None and not (args.folder / "model_index.json").is_file():
        parser.error(f"--folder {args.folder}: not a diffusers model folder (no model_index.json)")


def model_folder(args: argparse.Namespace) -> Path:
    """--folder, or the random-weight model of --model in --workdir (written if missing)."""
    if args.folder is not None:
        return args.folder.absolute()
    folder = (args.workdir / args.model).absolute()
    if (folder / "model_index.json").is_file():
        print(f"Reusing the random-weight model {folder}", flush=True)
        return folder
    config = ARCHITECTURES[args.model]
    needed = weights_on_disk(config, float16=False)
    existing = next(f for f in (folder, *folder.parents) if f.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise SystemExit(
            f"{args.model}'s random weights need {needed / GIB:.1f} GiB, but {existing} has "
            f"{free / GIB:.1f} GiB free: pass --workdir on a disk with more"
        )
    start = time.perf_counter()
    reuse_or_write(config, folder)
    print(
        f"Wrote {args.model}'s random weights ({needed / GIB:.1f} GiB) to {folder} in "
        f"{time.perf_counter() - start:.0f} s; later runs reuse them (remove the folder "
        "when done)",
        flush=True,
    )
    return folder


def job_arguments(args: argparse.Namespace, folder: Path) -> list[str]:
    """txt2image.py's arguments for the job, without the seed and output."""
    return [
        args.prompt,
        "--model",
        str(folder),
        "--steps",
        str(args.steps),
        "--cfg",
        str(args.cfg),
        "--width",
        str(args.size),
        "--height",
        str(args.size),
    ]


@dataclass(frozen=True)
class Run:
    """A command's wall time, the script's own timings (-v) and its output."""

    wall_s: float
    timings: dict[str, list[float]]  # load_s, denoise_s, decode_s: one per rank that printed
    output: str
    returncode: int

    def total(self, name: str) -> float:
        """The largest of the ranks' (the one everyone waits for), to 0.01 s."""
        if not self.timings[name]:
            raise SystemExit(f"txt2image.py -v printed no {name} timing:\n{self.output}")
        return max(self.timings[name])


def timed(command: Sequence[str], timeout: float) -> Run:
    """Run `command` from the repository's root, timed from outside."""
    start = time.perf_counter()
    result = subprocess.run(
        list(command), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    wall = time.perf_counter() - start
    output = result.stdout + result.stderr
    timings = {
        name: [float(value) for value in pattern.findall(output)]
        for name, pattern in _TIMINGS.items()
    }
    return Run(wall, timings, output, result.returncode)


def txt2image(arguments: Sequence[str], timeout: float, launcher: Sequence[str] = ()) -> Run:
    """`txt2image.py` with its timings printed (-v) and every weight read before it generates
    (--preload-models, as the server does: the load is then all in "Model loaded in")."""
    script = [str(ROOT / "txt2image.py"), *arguments, "-v", "--preload-models"]
    run = timed([*(launcher or [sys.executable]), *script], timeout)
    if run.returncode != 0:
        raise SystemExit(f"txt2image.py failed (exit status {run.returncode}):\n{run.output}")
    return run


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
