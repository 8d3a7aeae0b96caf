"""Build a random-weight TAESD at the real architecture and record what diffusers'
AutoencoderTiny computes with it: its encoder and decoder alone, and a whole
tiny-sd1 txt2img run with `pipe.vae` replaced by it (as diffusers' docs use TAESD).

The random weights are He-initialised at 0.7 of the gain that keeps a ReLU network's
activations at unit scale (the residual blocks add up: at full gain activations grow
100x, at the default init they vanish and every pixel clamps to black); the decoder's
last bias centres its output, so few pixels clamp (the decoder's images: 2%; the
txt2img run's: 42%). They are rounded to float16 and stored so (4.9 MB instead of
9.8), and the reference runs in float32 on the rounded values: loading them in
float32 is exact.
The folder's config.json is madebyollin/taesd's as the hub ships it.

Run from the repository root after tests.reference.tiny_models (needs
requirements-dev.txt):

    python -m tests.reference.tiny_autoencoder
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline
from safetensors.torch import save_file

from tests.reference.inputs import IMAGE_SIZE, MODELS, NEGATIVE_PROMPTS, PROMPTS, REFERENCE

# madebyollin/taesd's config.json, key for key (the hub's current revision, saved by
# diffusers 0.30; madebyollin/taesdxl has the same architecture).
TAESD_CONFIG = {
    "_class_name": "AutoencoderTiny",
    "_diffusers_version": "0.30.0",
    "act_fn": "relu",
    "decoder_block_out_channels": [64, 64, 64, 64],
    "encoder_block_out_channels": [64, 64, 64, 64],
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 3, 1],
    "num_encoder_blocks": [1, 3, 3, 3],
    "out_channels": 3,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "upsample_fn": "nearest",
    "upsampling_scaling_factor": 2,
}
FOLDER = MODELS / "taesd"


def build() -> AutoencoderTiny:
    torch.manual_seed(0)
    model = AutoencoderTiny.from_config(TAESD_CONFIG).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, 0.7 * (2 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.normal_(0, 0.05)
        model.decoder.layers[-1].bias.add_(0.35)
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    shutil.rmtree(FOLDER, ignore_errors=True)
    FOLDER.mkdir(parents=True)
    (FOLDER / "config.json").write_text(json.dumps(TAESD_CONFIG, indent=2) + "\n")
    weights = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(FOLDER / "diffusion_pytorch_model.safetensors"))
    return model


def main() -> None:
    model = build()
    rng = np.random.default_rng(22)
    out: dict[str, np.ndarray] = {}
    images = rng.uniform(-1, 1, (2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    latents = rng.standard_normal((2, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)).astype(np.float32)
    with torch.no_grad():
        out["images"], out["encoded"] = images, model.encode(torch.from_numpy(images)).latents
        out["latents"], out["decoded"] = latents, model.decode(torch.from_numpy(latents)).sample

        pipe = StableDiffusionPipeline.from_pretrained(
            MODELS / "tiny-sd1", safety_checker=None, requires_safety_checker=False
        )
        pipe.vae = model
        noise = rng.standard_normal((2, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)).astype(np.float32)
        out["txt2img.noise"] = noise
        out["txt2img"] = pipe(
            prompt=PROMPTS,
            negative_prompt=NEGATIVE_PROMPTS,
            num_inference_steps=4,
            guidance_scale=7.5,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            latents=torch.from_numpy(noise),
            output_type="np",
        ).images
    out = {k: np.asarray(v) for k, v in out.items()}
    for name in ("encoded", "decoded", "txt2img"):
        print(
            f"{name}: std {out[name].std():.3g}, range [{out[name].min():.3g}, "
            f"{out[name].max():.3g}]"
        )
    np.savez_compressed(REFERENCE / "tiny_autoencoder.npz", **out)
    print(f"wrote {FOLDER} and {REFERENCE / 'tiny_autoencoder.npz'}")


if __name__ == "__main__":
    main()
