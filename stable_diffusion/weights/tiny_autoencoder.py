"""Key mapping from diffusers' AutoencoderTiny layout to `models/tiny_autoencoder.py`.

The module names are diffusers' own, so only the convolutions change layout."""

from __future__ import annotations

import mlx.core as mx


def map_tiny_autoencoder(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    return {
        key: value.transpose(0, 2, 3, 1) if value.ndim == 4 else value  # OIHW -> OHWI
        for key, value in weights.items()
    }
