"""The scripts `sd-txt2image` and `sd-image2image` (also run as `python txt2image.py` and
`python image2image.py`): arguments, their checks, the denoising loop with a progress bar,
decoding and saving."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import mlx.core as mx
import numpy as np
from PIL import Image
from tqdm import tqdm

from . import distributed, prompts
from .cpu import COMPUTE_BFLOAT16, fast_cpu, keep_freed_memory, on_cpu, unavailable_bfloat16
from .distributed import Ranks
from .images import (
    GenerationParameters,
    check_output_path,
    load_image,
    make_grid,
    read_parameters,
    rounded_size,
    save_image,
    save_images,
    to_uint8,
)
from .inpainting import (
    MASKED_CONTENT,
    MAX_PADDING,
    ONLY_MASKED_PADDING,
    apply_overlay,
    blur_mask,
    crop_masked_area,
    load_mask,
    oriented_size,
    outpaint,
    parameters_extras,
    parse_outpaint,
)
from .noise import image_seeds
from .pipeline import Denoising, NonFiniteError, StableDiffusion, default_batch_size
from .prompts_file import PromptLine, read_prompts_file
from .samplers import describe_samplers, join_name, split_name
from .settings import (
    MAX_IMAGES,
    MAX_SIDE,
    MAX_STEPS,
    GenerationSettings,
    HiresFix,
    check_arguments,
)
from .text import printable
from .upscale import upscaler_name
from .weights.files import SUPPORTED_SUFFIXES

DEFAULT_MODEL = "sdxl"
# How the scripts spell the arguments that `settings.check_arguments` checks.
OPTION_NAMES = {
    "n_images": "--n_images",
    "steps": "--steps",
    "cfg": "--cfg",
    "seed": "--seed",
    "width": "--width",
    "height": "--height",
    "strength": "--strength",
    "decoding_batch_size": "--decoding_batch_size",
    "hires_scale": "--hires-scale",
    "hires_resize": "--hires-resize",
    "hires_steps": "--hires-steps",
    "hires_strength": "--hires-strength",
}
HIRES_OPTIONS = ("hires_scale", "hires_resize", "hires_steps", "hires_strength", "hires_upscaler")
# The exit status of a program ended by SIGINT, as shells report it (128 + 2).
INTERRUPTED = 130
EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")


def parser(description: str, image_input: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description,
        epilog="Under `mlx.launch` the images (or the prompts file's lines) are shared out "
        "over the ranks, and rank 0 saves them all.",
    )
    if image_input:
        p.add_argument("image", help="input image (resized/cropped to multiples of 64)")
        p.add_argument(
            "--strength",
            type=float,
            help="how much to change the image: 0 keeps it, 1 replaces it (default 0.5; "
            "0.75 with --mask or --outpaint, as A1111)",
        )
        p.add_argument(
            "--mask",
            metavar="PNG",
            help="inpaint: repaint where the mask (the image's size) is white and keep where it "
            "is black; a mask with transparency: its opaque part (A1111's conventions)",
        )
        p.add_argument("--invert-mask", action="store_true", help="repaint where the mask is black")
        p.add_argument(
            "--mask-blur",
            type=int,
            default=4,
            metavar="N",
            help="blur the mask's edge by a Gaussian of N pixels, to blend the repainted part "
            "into the kept one (default 4, as A1111; 0: none)",
        )
        p.add_argument(
            "--outpaint",
            metavar="L,R,T,B",
            help="extend the canvas by these pixels left, right, top and bottom (multiples of "
            "8) and paint the new border (with --mask: also the masked part)",
        )
        p.add_argument(
            "--masked-content",
            choices=[c.replace(" ", "-") for c in MASKED_CONTENT],
            help="what the masked part starts from, as A1111's: the image as it is "
            "('original', default with --mask), the colors around it blurred ('fill', default "
            "with --outpaint), noise ('latent-noise') or nothing ('latent-nothing')",
        )
        p.add_argument(
            "--only-masked",
            action=argparse.BooleanOptionalAction,
            help="with --mask: repaint a crop around the mask, scaled up to the image's size "
            "(rounded to multiples of 64), and paste it back; the rest of the image stays as "
            "it is, at its own size (A1111's 'Inpaint area: Only masked')",
        )
        p.add_argument(
            "--only-masked-padding",
            type=int,
            metavar="N",
            help=f"pixels of context around the mask for --only-masked (default "
            f"{ONLY_MASKED_PADDING}, as A1111)",
        )
    else:
        for side in ("--width", "--height"):
            p.add_argument(side, type=int, help=f"at most {MAX_SIDE}; default: the model's")
        p.add_argument(
            "--from-file",
            metavar="TXT",
            help="one job per line: a prompt, or A1111's options (--prompt ... --negative_prompt "
            "... --seed N --steps N --cfg_scale X --width N --height N --sampler_name NAME "
            "--batch_size N); what a line leaves out comes from the command line",
        )
        add_hires_options(p)
    p.add_argument("prompt", nargs="?", help="what to generate (optional with --from-image)")
    p.add_argument(
        "--from-image",
        metavar="PNG",
        help="re-run with the prompt and settings saved in an image generated before "
        "(options given here win; the model it names only with --use-saved-model)",
    )
    p.add_argument(
        "--use-saved-model",
        action="store_true",
        help="with --from-image: load the model the image names (a file can name any "
        "path or hub repo: check it first)",
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
        "--lora-dir",
        metavar="FOLDER",
        help="where the prompt's <lora:name:weight> tags are looked up (by file name, "
        "subfolders included); default: none",
    )
    p.add_argument(
        "--embedding",
        action="append",
        metavar="PATH",
        help="a textual-inversion embedding (A1111 .pt/.safetensors, diffusers "
        "learned_embeds), used by writing its file name in the prompt; repeat for several",
    )
    p.add_argument(
        "--embeddings-dir",
        metavar="FOLDER",
        help="load every embedding in FOLDER (subfolders included) that fits the model",
    )
    p.add_argument(
        "--clip-skip",
        type=int,
        help="condition on the text encoder's N-th layer from the end, as A1111 counts "
        "(1: the last, default; 2: the penultimate)",
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
    p.add_argument("--n_images", type=int, default=1, help=f"at most {MAX_IMAGES}")
    p.add_argument("--n_rows", type=int, default=1)
    p.add_argument(
        "--steps", type=int, help=f"denoising steps, at most {MAX_STEPS} (default: the model's)"
    )
    p.add_argument(
        "--cfg",
        type=float,
        help="classifier-free guidance weight (default: the model's; <= 1 turns it off)",
    )
    p.add_argument("--negative_prompt", default=None)
    p.add_argument(
        "--sampler",
        help="ours (dpm++2m, dpm++2m_karras), A1111's ('DPM++ 2M Karras') or ComfyUI's "
        "name; 'list' lists them (default: the model's)",
    )
    p.add_argument(
        "--schedule",
        help="noise schedule instead of the model's: karras or exponential (or A1111's "
        "'Schedule type' names)",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="0 to 2**64-1; -1 or none: random (printed)"
    )
    p.add_argument(
        "--batch_size",
        type=int,
        help="images per denoising batch (default: 1 on the CPU, all of them on a GPU)",
    )
    p.add_argument("--decoding_batch_size", type=int, default=1, help=f"at most {MAX_IMAGES}")
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
        "--vae-tile-size",
        type=int,
        metavar="PIXELS",
        help="side of the VAE's tiles, a multiple of 32 (implies --tiled-vae; default: the "
        "VAE's native size, as diffusers); smaller tiles take less memory: 256 decodes a "
        "1024px SDXL image in under 3 GiB",
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
        "--bfloat16",
        action="store_true",
        help="compute the matmuls, convolutions and attention in bfloat16 on CPUs with "
        "AVX512_BF16 or AMX: faster, slightly different images "
        "(pip install -r requirements-bfloat16.txt)",
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


def add_hires_options(p: argparse.ArgumentParser) -> None:
    hires = p.add_argument_group(
        "hires fix",
        "A1111's hires fix: generate at --width x --height, upscale, then denoise again "
        "(img2img) with the same prompt and seed",
    )
    hires.add_argument(
        "--hires-scale", type=float, metavar="X", help="upscale by X (1 to 8, e.g. 2)"
    )
    hires.add_argument(
        "--hires-resize",
        type=hires_size,
        metavar="WxH",
        help="upscale to cover W x H and center-crop to it (0 for a side: keep the aspect "
        "ratio), instead of --hires-scale",
    )
    hires.add_argument(
        "--hires-steps", type=int, metavar="N", help="second pass steps (default 0: as --steps)"
    )
    hires.add_argument(
        "--hires-strength",
        type=float,
        metavar="X",
        help="the second pass's denoising strength, 0 to 1 (default 0.7)",
    )
    hires.add_argument(
        "--hires-upscaler",
        metavar="NAME",
        help="latent (default: bilinear), latent-antialiased, latent-bicubic, "
        "latent-bicubic-antialiased, latent-nearest, latent-nearest-exact, or lanczos (decode, "
        "resize the image, encode); A1111's names ('Latent (nearest)') work too",
    )


def hires_size(value: str) -> tuple[int, int]:
    width, _, height = value.lower().partition("x")
    try:
        return int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not WxH (e.g. 1024x0)") from None


def hires_fix(args: argparse.Namespace) -> HiresFix | None:
    """The hires fix the options ask for, or None."""
    if args.hires_scale is None and args.hires_resize is None:
        return None
    given = {
        "scale": args.hires_scale,
        "resize": args.hires_resize,
        "steps": args.hires_steps,
        "strength": args.hires_strength,
        "upscaler": args.hires_upscaler,
    }
    return HiresFix(**{name: value for name, value in given.items() if value is not None})


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


def fail(p: argparse.ArgumentParser, error: Exception | str) -> NoReturn:
    """Exit with a usage error; messages can carry text from files (model names, keys),
    printed without their terminal control sequences."""
    p.error(printable(error))


def apply_saved_parameters(args: argparse.Namespace, saved: GenerationParameters) -> None:
    """Fill the options not given on the command line from an image's parameters. The
    model an image names is untrusted (any path or hub repo): it is used only with
    --use-saved-model, otherwise named and left alone."""
    values: dict[str, object] = {
        "prompt": saved.prompt,
        "negative_prompt": saved.negative_prompt or None,
        "steps": saved.steps,
        "cfg": saved.cfg_scale,
        "sampler": saved.sampler if _is_sampler(saved.sampler) else None,
        "seed": saved.seed,
        "width": saved.width,
        "height": saved.height,
        "strength": saved.strength,
        "clip_skip": saved.clip_skip,
    }
    if dict(saved.extras).get("VAE") in ("taesd", "taesdxl"):
        values["vae"] = "taesd"
    # The mask is not in the image: "Only masked" comes back with a --mask given again,
    # unless --no-only-masked.
    padding = saved.only_masked_padding() if getattr(args, "mask", None) else None
    if padding is not None and args.only_masked is not False:
        values.update(only_masked=True, only_masked_padding=padding)
    if saved.hires_scale is not None or saved.hires_resize is not None:
        values.update(
            hires_steps=saved.hires_steps,
            hires_strength=saved.strength,
            hires_upscaler=saved.hires_upscaler,
        )
        # The size goes by --hires-scale or --hires-resize: either given replaces both.
        if getattr(args, "hires_scale", None) is None and args.hires_resize is None:
            values.update(hires_scale=saved.hires_scale, hires_resize=saved.hires_resize)
    for name, value in values.items():
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, value)
    if args.use_saved_model:
        args.model = saved.model
    elif saved.model is not None and saved.model != args.model:
        using = f"--model {printable(args.model)}" if args.model else f"the default {DEFAULT_MODEL}"
        print(
            f"Note: the image was made with the model '{printable(saved.model)}'; using "
            f"{using}. Pass --use-saved-model to load the image's model."
        )
    # LoRAs named in the prompt come back with it (through --lora-dir); the others do not.
    in_prompt = {name for name, _ in prompts.extract_loras(saved.prompt)[1]}
    others = [(name, strength) for name, strength in saved.loras if name not in in_prompt]
    if others and not args.lora:
        used = ", ".join(f"{printable(name)}:{strength}" for name, strength in others)
        print(f"Note: the image was made with LoRAs ({used}); pass --lora to use them again")


def inpainting(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "mask", None) or getattr(args, "outpaint", None))


def check_inpainting_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The mask options: only with a mask or outpainting, in range; the outpainting sides
    parsed. Sets the masked content's default and what the PNG parameters record."""
    given = [
        option
        for option, value in (
            ("--invert-mask", args.invert_mask),
            ("--masked-content", args.masked_content),
        )
        if value
    ]
    if not inpainting(args) and given:
        fail(p, f"{', '.join(given)} goes with --mask or --outpaint")
    if args.mask_blur < 0 or args.mask_blur > 64:
        fail(p, f"--mask-blur must be 0 to 64 pixels, got {args.mask_blur}")
    if args.only_masked_padding is not None and not args.only_masked:
        fail(p, "--only-masked-padding goes with --only-masked")
    if args.only_masked and (not args.mask or args.outpaint):
        fail(p, "--only-masked goes with --mask, and not with --outpaint")
    if args.only_masked_padding is None and args.only_masked:
        args.only_masked_padding = ONLY_MASKED_PADDING
    if args.only_masked and not 0 <= args.only_masked_padding <= MAX_PADDING:
        fail(p, f"--only-masked-padding must be 0 to {MAX_PADDING} pixels")
    if args.outpaint:
        try:
            args.outpaint = parse_outpaint(args.outpaint)
        except ValueError as e:
            fail(p, e)
    content = args.masked_content or ("fill" if args.outpaint else "original")
    args.masked_content = content.replace("-", " ")
    args.mask_extras = (
        parameters_extras(
            args.mask_blur, args.masked_content, args.invert_mask, args.only_masked_padding
        )
        if inpainting(args)
        else ()
    )


def _is_sampler(name: str) -> bool:
    try:
        split_name(name)
    except ValueError:
        return False
    return True


def check_command_line(p: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """Reject bad arguments before any model is loaded; returns the output path."""
    if args.sampler == "list":
        print(describe_samplers())
        p.exit()
    if args.bfloat16:
        reason = unavailable_bfloat16()
        if reason is not None:
            fail(p, reason)
    if args.use_saved_model and (args.model or not args.from_image):
        fail(p, "--use-saved-model goes with --from-image, and without --model")
    if args.from_image:
        try:
            saved = read_parameters(args.from_image)
        except ValueError as e:
            fail(p, e)
        if args.use_saved_model and saved.model is None:
            fail(p, f"{args.from_image} names no model; pass --model instead of --use-saved-model")
        try:
            apply_saved_parameters(args, saved)
        except ValueError as e:
            fail(p, f"{args.from_image}: {e}")
    try:
        # One of our names; with --schedule alone, checked on a sampler taking them all.
        if args.sampler is not None:
            args.sampler = join_name(args.sampler, args.schedule)
        elif args.schedule is not None:
            join_name("euler", args.schedule)
    except ValueError as e:
        fail(p, e)
    from_file = getattr(args, "from_file", None)
    if from_file and (args.prompt is not None or args.from_image):
        fail(p, "--from-file takes the prompts from the file: give no prompt and no --from-image")
    if args.prompt is None and not from_file:
        fail(p, "give a prompt, or --from-image with an image generated before")
    args.model = args.model or DEFAULT_MODEL
    check_hires_options(p, args)
    if hasattr(args, "strength") and args.strength is None:
        args.strength = 0.75 if inpainting(args) else 0.5
    if hasattr(args, "mask"):
        check_inpainting_options(p, args)
    if args.seed is not None and args.seed < 0:
        args.seed = None  # -1 (any negative seed): random
    try:
        check_arguments(
            n_images=args.n_images,
            steps=args.steps,
            cfg=args.cfg,
            seed=args.seed,
            width=getattr(args, "width", None),
            height=getattr(args, "height", None),
            strength=getattr(args, "strength", None),
            decoding_batch_size=args.decoding_batch_size,
            hires_scale=getattr(args, "hires_scale", None),
            hires_resize=getattr(args, "hires_resize", None),
            hires_steps=getattr(args, "hires_steps", None),
            hires_strength=getattr(args, "hires_strength", None),
            names=OPTION_NAMES,
        )
        if args.batch_size is not None:
            check_arguments(n_images=args.batch_size, names={"n_images": "--batch_size"})
    except ValueError as e:
        fail(p, e)
    if args.n_rows < 1 or args.n_images % args.n_rows:
        fail(p, f"--n_images {args.n_images} is not divisible by --n_rows {args.n_rows}")
    if args.preview is not None and args.preview < 1:
        fail(p, f"--preview must be at least 1 (got {args.preview})")
    args.lora = args.lora or []
    for path, _ in args.lora:
        if not Path(path).is_file():
            fail(p, f"--lora {path}: no such file")
    if args.clip_skip is not None and args.clip_skip < 1:
        fail(p, f"--clip-skip must be at least 1 (the last layer), got {args.clip_skip}")
    args.clip_skip = args.clip_skip or 1
    try:
        for text in (args.prompt or "", args.negative_prompt or ""):
            prompts.parse_prompt(text)  # a malformed weight is an error before loading
        args.lora += prompt_loras(args)
        check_embedding_options(args)
    except ValueError as e:
        fail(p, e)
    try:
        individual = args.n_images if args.save_individual else 0
        return check_output_path(args.output, overwrite=args.overwrite, individual=individual)
    except ValueError as e:
        fail(p, e)


def check_hires_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The hires options go together; the upscaler becomes A1111's name for it."""
    if not hasattr(args, "hires_scale"):
        return
    if args.hires_scale is not None and args.hires_resize is not None:
        fail(p, "give --hires-scale or --hires-resize, not both")
    if args.hires_scale is None and args.hires_resize is None:
        given = [f"--{name.replace('_', '-')}" for name in HIRES_OPTIONS if getattr(args, name)]
        if given:
            fail(p, f"{', '.join(given)} need --hires-scale (or --hires-resize)")
    if args.hires_upscaler is not None:
        try:
            args.hires_upscaler = upscaler_name(args.hires_upscaler)
        except ValueError as e:
            fail(p, f"--hires-upscaler: {e}")


def prompt_loras(args: argparse.Namespace) -> list[tuple[str, float]]:
    """The (path, strength) of the prompts' <lora:name:weight> tags, found in --lora-dir by
    file stem (as A1111 names LoRAs), only among the files inside it (no symlinks out)."""
    tags = [
        tag
        for text in (args.prompt or "", args.negative_prompt or "")
        for tag in prompts.extract_loras(text)[1]
    ]
    if not tags:
        return []
    if args.lora_dir is None:
        names = ", ".join(f"<lora:{name}:{strength}>" for name, strength in tags)
        raise ValueError(f"the prompt names LoRAs ({names}); give --lora-dir FOLDER to find them")
    available = files_in(args.lora_dir, SUPPORTED_SUFFIXES, "--lora-dir")
    by_name: dict[str, list[Path]] = {}
    for path in available:
        by_name.setdefault(path.stem, []).append(path)
    given = {Path(path).resolve() for path, _ in args.lora}
    found: list[tuple[str, float]] = []
    for name, strength in tags:
        paths = by_name.get(name, [])
        if not paths:
            known = ", ".join(sorted(by_name)) or "no LoRA files"
            raise ValueError(
                f"<lora:{name}:{strength}>: no LoRA {name!r} in {args.lora_dir} (it has: {known})"
            )
        if len(paths) > 1:
            listed = ", ".join(str(path) for path in paths)
            raise ValueError(
                f"<lora:{name}:{strength}>: several files are named {name!r}: {listed}; rename one"
            )
        if paths[0].resolve() in given or str(paths[0]) in (path for path, _ in found):
            raise ValueError(
                f"the LoRA {name!r} is given twice (a tag and --lora, or two tags); give it once"
            )
        found.append((str(paths[0]), strength))
    return found


def files_in(folder: str, suffixes: tuple[str, ...], option: str) -> list[Path]:
    """The files with `suffixes` under `folder` whose real location is inside it, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{option} {folder}: no such folder")
    real_root = root.resolve()
    return sorted(
        path
        for path in root.rglob("*")
        if path.suffix.lower() in suffixes
        and path.is_file()
        and path.resolve().is_relative_to(real_root)
    )


def check_embedding_options(args: argparse.Namespace) -> None:
    """Refuse missing --embedding files and --embeddings-dir folders before loading."""
    for path in args.embedding or []:
        if not Path(path).is_file():
            raise ValueError(f"--embedding {path}: no such file")
    if args.embeddings_dir is not None and not Path(args.embeddings_dir).is_dir():
        raise ValueError(f"--embeddings-dir {args.embeddings_dir}: no such folder")


def load_embeddings(
    p: argparse.ArgumentParser, sd: StableDiffusion, args: argparse.Namespace
) -> None:
    """Load the --embedding files (one that does not fit is an error) and those of
    --embeddings-dir (one that does not fit, such as an SD 1.x embedding in an SDXL run, is
    skipped with a note)."""
    for path in args.embedding or []:
        try:
            sd.load_embedding(path)
        except ValueError as e:
            fail(p, f"--embedding: {e}")
    if args.embeddings_dir is not None:
        for path in files_in(args.embeddings_dir, EMBEDDING_SUFFIXES, "--embeddings-dir"):
            try:
                sd.load_embedding(path)
            except ValueError as e:
                print(printable(f"Skipped embedding {path}: {e}"))


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
            tiled_vae=args.tiled_vae or args.vae_tile_size is not None,
            vae_tile_size=args.vae_tile_size,
        )
    except (FileNotFoundError, ValueError) as e:
        fail(p, e)
    if sd.components.architecture == "sd2" and args.prediction_type is None:
        # The keys of the 512 base model and the 768 v-prediction one are the same.
        print(
            "SD 2.x single file: assuming the 768x768 v-prediction model; for a 512x512 "
            "epsilon model (SD 2.x base) pass --prediction-type epsilon"
        )
    load_embeddings(p, sd, args)
    if args.sampler is None and args.schedule is not None:
        try:
            args.sampler = join_name(sd.defaults.sampler, args.schedule)
        except ValueError as e:
            fail(p, f"the model's sampler: {e}")
    if args.preload_models:
        sd.preload()
    if args.verbose:
        seconds = time.perf_counter() - start
        print(f"Model loaded in {seconds:.2f} s ({printable(sd.components.path)})")
    return sd


def preview_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.preview.png")


def write_preview(sd: StableDiffusion, latents: mx.array, path: Path, n_rows: int) -> None:
    """Replace the preview image atomically: a viewer never reads a half-written file. A
    preview that cannot be written (disk full) is reported and the generation goes on."""
    images = sd.preview(latents)
    grid = make_grid(images, n_rows if len(images) % n_rows == 0 else 1)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as f:
        temporary = Path(f.name)
    try:
        Image.fromarray(grid).save(temporary, format="PNG")
        os.replace(temporary, path)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        tqdm.write(f"Could not write the preview {path}: {e.strerror or e}")


def denoise(
    sd: StableDiffusion,
    batches: list[Denoising],
    args: argparse.Namespace,
    keep_models: bool = False,
    prefix: str = "",
    output: Path | None = None,
) -> mx.array:
    """Every step of a job's batches, with a progress bar; their final latents, concatenated.
    Unless `keep_models` (more jobs follow) or --preload-models, the text encoders are freed
    once every batch's conditioning is computed, before the UNet's weights load. With
    --preview, a preview next to `output` every N steps."""
    start = time.perf_counter()
    every: int = getattr(args, "preview", None) or 0
    preview = preview_path(output) if every and output is not None else None
    description = f"{prefix}Denoising"
    if preview is not None:
        description += f" (preview every {every} steps: {preview.name})"
    finals = []
    with fast_cpu(bfloat16=args.bfloat16):
        if not (args.preload_models or keep_models):
            for batch in batches:
                batch.compute_conditioning()
            sd.release_text_encoders()
        for batch in batches:
            for step, x in enumerate(tqdm(batch, desc=description), start=1):
                mx.eval(x)
                if preview is not None and step % every == 0:
                    write_preview(sd, x, preview, args.n_rows)
            finals.append(x)
    if args.verbose:
        print(
            f"{prefix}Denoised in {time.perf_counter() - start:.2f} s, "
            f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB"
        )
    return finals[0] if len(finals) == 1 else mx.concatenate(finals)


def decode(
    sd: StableDiffusion,
    latents: mx.array,
    args: argparse.Namespace,
    keep_models: bool = False,
    prefix: str = "",
) -> np.ndarray:
    """(N, H, W, 3) uint8 images, `--decoding_batch_size` at a time. Unless `keep_models`
    or --preload-models, the UNet is freed first (the VAE's peak)."""
    if not (args.preload_models or keep_models):
        sd.release_unet()
    start = time.perf_counter()
    batch = args.decoding_batch_size
    decoded = []
    with fast_cpu(bfloat16=args.bfloat16):
        for i in tqdm(range(0, latents.shape[0], batch), desc=f"{prefix}Decoding"):
            try:
                images = sd.decode(latents[i : i + batch])
            except NonFiniteError as e:
                sys.exit(f"{prefix}error: {e} Nothing was saved.")
            mx.eval(images)
            decoded.append(to_uint8(images))
    if args.verbose:
        print(
            f"{prefix}Decoded in {time.perf_counter() - start:.2f} s, "
            f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB"
        )
    return np.concatenate(decoded)


def save(
    images: np.ndarray,
    args: argparse.Namespace,
    output: Path,
    parameters: list[GenerationParameters],
) -> None:
    try:
        paths = save_images(
            images,
            output,
            parameters,
            n_rows=args.n_rows,
            overwrite=args.overwrite,
            save_individual=args.save_individual,
        )
    except ValueError as e:  # a full disk or an I/O error: nothing partial was left
        raise SystemExit(f"error: {e}") from None
    for path in paths:
        print(f"Saved {printable(path)}")


def image_parameters(
    sd: StableDiffusion, args: argparse.Namespace, settings: GenerationSettings
) -> list[GenerationParameters]:
    """What each image's PNG records: the settings the generation ran with, its own seed,
    the model as named on the command line, the LoRAs by their file names without
    extension (as A1111 names them), the decoder when it is not the model's VAE, and
    bfloat16 compute (its pixels differ from float32's)."""
    loras = tuple((Path(path).stem, strength) for path, strength in args.lora)
    first = settings.parameters(model=args.model, loras=loras)
    extras = [*first.extras, *getattr(args, "mask_extras", ())]
    if sd.vae_name is not None:
        extras.append(("VAE", sd.vae_name))
    if getattr(args, "bfloat16", False) and on_cpu():
        extras.append(COMPUTE_BFLOAT16)
    first = dataclasses.replace(first, extras=tuple(extras))
    seeds = image_seeds(settings.seed, len(settings.prompts))
    return [dataclasses.replace(first, seed=seed) for seed in seeds]


# -- jobs: one prompt's images, or a prompts file's lines, shared out over the ranks ----------

# What a script generates: `n_images` images from their first seed, with `args`' options.
Start = Callable[[StableDiffusion, argparse.Namespace, int, int], Denoising]
# What is done to the decoded uint8 images before saving (inpainting's overlay).
Finish = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Job:
    """One prompt's images: the command line's, or one line of a prompts file."""

    args: argparse.Namespace  # the command line's options, with the line's in their place
    output: Path
    line: int | None = None


def _line_arguments(
    p: argparse.ArgumentParser, args: argparse.Namespace, line: PromptLine
) -> argparse.Namespace:
    values = {
        name: value
        for name, value in dataclasses.asdict(line).items()
        if name != "number" and value is not None
    }
    where = f"{args.from_file} line {line.number}"
    if "sampler" in values:
        try:
            values["sampler"] = join_name(values["sampler"], None)
        except ValueError as e:
            fail(p, f"{where}: {e}")
    job = argparse.Namespace(**{**vars(args), **values})
    if job.n_images % job.n_rows:
        job.n_rows = 1
    try:
        check_arguments(
            n_images=job.n_images,
            steps=job.steps,
            cfg=job.cfg,
            seed=job.seed,
            width=job.width,
            height=job.height,
            names={**OPTION_NAMES, "n_images": "--batch_size", "cfg": "--cfg_scale"},
        )
        for text in (job.prompt, job.negative_prompt or ""):
            prompts.parse_prompt(text)
            if prompts.extract_loras(text)[1]:
                raise ValueError("<lora:...> tags are not read from a prompts file; use --lora")
    except ValueError as e:
        fail(p, f"{where}: {e}")
    return job


def jobs_of(p: argparse.ArgumentParser, args: argparse.Namespace, output: Path) -> list[Job]:
    """The run's jobs, every line of a prompts file checked before any model loads. A line's
    images go to `<output stem>-line<N>.png` (N its line number), never over a file."""
    if not getattr(args, "from_file", None):
        return [Job(args, output)]
    try:
        lines = read_prompts_file(args.from_file)
    except ValueError as e:
        fail(p, e)
    jobs = []
    for line in lines:
        job_args = _line_arguments(p, args, line)
        path = output.with_name(f"{output.stem}-line{line.number:03d}{output.suffix}")
        individual = job_args.n_images if job_args.save_individual else 0
        try:
            path = check_output_path(path, overwrite=args.overwrite, individual=individual)
        except ValueError as e:
            fail(p, e)
        jobs.append(Job(job_args, path, line.number))
    return jobs


def job_seeds(ranks: Ranks, jobs: list[Job]) -> list[int]:
    """Each job's first seed: its own, or a random one drawn by rank 0 and shared with all
    ranks, so that every rank knows every job's parameters."""
    drawn = np.array([secrets.randbits(31) for _ in jobs], dtype=np.int32)
    if ranks.group is not None:
        shared = mx.distributed.all_gather(mx.array(drawn)[None], group=ranks.group, stream=mx.cpu)
        drawn = np.array(shared)[0]
    return [
        int(d) if job.args.seed is None or job.args.seed < 0 else job.args.seed
        for job, d in zip(jobs, drawn, strict=True)
    ]


def batch_size(args: argparse.Namespace) -> int:
    """Images per UNet call: `--batch_size`, else the pipeline's default for the device."""
    return args.batch_size or default_batch_size(args.n_images)


def _make_images(
    p: argparse.ArgumentParser,
    sd: StableDiffusion,
    start: Start,
    job: Job,
    images: range,
    seed: int,
    keep_models: bool,
    ranks: Ranks,
    finish: Finish | None = None,
) -> tuple[np.ndarray, list[GenerationParameters]]:
    """Images `images` of a job as uint8, `--batch_size` per UNet call, image i drawn from
    seed + i; with their parameters. None: an empty (0, 8, 8, 3) array."""
    if not images:
        return np.zeros((0, 8, 8, 3), np.uint8), []
    size = batch_size(job.args)
    try:
        batches = [
            start(sd, job.args, len(images[i : i + size]), seed + images[i])
            for i in range(0, len(images), size)
        ]
    except ValueError as e:
        fail(p, f"{ranks.prefix()}{e}")
    preview_next_to = job.output if ranks.is_main else None
    x = denoise(sd, batches, job.args, keep_models, ranks.prefix(), preview_next_to)
    parameters = [p for batch in batches for p in image_parameters(sd, job.args, batch.settings)]
    pixels = decode(sd, x, job.args, keep_models, ranks.prefix())
    return (pixels if finish is None else finish(pixels)), parameters


def generate(
    p: argparse.ArgumentParser,
    args: argparse.Namespace,
    output: Path,
    start: Start,
    finish: Finish | None = None,
) -> None:
    """Load the model and make the run's images, in one process or over the ranks
    `mlx.launch` started: one prompt's images in contiguous blocks per rank, or a prompts
    file's lines one per rank per round. Rank 0 gathers and saves, each image as soon as it
    has it, so that a failing rank costs only its own."""
    # One heap for every phase and job: the decode reuses what the UNet freed.
    with keep_freed_memory():
        _generate(p, args, output, start, finish)


def _generate(
    p: argparse.ArgumentParser,
    args: argparse.Namespace,
    output: Path,
    start: Start,
    finish: Finish | None,
) -> None:
    ranks = distributed.ranks()
    jobs = jobs_of(p, args, output)
    seeds = job_seeds(ranks, jobs)
    sd = load_model(p, args)
    if len(jobs) == 1:
        job, seed = jobs[0], seeds[0]
        if ranks.is_main:
            print(f"Seed: {seed}")
        mine = distributed.shard(job.args.n_images, ranks.rank, ranks.size)
        pixels, parameters = _make_images(p, sd, start, job, mine, seed, False, ranks, finish)
        if ranks.size == 1:
            save(pixels, job.args, job.output, parameters)
        else:
            _save_gathered(ranks, pixels, parameters, job)
        return
    for first in range(0, len(jobs), ranks.size):
        index = first + ranks.rank
        pixels, parameters = np.zeros((0, 8, 8, 3), np.uint8), []
        if index < len(jobs):
            job = jobs[index]
            print(f"{ranks.prefix()}Line {job.line}: seed {seeds[index]}")
            images = range(job.args.n_images)
            pixels, parameters = _make_images(
                p, sd, start, job, images, seeds[index], True, ranks, finish
            )
        results = _gather(ranks, pixels, parameters)
        if ranks.is_main:
            for job_index, result in zip(range(first, len(jobs)), results, strict=False):
                job = jobs[job_index]
                texts = [GenerationParameters.from_text(text) for text in result.texts]
                save(result.images, job.args, job.output, texts)


def _gather(
    ranks: Ranks, pixels: np.ndarray, parameters: list[GenerationParameters]
) -> list[distributed.Result]:
    """Every rank's images and parameters; a rank lost meanwhile ends the run with one line
    (`mlx.launch` has stopped or is stopping the others; the images saved so far stay)."""
    try:
        return distributed.gather(ranks, pixels, [p.to_text() for p in parameters])
    except distributed.RankLost as e:
        sys.exit(f"{ranks.prefix()}error: {e}; the images saved so far stay")


def _save_gathered(
    ranks: Ranks, pixels: np.ndarray, parameters: list[GenerationParameters], job: Job
) -> None:
    """One prompt's images over the ranks: rank 0 saves its own before gathering the rest,
    every image on its own (`<stem>-<i>.png`), then the grid."""
    n, overwrite = job.args.n_images, job.args.overwrite

    def saved(image: np.ndarray, path: Path, image_parameters: GenerationParameters) -> None:
        print(f"Saved {printable(save_image(image, path, image_parameters, overwrite))}")

    if ranks.is_main:
        grid_path = check_output_path(job.output, overwrite, individual=n)
        individual = [grid_path.with_name(f"{grid_path.stem}-{i}.png") for i in range(n)]
        for i, image in enumerate(pixels):
            saved(image, individual[i], parameters[i])
    results = _gather(ranks, pixels, parameters)
    if not ranks.is_main:
        return
    everything = distributed.in_rank_order(results)
    every_parameters = [GenerationParameters.from_text(t) for t in everything.texts]
    for i in range(len(pixels), n):
        saved(everything.images[i], individual[i], every_parameters[i])
    saved(make_grid(everything.images, job.args.n_rows), grid_path, every_parameters[0])


@contextmanager
def exit_on_interrupt() -> Iterator[None]:
    """Ctrl-C ends a script with one line and exit status 130, instead of a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print("\nInterrupted; nothing was saved.", file=sys.stderr)
        sys.exit(INTERRUPTED)


def txt2image_main(argv: Sequence[str] | None = None) -> None:
    """sd-txt2image: generate images from a text prompt."""
    p = parser("Generate images from a text prompt with Stable Diffusion in MLX.")
    args = p.parse_args(argv)

    def start(sd: StableDiffusion, args: argparse.Namespace, n_images: int, seed: int):
        shared: dict[str, Any] = {
            "n_images": n_images,
            "num_steps": args.steps,
            "cfg_weight": args.cfg,
            "negative_text": args.negative_prompt,
            "seed": seed,
            "width": args.width,
            "height": args.height,
            "sampler": args.sampler,
            "clip_skip": args.clip_skip,
        }
        hires = hires_fix(args)
        if hires is not None:
            return sd.generate_latents_hires(args.prompt, hires, **shared)
        return sd.generate_latents(args.prompt, **shared)

    with exit_on_interrupt():
        output = check_command_line(p, args)
        generate(p, args, output, start)


def image2image_main(argv: Sequence[str] | None = None) -> None:
    """sd-image2image: transform an image guided by a text prompt."""
    p = parser(
        "Transform an image guided by a text prompt with Stable Diffusion in MLX.",
        image_input=True,
    )
    args = p.parse_args(argv)
    with exit_on_interrupt():
        output = check_command_line(p, args)
        try:
            # --only-masked keeps the image at its size: only the crop is denoised.
            image, message = load_image(args.image, multiple=1 if args.only_masked else 64)
        except ValueError as e:
            fail(p, e)
        if message:
            print(printable(message))
        mask, finish = None, None
        if inpainting(args):
            image, mask = inpainting_inputs(p, args, image)
            if args.only_masked:
                image, mask, finish = only_masked_inputs(p, args, image, mask)
            else:
                original = to_uint8(image)[0]

                def finish(pixels: np.ndarray) -> np.ndarray:
                    return apply_overlay(pixels, original, mask)

        def start(sd: StableDiffusion, args: argparse.Namespace, n_images: int, seed: int):
            return sd.generate_latents_from_image(
                image,
                args.prompt,
                strength=args.strength,
                n_images=n_images,
                num_steps=args.steps,
                cfg_weight=args.cfg,
                negative_text=args.negative_prompt,
                seed=seed,
                sampler=args.sampler,
                clip_skip=args.clip_skip,
                mask=mask,
                masked_content=args.masked_content,
            )

        generate(p, args, output, start, finish)


def inpainting_inputs(
    p: argparse.ArgumentParser, args: argparse.Namespace, image: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The image (on its grown canvas with --outpaint) and the blurred mask, from --mask
    (read at the input's size, brought to the image's), --invert-mask, --outpaint and
    --mask-blur, in A1111's order."""
    mask = None
    try:
        if args.mask:
            size = oriented_size(args.image)
            mask = load_mask(args.mask, size, (image.shape[1], image.shape[0]))
            if args.invert_mask:
                mask = 1 - mask
        if args.outpaint:
            image, mask = outpaint(image, mask, args.outpaint)
            check_arguments(width=image.shape[1], height=image.shape[0], names=OPTION_NAMES)
    except ValueError as e:
        fail(p, f"{'--outpaint: the canvas: ' if args.outpaint else ''}{e}")
    assert mask is not None  # a mask or outpainting: `inpainting(args)`
    return image, blur_mask(mask, args.mask_blur)


def only_masked_inputs(
    p: argparse.ArgumentParser, args: argparse.Namespace, image: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, Finish]:
    """--only-masked: the crop of the image and of the (blurred) mask to denoise, at the
    image's size rounded as other runs round it (multiples of 64), and what pastes the
    decoded crops back into the image."""
    size = rounded_size((image.shape[1], image.shape[0]))
    try:
        area = crop_masked_area(image, mask, size, args.only_masked_padding)
    except ValueError as e:
        fail(p, f"--mask: {e}")
    x1, y1, x2, y2 = area.region
    print(f"Only masked: repainting {x2 - x1}x{y2 - y1} at ({x1}, {y1}) at {size[0]}x{size[1]}")
    return area.image, area.mask, area.paste
