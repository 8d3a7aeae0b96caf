"""Build the tiny random-weight pipelines the tests use and record what the
reference implementation (diffusers + transformers on PyTorch) computes on them.

The models have the real architectures' structure and the real diffusers key
layouts (SD 1.x conv projections and quick_gelu CLIP; SD 2.x linear projections
and per-block head counts; SDXL two text encoders, transformer_layers_per_block
> 1 and the text_time embedding), only with tiny widths. They are saved in the
diffusers folder layout, so the tests load them through the same code path a hub
download takes.

Run from the repository root (needs requirements-dev.txt):

    python -m tests.reference.tiny_models
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from stable_diffusion.tokenizer import clip_vocabulary
from tests.reference.inputs import IMAGE_SIZE, MODELS, NEGATIVE_PROMPTS, PROMPTS, REFERENCE

TINY_VOCAB_MERGES = 2000

SD_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}

VAE_KWARGS = dict(
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=IMAGE_SIZE,
)


def write_tokenizer(folder: Path, pad_token: str) -> CLIPTokenizer:
    vocab, merges = clip_vocabulary(max_merges=TINY_VOCAB_MERGES)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        pad_token=pad_token,
        model_max_length=77,
    )
    tokenizer.save_pretrained(folder)
    # Hub SD repos ship only the slow tokenizer's files; so do the fixtures.
    (folder / "tokenizer.json").unlink(missing_ok=True)
    return tokenizer


def text_encoder_config(hidden_act: str, vocab_size: int, legacy_eos: bool = False):
    # Real SD 1.x configs carry eos_token_id 2, which makes transformers pool at
    # the highest token id; newer configs name the real end-of-text id.
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=32,
        bos_token_id=vocab_size - 2,
        eos_token_id=2 if legacy_eos else vocab_size - 1,
        pad_token_id=1,
    )


def sd_unet(use_linear_projection: bool, heads: tuple[int, int]) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8,
        block_out_channels=(16, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=heads,
        use_linear_projection=use_linear_projection,
        norm_num_groups=8,
    )


def sdxl_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8,
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 2, 3),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=8,
    )


def build_sd(name: str, hidden_act: str, use_linear_projection: bool) -> StableDiffusionPipeline:
    folder = MODELS / name
    tokenizer = write_tokenizer(folder / "tokenizer", "<|endoftext|>")
    legacy_eos = hidden_act == "quick_gelu"
    text_encoder = CLIPTextModel(text_encoder_config(hidden_act, len(tokenizer), legacy_eos))
    heads = (2, 4) if use_linear_projection else (4, 4)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE_KWARGS, scaling_factor=0.18215),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=sd_unet(use_linear_projection, heads),
        scheduler=EulerDiscreteScheduler.from_config(SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def build_sdxl(name: str) -> StableDiffusionXLPipeline:
    folder = MODELS / name
    tokenizer = write_tokenizer(folder / "tokenizer", "<|endoftext|>")
    tokenizer_2 = write_tokenizer(folder / "tokenizer_2", "!")
    text_encoder = CLIPTextModel(text_encoder_config("quick_gelu", len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config("gelu", len(tokenizer)))
    scheduler = EulerDiscreteScheduler.from_config({**SD_SCHEDULER, "timestep_spacing": "trailing"})
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**VAE_KWARGS, scaling_factor=0.13025, force_upcast=True),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=sdxl_unet(),
        scheduler=scheduler,
    )


def randomize_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm layers start as identity; give them random affine parameters so a
    mapping bug in their keys cannot hide."""
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm | torch.nn.LayerNorm):
            with torch.no_grad():
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))


def component_references(pipe, is_xl: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    encoders = [("text_encoder", pipe.text_encoder, pipe.tokenizer)]
    if is_xl:
        encoders.append(("text_encoder_2", pipe.text_encoder_2, pipe.tokenizer_2))
    for name, encoder, tokenizer in encoders:
        ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        result = encoder(torch.tensor(ids), output_hidden_states=True)
        out[f"{name}.input_ids"] = np.array(ids, dtype=np.int32)
        out[f"{name}.last_hidden_state"] = result.last_hidden_state.numpy()
        out[f"{name}.penultimate_hidden_state"] = result.hidden_states[-2].numpy()
        pooled = result.text_embeds if is_xl and name == "text_encoder_2" else result.pooler_output
        out[f"{name}.pooled"] = pooled.numpy()

    latents = rng.standard_normal((2, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)).astype(np.float32)
    context = rng.standard_normal((2, 77, pipe.unet.config.cross_attention_dim)).astype(np.float32)
    timesteps = np.array([999.0, 411.5], dtype=np.float32)
    kwargs = {}
    if is_xl:
        text_embeds = rng.standard_normal((2, 32)).astype(np.float32)
        time_ids = np.array(
            [[1024, 768, 0, 0, 1024, 768], [512, 512, 16, 32, 768, 1024]], np.float32
        )
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.from_numpy(text_embeds),
            "time_ids": torch.from_numpy(time_ids),
        }
        out["unet.text_embeds"], out["unet.time_ids"] = text_embeds, time_ids
    noise_pred = pipe.unet(
        torch.from_numpy(latents), torch.from_numpy(timesteps), torch.from_numpy(context), **kwargs
    ).sample
    out.update({"unet.latents": latents, "unet.timesteps": timesteps, "unet.context": context})
    out["unet.output"] = noise_pred.numpy()

    images = rng.uniform(-1, 1, (2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    posterior = pipe.vae.encode(torch.from_numpy(images)).latent_dist
    out["vae.images"] = images
    out["vae.encoded_mean"] = posterior.mean.numpy()
    out["vae.encoded_std"] = posterior.std.numpy()
    out["vae.decoded"] = pipe.vae.decode(torch.from_numpy(latents)).sample.numpy()
    return out


@contextmanager
def given_img2img_noise(pipe, noise: np.ndarray) -> Iterator[None]:
    """Make a diffusers img2img pipeline use `noise` and the VAE posterior mean:
    it would draw from torch's RNG and sample the posterior, which no other
    implementation can reproduce."""
    module = sys.modules[type(pipe).__module__]
    original_randn, original_retrieve = module.randn_tensor, module.retrieve_latents
    module.randn_tensor = lambda *args, **kwargs: torch.from_numpy(noise)
    module.retrieve_latents = lambda output, generator=None, sample_mode="sample": (
        original_retrieve(output, generator, "argmax")
    )
    try:
        yield
    finally:
        module.randn_tensor, module.retrieve_latents = original_randn, original_retrieve


def pipeline_references(pipe, img2img_class, is_xl, rng) -> dict[str, np.ndarray]:
    """Whole txt2img and img2img runs with the Euler sampler and given noise."""
    out: dict[str, np.ndarray] = {}
    shape = (2, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    noise = rng.standard_normal(shape).astype(np.float32)
    common = dict(prompt=PROMPTS, output_type="np", height=IMAGE_SIZE, width=IMAGE_SIZE)
    for cfg in (0.0, 7.5):
        out[f"txt2img.cfg{cfg}"] = pipe(
            **common,
            negative_prompt=NEGATIVE_PROMPTS,
            num_inference_steps=4,
            guidance_scale=cfg,
            latents=torch.from_numpy(noise),
        ).images
    out["txt2img.noise"] = noise

    init_image = (rng.uniform(0, 1, (IMAGE_SIZE, IMAGE_SIZE, 3)) * 255).astype(np.uint8)
    img2img_noise = rng.standard_normal(shape).astype(np.float32)
    img2img = img2img_class(**pipe.components)
    with given_img2img_noise(img2img, img2img_noise):
        for strength in (0.5, 0.75):
            out[f"img2img.strength{strength}"] = img2img(
                prompt=PROMPTS,
                negative_prompt=NEGATIVE_PROMPTS,
                image=[Image.fromarray(init_image)] * 2,
                strength=strength,
                num_inference_steps=4,
                guidance_scale=7.5,
                output_type="np",
            ).images
    out["img2img.image"] = init_image
    out["img2img.noise"] = img2img_noise
    return out


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    shutil.rmtree(MODELS, ignore_errors=True)
    REFERENCE.mkdir(parents=True, exist_ok=True)
    builds = {
        "tiny-sd1": lambda: build_sd("tiny-sd1", "quick_gelu", use_linear_projection=False),
        "tiny-sd2": lambda: build_sd("tiny-sd2", "gelu", use_linear_projection=True),
        "tiny-sdxl": lambda: build_sdxl("tiny-sdxl"),
    }
    for seed, (name, build) in enumerate(builds.items()):
        pipe = build()
        for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if getattr(pipe, component, None) is not None:
                randomize_norms(getattr(pipe, component), generator)
        pipe.save_pretrained(MODELS / name, safe_serialization=True)
        is_xl = isinstance(pipe, StableDiffusionXLPipeline)
        img2img_class = (
            StableDiffusionXLImg2ImgPipeline if is_xl else StableDiffusionImg2ImgPipeline
        )
        rng = np.random.default_rng(seed)
        with torch.no_grad():
            refs = component_references(pipe, is_xl, rng)
            refs.update(pipeline_references(pipe, img2img_class, is_xl, rng))
        np.savez_compressed(REFERENCE / f"{name}.npz", **refs)
        print(f"wrote {MODELS / name} and {REFERENCE / name}.npz")


if __name__ == "__main__":
    main()
