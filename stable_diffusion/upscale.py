"""The hires fix's upscalers, as AUTOMATIC1111 names them.

The "Latent" modes resize the latents themselves, as A1111 does with PyTorch's
`interpolate` (`shared.latent_upscale_modes`): "Latent" is bilinear without antialiasing,
then bicubic, nearest and nearest-exact, and the antialiased variants. Each is written here
as one (output, input) weight matrix per axis, built with PyTorch's index and weight
formulas, so that the result is PyTorch's up to float rounding. "Lanczos" resizes the
decoded image with PIL's Lanczos filter instead (the hires fix then encodes it again).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from PIL import Image

# A1111's name -> (PyTorch's interpolation mode, antialias).
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE_UPSCALERS = ("Lanczos",)
UPSCALERS = (*LATENT_MODES, *IMAGE_UPSCALERS)


def _simple(name: str) -> str:
    """'Latent (nearest-exact)' -> 'latent-nearest-exact': the spelling the scripts take."""
    words = name.lower().replace("(", " ").replace(")", " ").replace("_", " ").replace("-", " ")
    return "-".join(words.split())


_BY_SIMPLE_NAME = {_simple(name): name for name in UPSCALERS}


def upscaler_name(name: str) -> str:
    """A1111's name of the upscaler `name` names: A1111's own, in any case, or its simple
    spelling (latent, latent-nearest, latent-bicubic-antialiased, lanczos, ...)."""
    found = _BY_SIMPLE_NAME.get(_simple(name))
    if found is None:
        known = ", ".join(_BY_SIMPLE_NAME)
        raise ValueError(f"unknown hires upscaler {name!r:.60}; the upscalers are: {known}")
    return found


def is_latent(upscaler: str) -> bool:
    return upscaler in LATENT_MODES


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """The cubic convolution kernel (Keys); PyTorch uses a = -0.75, and -0.5 antialiased."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _weights(size_in: int, size_out: int, mode: str, antialias: bool) -> np.ndarray:
    """The (size_out, size_in) matrix that resizes one axis as PyTorch's `interpolate(...,
    size=..., mode=mode, align_corners=False, antialias=antialias)` does (aten/src/ATen/
    native/UpSample.h and UpSampleKernel.cpp)."""
    scale = np.float32(size_in) / np.float32(size_out)
    out = np.arange(size_out)
    matrix = np.zeros((size_out, size_in), np.float64)
    if mode in ("nearest", "nearest-exact"):
        offset = 0.5 if mode == "nearest-exact" else 0.0
        source = np.floor((out + offset).astype(np.float32) * scale).astype(np.int64)
        matrix[out, np.minimum(source, size_in - 1)] = 1
        return matrix.astype(np.float32)
    if antialias:
        # A filter stretched over the input pixels when shrinking; for enlarging, PyTorch's
        # bilinear and PIL's bicubic (a = -0.5), normalized over the pixels inside.
        support = (1.0 if mode == "bilinear" else 2.0) * max(float(scale), 1.0)
        inverse = 1 / float(scale) if scale >= 1 else 1.0
        for i in out:
            center = float(scale) * (i + 0.5)
            low = max(int(center - support + 0.5), 0)
            high = min(int(center + support + 0.5), size_in)
            x = (np.arange(low, high) - center + 0.5) * inverse
            w = np.maximum(0.0, 1 - np.abs(x)) if mode == "bilinear" else _cubic(x, -0.5)
            matrix[i, low:high] = w / w.sum() if w.sum() != 0 else w
        return matrix.astype(np.float32)
    source = (out.astype(np.float32) + 0.5) * scale - 0.5
    if mode == "bilinear":
        source = np.maximum(source, 0)
        low = source.astype(np.int64)
        fraction = source - low
        high = np.minimum(low + 1, size_in - 1)
        np.add.at(matrix, (out, low), 1 - fraction)
        np.add.at(matrix, (out, high), fraction)
        return matrix.astype(np.float32)
    low = np.floor(source).astype(np.int64)
    fraction = source - low
    for k in range(-1, 3):
        np.add.at(matrix, (out, np.clip(low + k, 0, size_in - 1)), _cubic(fraction - k, -0.75))
    return matrix.astype(np.float32)


def resize_latents(latents: mx.array, height: int, width: int, upscaler: str) -> mx.array:
    """(N, h, w, C) latents resized to (N, height, width, C) by a "Latent" upscaler."""
    mode, antialias = LATENT_MODES[upscaler]
    rows = mx.array(_weights(latents.shape[1], height, mode, antialias))
    columns = mx.array(_weights(latents.shape[2], width, mode, antialias))
    x = latents.astype(mx.float32)
    x = mx.einsum("oh,nhwc->nowc", rows, x)
    return mx.einsum("pw,nowc->nopc", columns, x)


def lanczos(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, H, W, 3) float images in [0, 1] resized by PIL's Lanczos filter, channel by channel
    in float (no 8-bit rounding), clipped back to [0, 1] (the filter overshoots)."""
    resized = np.empty((len(images), height, width, images.shape[-1]), np.float32)
    for n, image in enumerate(np.asarray(images, np.float32)):
        for c in range(image.shape[-1]):
            channel = Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F")
            resized[n, ..., c] = np.asarray(
                channel.resize((width, height), Image.Resampling.LANCZOS)
            )
    return np.clip(resized, 0, 1)
