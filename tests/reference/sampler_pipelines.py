"""Reference for whole txt2img/img2img runs with every deterministic sampler:
the diffusers pipelines on the tiny SD 2.x-like and SDXL-like models with the
matching diffusers scheduler and given noise; and txt2img on tiny models whose
scheduler config is a hub repo's (SD 1.5's, SD 2.1's: missing keys included), with the
sampler's class made as users make it, `SamplerClass.from_config(pipe.scheduler.config)`.

Run from the repository root (needs requirements-dev.txt):

    python -m tests.reference.sampler_pipelines
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from PIL import Image

from tests.reference.inputs import (
    DETERMINISTIC_SAMPLERS,
    HUB_CONFIG_MODELS,
    HUB_CONFIG_SAMPLERS,
    IMAGE_SIZE,
    MODELS,
    REFERENCE,
    SAMPLER_IMG2IMG_STRENGTH,
    SAMPLER_NEGATIVE_PROMPT,
    SAMPLER_PROMPT,
    SAMPLER_STEPS,
    with_hub_scheduler,
)
from tests.reference.tiny_models import given_img2img_noise

# Our sampler name -> the diffusers scheduler and the options it implies. The tiny
# models' configs have no clip_sample, so DDIM clips x0 (its default) as ours does.
SCHEDULERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {}),
    "dpm++2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}


def main() -> None:
    rng = np.random.default_rng(7)
    shape = (1, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    out = {
        "noise": rng.standard_normal(shape).astype(np.float32),
        "img2img_noise": rng.standard_normal(shape).astype(np.float32),
        "image": (rng.uniform(0, 1, (IMAGE_SIZE, IMAGE_SIZE, 3)) * 255).astype(np.uint8),
    }
    common = dict(
        prompt=SAMPLER_PROMPT,
        negative_prompt=SAMPLER_NEGATIVE_PROMPT,
        num_inference_steps=SAMPLER_STEPS,
        guidance_scale=7.5,
        output_type="np",
    )
    assert list(SCHEDULERS) == DETERMINISTIC_SAMPLERS
    for model in ("tiny-sd2", "tiny-sdxl"):
        pipe = DiffusionPipeline.from_pretrained(MODELS / model)
        base_config = pipe.scheduler.config
        for name, (scheduler_class, options) in SCHEDULERS.items():
            pipe.scheduler = scheduler_class.from_config(base_config, **options)
            with torch.no_grad():
                out[f"{model}.{name}.txt2img"] = pipe(
                    **common,
                    latents=torch.from_numpy(out["noise"]),
                    height=IMAGE_SIZE,
                    width=IMAGE_SIZE,
                ).images
        img2img = AutoPipelineForImage2Image.from_pipe(pipe)
        img2img.scheduler = DPMSolverMultistepScheduler.from_config(
            base_config, use_karras_sigmas=True
        )
        with torch.no_grad(), given_img2img_noise(img2img, out["img2img_noise"]):
            out[f"{model}.dpm++2m_karras.img2img"] = img2img(
                **common, image=Image.fromarray(out["image"]), strength=SAMPLER_IMG2IMG_STRENGTH
            ).images
    with tempfile.TemporaryDirectory() as tmp:
        for model in HUB_CONFIG_MODELS:
            pipe = DiffusionPipeline.from_pretrained(with_hub_scheduler(model, Path(tmp)))
            file_config = pipe.scheduler.config
            for name in HUB_CONFIG_SAMPLERS:
                scheduler_class, options = SCHEDULERS[name]
                pipe.scheduler = scheduler_class.from_config(file_config, **options)
                with torch.no_grad():
                    out[f"{model}.hub_config.{name}.txt2img"] = pipe(
                        **common,
                        latents=torch.from_numpy(out["noise"]),
                        height=IMAGE_SIZE,
                        width=IMAGE_SIZE,
                    ).images
    np.savez_compressed(REFERENCE / "sampler_pipelines.npz", **out)
    print(f"wrote {REFERENCE / 'sampler_pipelines.npz'}")


if __name__ == "__main__":
    main()
