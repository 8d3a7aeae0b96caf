"""Key mapping from the diffusers / transformers layout to this package's modules.

The modules use diffusers' and transformers' own parameter names, so the
mapping only adapts layouts: convolutions go channels-last, 1x1 convolutions
that are linear layers here become matrices, and legacy names are renamed."""

from __future__ import annotations

import mlx.core as mx

# 1x1 convolutions in some checkpoints (SD 1.x transformer projections, old VAE
# attention) that are `nn.Linear` in this package.
_LINEAR_SUFFIXES = (
    "proj_in.weight",
    "proj_out.weight",
    "to_q.weight",
    "to_k.weight",
    "to_v.weight",
    "to_out.0.weight",
)

# Attention names of VAE checkpoints saved by diffusers before 0.14.
_LEGACY_VAE_ATTENTION = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}


def _adapt_layout(key: str, value: mx.array) -> mx.array:
    if value.ndim != 4:
        return value
    if key.endswith(_LINEAR_SUFFIXES):
        return value.reshape(value.shape[0], value.shape[1])
    return value.transpose(0, 2, 3, 1)  # OIHW -> OHWI


def map_unet(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    return {key: _adapt_layout(key, value) for key, value in weights.items()}


def map_vae(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    mapped = {}
    for key, value in weights.items():
        for old, new in _LEGACY_VAE_ATTENTION.items():
            key = key.replace(old, new)
        mapped[key] = _adapt_layout(key, value)
    return mapped


def map_text_encoder(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    mapped = {}
    for key, value in weights.items():
        # position_ids is a buffer of transformers, not a weight.
        if key.endswith("embeddings.position_ids"):
            continue
        # transformers 5 saves the text transformer's weights without its prefix.
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        mapped[key] = value
    return mapped
