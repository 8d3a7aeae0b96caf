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
}


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
            strength=self.strength,
            clip_skip=self.clip_skip,
        )


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
    if width is not None or height is not None:
        sides: dict[str, int | None] = {"width": None, "height": None}
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
