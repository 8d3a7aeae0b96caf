"""Reference for sizes whose latent does not divide by the UNet's total downsampling
(diffusers passes each skip connection's size to the upsampler): txt2img and img2img at
ODD_WIDTH x ODD_HEIGHT on the three tiny models, Euler sampler, given noise.

Run from the repository root (needs requirements-dev.txt):

    python -m tests.reference.odd_sizes
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoPipelineForImage2Image, DiffusionPipeline
from PIL import Image

from tests.reference.inputs import (
    MODELS,
    ODD_HEIGHT,
    ODD_IMG2IMG_STRENGTH,
    ODD_NEGATIVE_PROMPT,
    ODD_PROMPT,
    ODD_STEPS,
    ODD_WIDTH,
    REFERENCE,
)
from tests.reference.tiny_models import given_img2img_noise


def main() -> None:
    rng = np.random.default_rng(11)
    shape = (1, 4, ODD_HEIGHT // 8, ODD_WIDTH // 8)
    out = {
        "noise": rng.standard_normal(shape).astype(np.float32),
        "img2img_noise": rng.standard_normal(shape).astype(np.float32),
        "image": (rng.uniform(0, 1, (ODD_HEIGHT, ODD_WIDTH, 3)) * 255).astype(np.uint8),
    }
    common = dict(
        prompt=ODD_PROMPT,
        negative_prompt=ODD_NEGATIVE_PROMPT,
        num_inference_steps=ODD_STEPS,
        guidance_scale=7.5,
        output_type="np",
    )
    for model in ("tiny-sd1", "tiny-sd2", "tiny-sdxl"):
        pipe = DiffusionPipeline.from_pretrained(MODELS / model)
        assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
        with torch.no_grad():
            out[f"{model}.txt2img"] = pipe(
                **common,
                latents=torch.from_numpy(out["noise"]),
                height=ODD_HEIGHT,
                width=ODD_WIDTH,
            ).images
        img2img = AutoPipelineForImage2Image.from_pipe(pipe)
        with torch.no_grad(), given_img2img_noise(img2img, out["img2img_noise"]):
            out[f"{model}.img2img"] = img2img(
                **common, image=Image.fromarray(out["image"]), strength=ODD_IMG2IMG_STRENGTH
            ).images
    np.savez_compressed(REFERENCE / "odd_sizes.npz", **out)
    print(f"wrote {REFERENCE / 'odd_sizes.npz'}")


if __name__ == "__main__":
    main()
