"""Reference for inpainting: diffusers' StableDiffusionInpaintPipeline and
StableDiffusionXLInpaintPipeline on tiny models, with an inpainting UNet (9 input channels)
and with the ordinary (4-channel) tiny models.

It builds the tiny inpainting UNets (SD 1.x-like and SDXL-like, sharing the other
components of tiny-sd1 / tiny-sdxl; the SDXL one smaller than tiny-sdxl's to keep the
fixtures small) and stores only their UNet folders. The SD 1.x one is also written in the
original single-file layout, which diffusers' own `from_single_file` must load to the same
parameters (its digest is recorded; the tests write the file again).

Determinism, honestly: the pipelines would draw the initial noise from torch's RNG and
*sample* the VAE posterior of the image and of the masked image (`retrieve_latents` in
"sample" mode). The noise is given, and `retrieve_latents` is patched to take the posterior
mean ("argmax"), which is what our encoder computes (`given_img2img_noise`). Everything else
(mask binarization and resizing, the masked image, the noise levels of the unmasked region)
is diffusers' own code.

Run from the repository root (needs requirements-dev.txt):

    python -m tests.reference.inpainting
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from tests.reference.inputs import (
    IMAGE_SIZE,
    INPAINT_NEGATIVE_PROMPT,
    INPAINT_PROMPT,
    INPAINT_SAMPLERS,
    INPAINT_STEPS,
    INPAINT_STRENGTHS,
    INPAINTING,
    MODELS,
    REFERENCE,
    inpainting_mask,
    inpainting_model,
)
from tests.reference.original_layout import digest, folder_to_original, write_safetensors
from tests.reference.tiny_models import given_img2img_noise, randomize_norms, sd_unet

SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
}


def inpainting_unets(generator: torch.Generator) -> dict[str, UNet2DConditionModel]:
    sd1 = UNet2DConditionModel.from_config(sd_unet(False, (4, 4)).config, in_channels=9)
    sdxl = UNet2DConditionModel(
        in_channels=9,
        sample_size=IMAGE_SIZE // 8,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=8,
    )
    for unet in (sd1, sdxl):
        assert unet.conv_in.in_channels == 9
        randomize_norms(unet, generator)
    return {"tiny-sd1-inpainting": sd1, "tiny-sdxl-inpainting": sdxl}


def run(pipe, image: np.ndarray, mask: np.ndarray, noise: np.ndarray, strength: float):
    with given_img2img_noise(pipe, noise):
        return pipe(
            prompt=INPAINT_PROMPT,
            negative_prompt=INPAINT_NEGATIVE_PROMPT,
            image=Image.fromarray(image),
            mask_image=Image.fromarray(mask),
            strength=strength,
            num_inference_steps=INPAINT_STEPS,
            guidance_scale=7.5,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            output_type="np",
        ).images


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(3)
    shutil.rmtree(INPAINTING, ignore_errors=True)
    for name, unet in inpainting_unets(generator).items():
        unet.save_pretrained(INPAINTING / name / "unet", safe_serialization=True)
    rng = np.random.default_rng(11)
    shape = (1, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    out = {
        "image": (rng.uniform(0, 1, (IMAGE_SIZE, IMAGE_SIZE, 3)) * 255).astype(np.uint8),
        "mask": inpainting_mask(),
        "noise": rng.standard_normal(shape).astype(np.float32),
    }
    expected = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        folders = {
            "tiny-sd1": MODELS / "tiny-sd1",
            "tiny-sdxl": MODELS / "tiny-sdxl",
            "tiny-sd1-inpainting": inpainting_model("tiny-sd1-inpainting", Path(tmp)),
            "tiny-sdxl-inpainting": inpainting_model("tiny-sdxl-inpainting", Path(tmp)),
        }
        for name, folder in folders.items():
            xl = "sdxl" in name
            cls = StableDiffusionXLInpaintPipeline if xl else StableDiffusionInpaintPipeline
            pipe = cls.from_pretrained(folder, torch_dtype=torch.float32)
            base_config = pipe.scheduler.config
            for strength in INPAINT_STRENGTHS:
                out[f"{name}.euler.{strength}"] = run(
                    pipe, out["image"], out["mask"], out["noise"], strength
                )
            if name == "tiny-sd1":
                for sampler in INPAINT_SAMPLERS[1:]:
                    pipe.scheduler = SCHEDULERS[sampler].from_config(base_config)
                    out[f"{name}.{sampler}.0.6"] = run(
                        pipe, out["image"], out["mask"], out["noise"], 0.6
                    )

        # The SD 1.x inpainting model as a single file: diffusers loads it to the folder's
        # parameters.
        folder = folders["tiny-sd1-inpainting"]
        weights = folder_to_original(folder, "sd1")
        path = Path(tmp) / "tiny-sd1-inpainting.safetensors"
        write_safetensors(weights, path)
        single = StableDiffusionInpaintPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32
        )
        reference = StableDiffusionInpaintPipeline.from_pretrained(folder)
        for component in ("unet", "vae", "text_encoder"):
            ours, theirs = (getattr(p, component).state_dict() for p in (single, reference))
            assert ours.keys() == theirs.keys(), component
            assert all(torch.equal(ours[k], v) for k, v in theirs.items()), component
        expected["tiny-sd1-inpainting.safetensors"] = digest(weights)
    np.savez_compressed(REFERENCE / "inpainting.npz", **out)
    (INPAINTING / "expected.json").write_text(json.dumps({"digests": expected}, indent=2) + "\n")
    print(f"wrote {INPAINTING} and {REFERENCE / 'inpainting.npz'}")


if __name__ == "__main__":
    main()
