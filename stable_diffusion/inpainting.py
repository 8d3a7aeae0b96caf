"""Inpainting and outpainting in pixels, as A1111 does them around the denoising: reading
the mask, its blur, filling the masked area, extending the canvas, and pasting the
input's unmasked pixels back over the decoded image ("overlay").

Masks are float32 (H, W) in [0, 1], white (1) = repaint. The denoising itself (the mask
binarized and brought to the latent size as diffusers does) is the pipeline's."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .images import _ALPHA_MODES, _open_image

# What fills the masked area before denoising: A1111's "inpainting_fill" 0 to 3, by name.
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")


def check_masked_content(masked_content: str) -> None:
    if masked_content not in MASKED_CONTENT:
        raise ValueError(
            f"unknown masked content {masked_content!r}; choose one of: "
            + ", ".join(MASKED_CONTENT)
        )


def mask_from_image(image: Image.Image) -> np.ndarray:
    """A mask from a picture, as A1111's `create_binary_mask`: the alpha channel of an
    image with transparency (opaque = repaint, thresholded at 128), else its gray levels."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return (alpha > 128).astype(np.float32)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        gray = np.asarray(image, dtype=np.float64) / (65535.0 if image.mode != "F" else 1.0)
        return np.clip(gray, 0, 1).astype(np.float32)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def load_mask(
    path: str | os.PathLike[str], image_size: tuple[int, int], target: tuple[int, int]
) -> np.ndarray:
    """The mask in `path` for an input image of `image_size` (width, height, as stored,
    EXIF orientation applied), brought to `target` (width, height) the way `load_image`
    brought the image (resized and center-cropped). Raises ValueError naming the file when
    it cannot be read or its size differs from the image's."""
    with _open_image(path) as opened:
        try:
            opened.load()
            image = ImageOps.exif_transpose(opened)
        except Exception as e:  # PIL reports corrupt data with many exception types
            raise ValueError(f"{path}: cannot decode the mask ({e or type(e).__name__})") from None
        if image.size != tuple(image_size):
            raise ValueError(
                f"{path}: the mask is {image.width}x{image.height} but the image is "
                f"{image_size[0]}x{image_size[1]}; give a mask of the image's size"
            )
        mask = mask_from_image(image)
    return fit_mask(mask, target)


def fit_mask(mask: np.ndarray, target: tuple[int, int], crop: bool = True) -> np.ndarray:
    """The mask at `target` (width, height): resized and center-cropped as `load_image`
    does to images (stretched instead with `crop` False)."""
    if mask.shape[::-1] == tuple(target):
        return mask
    image = Image.fromarray(mask, mode="F")
    if crop:
        resized = ImageOps.fit(image, target, Image.Resampling.LANCZOS)
    else:
        resized = image.resize(target, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0, 1)


def oriented_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) of an image file once its EXIF orientation is applied."""
    with _open_image(path) as image:
        try:
            return ImageOps.exif_transpose(image).size
        except Exception:  # as load_image: an unreadable orientation leaves it as stored
            return image.size


def blur_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """A1111's mask blur: a Gaussian of σ = `radius` pixels along each axis, kernel side
    2·int(2.5σ + 0.5) + 1, edges mirrored (OpenCV's default), on 8-bit levels."""
    if radius <= 0:
        return mask
    half = int(2.5 * radius + 0.5)
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.exp(-(offsets**2) / (2.0 * radius**2))
    kernel /= kernel.sum()
    levels = np.round(np.clip(mask, 0, 1) * 255.0).astype(np.float64)
    for axis in (1, 0):
        if levels.shape[axis] == 1:
            continue
        pad = [(0, 0), (0, 0)]
        pad[axis] = (half, half)
        padded = np.pad(levels, pad, mode="reflect")  # OpenCV's BORDER_REFLECT_101
        levels = sum(
            kernel[i] * np.take(padded, range(i, i + levels.shape[axis]), axis=axis)
            for i in range(kernel.size)
        )
        levels = np.round(levels)
    return (np.clip(levels, 0, 255) / 255.0).astype(np.float32)


def overlay_mask(mask: np.ndarray) -> np.ndarray:
    """How much of the generated image each pixel keeps, as A1111's `mask_for_overlay`: the
    (blurred) mask doubled and clipped, so that only where it is 0 the input stays."""
    return np.clip(np.round(mask * 255.0) * 2, 0, 255).astype(np.float32) / 255.0


def apply_overlay(generated: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) `generated` with the input's pixels (uint8 (H, W, 3)) where the
    (blurred) mask is 0, and a blend of both where the blur made it partial."""
    keep = overlay_mask(mask)[None, ..., None]
    blended = generated.astype(np.float32) * keep + original.astype(np.float32) * (1 - keep)
    return np.round(blended).astype(np.uint8)


def fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A1111's "fill" masked content (`masking.fill`): the masked area painted with ever
    less blurred copies of the unmasked image, so that it starts from the colors around it.
    `image` float (H, W, 3) in [0, 1]; returns the same."""
    pixels = Image.fromarray(np.round(image * 255).astype(np.uint8))
    keep = Image.fromarray(np.round((1 - mask) * 255).astype(np.uint8), mode="L")
    result = Image.new("RGBA", pixels.size)
    masked = Image.new("RGBa", pixels.size)
    masked.paste(pixels.convert("RGBA").convert("RGBa"), mask=keep)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return np.asarray(result.convert("RGB"), dtype=np.float32) / 255.0


def parse_outpaint(value: str) -> tuple[int, int, int, int]:
    """LEFT,RIGHT,TOP,BOTTOM pixels, each a multiple of 8 (the latents' grid)."""
    parts = value.split(",")
    try:
        sides = tuple(int(p) for p in parts)
    except ValueError:
        sides = ()
    if len(sides) != 4 or any(s < 0 or s % 8 for s in sides) or not any(sides):
        raise ValueError(
            f"--outpaint takes LEFT,RIGHT,TOP,BOTTOM pixels, each a multiple of 8 and not "
            f"all 0 (e.g. 0,128,0,0), got {value!r}"
        )
    left, right, top, bottom = sides
    return left, right, top, bottom


def outpaint(
    image: np.ndarray, mask: np.ndarray | None, sides: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The image on a canvas grown by (left, right, top, bottom) pixels, and the mask that
    repaints the new border (and what `mask` marked inside). The new area is mid-gray until
    the masked content fills it."""
    left, right, top, bottom = sides
    pad = ((top, bottom), (left, right))
    canvas = np.pad(image, (*pad, (0, 0)), constant_values=0.5)
    inner = np.zeros(image.shape[:2], np.float32) if mask is None else mask
    return canvas, np.pad(inner, pad, constant_values=1.0)


def parameters_extras(
    mask_blur: int, masked_content: str, inverted: bool
) -> tuple[tuple[str, str], ...]:
    """The fields A1111's infotext gives an inpainting run: the mask blur, the masked
    content unless "original" (its default), and the mask mode when inverted; A1111 writes
    the blur only when there is one."""
    extras = [("Mask blur", str(mask_blur))] if mask_blur > 0 else []
    if masked_content != "original":
        extras.append(("Masked content", masked_content))
    if inverted:
        extras.append(("Mask mode", "Inpaint not masked"))
    return tuple(extras)
