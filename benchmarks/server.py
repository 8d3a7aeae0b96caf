"""Time to the first and the second image: two `txt2image.py` runs against the resident server.

    python -m benchmarks.server --model sd-turbo --size 512 --steps 1 --cfg 0

Both sides make the same two images (the same prompt, settings and seeds: --seed, then
--seed + 1) from one model folder (by default a full-size architecture with random weights,
written once to --workdir and reused). First each image by a `txt2image.py` run of its own,
in a fresh process, timed from outside (process start, imports, load, generation and saving)
and by the script's own report (-v: the model's load, denoising, decoding). Then the server
(`python -m stable_diffusion.server`) on a free loopback port, timed until it answers, and the
two images as two `/sdapi/v1/txt2img` requests in a row over HTTP, each timed. The server's
images must equal the scripts' pixel for pixel (it promises the scripts' pixels): the
command fails otherwise. Results go to a JSON file and print as a markdown table."""

from __future__ import annotations

# First, so that MLX binds to the optimized BLAS before anything imports mlx.core.
import stable_diffusion  # noqa: F401

# isort: split
import argparse
import base64
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .report import machine_info
from .scripts import (
    ROOT,
    add_model_options,
    check_model_options,
    job_arguments,
    model_folder,
    pixels,
    txt2image,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.server", description=__doc__.split("\n\n")[0]
    )
    add_model_options(parser, model="sd-turbo", steps=1, cfg=0.0)
    parser.add_argument("--output", default="server-results.json", help="JSON results file")
    args = parser.parse_args(argv)
    check_model_options(parser, args)
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def start_server(folder: Path, port: int, log: Path, timeout: float) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "stable_diffusion.server",
        "--model",
        str(folder),
        "--port",
        str(port),
        "--output-dir",
        str(log.parent / "server-outputs"),
    ]
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not _get(f"http://127.0.0.1:{port}/sdapi/v1/progress"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise SystemExit(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return process


def txt2img(port: int, payload: dict[str, Any], timeout: float) -> tuple[float, np.ndarray]:
    """One request's time (sent to answer read) and its image."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/sdapi/v1/txt2img",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"the server refused the request: {e.code} {e.read().decode()}") from None
    seconds = time.perf_counter() - start
    (image,) = body["images"]
    with Image.open(io.BytesIO(base64.b64decode(image))) as png:
        return seconds, np.asarray(png.convert("RGB"))


def measure(args: argparse.Namespace, folder: Path, work: Path) -> dict[str, Any]:
    seeds = [args.seed, args.seed + 1]
    job = job_arguments(args, folder)
    scripts, expected = [], []
    for i, seed in enumerate(seeds):
        output = work / f"script-{i}.png"
        run = txt2image([*job, "--seed", str(seed), "--output", str(output)], args.timeout)
        scripts.append(
            {
                "wall_s": run.wall_s,
                "load_s": run.total("load_s"),
                "generation_s": run.total("denoise_s") + run.total("decode_s"),
            }
        )
        expected.append(pixels(output))
        print(f"script run {i + 1}: {run.wall_s:.2f} s", flush=True)

    port = free_port()
    start = time.perf_counter()
    process = start_server(folder, port, work / "server.log", args.timeout)
    try:
        startup = time.perf_counter() - start
        print(f"server answering after {startup:.2f} s", flush=True)
        requests, equal = [], []
        for seed, pixels_expected in zip(seeds, expected, strict=True):
            payload = {
                "prompt": args.prompt,
                "seed": seed,
                "steps": args.steps,
                "cfg_scale": args.cfg,
                "width": args.size,
                "height": args.size,
            }
            seconds, image = txt2img(port, payload, args.timeout)
            requests.append(seconds)
            equal.append(bool(np.array_equal(image, pixels_expected)))
            print(f"request {len(requests)}: {seconds:.2f} s", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {
        "scripts": scripts,
        "server": {"startup_s": startup, "requests_s": requests},
        "equal": equal,
    }


def summary(results: dict[str, Any]) -> dict[str, list[float]]:
    """Time to the first and to the second image, per side, load included and excluded."""
    walls = [run["wall_s"] for run in results["scripts"]]
    outside_load = [run["wall_s"] - run["load_s"] for run in results["scripts"]]
    generation = [run["generation_s"] for run in results["scripts"]]
    server = results["server"]
    requests = server["requests_s"]
    return {
        "scripts, load included": [walls[0], walls[0] + walls[1]],
        "scripts, load excluded": [outside_load[0], outside_load[0] + outside_load[1]],
        "scripts, denoise + decode only": [generation[0], generation[0] + generation[1]],
        "server, load included": [
            server["startup_s"] + requests[0],
            server["startup_s"] + requests[0] + requests[1],
        ],
        "server, load excluded": [requests[0], requests[0] + requests[1]],
    }


def markdown(results: dict[str, Any]) -> str:
    settings, machine = results["settings"], results["machine"]
    lines = [
        f"{settings['model']} ({settings['folder']}), {settings['size']}px, "
        f"{settings['steps']} steps, CFG {settings['cfg']}; {machine['cpu']}, "
        f"{machine['cores']} cores, MLX {machine['mlx']}",
        "",
        "| | first image s | second image s |",
        "|---|---|---|",
    ]
    for name, (first, second) in results["summary"].items():
        lines.append(f"| {name} | {first:.2f} | {second:.2f} |")
    scripts = results["scripts"]
    lines += [
        "",
        "Load excluded: the scripts' wall time less their model load (process start, imports, "
        "generation and saving remain); the server's requests (HTTP, generation, PNG).",
        "Script runs (wall / model load / denoise + decode, s): "
        + ", ".join(
            f"{r['wall_s']:.2f} / {r['load_s']:.2f} / {r['generation_s']:.2f}" for r in scripts
        )
        + f"; server start {results['server']['startup_s']:.2f} s. "
        + ("Same pixels on both sides." if all(results["equal"]) else "THE IMAGES DIFFER."),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    folder = model_folder(args)
    with tempfile.TemporaryDirectory(prefix="sd-server-benchmark-") as work:
        results = measure(args, folder, Path(work))
    results["settings"] = {
        "model": args.model if args.folder is None else str(args.folder),
        "folder": str(folder),
        "size": args.size,
        "steps": args.steps,
        "cfg": args.cfg,
        "seeds": [args.seed, args.seed + 1],
        "prompt": args.prompt,
    }
    results["machine"] = machine_info()
    results["summary"] = summary(results)
    Path(args.output).write_text(json.dumps(results, indent=1))
    print()
    print(markdown(results))
    if not all(results["equal"]):
        raise SystemExit("the server's images differ from the scripts'")
    return results


if __name__ == "__main__":
    main()
