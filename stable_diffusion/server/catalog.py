"""The models and LoRAs that requests may name: what is found in `--models-dir` and
`--lora-dir`, and nothing else.

A request's name is looked up in the listing, never joined to a path, so ``../x``, an
absolute path or a symlink leading out of the folder names nothing. Entries whose real
path (symlinks resolved) lies outside their folder are left out of the listing."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ..weights.files import SUPPORTED_SUFFIXES

# Enough for any real collection; bounds the work of one listing request.
MAX_ENTRIES = 2000
MAX_DEPTH = 4
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]+\]$")  # A1111 titles end with " [hash]"


@dataclass(frozen=True)
class Entry:
    title: str  # relative path in its folder, "/"-separated; what requests name
    name: str  # file or folder name without extension (A1111's model_name / LoRA name)
    path: Path


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a broken or looping symlink
        return False


def _walk(root: Path, keep_file, keep_folder=None) -> list[Entry]:
    root = root.resolve()
    entries = []
    for folder, subfolders, files in os.walk(root, followlinks=False):
        here = Path(folder)
        depth = len(here.relative_to(root).parts)
        if keep_folder is not None:
            models = sorted(name for name in subfolders if keep_folder(here / name))
            for name in models:
                path = here / name
                if _inside(path, root):
                    entries.append(Entry(path.relative_to(root).as_posix(), name, path))
            subfolders[:] = [name for name in subfolders if name not in models]
        subfolders[:] = sorted(subfolders) if depth < MAX_DEPTH else []
        for name in sorted(files):
            path = here / name
            if keep_file(path) and _inside(path, root):
                entries.append(Entry(path.relative_to(root).as_posix(), path.stem, path))
        if len(entries) >= MAX_ENTRIES:
            break
    return entries[:MAX_ENTRIES]


def _is_weights_file(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_SUFFIXES and path.is_file()


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


class Catalog:
    """The startup model, the models in `models_dir` and the LoRAs in `lora_dir`."""

    def __init__(self, startup_model: str, models_dir: Path | None, lora_dir: Path | None):
        self.startup_model = startup_model
        self.models_dir = models_dir
        self.lora_dir = lora_dir

    def models(self) -> list[Entry]:
        startup = Entry(self.startup_model, Path(self.startup_model).stem, Path(self.startup_model))
        found = (
            []
            if self.models_dir is None
            else _walk(self.models_dir, _is_weights_file, _is_diffusers_folder)
        )
        return [startup, *(e for e in found if e.title != startup.title)]

    def loras(self) -> list[Entry]:
        return [] if self.lora_dir is None else _walk(self.lora_dir, _is_weights_file)

    def find_model(self, name: str) -> Entry:
        """The model titled (or named) `name`; ValueError listing the choices otherwise."""
        return _find(_HASH_SUFFIX.sub("", name.strip()), self.models(), "model", "--models-dir")

    def find_lora(self, name: str) -> Entry:
        return _find(name, self.loras(), "LoRA", "--lora-dir")


def _find(name: str, entries: list[Entry], what: str, flag: str) -> Entry:
    for entry in entries:
        if name == entry.title:
            return entry
    for entry in entries:
        if name == entry.name:
            return entry
    shown = ", ".join(e.title for e in entries[:20]) or f"none (see {flag})"
    raise ValueError(f"unknown {what} {name!r}; available: {shown}")


def lora_hash(path: Path) -> str:
    """A1111's short hash of a LoRA (the first 12 hex digits of what its "Lora hashes"
    field records): for .safetensors the "addnet" hash, SHA-256 of the bytes after the
    header (A1111's hashes.addnet_hash_safetensors), else SHA-256 of the file."""
    stat = path.stat()
    return _hash(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _hash(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix.lower() == ".safetensors":
            (header_length,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + header_length)
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]
