"""Textual-inversion embedding files: the token vectors they hold, by text encoder.

Read without running code (`weights.files.load_weights`), in the layouts people share:

* A1111's ``.pt``: ``{"string_to_param": {"*": (n, dims)}, "name": ..., ...}``;
* A1111's ``.safetensors``: ``{"emb_params": (n, dims)}``;
* SDXL embeddings: ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``, one set of vectors per
  text encoder;
* diffusers' ``learned_embeds.safetensors`` / ``.bin``: ``{token: (dims,) or (n, dims)}``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .weights.files import WeightFileError, load_weights

# Encoder names as SDXL embeddings key them: CLIP ViT-L (the first), OpenCLIP ViT-bigG.
SDXL_ENCODERS = ("clip_l", "clip_g")
_DIFFUSERS_STEM = "learned_embeds"


@dataclass(frozen=True)
class Embedding:
    """`vectors`: one (n, dims) array for a one-encoder model, or per SDXL encoder
    (`SDXL_ENCODERS` order). `token`: what the prompt writes to use it."""

    token: str
    vectors: tuple[mx.array, ...]


def read_embedding(path: str | os.PathLike[str], token: str | None = None) -> Embedding:
    """The embedding in the file at `path`. The token is `token`, else the file's stem
    (A1111's convention), except for diffusers' ``learned_embeds`` files, which name it
    inside. Raises WeightFileError for a file that holds no embedding."""
    path = Path(path)
    tensors = load_weights(path)
    if all(name in tensors for name in SDXL_ENCODERS):
        vectors = tuple(tensors[name] for name in SDXL_ENCODERS)
        return Embedding(token or path.stem, tuple(_matrix(path, v) for v in vectors))
    params = [name for name in tensors if name.startswith("string_to_param.")]
    if params:
        chosen = params
    elif "emb_params" in tensors:
        chosen = ["emb_params"]
    else:
        chosen = list(tensors)
    if len(chosen) != 1:
        raise WeightFileError(
            f"{path} is not a textual-inversion embedding (it holds {len(tensors)} tensors: "
            f"{', '.join(sorted(tensors)[:5])}...); expected A1111's string_to_param or "
            "emb_params, SDXL's clip_l and clip_g, or diffusers' {token: vector}"
        )
    name = chosen[0]
    named_inside = path.stem == _DIFFUSERS_STEM and not params and name != "emb_params"
    token = token or (name if named_inside else path.stem)
    return Embedding(token, (_matrix(path, tensors[name]),))


def _matrix(path: Path, vectors: mx.array) -> mx.array:
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0 or not mx.issubdtype(vectors.dtype, mx.floating):
        raise WeightFileError(
            f"{path}: an embedding is a (vectors, dims) array of floats, got shape "
            f"{tuple(vectors.shape)} of {vectors.dtype}"
        )
    if not mx.all(mx.isfinite(vectors)).item():
        raise WeightFileError(f"{path}: the embedding holds NaN or infinite values; re-download it")
    return vectors.astype(mx.float32)
