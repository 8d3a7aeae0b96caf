"""Resolve a model name (alias, hub repo id or local folder) to a local
diffusers-format folder, downloading only the files the pipeline needs."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..text import printable

ALIASES = {
    "sdxl": "stabilityai/sdxl-turbo",
    "sd": "stabilityai/stable-diffusion-2-1-base",
    "sd-1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd-2.1": "stabilityai/stable-diffusion-2-1",
    "sd-2.1-base": "stabilityai/stable-diffusion-2-1-base",
    "sdxl-base": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-turbo": "stabilityai/sdxl-turbo",
    "sd-turbo": "stabilityai/sd-turbo",
    # Inpainting models (UNet with 9 input channels): image2image.py --mask.
    "sd-1.5-inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
    "sd-2-inpainting": "stabilityai/stable-diffusion-2-inpainting",
    "sdxl-inpainting": "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
}

# The tiny autoencoders (diffusers AutoencoderTiny folders), by whether the model is SDXL.
TINY_AUTOENCODERS = {False: "madebyollin/taesd", True: "madebyollin/taesdxl"}

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")


# The hub's rule for "owner/name": letters, digits, "-", "_", "." (not leading, no "..").
_REPO_ID = re.compile(r"(?!.*\.\.)[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class ModelNotFoundError(FileNotFoundError):
    pass


def _looks_like_a_path(model: str) -> bool:
    return model.startswith((os.sep, ".", "~")) or model.count("/") > 1 or "\\" in model


def _download_patterns(variant: str) -> list[str]:
    patterns = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer*/*.json",
        "tokenizer*/merges.txt",
    ]
    for component in COMPONENTS:
        patterns.append(f"{component}/config.json")
        for stem in WEIGHT_STEMS:
            patterns.append(f"{component}/{stem}{variant}.safetensors")
            if not variant:
                patterns += [f"{component}/{stem}-*-of-*.safetensors", f"{component}/*.index.json"]
    return patterns


def weight_files(folder: Path, prefer_float16: bool) -> list[Path]:
    """The safetensors files of one component folder, the float16 variant first
    when asked for and present; sharded files in order."""
    variants = (".fp16", "") if prefer_float16 else ("", ".fp16")
    for variant in variants:
        for stem in WEIGHT_STEMS:
            single = folder / f"{stem}{variant}.safetensors"
            if single.is_file():
                return [single]
            shards = sorted(folder.glob(f"{stem}-*-of-*{variant}.safetensors"))
            if shards and (variant or not any(".fp16" in s.name for s in shards)):
                return shards
    found = sorted(printable(p.name) for p in folder.iterdir()) if folder.is_dir() else []
    raise ModelNotFoundError(
        f"no .safetensors weights in {printable(folder)} (found: {', '.join(found) or 'nothing'}). "
        "Only safetensors diffusers folders are supported here; convert .bin weights with "
        "diffusers' save_pretrained(safe_serialization=True)."
    )


def resolve_model(model: str, prefer_float16: bool = False) -> Path:
    """A local folder for `model`: an existing folder as is, else a hub repo id
    (or alias) fetched through the Hugging Face cache. Messages name `model` without its
    terminal control sequences (it can come from a file)."""
    path = Path(model).expanduser()
    shown = printable(path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{shown} is not a diffusers model folder (no model_index.json in it)."
            )
        return path
    if path.exists():
        raise ModelNotFoundError(
            f"{shown} is a file, not a diffusers model folder: pass a folder with "
            "model_index.json, or a single-file checkpoint (.safetensors or .ckpt)."
        )
    if _looks_like_a_path(model):
        raise ModelNotFoundError(
            f"no such model folder: {shown} does not exist. Check the path, or pass a hub repo "
            f"id (owner/name) or an alias ({', '.join(ALIASES)})."
        )
    repo_id = ALIASES.get(model, model)
    if path.suffix or not _REPO_ID.fullmatch(repo_id):
        raise ModelNotFoundError(
            f"model {model!r} is neither a local folder nor a Hugging Face repo id "
            f"(owner/name); known aliases: {', '.join(ALIASES)}."
        )
    return _snapshot(repo_id, prefer_float16)


def resolve_component(component: str) -> Path:
    """A local folder for one component (config.json and safetensors weights, e.g.
    `madebyollin/taesd`): an existing folder as is, else a hub repo id fetched through
    the Hugging Face cache."""
    path = Path(component).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a diffusers component (no config.json in it).")
        return path
    if _looks_like_a_path(component) or not _REPO_ID.fullmatch(component):
        raise ModelNotFoundError(
            f"no such component folder: {path} does not exist, and {component!r} is not a "
            "Hugging Face repo id (owner/name)."
        )
    from huggingface_hub import snapshot_download

    patterns = ["config.json", *(f"{stem}.safetensors" for stem in WEIGHT_STEMS)]
    with _hub_errors(component, "--vae"):
        folder = Path(snapshot_download(component, allow_patterns=patterns))
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{component!r} is not a diffusers component (no config.json).")
    return folder


@contextmanager
def _hub_errors(repo_id: str, option: str) -> Iterator[None]:
    """The hub's exceptions as ModelNotFoundErrors that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        yield
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache and {why}. "
            "Download it once with network access (unset HF_HUB_OFFLINE), set HF_HOME to the "
            f"cache that has it, or pass a local diffusers folder to {option}."
        ) from e
    except GatedRepoError as e:
        raise ModelNotFoundError(
            f"model {repo_id!r} is gated: accept its license on the hub and log in "
            "with `hf auth login`."
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(f"no model {repo_id!r} on the Hugging Face hub.") from e


def _snapshot(repo_id: str, prefer_float16: bool) -> Path:
    from huggingface_hub import snapshot_download

    with _hub_errors(repo_id, "--model"):
        folder = None
        if prefer_float16:
            folder = Path(snapshot_download(repo_id, allow_patterns=_download_patterns(".fp16")))
        if folder is None or not any((folder / "unet").glob("*.fp16.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=_download_patterns("")))
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(f"{repo_id!r} is not a diffusers pipeline (no model_index.json).")
    return folder
