"""Reference for A1111's hires fix, which has no diffusers counterpart: diffusers' txt2img
pipeline (latents out), the upscaling A1111 does (PyTorch's `interpolate` for the "Latent"
modes; decode, PIL's Lanczos and encode for "Lanczos"), then diffusers' img2img pipeline on
the result with the same prompt, given noise at the new size. Also PyTorch's `interpolate`
alone, for every latent mode A1111 offers, on random latents.

Run from the repository root after tests.reference.tiny_models (needs
requirements-dev.txt):

    python -m tests.reference.hires_fix
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoPipelineForImage2Image, DiffusionPipeline
from PIL import Image

from tests.reference.inputs import (
    HIRES_CASES,
    HIRES_NEGATIVE_PROMPT,
    HIRES_PROMPT,
    HIRES_STEPS,
    HIRES_STRENGTH,
    IMAGE_SIZE,
    LATENT_UPSCALE_MODES,
    LATENT_UPSCALE_SIZES,
    MODELS,
    REFERENCE,
    hires_case_name,
)
from tests.reference.tiny_models import given_img2img_noise


def lanczos(images: np.ndarray, size: int) -> np.ndarray:
    """PIL's Lanczos on each float channel (no 8-bit rounding), clipped to [0, 1]."""
    return np.clip(
        np.stack(
            [
                np.stack(
                    [
                        np.asarray(
                            Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F").resize(
                                (size, size), Image.Resampling.LANCZOS
                            )
                        )
                        for c in range(image.shape[-1])
                    ],
                    axis=-1,
                )
                for image in images
            ]
        ),
        0,
        1,
    )


def hires(pipe, upscaler: str, scale: float, noise: np.ndarray, hires_noise: np.ndarray):
    common = dict(
        prompt=HIRES_PROMPT,
        negative_prompt=HIRES_NEGATIVE_PROMPT,
        num_inference_steps=HIRES_STEPS,
        guidance_scale=7.5,
    )
    size = int(IMAGE_SIZE * scale)
    latent = upscaler != "Lanczos"
    first = pipe(
        **common,
        latents=torch.from_numpy(noise),
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        output_type="latent" if latent else "np",
    ).images
    if latent:
        mode, antialias = LATENT_UPSCALE_MODES[upscaler]
        image = torch.nn.functional.interpolate(
            first, size=(size // 8, size // 8), mode=mode, antialias=antialias
        )
    else:
        image = lanczos(first, size)
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    with given_img2img_noise(img2img, hires_noise):
        return img2img(**common, image=image, strength=HIRES_STRENGTH, output_type="np").images


def main() -> None:
    rng = np.random.default_rng(29)
    out: dict[str, np.ndarray] = {
        "noise": rng.standard_normal((1, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)).astype(np.float32)
    }
    for scale in sorted({scale for _, _, scale, _ in HIRES_CASES}):
        side = int(IMAGE_SIZE * scale) // 8
        out[f"hires_noise.x{scale}"] = rng.standard_normal((1, 4, side, side)).astype(np.float32)
    with torch.no_grad():
        for model, upscaler, scale, tiled in HIRES_CASES:
            pipe = DiffusionPipeline.from_pretrained(MODELS / model)
            assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
            if tiled:
                pipe.vae.enable_tiling()
            name = hires_case_name(model, upscaler, scale, tiled)
            out[name] = hires(pipe, upscaler, scale, out["noise"], out[f"hires_noise.x{scale}"])
        latents = rng.standard_normal((2, 4, 9, 11)).astype(np.float32)
        out["latents"] = latents
        for upscaler, (mode, antialias) in LATENT_UPSCALE_MODES.items():
            for height, width in LATENT_UPSCALE_SIZES:
                out[f"{upscaler}.{height}x{width}"] = torch.nn.functional.interpolate(
                    torch.from_numpy(latents), size=(height, width), mode=mode, antialias=antialias
                ).numpy()
    np.savez_compressed(REFERENCE / "hires_fix.npz", **out)
    print(f"wrote {REFERENCE / 'hires_fix.npz'}")


if __name__ == "__main__":
    main()
