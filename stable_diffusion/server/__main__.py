"""python -m stable_diffusion.server --model sdxl: serve A1111's web API and a page."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stable_diffusion.server",
        description="Keep a Stable Diffusion model loaded and serve AUTOMATIC1111's web API "
        "(/sdapi/v1/*) and a web page at /.",
    )
    p.add_argument(
        "--model",
        default="sdxl",
        help="the model loaded at start, as the scripts' --model (default: sdxl)",
    )
    p.add_argument(
        "--models-dir",
        type=Path,
        help="models (diffusers folders, .safetensors, "
        ".ckpt) that requests may switch to (sd_model_checkpoint)",
    )
    p.add_argument("--lora-dir", type=Path, help="LoRAs that prompts may name: <lora:name:0.8>")
    p.add_argument(
        "-q",
        "--quantize",
        action="store_true",
        help="4-bit text encoders and 8-bit UNet, the rest in float16",
    )
    p.add_argument(
        "--float16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: float16 on a GPU or with -q, else float32 on the CPU",
    )
    p.add_argument(
        "--bfloat16",
        action="store_true",
        help="compute the matmuls, convolutions and attention in bfloat16 on CPUs with "
        "AVX512_BF16 or AMX (pip install -r requirements-bfloat16.txt)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    p.add_argument("--port", type=int, default=7860, help="default 7860, as A1111")
    p.add_argument(
        "--api-auth",
        metavar="USER:PASS[,USER2:PASS2]",
        help="require HTTP basic auth, as A1111's --api-auth",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=8,
        help="jobs that may wait behind the running one; more get HTTP 503 (default 8)",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs"),
        help="where save_images writes (default ./outputs); never overwritten",
    )
    return p


def parse_auth(value: str | None) -> dict[str, str] | None:
    """USER:PASS[,USER2:PASS2] -> {user: password}; ValueError for a malformed list."""
    if value is None:
        return None
    users = {}
    for pair in value.split(","):
        user, colon, password = pair.partition(":")
        if not colon or not user or not password:
            raise ValueError(f"--api-auth: {pair!r} is not USER:PASS")
        users[user] = password
    return users


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    try:
        users = parse_auth(args.api_auth)
    except ValueError as e:
        p.error(str(e))
    if not 0 < args.port < 65536:
        p.error(f"--port must be between 1 and 65535 (got {args.port})")
    if args.max_queue < 0:
        p.error(f"--max-queue must be >= 0 (got {args.max_queue})")
    for flag, folder in (("--models-dir", args.models_dir), ("--lora-dir", args.lora_dir)):
        if folder is not None and not folder.is_dir():
            p.error(f"{flag} {folder}: no such directory")
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"--output-dir {args.output_dir}: {e.strerror or e}")
    try:
        import uvicorn

        from .app import ServerConfig, create_app
    except ImportError as e:
        p.error(
            f"the server needs its extra dependencies ({e.name} is missing): "
            "pip install -r requirements-server.txt"
        )
    if args.bfloat16:
        from ..cpu import unavailable_bfloat16

        reason = unavailable_bfloat16()
        if reason is not None:
            p.error(reason)
    if not is_loopback(args.host) and users is None:
        print(
            f"WARNING: listening on {args.host} without --api-auth: anyone who can reach this "
            "machine can use the model. Add --api-auth USER:PASS.",
            file=sys.stderr,
        )
    config = ServerConfig(
        model=args.model,
        models_dir=args.models_dir,
        lora_dir=args.lora_dir,
        float16=args.float16,
        quantize=args.quantize,
        bfloat16=args.bfloat16,
        max_queue=args.max_queue,
        auth=users,
        output_dir=args.output_dir,
    )
    from ..cpu import keep_freed_memory

    # The process keeps what it frees for the next request (its resident size stays at its
    # high-water mark): each image reuses the memory of the one before.
    with keep_freed_memory():
        print(f"Loading {args.model} ...", flush=True)
        try:
            app = create_app(config)
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
        print(
            f"Serving http://{args.host}:{args.port}/ (API: /sdapi/v1/, schema: /openapi.json)",
            flush=True,
        )
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
