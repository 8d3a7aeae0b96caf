"""What a loaded model is made of, however it was stored."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import SchedulerConfig
from ..models.clip import CLIPTextModel
from ..models.unet import UNetModel
from ..models.vae import Autoencoder
from ..settings import MAX_SIDE
from ..tokenizer import Tokenizer


@dataclass
class Components:
    """A model's parts and what the pipeline needs to know about it. Mutable so that the
    pipeline can drop the text encoders and the UNet once they are done (lower peak
    memory): it holds the only references."""

    path: Path  # the diffusers folder, or the single-file checkpoint
    # What a single file was detected to be ("sd1", "sd2", "sdxl"); None for folders,
    # whose configs say it.
    architecture: str | None
    is_xl: bool
    # SDXL encodes "no negative prompt" as zeros rather than as the empty prompt's text.
    force_zeros_for_empty_prompt: bool
    scheduler_config: SchedulerConfig
    default_sampler: str
    native_size: int  # pixels per side the model was trained at
    tokenizers: list[Tokenizer]
    text_encoders: list[CLIPTextModel]
    unet: UNetModel | None
    vae: Autoencoder


def check_native_size(image_size: int, downscale: int | None = None) -> None:
    """Refuse a native size out of range or, given the VAE's `downscale`, not a multiple of
    it."""
    if not 0 < image_size <= MAX_SIDE or image_size % (downscale or 1):
        kind = f"a positive multiple of {downscale}" if downscale else "positive"
        raise ValueError(f"image size must be {kind}, at most {MAX_SIDE} (got {image_size})")
