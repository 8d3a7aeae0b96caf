"""Inputs shared by the reference scripts and the tests that replay them (no
PyTorch here: CI imports this module)."""

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MODELS = FIXTURES / "models"
REFERENCE = FIXTURES / "reference"

IMAGE_SIZE = 64  # pixels; the tiny VAEs downsample by 8 like the real one

# tiny_models.py: batches of two prompts.
PROMPTS = ["a photo of an astronaut riding a horse on mars", "a red sign saying MLX"]
NEGATIVE_PROMPTS = ["blurry, low quality", ""]

# long_prompts.py: a prompt that needs several 75-token chunks.
LONG_PROMPT = (
    "a highly detailed oil painting of an old lighthouse on a rocky coast at dusk, "
    "storm clouds gathering over a dark green sea, waves crashing against the rocks, "
    "a small fishing boat with a red sail returning to the harbour, seagulls circling "
    "above the mast, warm light in the keeper's window, wet stones reflecting the sky, "
    "in the style of the romantic landscape painters of the nineteenth century, "
    "dramatic lighting, rich textures, visible brush strokes, museum quality, framed"
)
LONG_NEGATIVE_PROMPT = "blurry, low quality"

# sampler_pipelines.py: one run per deterministic sampler.
DETERMINISTIC_SAMPLERS = ["euler", "heun", "ddim", "dpm++2m", "dpm++2m_karras"]
SAMPLER_PROMPT = "a watercolor of a fox in the snow"
SAMPLER_NEGATIVE_PROMPT = "photo"
SAMPLER_STEPS = 5
SAMPLER_IMG2IMG_STRENGTH = 0.6

# prompt_conventions.py: A1111's weighting, clip skip, textual inversion.
WEIGHTED_PROMPT = "a (red:1.5) fox in [the snow], ((sunset)) BREAK oil painting"
# What A1111's rules make of it (tests/test_prompts.py checks our parser gives exactly this):
# the reference encodes these fragments, so that it does not rely on our parser.
WEIGHTED_FRAGMENTS = [
    [
        ("a ", 1.0),
        ("red", 1.5),
        (" fox in ", 1.0),
        ("the snow", 1 / 1.1),
        (", ", 1.0),
        ("sunset", 1.1 * 1.1),
    ],
    [("oil painting", 1.0)],
]
WEIGHTED_NEGATIVE_PROMPT = "(blurry:1.3), low [quality]"
WEIGHTED_NEGATIVE_FRAGMENTS = [[("blurry", 1.3), (", low ", 1.0), ("quality", 1 / 1.1)]]
CONVENTION_STEPS = 3
CLIP_SKIP = 2  # A1111's numbering: diffusers' clip_skip=1
EMBEDDING_PROMPT = "a watercolor of foxstyle in the snow"
EMBEDDING_NEGATIVE_PROMPT = "blurry, snowy"
# Embedding files in tests/fixtures/embeddings/, by model, each used by its file's stem:
# A1111's .pt (two vectors) and .safetensors (three), SDXL's clip_l/clip_g (two each).
EMBEDDING_FILES = {
    "tiny-sd1": ["foxstyle.pt", "snowy.safetensors"],
    "tiny-sdxl": ["foxstyle.safetensors"],
}
# diffusers' format names its token inside the file.
DIFFUSERS_EMBEDDING = "learned_embeds.safetensors"
DIFFUSERS_EMBEDDING_TOKEN = "<paper-cut>"
DIFFUSERS_EMBEDDING_PROMPT = "a <paper-cut> fox"

# The scheduler/scheduler_config.json files of the hub repos, key for key, as each repo
# has shipped it since its release (their _diffusers_version tells which diffusers
# wrote them; the older ones lack timestep_spacing, and SD 1.5's prediction_type).
_SD_KEYS = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
_SDXL_KEYS = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    **_SD_KEYS,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
HUB_CONFIGS: dict[str, dict[str, Any]] = {
    # runwayml/stable-diffusion-v1-5 (now stable-diffusion-v1-5/stable-diffusion-v1-5)
    "hub_sd15": {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **_SD_KEYS},
    # stabilityai/stable-diffusion-2-1 (768 px, v-prediction)
    "hub_sd21": {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.8.0",
        **_SD_KEYS,
        "prediction_type": "v_prediction",
    },
    # stabilityai/stable-diffusion-2-1-base
    "hub_sd21_base": {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.10.0.dev0",
        **_SD_KEYS,
        "prediction_type": "epsilon",
    },
    # stabilityai/stable-diffusion-xl-base-1.0
    "hub_sdxl": _SDXL_KEYS,
    # stabilityai/sdxl-turbo
    "hub_sdxl_turbo": {
        **_SDXL_KEYS,
        "_class_name": "EulerAncestralDiscreteScheduler",
        "_diffusers_version": "0.24.0.dev0",
        "timestep_spacing": "trailing",
    },
}

# sampler_pipelines.py: tiny models with a hub repo's scheduler config, run with
# samplers other than the config's class (as `with_hub_scheduler` writes them).
HUB_CONFIG_MODELS = {
    "tiny-sd1": "hub_sd15",
    "tiny-sd2": "hub_sd21",
}
HUB_CONFIG_SAMPLERS = ["euler", "heun", "ddim", "dpm++2m"]


def with_hub_scheduler(model: str, folder: Path) -> Path:
    """A copy of tiny model `model` in `folder`, its scheduler config replaced by that of
    the hub repo HUB_CONFIG_MODELS names (model_index.json names its class too)."""
    config = HUB_CONFIGS[HUB_CONFIG_MODELS[model]]
    copy = Path(shutil.copytree(MODELS / model, folder / model))
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    index = json.loads((copy / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", config["_class_name"]]
    (copy / "model_index.json").write_text(json.dumps(index, indent=2))
    return copy


# odd_sizes.py: a non-square size whose latent sides (9 x 11) neither tiny UNet's total
# downsampling (2 for SD 1.x/2.x, 4 for SDXL) divides.
ODD_WIDTH, ODD_HEIGHT = 72, 88
ODD_PROMPT = "a lighthouse at dusk"
ODD_NEGATIVE_PROMPT = "blurry"
ODD_STEPS = 4
ODD_IMG2IMG_STRENGTH = 0.75


# inpainting.py: tiny inpainting UNets (9 input channels) with the other components of a
# tiny model; only their UNet folders are stored (tests/fixtures/inpainting/<name>/unet).
INPAINTING = FIXTURES / "inpainting"
INPAINTING_MODELS = {"tiny-sd1-inpainting": "tiny-sd1", "tiny-sdxl-inpainting": "tiny-sdxl"}
INPAINT_PROMPT = "a red door in a stone wall"
INPAINT_NEGATIVE_PROMPT = "blurry"
INPAINT_STEPS = 4
INPAINT_STRENGTHS = [1.0, 0.6]
# Samplers run with the 4-channel SD 1.x model at the lower strength: each has its own
# noise levels for the unmasked region.
INPAINT_SAMPLERS = ["euler", "heun", "ddim", "dpm++2m"]


def inpainting_model(name: str, folder: Path) -> Path:
    """The tiny inpainting model `name` as a diffusers folder in `folder`: its base model's
    components with the stored inpainting UNet."""
    copy = Path(shutil.copytree(MODELS / INPAINTING_MODELS[name], folder / name))
    shutil.rmtree(copy / "unet")
    shutil.copytree(INPAINTING / name / "unet", copy / "unet")
    return copy


def inpainting_mask() -> np.ndarray:
    """A uint8 (IMAGE_SIZE, IMAGE_SIZE) mask that no 8x8 grid aligns with, with gray levels
    on both sides of the 0.5 threshold (127 and 128 among them)."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    mask[13:45, 21:53] = 255
    mask[13:45, 17:21] = 127
    mask[45:50, 21:53] = 128
    mask[50:58, 30:40] = 200
    return mask


# hires_fix.py: txt2img at IMAGE_SIZE, upscaled, then img2img with the same prompt.
HIRES_PROMPT = "a castle on a hill at sunset"
HIRES_NEGATIVE_PROMPT = "blurry"
HIRES_STEPS = 4  # both passes; the second runs int(4 * strength) of them
HIRES_STRENGTH = 0.5
# (model, A1111 upscaler, scale, tiled VAE): every latent mode the hires fix documents, and
# Lanczos (decode, resize, encode) untiled and with diffusers' tiling on the 2x image.
HIRES_CASES = [
    ("tiny-sd1", "Latent", 2.0, False),
    ("tiny-sd1", "Latent", 1.5, False),
    ("tiny-sd1", "Latent (nearest)", 2.0, False),
    ("tiny-sd1", "Latent (nearest-exact)", 1.5, False),
    ("tiny-sd1", "Lanczos", 2.0, False),
    ("tiny-sd1", "Lanczos", 2.0, True),
    ("tiny-sdxl", "Latent", 2.0, False),
    ("tiny-sdxl", "Lanczos", 2.0, False),
]
# The latent modes of PyTorch's `interpolate` that A1111 offers (shared.latent_upscale_modes).
LATENT_UPSCALE_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
LATENT_UPSCALE_SIZES = [(18, 22), (13, 17), (27, 33)]


def hires_case_name(model: str, upscaler: str, scale: float, tiled: bool) -> str:
    return f"{model}.{upscaler}.x{scale}" + (".tiled" if tiled else "")
