"""What `txt2image.py` and `image2image.py` share: arguments, their checks,
the denoising loop with a progress bar, decoding and saving."""

from __future__ import annotations

import argparse
import math
import os
import secrets
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image
from tqdm import tqdm

from .cpu_kernels import fast_cpu
from .images import (
    GenerationParameters,
    check_output_path,
    make_grid,
    read_parameters,
    save_images,
    validate_size,
)
from .pipeline import Denoising, StableDiffusion
from .samplers import SAMPLERS


def parser(description: str, image_input: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    if image_input:
        p.add_argument("image", help="input image (resized/cropped to multiples of 64)")
        p.add_argument(
            "--strength",
            type=float,
            help="how much to change the image: 0 keeps it, 1 replaces it (default 0.5)",
        )
    else:
        p.add_argument("--width", type=int, help="default: the model's native size")
        p.add_argument("--height", type=int, help="default: the model's native size")
    p.add_argument("prompt", nargs="?", help="what to generate (optional with --from-image)")
    p.add_argument(
        "--from-image",
        metavar="PNG",
        help="re-run with the prompt and settings saved in an image generated before "
        "(options given here win)",
    )
    p.add_argument(
        "--model",
        help="'sdxl' (default: stabilityai/sdxl-turbo), 'sd' (stabilityai/stable-diffusion-"
        "2-1-base), 'sd-1.5', 'sd-2.1', 'sd-turbo', a Hugging Face repo id, a local diffusers "
        "folder, or a single-file checkpoint (.safetensors/.ckpt)",
    )
    p.add_argument(
        "--lora",
        action="append",
        type=lora_spec,
        metavar="PATH[:STRENGTH]",
        help="merge a LoRA (kohya/civitai or diffusers format) with a strength (default 1.0); "
        "repeat for several",
    )
    p.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        help="what the model predicts, for files that do not say (single-file SD 2.x: "
        "v_prediction at 768, epsilon at 512); default: the model's",
    )
    p.add_argument(
        "--image-size",
        type=int,
        help="the model's native size in pixels, for single files (default: 512 SD 1.x, "
        "768 SD 2.x, 1024 SDXL)",
    )
    p.add_argument("--n_images", type=int, default=1)
    p.add_argument("--n_rows", type=int, default=1)
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument(
        "--cfg",
        type=float,
        help="classifier-free guidance weight (default: the model's; <= 1 turns it off)",
    )
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--sampler", choices=list(SAMPLERS), help="default: the model's")
    p.add_argument("--seed", type=int, default=None, help="-1 or none: random (printed)")
    p.add_argument("--decoding_batch_size", type=int, default=1)
    p.add_argument(
        "--vae",
        metavar="full|taesd|PATH",
        help="the decoder: 'full' (default: the model's VAE), 'taesd' (the tiny autoencoder, "
        "madebyollin/taesd or taesdxl for SDXL: far faster, a little less detail), or a "
        "folder or repo id of a diffusers AutoencoderTiny",
    )
    p.add_argument(
        "--tiled-vae",
        action="store_true",
        help="decode (and encode) in overlapping tiles, as diffusers' enable_tiling(): "
        "bounded memory for large images (automatic where the untiled VAE would not fit)",
    )
    p.add_argument(
        "--preview",
        type=int,
        metavar="N",
        help="write a preview next to the output (out.preview.png) every N steps: by the "
        "tiny decoder with --vae taesd, else a cheap latent-to-RGB map",
    )
    p.add_argument(
        "-q",
        "--quantize",
        action="store_true",
        help="4-bit text encoders and 8-bit UNet, the rest in float16 (least memory)",
    )
    p.add_argument(
        "--float16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: float16 on a GPU or with -q, else float32 on the CPU (where float16 "
        "weights only save memory: each layer converts them to float32 as it runs)",
    )
    p.add_argument(
        "--preload-models",
        action="store_true",
        help="load all weights before generating (for timings)",
    )
    p.add_argument("--output", default="out.png")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output file instead of picking a new name",
    )
    p.add_argument("--save-individual", action="store_true", help="also save each image on its own")
    p.add_argument("-v", "--verbose", action="store_true", help="timings and peak memory")
    return p


def lora_spec(value: str) -> tuple[str, float]:
    """PATH or PATH:STRENGTH. The strength is what follows the last colon only if that is a
    number, so Windows paths (C:\\loras\\x.safetensors) work without one."""
    path, _, strength = value.rpartition(":")
    try:
        number = float(strength)
    except ValueError:
        return value, 1.0
    if not path or not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not PATH[:STRENGTH]")
    return path, number


def apply_saved_parameters(args: argparse.Namespace, saved: GenerationParameters) -> None:
    """Fill the options not given on the command line from an image's parameters."""
    values = {
        "prompt": saved.prompt,
        "negative_prompt": saved.negative_prompt or None,
        "steps": saved.steps,
        "cfg": saved.cfg_scale,
        "sampler": saved.sampler if saved.sampler in SAMPLERS else None,
        "seed": saved.seed,
        "model": saved.model,
        "width": saved.width,
        "height": saved.height,
        "strength": saved.strength,
    }
    if dict(saved.extras).get("VAE") in ("taesd", "taesdxl"):
        values["vae"] = "taesd"
    for name, value in values.items():
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, value)
    if saved.loras and not args.lora:
        used = ", ".join(f"{name}:{strength}" for name, strength in saved.loras)
        print(f"Note: the image was made with LoRAs ({used}); pass --lora to use them again")


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """Reject bad arguments before any model is loaded; returns the output path."""
    if args.from_image:
        try:
            apply_saved_parameters(args, read_parameters(args.from_image))
        except ValueError as e:
            p.error(str(e))
    if args.prompt is None:
        p.error("give a prompt, or --from-image with an image generated before")
    args.model = args.model or "sdxl"
    if hasattr(args, "strength") and args.strength is None:
        args.strength = 0.5
    if args.n_images < 1:
        p.error("--n_images must be at least 1")
    if args.n_rows < 1 or args.n_images % args.n_rows:
        p.error(f"--n_images {args.n_images} is not divisible by --n_rows {args.n_rows}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be at least 1 (got {args.steps})")
    if args.cfg is not None and args.cfg < 0:
        p.error(f"--cfg must be >= 0 (got {args.cfg})")
    if args.preview is not None and args.preview < 1:
        p.error(f"--preview must be at least 1 (got {args.preview})")
    if args.decoding_batch_size < 1:
        p.error("--decoding_batch_size must be at least 1")
    if not 0 <= getattr(args, "strength", 0) <= 1:
        p.error(f"--strength must be between 0 and 1 (got {args.strength})")
    args.lora = args.lora or []
    for path, _ in args.lora:
        if not Path(path).is_file():
            p.error(f"--lora {path}: no such file")
    try:
        sizes = [getattr(args, side, None) for side in ("width", "height")]
        validate_size(*(8 if size is None else size for size in sizes))
        individual = args.n_images if args.save_individual else 0
        return check_output_path(args.output, overwrite=args.overwrite, individual=individual)
    except ValueError as e:
        p.error(str(e))


def seed(args: argparse.Namespace) -> int:
    """The seed to use, printed so that a run can be repeated; -1 or none: random."""
    value = secrets.randbits(31) if args.seed is None or args.seed < 0 else args.seed
    print(f"Seed: {value}")
    return value


def load_model(p: argparse.ArgumentParser, args: argparse.Namespace) -> StableDiffusion:
    start = time.perf_counter()
    try:
        sd = StableDiffusion(
            args.model,
            float16=args.float16,
            quantize=args.quantize,
            loras=args.lora,
            prediction_type=args.prediction_type,
            image_size=args.image_size,
            decoder={None: "full", "taesd": "tiny"}.get(args.vae, args.vae),
            tiled_vae=args.tiled_vae,
        )
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    if sd.architecture == "sd2" and args.prediction_type is None:
        # The keys of the 512 base model and the 768 v-prediction one are the same.
        print(
            "SD 2.x single file: assuming the 768x768 v-prediction model; for a 512x512 "
            "epsilon model (SD 2.x base) pass --prediction-type epsilon"
        )
    if args.preload_models:
        sd.preload()
    if args.verbose:
        print(f"Model loaded in {time.perf_counter() - start:.1f} s ({sd.folder})")
    return sd


def preview_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.preview.png")


def write_preview(sd: StableDiffusion, latents: mx.array, path: Path, n_rows: int) -> None:
    """Replace the preview image atomically: a viewer never reads a half-written file. A
    preview that cannot be written (disk full) is reported and the generation goes on."""
    grid = make_grid(sd.preview(latents), n_rows)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as f:
        temporary = Path(f.name)
    try:
        Image.fromarray(grid).save(temporary, format="PNG")
        os.replace(temporary, path)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        tqdm.write(f"Could not write the preview {path}: {e.strerror or e}")


def denoise(
    sd: StableDiffusion, latents: Denoising, args: argparse.Namespace, output: Path | None = None
) -> mx.array:
    """The denoising loop; with --preview, a preview next to `output` every N steps."""
    start = time.perf_counter()
    every = getattr(args, "preview", None) if output is not None else None
    description = "Denoising"
    if every:
        description += f" (preview every {every} steps: {preview_path(output).name})"
    with fast_cpu():
        if not args.preload_models:
            # Lower peak memory: the text encoders are gone before the UNet's weights load.
            latents.compute_conditioning()
            sd.release_text_encoders()
        for step, x in enumerate(tqdm(latents, desc=description), start=1):
            mx.eval(x)
            if every and step % every == 0:
                write_preview(sd, x, preview_path(output), args.n_rows)
    if args.verbose:
        print(
            f"Denoised in {time.perf_counter() - start:.1f} s, "
            f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB"
        )
    return x


def decode_and_save(
    sd: StableDiffusion,
    latents: mx.array,
    args: argparse.Namespace,
    output: Path,
    parameters: GenerationParameters,
) -> None:
    # The UNet is done: free it before the VAE's peak.
    if not args.preload_models:
        sd.release_unet()
    start = time.perf_counter()
    batch = args.decoding_batch_size
    decoded = []
    with fast_cpu():
        for i in tqdm(range(0, latents.shape[0], batch), desc="Decoding"):
            images = sd.decode(latents[i : i + batch])
            mx.eval(images)
            decoded.append(np.array(images))
    if args.verbose:
        print(
            f"Decoded in {time.perf_counter() - start:.1f} s, "
            f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB"
        )
    paths = save_images(
        np.concatenate(decoded),
        output,
        parameters,
        n_rows=args.n_rows,
        overwrite=args.overwrite,
        save_individual=args.save_individual,
    )
    for path in paths:
        print(f"Saved {path}")


def generation_parameters(
    sd: StableDiffusion, args: argparse.Namespace, width: int, height: int, **extra
) -> GenerationParameters:
    defaults = sd.defaults
    if sd.vae_name is not None:
        extra["extras"] = (*extra.get("extras", ()), ("VAE", sd.vae_name))
    return GenerationParameters(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt or "",
        steps=args.steps or defaults.steps,
        sampler=args.sampler or defaults.sampler,
        cfg_scale=defaults.cfg if args.cfg is None else args.cfg,
        seed=sd.last_seed,
        width=width,
        height=height,
        model=args.model,
        # A1111 names LoRAs by their file name without extension.
        loras=tuple((Path(path).stem, strength) for path, strength in args.lora),
        **extra,
    )
