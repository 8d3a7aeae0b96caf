"""Reading input images and writing results, with their generation parameters.

Output names: results are never written over an existing file unless asked to.  For
``out.png`` the grid goes to ``out.png`` and, with ``save_individual``, image *i* to
``out-i.png``.  When any of these exists, the whole set moves to the next free stem:
``out_1.png`` (``out_1-0.png``, ...), then ``out_2.png``, ...  The ``_k`` suffix for runs
and ``-i`` for images keep one run's names from ever being another run's.
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import math
import os
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from . import limits
from .limits import MAX_INPUT_PIXELS
from .parameters import GenerationParameters

__all__ = [
    "MAX_INPUT_PIXELS",
    "GenerationParameters",
    "check_output_path",
    "encode_png",
    "load_image",
    "make_grid",
    "read_parameters",
    "save_image",
    "save_images",
    "to_uint8",
    "validate_size",
]

_PARAMETERS_KEY = "parameters"  # A1111's PNG text chunk
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# UTF-8 takes at most 4 bytes a character.
_MAX_PARAMETERS_BYTES = 4 * limits.MAX_PARAMETERS_TEXT
# Pillow opens 16-bit grayscale as "I;16*", or as "I" in older versions.
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# The process's umask can only be read by setting it; done once, before any thread starts.
_UMASK = os.umask(0)
os.umask(_UMASK)


def validate_size(width: int, height: int, multiple: int = 8) -> None:
    """Raise ValueError, suggesting valid values, unless both sides are positive multiples
    of `multiple`."""
    problems = []
    for name, value in (("width", width), ("height", height)):
        if value > 0 and value % multiple == 0:
            continue
        lower = value // multiple * multiple
        options = [v for v in (lower, lower + multiple) if v > 0] or [multiple]
        suggestion = " or ".join(str(v) for v in options)
        problems.append(
            f"{name} {value} is not a positive multiple of {multiple}; use {suggestion}"
        )
    if problems:
        raise ValueError("; ".join(problems))


def make_grid(images: Any, n_rows: int) -> np.ndarray:
    """Tile (N, H, W, C) images into one (n_rows*H, N/n_rows*W, C) array, row by row."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W, C), got {images.shape}")
    n, h, w, c = images.shape
    if n_rows < 1 or n % n_rows:
        raise ValueError(
            f"cannot arrange {n} images in {n_rows} rows: the number of images must be "
            "divisible by n_rows"
        )
    n_cols = n // n_rows
    grid = images.reshape(n_rows, n_cols, h, w, c).transpose(0, 2, 1, 3, 4)
    return grid.reshape(n_rows * h, n_cols * w, c)


def check_output_path(
    path: str | os.PathLike[str], overwrite: bool = False, *, individual: int = 0
) -> Path:
    """Validate an output path before spending minutes on generation, and resolve the name
    that will be written.

    Adds ``.png`` when there is no extension and refuses other extensions (only PNG keeps
    the parameters).  Raises ValueError when the directory is missing or not writable.
    Unless `overwrite`, returns the first free name (see the module docstring), counting the
    `individual` per-image files ``stem-0.png`` ... that will accompany it.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file name such as {path / 'out.png'}")
    if path.suffix == "":
        path = path.with_suffix(".png")
    elif path.suffix.lower() != ".png":
        raise ValueError(
            f"{path}: only PNG output is supported (it carries the generation parameters); "
            f"use {path.with_suffix('.png')}"
        )
    directory = path.parent
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise ValueError(f"cannot save to {path}: the directory {directory} {what}")
    try:
        # Actually creating a file is the only reliable test (read-only mounts, ACLs, root).
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ValueError(
            f"cannot save to {path}: directory {directory} is not writable ({e.strerror or e})"
        ) from None
    if overwrite:
        return path
    return next(
        candidate
        for candidate in _candidate_names(path)
        if not any(p.exists() for p in _file_set(candidate, individual))
    )


def save_images(
    images: Any,
    path: str | os.PathLike[str],
    parameters: GenerationParameters | Sequence[GenerationParameters],
    *,
    n_rows: int = 1,
    overwrite: bool = False,
    save_individual: bool = False,
) -> list[Path]:
    """Save images (N, H, W, 3), floats in [0, 1] (NumPy or MLX) or uint8 pixels (NumPy), as
    one grid PNG carrying the
    parameters in A1111's ``parameters`` text chunk, and optionally each image as well.

    `parameters` is one object for all images or one per image; the grid gets the first.
    With a single image the grid *is* that image, so no separate copy is written.  Returns
    the paths written, grid first; names follow the module docstring.
    """
    pixels = to_uint8(images)
    n = len(pixels)
    if n == 0:
        raise ValueError("no images to save")
    all_parameters = (
        [parameters] * n if isinstance(parameters, GenerationParameters) else list(parameters)
    )
    if len(all_parameters) != n:
        raise ValueError(f"got {len(all_parameters)} parameter sets for {n} images")
    grid = make_grid(pixels, n_rows)
    individual = n if save_individual and n > 1 else 0
    grid_path = check_output_path(path, overwrite, individual=individual)

    outputs = zip(
        [grid, *pixels[:individual]],
        [all_parameters[0], *all_parameters[:individual]],
        _file_set(grid_path, individual),
        strict=True,
    )
    return [_write_png(image, p, target, overwrite) for image, p, target in outputs]


def read_parameters(path: str | os.PathLike[str]) -> GenerationParameters:
    """The generation parameters stored in an image by `save_images` (or A1111).

    Only the metadata is read, never the pixels: for a PNG its chunks are walked (text
    placed after the image data too), for other formats PIL's header."""
    if _is_png(path):
        try:
            text = _png_text(Path(path), _PARAMETERS_KEY)
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: cannot read the image metadata ({e})") from None
    else:
        with _open_image(path) as image:
            text = image.info.get(_PARAMETERS_KEY)
    if not isinstance(text, str):
        raise ValueError(
            f"{path} has no generation parameters (no '{_PARAMETERS_KEY}' PNG text chunk)"
        )
    try:
        return GenerationParameters.from_text(text)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def rounded_size(size: tuple[int, int], multiple: int = 64) -> tuple[int, int]:
    """(width, height) with each side rounded to the nearest multiple of `multiple` (at
    least one): the size `load_image` gives an image."""
    width, height = (max(multiple, math.floor(s / multiple + 0.5) * multiple) for s in size)
    return width, height


def load_image(
    path: str | os.PathLike[str], *, multiple: int = 64
) -> tuple[np.ndarray, str | None]:
    """Read an image for img2img as float32 (H, W, 3) RGB in [0, 1].

    Applies the EXIF orientation, flattens transparency onto white and converts every mode
    to RGB.  Sides that are not multiples of `multiple` are rounded to the nearest multiple
    (at least one), resizing and, if the aspect ratio changes, center-cropping.  Returns the
    pixels and a message describing such changes, or None.  Raises ValueError naming the file
    when it is missing, not an image, corrupt or larger than MAX_INPUT_PIXELS.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be positive, got {multiple}")
    notes = []
    with _open_image(path) as image:
        w, h = image.size
        if w * h > MAX_INPUT_PIXELS:
            raise ValueError(
                f"{path}: the image is {w}x{h}, too large (over {MAX_INPUT_PIXELS:,} pixels); "
                "resize it first"
            )
        try:
            # Decode before the EXIF step, whose errors are forgiven: corrupt pixel data
            # must not slip through as an "EXIF problem".
            image.load()
            rgb, flattened = _to_rgb(_exif_transpose(image, notes))
        except Exception as e:  # PIL reports corrupt data with many exception types
            raise ValueError(f"{path}: cannot decode the image ({e or type(e).__name__})") from None
    if flattened:
        notes.append("transparent areas were filled with white")

    w, h = rgb.size
    target = rounded_size((w, h), multiple)
    if target != (w, h):
        rgb = ImageOps.fit(rgb, target, Image.Resampling.LANCZOS)
        cropped = " and center-cropped" if w * target[1] != h * target[0] else ""
        notes.append(
            f"resized{cropped} {w}x{h} to {target[0]}x{target[1]} "
            f"(sides must be multiples of {multiple})"
        )
    pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    return pixels, "; ".join(notes) or None


def _is_png(path: str | os.PathLike[str]) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(8) == _PNG_SIGNATURE
    except OSError:
        return False  # _open_image names the problem


def _png_text(path: Path, keyword: str) -> str | None:
    """The last tEXt/zTXt/iTXt chunk named `keyword` (PIL keeps the last one too), read
    chunk by chunk: the image data is skipped, and the text is limited to
    `_MAX_PARAMETERS_BYTES` before it is read or decompressed."""
    text = None
    with path.open("rb") as file:
        if file.read(8) != _PNG_SIGNATURE:
            raise ValueError("not a PNG file")
        for _ in range(limits.MAX_PNG_CHUNKS):
            head = file.read(8)
            if len(head) < 8 or head[4:] == b"IEND":
                return text  # a truncated file keeps the text read so far, as PIL does
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind not in (b"tEXt", b"zTXt", b"iTXt"):
                file.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
                continue
            # The keyword (79 bytes at most) and the compression fields come first.
            if length > _MAX_PARAMETERS_BYTES + 100:
                name = file.read(80).partition(b"\0")[0]
                if name == keyword.encode("latin-1"):
                    raise ValueError(_too_long(keyword, length))
                file.seek(length + 4 - min(length, 80), os.SEEK_CUR)
                continue
            data = file.read(length)
            file.seek(4, os.SEEK_CUR)
            name, _, body = data.partition(b"\0")
            if name == keyword.encode("latin-1"):
                text = _decode_text_chunk(kind, body, keyword)
    raise ValueError(f"more than {limits.MAX_PNG_CHUNKS:,} PNG chunks; the file is damaged")


def _decode_text_chunk(kind: bytes, body: bytes, keyword: str) -> str:
    if kind == b"tEXt":
        return body.decode("latin-1")
    if kind == b"zTXt":  # compression method, then zlib data
        return _inflate(body[1:], keyword).decode("latin-1")
    # iTXt: compression flag and method, language tag, translated keyword, then the text.
    compressed = body[:1] == b"\1"
    _language, _, rest = body[2:].partition(b"\0")
    _translated, _, raw = rest.partition(b"\0")
    raw = _inflate(raw, keyword) if compressed else raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"the {keyword!r} text is not UTF-8") from None


def _inflate(data: bytes, keyword: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, _MAX_PARAMETERS_BYTES + 1)
    except zlib.error as e:
        raise ValueError(f"the {keyword!r} text is corrupt ({e})") from None
    if len(raw) > _MAX_PARAMETERS_BYTES:
        raise ValueError(_too_long(keyword, len(raw)))
    return raw


def _too_long(keyword: str, size: int) -> str:
    return (
        f"its {keyword!r} text has over {size:,} bytes, more than generation parameters "
        f"need ({limits.MAX_PARAMETERS_TEXT:,} characters at most)"
    )


def _open_image(path: str | os.PathLike[str]) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not an image")
    try:
        image = Image.open(path)
    except Image.DecompressionBombError:
        raise ValueError(f"{path}: the image is too large to load safely") from None
    except Exception as e:  # UnidentifiedImageError, permissions, and corrupt headers alike
        reason = (
            "not an image or an unsupported format"
            if isinstance(e, Image.UnidentifiedImageError)
            else str(e) or type(e).__name__
        )
        raise ValueError(f"{path}: cannot open the image ({reason})") from None
    if min(image.size) < 1:
        image.close()
        raise ValueError(f"{path}: the image is empty ({image.width}x{image.height})")
    return image


def _exif_transpose(image: Image.Image, notes: list[str]) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF must not cost the user an otherwise good image
        notes.append("its EXIF orientation could not be read, so it was used as stored")
        return image


def _to_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """RGB version of `image`, and whether transparency was flattened onto white."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own conversion clips 16-bit values at 255 instead of scaling them.
        gray = np.asarray(image, dtype=np.float64) / 65535.0
        gray = np.round(np.clip(gray, 0.0, 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1)), False
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), True
    return image.convert("RGB"), False


def to_uint8(images: Any) -> np.ndarray:
    """Float images in [0, 1] (NumPy or MLX) as uint8 pixels; uint8 ones as they are."""
    # NumPy cannot view MLX's bfloat16 buffers, so widen those first.
    if isinstance(images, mx.array) and images.dtype == mx.bfloat16:
        images = images.astype(mx.float32)
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
    # NaNs become black rather than failing the save: the user keeps whatever came out.
    images = np.nan_to_num(images.astype(np.float32), nan=0.0)
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def _candidate_names(path: Path) -> Iterator[Path]:
    yield path
    for k in itertools.count(1):
        yield path.with_name(f"{path.stem}_{k}{path.suffix}")


def _file_set(grid_path: Path, individual: int) -> list[Path]:
    return [grid_path] + [
        grid_path.with_name(f"{grid_path.stem}-{i}.png") for i in range(individual)
    ]


def save_image(
    pixels: np.ndarray, path: Path, parameters: GenerationParameters, overwrite: bool = False
) -> Path:
    """One (H, W, 3) uint8 image as a PNG carrying `parameters`, at `path` or, unless
    `overwrite`, at the next free name; returns the path written."""
    return _write_png(pixels, parameters, path, overwrite)


def encode_png(pixels: np.ndarray, parameters: GenerationParameters) -> bytes:
    """An (H, W, 3) uint8 image as PNG bytes carrying `parameters` in A1111's chunk: what
    `save_images` writes, for callers that send the file rather than save it."""
    info = PngImagePlugin.PngInfo()
    # Lone surrogates (e.g. from undecodable command-line bytes) cannot be stored as UTF-8;
    # escape them rather than lose the image.
    text = parameters.to_text().encode("utf-8", "backslashreplace").decode("utf-8")
    info.add_text(_PARAMETERS_KEY, text)  # tEXt, or iTXt beyond Latin-1, as A1111 does
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _write_png(
    pixels: np.ndarray, parameters: GenerationParameters, path: Path, overwrite: bool
) -> Path:
    """Write the PNG atomically: into a temporary file in the target folder, flushed to
    disk, then moved into place, so that a full disk or an I/O error leaves no partial file
    and never damages the file `overwrite` replaces. Raises ValueError saying what failed."""
    data = encode_png(pixels, parameters)
    try:
        descriptor, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.stem}-", suffix=".png.partial"
        )
    except OSError as e:
        raise _save_error(path, e) from None
    try:
        os.fchmod(descriptor, 0o666 & ~_UMASK)  # mkstemp's 0o600 would hide the image
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(temporary, path)
            final = path
        else:
            final = _move_to_free_name(temporary, path)
        _sync_directory(path.parent)
    except BaseException as e:  # KeyboardInterrupt too: never leave the partial file
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(e, OSError):
            raise _save_error(path, e) from None
        raise
    return final


def _move_to_free_name(temporary: str, path: Path) -> Path:
    """Give the finished file the first free name from `path` on. A hard link fails if the
    name exists, so a name another process took since it was checked is never overwritten;
    where hard links are not supported, the name is reserved by exclusive creation first."""
    for candidate in _candidate_names(path):
        try:
            os.link(temporary, candidate)
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            try:
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                continue
            os.replace(temporary, candidate)
            return candidate
        os.unlink(temporary)
        return candidate
    raise AssertionError("unreachable: _candidate_names is endless")


def _sync_directory(directory: Path) -> None:
    # The rename is durable only once the directory is on disk too; not every system can
    # open a directory for that, and the file itself is already complete.
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _save_error(path: Path, error: OSError) -> ValueError:
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += "; free some space, or save elsewhere with --output"
    return ValueError(
        f"cannot save {path}: {reason}. Nothing was written, and any existing file is intact."
    )
