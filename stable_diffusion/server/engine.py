"""The server's only contact with the pipeline: loading a model, merging LoRAs for a
request, denoising step by step and decoding, exactly as `txt2image.py` and
`image2image.py` do (so that the server's pixels are the scripts').

Only the worker thread (`jobs.Worker`) calls an `Engine`: MLX work stays on one thread."""

from __future__ import annotations

import gc
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from PIL import Image

from ..cpu import fast_cpu
from ..images import to_uint8
from ..pipeline import Defaults, Denoising, StableDiffusion, default_batch_size
from ..settings import HiresFix

# Latent-to-RGB projections for the progress preview, the cheap approximation A1111 and
# ComfyUI show while sampling: rgb = (latent @ F + 1) / 2. The factors are ComfyUI's
# (comfy/latent_formats.py, SD15.latent_rgb_factors and SDXL.latent_rgb_factors; SD 2.x
# shares SD 1.x's VAE).
_LATENT_RGB = {
    False: np.array(
        [
            [0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177],
        ],
        dtype=np.float32,
    ),
    True: np.array(
        [
            [0.3920, 0.4054, 0.4549],
            [-0.2634, -0.0196, 0.0653],
            [0.0568, 0.1687, -0.0755],
            [-0.3112, -0.2359, -0.2076],
        ],
        dtype=np.float32,
    ),
}


def preview_png(latent: np.ndarray, is_xl: bool) -> bytes | None:
    """A PNG of one (H, W, 4) latent through the fixed projection (1/8 of the image's
    size); None for latents with another channel count."""
    if latent.ndim != 3 or latent.shape[-1] != 4:
        return None
    rgb = np.clip((latent.astype(np.float32) @ _LATENT_RGB[is_xl] + 1) / 2, 0, 1)
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.nan_to_num(rgb) * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Generation:
    """One batch to generate, every value resolved (the model's defaults filled in)."""

    text: str  # the prompt as encoded (LoRA tags removed)
    negative_text: str | None
    steps: int
    cfg: float
    sampler: str  # ours, e.g. "euler_a"
    seed: int
    n_images: int
    width: int
    height: int
    image: np.ndarray | None = None  # img2img: (H, W, 3) in [0, 1]
    strength: float = 0.0
    mask: np.ndarray | None = None  # inpainting: (H, W) in [0, 1], blurred
    masked_content: str = "original"
    hires: HiresFix | None = None  # txt2img's hires fix
    clip_skip: int = 1  # A1111's numbering: 1 is the last layer


# Called after each step with (step, steps, latents); returns True to stop there.
StepCallback = Callable[[int, int, mx.array], bool]


class Engine:
    """A resident `StableDiffusion`, loaded with the server's --float16 and -q, run with its
    --bfloat16."""

    def __init__(self, float16: bool | None, quantize: bool, bfloat16: bool = False):
        self.float16 = float16
        self.quantize = quantize
        self.bfloat16 = bfloat16
        self.sd: StableDiffusion | None = None
        self.model_title: str | None = None
        self._loras: tuple[tuple[str, float], ...] = ()

    def load(self, model: str | os.PathLike[str], title: str) -> None:
        """Load `model`, freeing the current one first (two never share the memory)."""
        self.sd, self.model_title, self._loras = None, None, ()
        gc.collect()
        mx.clear_cache()
        sd = StableDiffusion(str(model), float16=self.float16, quantize=self.quantize)
        sd.preload()
        self.sd, self.model_title = sd, title

    def use_model(self, model: str | os.PathLike[str], title: str) -> None:
        """Load `model` unless it is the one loaded. Raises ValueError naming it if it does not
        load (no model is loaded then)."""
        if self.sd is not None and self.model_title == title:
            return
        try:
            self.load(model, title)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"cannot load {title}: {e}") from None

    @property
    def defaults(self) -> Defaults:
        return self._model().defaults

    def _model(self) -> StableDiffusion:
        if self.sd is None:
            raise RuntimeError("no model is loaded (the last model switch failed)")
        return self.sd

    def use_loras(self, loras: Sequence[tuple[str | os.PathLike[str], float]]) -> None:
        """Merge exactly `loras` (path, strength) into the weights. The weights from before
        any LoRA are restored exactly first, unless the same LoRAs are merged already
        (consecutive requests with the same LoRAs merge them once). Raises ValueError for
        a LoRA that does not fit, leaving the weights without LoRAs."""
        wanted = tuple((str(path), float(strength)) for path, strength in loras)
        if wanted == self._loras:
            return
        sd = self._model()
        sd.unload_loras()
        self._loras = ()
        try:
            for path, strength in wanted:
                sd.load_lora(path, strength)
        except ValueError:
            sd.unload_loras()
            raise
        self._loras = wanted

    def denoise(self, g: Generation, on_step: StepCallback) -> mx.array:
        """The latents after the last step run (all steps, or fewer if `on_step` stopped),
        image i drawn from seed g.seed + i, as many per UNet call as the scripts make
        (`default_batch_size`). Raises ValueError for settings the pipeline refuses, before
        any step; an interrupted run returns the images begun."""
        sd = self._model()
        size = default_batch_size(g.n_images)

        def start(first: int) -> Denoising:
            n_images, seed = min(size, g.n_images - first), g.seed + first
            shared: dict[str, Any] = {
                "n_images": n_images,
                "num_steps": g.steps,
                "cfg_weight": g.cfg,
                "negative_text": g.negative_text,
                "seed": seed,
                "sampler": g.sampler,
                "clip_skip": g.clip_skip,
            }
            if g.hires is not None:
                return sd.generate_latents_hires(
                    g.text, g.hires, width=g.width, height=g.height, **shared
                )
            if g.image is None:
                return sd.generate_latents(g.text, width=g.width, height=g.height, **shared)
            return sd.generate_latents_from_image(
                g.image,
                g.text,
                strength=g.strength,
                mask=g.mask,
                masked_content=g.masked_content,
                **shared,
            )

        batches = [start(first) for first in range(0, g.n_images, size)]
        finals: list[mx.array] = []
        with fast_cpu(bfloat16=self.bfloat16):
            for latents in batches:
                for step, x in enumerate(latents, start=1):
                    mx.eval(x)
                    if on_step(step, len(latents), x):
                        return mx.concatenate([*finals, x])
                finals.append(x)
        return mx.concatenate(finals)

    def decode(self, latents: mx.array) -> np.ndarray:
        """(N, H, W, 3) uint8 images, decoded one at a time as the scripts do."""
        sd = self._model()
        decoded = []
        with fast_cpu(bfloat16=self.bfloat16):
            for i in range(latents.shape[0]):
                image = sd.decode(latents[i : i + 1])
                mx.eval(image)
                decoded.append(to_uint8(image))
        return np.concatenate(decoded)
