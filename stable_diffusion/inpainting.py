"""Inpainting and outpainting in pixels, as A1111 does them around the denoising: reading
the mask, its blur, filling the masked area, extending the canvas, inpainting "only
masked" (a crop around the mask, denoised at the full processing size), and pasting the
input's unmasked pixels back over the decoded image ("overlay").

Masks are float32 (H, W) in [0, 1], white (1) = repaint. The denoising itself (the mask
binarized and brought to the latent size as diffusers does) is the pipeline's."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .images import _ALPHA_MODES, _open_image, to_uint8

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
    return _blend(generated, original, overlay_mask(mask))


def _blend(generated: np.ndarray, original: np.ndarray, keep: np.ndarray) -> np.ndarray:
    keep = keep[..., None]
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
    mask_blur: int, masked_content: str, inverted: bool, only_masked_padding: int | None = None
) -> tuple[tuple[str, str], ...]:
    """The fields A1111's infotext gives an inpainting run: the mask blur, the masked
    content unless "original" (its default), the mask mode when inverted, and for "only
    masked" (a padding given) its inpaint area and padding; A1111 writes the blur only when
    there is one."""
    extras = [("Mask blur", str(mask_blur))] if mask_blur > 0 else []
    if masked_content != "original":
        extras.append(("Masked content", masked_content))
    if inverted:
        extras.append(("Mask mode", "Inpaint not masked"))
    if only_masked_padding is not None:
        extras.append(("Inpaint area", ONLY_MASKED))
        extras.append(("Masked area padding", str(only_masked_padding)))
    return tuple(extras)


# "Only masked" (A1111's inpaint_full_res): its "Inpaint area" name, the padding around the
# mask's bounding box that A1111's UI starts with (its API's default is 0), and the most
# this project takes (more than an image's side is the same as the side).
ONLY_MASKED = "Only masked"
ONLY_MASKED_PADDING = 32
MAX_PADDING = 4096


def crop_region(mask: np.ndarray, padding: int) -> tuple[int, int, int, int] | None:
    """A1111's `masking.get_crop_region_v2`: the bounding box (x1, y1, x2, y2), ends
    exclusive, of the pixels where the mask's 8-bit level is not 0, grown by `padding` on
    each side and kept within the mask; None where the mask is 0 everywhere."""
    marked = np.round(np.clip(mask, 0, 1) * 255) > 0
    rows, columns = np.flatnonzero(marked.any(axis=1)), np.flatnonzero(marked.any(axis=0))
    if rows.size == 0:
        return None
    height, width = mask.shape
    return (
        max(int(columns[0]) - padding, 0),
        max(int(rows[0]) - padding, 0),
        min(int(columns[-1]) + 1 + padding, width),
        min(int(rows[-1]) + 1 + padding, height),
    )


def expand_crop_region(
    region: tuple[int, int, int, int], size: tuple[int, int], image_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A1111's `masking.expand_crop_region`: `region` grown on its short side, centered, to
    the aspect ratio of the processing `size` (width, height), shifted back inside an image
    of `image_size` (width, height) and cut at its edge when the image is too small."""
    x1, y1, x2, y2 = region
    ratio = size[0] / size[1]
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _expand((x2 - x1) / ratio, y1, y2, image_size[1])
    else:
        x1, x2 = _expand((y2 - y1) * ratio, x1, x2, image_size[0])
    return x1, y1, x2, y2


def _expand(desired: float, start: int, end: int, limit: int) -> tuple[int, int]:
    grow = int(desired - (end - start))
    start -= grow // 2
    end += grow - grow // 2
    if end >= limit:
        start -= end - limit
        end = limit
    if start < 0:
        end -= start
        start = 0
    return start, min(end, limit)


def _resize(image: Image.Image, width: int, height: int, fill: bool) -> Image.Image:
    """A1111's `images.resize_image` without an upscaler (Lanczos), in the image's mode:
    scaled to cover `width` x `height` and the excess cropped, centered ("crop and resize",
    mode 1), or with `fill` scaled to fit inside and the bands left filled with the edge
    rows or columns stretched ("resize and fill", mode 2)."""
    ratio, src_ratio = width / height, image.width / image.height
    # Mode 1 covers (the whole width when the target is wider), mode 2 fits (when narrower).
    whole_width = ratio < src_ratio if fill else ratio > src_ratio
    # Floors, as A1111's; at least a pixel, where A1111 fails on a hairline crop.
    src_w = width if whole_width else max(1, image.width * height // image.height)
    src_h = height if not whole_width else max(1, image.height * width // image.width)
    resized = image.resize((src_w, src_h), Image.Resampling.LANCZOS)
    result = Image.new(image.mode, (width, height))
    result.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    if not fill:
        return result
    # A1111's bands: the edge row (column) stretched, with resize's default filter.
    w, h = resized.size
    band = height // 2 - src_h // 2
    if ratio < src_ratio and band > 0:
        result.paste(resized.resize((width, band), box=(0, 0, width, 0)), (0, 0))
        result.paste(resized.resize((width, band), box=(0, h, width, h)), (0, band + src_h))
    band = width // 2 - src_w // 2
    if ratio > src_ratio and band > 0:
        result.paste(resized.resize((band, height), box=(0, 0, 0, height)), (0, 0))
        result.paste(resized.resize((band, height), box=(w, 0, w, height)), (band + src_w, 0))
    return result


@dataclass(frozen=True, eq=False)
class MaskedArea:
    """An "only masked" inpainting (A1111's inpaint_full_res): the crop of the image and
    of the mask to denoise at the processing size, and what pastes the result back."""

    region: tuple[int, int, int, int]  # (x1, y1, x2, y2) in the image, ends exclusive
    image: np.ndarray  # float32 ([N,] h, w, 3): the crop at the processing size
    mask: np.ndarray  # float32 (h, w): the mask's crop at the processing size
    canvas: np.ndarray  # uint8 (N, H, W, 3): the whole input
    overlay: np.ndarray  # float32 (H, W): the whole (blurred) mask

    def paste(self, generated: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3): the generated crops (uint8 (N, h, w, 3)) scaled back to the
        region ("crop and resize") and pasted into the input through the blurred mask, as
        A1111's `apply_overlay` with `paste_to`: image i into input i (or the only one).
        Unlike "whole picture", the mask is not doubled: its blurred edge blends."""
        x1, y1, x2, y2 = self.region
        canvas = np.broadcast_to(self.canvas, (len(generated), *self.canvas.shape[1:]))
        full = canvas.copy()
        for index, image in enumerate(generated):
            crop = _resize(Image.fromarray(image), x2 - x1, y2 - y1, fill=False)
            full[index, y1:y2, x1:x2] = np.asarray(crop)
        return _blend(full, canvas, self.overlay)


def crop_masked_area(
    image: np.ndarray, mask: np.ndarray, size: tuple[int, int], padding: int
) -> MaskedArea:
    """A1111's "Inpaint area: Only masked" for images float32 ([N,] H, W, 3) in [0, 1] and
    their (blurred) mask (H, W): the mask's bounding box grown by `padding` pixels
    (`crop_region`), widened to the aspect ratio of the processing `size` (width, height)
    within the image (`expand_crop_region`), and that crop of the images and of the mask
    resized to `size` ("resize and fill"). Raises ValueError for a mask that marks nothing
    (A1111 then falls back to plain img2img, changing the whole image)."""
    if padding < 0:
        raise ValueError(f"the masked area padding must be 0 or more pixels, got {padding}")
    region = crop_region(mask, padding)
    if region is None:
        raise ValueError(
            "the mask is empty (black everywhere, after inverting): nothing to inpaint; "
            "paint white where the image should change"
        )
    height, width = mask.shape
    region = expand_crop_region(region, size, (width, height))
    canvas = to_uint8(image)
    crops = [
        np.asarray(_resize(Image.fromarray(i).crop(region), *size, fill=True), np.float32)
        for i in canvas
    ]
    levels = Image.fromarray(np.round(np.clip(mask, 0, 1) * 255).astype(np.uint8), mode="L")
    mask_crop = _resize(levels.crop(region), *size, fill=True)
    return MaskedArea(
        region=region,
        image=np.stack(crops)[0 if image.ndim == 3 else slice(None)] / 255.0,
        mask=np.asarray(mask_crop, np.float32) / 255.0,
        canvas=canvas,
        overlay=mask,
    )
