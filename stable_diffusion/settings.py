"""The settings of one generation: checked by one function that the Python API, the scripts
and the HTTP server all call (each naming the arguments as its users spell them), before
anything loads, and worked out once (defaults filled in, seed drawn) into the
`GenerationSettings` that the denoising carries and the PNG parameters are written from."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .images import validate_size
from .parameters import GenerationParameters

# Every Stable Diffusion release trains on a schedule of 1000 timesteps, and a sampler
# cannot take more steps than its schedule has (it checks the model's own once loaded).
MAX_STEPS = 1000
# All images of a call are denoised as one batch: memory grows with their number. The
# size check after the model loads (`StableDiffusion._check_size`) refuses batches whose
# UNet activations do not fit this machine; this bound refuses absurd counts before loading.
MAX_IMAGES = 64
# Pixels per side. Attention runs in blocks and the VAE in tiles, so memory grows with the
# pixels: at 8192x8192 the UNet's activations take at least 39 GiB with CFG (SD 1.5, SDXL:
# `pipeline.unet_activation_bytes`), hours of work per step on a CPU; and it is the largest
# input image `images.load_image` takes (MAX_INPUT_PIXELS).
MAX_SIDE = 8192
# `mx.random.key` takes a 64-bit unsigned seed.
MAX_SEED = 2**64 - 1

# The names the Python API gives the arguments (`StableDiffusion.generate_latents`).
API_NAMES: Mapping[str, str] = {
    "n_images": "n_images",
    "steps": "steps",
    "cfg": "cfg weight",
    "seed": "seed",
    "width": "width",
    "height": "height",
    "strength": "strength",
    "decoding_batch_size": "decoding batch size",
    "hires_scale": "hires scale",
    "hires_resize": "hires resize",
    "hires_steps": "hires steps",
    "hires_strength": "hires strength",
}
# A1111's slider goes up to 4; larger factors are refused by the size limit anyway.
MAX_HIRES_SCALE = 8


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix: upscale the first pass's latents by `scale` (or to `resize`,
    width x height, 0 keeping the aspect ratio, then center-cropped) with `upscaler`, then
    denoise them again at `strength` over `steps` steps (0: as many as the first pass)."""

    scale: float = 2.0
    steps: int = 0
    strength: float = 0.7  # A1111's default in its page
    upscaler: str = "Latent"
    resize: tuple[int, int] | None = None

    def sizes(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((width, height) upscaled to, (width, height) cropped to), as A1111 works them
        out (`calculate_target_resolution`)."""
        if self.resize is None:
            upscaled = int(width * self.scale), int(height * self.scale)
            return upscaled, upscaled
        resize_x, resize_y = self.resize
        if resize_y == 0:
            upscaled = resize_x, resize_x * height // width
            return upscaled, upscaled
        if resize_x == 0:
            upscaled = resize_y * width // height, resize_y
            return upscaled, upscaled
        if width / height < resize_x / resize_y:
            return (resize_x, resize_x * height // width), self.resize
        return (resize_y * width // height, resize_y), self.resize


@dataclass(frozen=True)
class GenerationSettings:
    """What one generation ran with, defaults filled in and seed drawn."""

    prompts: tuple[str, ...]  # one per generated image
    negative_prompts: tuple[str, ...] | None  # None: none given (SDXL then uses zeros)
    steps: int  # as asked for; img2img runs `strength` of them
    cfg: float
    sampler: str
    seed: int  # the first image's; image i's is seed + i
    width: int
    height: int
    strength: float | None = None  # img2img only
    clip_skip: int = 1  # A1111's numbering: 1 is the last layer
    hires: HiresFix | None = None  # txt2img's second pass; width, height: the first's

    @property
    def uses_cfg(self) -> bool:
        """Whether classifier-free guidance runs (a weight <= 1 turns it off)."""
        return self.cfg > 1

    def parameters(
        self, model: str | None = None, loras: tuple[tuple[str, float], ...] = ()
    ) -> GenerationParameters:
        """The parameters saved in a PNG (one prompt, as every tool stores them)."""
        negatives = set(self.negative_prompts or [""])
        if len(set(self.prompts)) != 1 or len(negatives) != 1:
            raise ValueError("an image's parameters hold one prompt and one negative prompt")
        return GenerationParameters(
            prompt=self.prompts[0],
            negative_prompt=negatives.pop(),
            steps=self.steps,
            sampler=self.sampler,
            cfg_scale=self.cfg,
            seed=self.seed,
            width=self.width,
            height=self.height,
            model=model,
            loras=loras,
            clip_skip=self.clip_skip,
            **strength_parameters(self.strength, self.hires),
        )


def strength_parameters(strength: float | None, hires: HiresFix | None) -> dict[str, Any]:
    """img2img's strength, or the hires fix (A1111 records its strength as the same field)."""
    if hires is None:
        return {"strength": strength}
    return {
        "strength": hires.strength,
        "hires_scale": None if hires.resize else hires.scale,
        "hires_resize": hires.resize,
        "hires_steps": hires.steps,
        "hires_upscaler": hires.upscaler,
    }


def check_arguments(
    *,
    n_images: object = 1,
    n_prompts: int = 1,
    steps: object = None,
    cfg: object = None,
    seed: object = None,
    width: object = None,
    height: object = None,
    strength: object = None,
    decoding_batch_size: object = None,
    hires_scale: object = None,
    hires_resize: object = None,
    hires_steps: object = None,
    hires_strength: object = None,
    multiple: int = 8,
    names: Mapping[str, str] = API_NAMES,
) -> None:
    """Raise ValueError, naming the argument as `names` spells it, for any argument out of
    range; None means "not given". Sides must be multiples of `multiple` (the VAE's
    downscale: 8 for every Stable Diffusion)."""
    n_images = _integer(names["n_images"], n_images, 1, MAX_IMAGES)
    if n_images * n_prompts > MAX_IMAGES:
        raise ValueError(
            f"{n_prompts} prompts x {n_images} images is {n_images * n_prompts} images; "
            f"at most {MAX_IMAGES} are generated at once"
        )
    if steps is not None:
        _integer(names["steps"], steps, 1, MAX_STEPS)
    if cfg is not None:
        cfg = _real(names["cfg"], cfg)
        if cfg < 0:
            raise ValueError(f"{names['cfg']} must be >= 0 (got {cfg})")
    if seed is not None:
        # Image i of a call uses seed + i (`noise.py`): the last must fit too.
        last = MAX_SEED - (n_images * n_prompts - 1)
        _integer(names["seed"], seed, 0, last, " (leave it out for a random one)")
    if strength is not None:
        strength = _real(names["strength"], strength)
        if not 0 <= strength <= 1:
            raise ValueError(f"{names['strength']} must be between 0 and 1 (got {strength})")
    if decoding_batch_size is not None:
        # A decoding batch is some of the call's images: more than MAX_IMAGES decodes no more.
        _integer(names["decoding_batch_size"], decoding_batch_size, 1, MAX_IMAGES)
    sides: dict[str, int | None] = {"width": None, "height": None}
    if width is not None or height is not None:
        for side, value in (("width", width), ("height", height)):
            if value is not None:
                # validate_size refuses sides below 1, suggesting the nearest valid ones.
                sides[side] = _integer(names[side], value, None, MAX_SIDE)
        # Only the given sides are checked; `multiple` stands in for the others.
        validate_size(
            multiple if sides["width"] is None else sides["width"],
            multiple if sides["height"] is None else sides["height"],
            multiple,
        )
    _check_hires(
        names,
        hires_scale,
        hires_resize,
        hires_steps,
        hires_strength,
        sides["width"],
        sides["height"],
        multiple,
    )


def _check_hires(
    names: Mapping[str, str],
    scale: object,
    resize: object,
    steps: object,
    strength: object,
    width: int | None,
    height: int | None,
    multiple: int,
) -> None:
    """The hires fix's numbers, and the size it makes when the first pass's is known."""
    if steps is not None:
        _integer(names["hires_steps"], steps, 0, MAX_STEPS, " (0: as many as the first pass)")
    if strength is not None:
        strength = _real(names["hires_strength"], strength)
        if not 0 <= strength <= 1:
            raise ValueError(f"{names['hires_strength']} must be between 0 and 1 (got {strength})")
    factor = None
    if scale is not None:
        factor = _real(names["hires_scale"], scale)
        if not 1 <= factor <= MAX_HIRES_SCALE:
            raise ValueError(
                f"{names['hires_scale']} must be between 1 and {MAX_HIRES_SCALE} (got {factor})"
            )
    size = None
    if resize is not None:
        if not isinstance(resize, tuple) or len(resize) != 2:
            raise ValueError(f"{names['hires_resize']} must be a (width, height) pair")
        hint = " (0 keeps the aspect ratio)"
        size = (
            _integer(names["hires_resize"], resize[0], 0, MAX_SIDE, hint),
            _integer(names["hires_resize"], resize[1], 0, MAX_SIDE, hint),
        )
        if size == (0, 0):
            raise ValueError(f"{names['hires_resize']} 0x0 gives no size; give a width or height")
    if (factor is None and size is None) or width is None or height is None:
        return
    upscaled, cropped = HiresFix(scale=factor or 1.0, resize=size).sizes(width, height)
    name = names["hires_resize" if resize is not None else "hires_scale"]
    for w, h in {upscaled, cropped}:
        if w % multiple or h % multiple or not 0 < w <= MAX_SIDE or not 0 < h <= MAX_SIDE:
            raise ValueError(
                f"{name} makes {width}x{height} into {w}x{h}: the hires size must be "
                f"multiples of {multiple} between {multiple} and {MAX_SIDE}; choose a factor or "
                "size that gives one"
            )


def _integer(name: str, value: object, low: int | None, high: int, hint: str = "") -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)  # type: ignore[arg-type]  # ints, not floats
    except TypeError:
        raise ValueError(f"{name} must be an integer (got {value!r:.40})") from None
    if low is not None and number < low:
        raise ValueError(f"{name} must be at least {low} (got {number}){hint}")
    if number > high:
        raise ValueError(f"{name} must be at most {high} (got {number}){hint}")
    return number


def _real(name: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number (got {value!r:.40})")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number (got {number})")
    return number
