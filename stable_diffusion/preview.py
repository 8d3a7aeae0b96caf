"""The cheapest look at latents: a fixed linear map of the four latent channels to RGB.

The factors are ComfyUI's `latent_rgb_factors` (comfy/latent_formats.py, classes SD15
and SDXL), applied as ComfyUI's Latent2RGBPreviewer does: rgb = latents @ factors + bias,
in [-1, 1]. One pixel per latent, so the result is 1/8 of the image's size each way."""

from __future__ import annotations

import mlx.core as mx

# Rows: latent channels; columns: R, G, B.
_SD_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
_SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
_SDXL_BIAS = (0.1084, -0.0175, -0.0011)


def latent_rgb(latents: mx.array, is_xl: bool) -> mx.array:
    """Scaled NHWC latents (what the sampler works on) -> NHWC RGB in [0, 1], one pixel
    per latent."""
    factors = mx.array(_SDXL_FACTORS if is_xl else _SD_FACTORS)
    bias = mx.array(_SDXL_BIAS if is_xl else (0.0, 0.0, 0.0))
    rgb = latents.astype(mx.float32) @ factors + bias
    return mx.clip((rgb + 1) / 2, 0, 1)
