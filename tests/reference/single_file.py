"""Single-file checkpoints of the tiny models, checked with diffusers' own loader, and what
diffusers computes with them.

For each tiny diffusers pipeline (tests/reference/tiny_models.py), `original_layout` writes
its weights in the original single-file layout. diffusers' `from_single_file` loads that
file and every parameter must equal the diffusers folder's: this proves the layout (the
inverse of diffusers' conversion is not part of its pip package). The outputs of the
single-file-loaded pipeline are then recorded: text encoders, UNet, VAE decoding and a short
Euler txt2img run. The tests write the same .safetensors files again (no PyTorch needed)
and check their digest; the pickled .ckpt (tiny SD 1.x in float16, wrapped in
{"state_dict": ...} with training leftovers, as real .ckpt files are) is stored.

Run from the repository root (needs requirements-dev.txt):

    python -m tests.reference.single_file
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import (
    convert_open_clip_checkpoint,
    load_single_file_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from tests.reference.inputs import FIXTURES, IMAGE_SIZE, NEGATIVE_PROMPTS, PROMPTS
from tests.reference.original_layout import digest, folder_to_original, write_safetensors

MODELS = {"tiny-sd1": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
OUT = FIXTURES / "single_file"


def open_clip_text_encoder_2(path: Path, folder: Path) -> CLIPTextModelWithProjection:
    """SDXL's second text encoder through diffusers' OpenCLIP conversion. from_single_file
    would pick it by comparing widths with the first one, which the tiny model's equal
    widths defeat: it would load the first encoder's weights instead."""
    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    state = convert_open_clip_checkpoint(model, checkpoint, prefix="conditioner.embedders.1.model.")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_with_diffusers(path: Path, folder: Path, architecture: str):
    cls = StableDiffusionXLPipeline if architecture == "sdxl" else StableDiffusionPipeline
    kwargs = {}
    if architecture == "sdxl":
        kwargs["text_encoder_2"] = open_clip_text_encoder_2(path, folder)
    return cls.from_single_file(
        str(path),
        config=str(folder),
        local_files_only=True,
        torch_dtype=torch.float32,
        **kwargs,
    )


def check_parameters(pipe, folder: Path, architecture: str, float16: bool) -> None:
    """Every parameter of the single-file pipeline equals the folder pipeline's (rounded
    to float16 for a float16 file)."""
    cls = StableDiffusionXLPipeline if architecture == "sdxl" else StableDiffusionPipeline
    reference = cls.from_pretrained(folder, torch_dtype=torch.float32)
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if architecture == "sdxl" else [])
    for name in names:
        ours = getattr(pipe, name).state_dict()
        theirs = getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys(), (name, ours.keys() ^ theirs.keys())
        for key, value in theirs.items():
            expected = value.half().float() if float16 and value.is_floating_point() else value
            assert torch.equal(ours[key], expected), f"{name}.{key} differs"
        print(f"  {name}: {len(theirs)} parameters equal")


def references(pipe, architecture: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    is_xl = architecture == "sdxl"
    out: dict[str, np.ndarray] = {}
    encoders = [("text_encoder", pipe.text_encoder, pipe.tokenizer)]
    if is_xl:
        encoders.append(("text_encoder_2", pipe.text_encoder_2, pipe.tokenizer_2))
    for name, encoder, tokenizer in encoders:
        ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        result = encoder(torch.tensor(ids), output_hidden_states=True)
        out[f"{name}.input_ids"] = np.array(ids, dtype=np.int32)
        out[f"{name}.last_hidden_state"] = result.last_hidden_state.numpy()
        pooled = result.text_embeds if name == "text_encoder_2" else result.pooler_output
        out[f"{name}.pooled"] = pooled.numpy()

    latents = rng.standard_normal((1, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)).astype(np.float32)
    context = rng.standard_normal((1, 77, pipe.unet.config.cross_attention_dim))
    context = context.astype(np.float32)
    timesteps = np.array([411.5], dtype=np.float32)
    kwargs = {}
    if is_xl:
        text_embeds = rng.standard_normal((1, 32)).astype(np.float32)
        time_ids = np.array([[512, 512, 16, 32, 768, 1024]], np.float32)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.from_numpy(text_embeds),
            "time_ids": torch.from_numpy(time_ids),
        }
        out["unet.text_embeds"], out["unet.time_ids"] = text_embeds, time_ids
    prediction = pipe.unet(
        torch.from_numpy(latents), torch.from_numpy(timesteps), torch.from_numpy(context), **kwargs
    ).sample
    out.update({"unet.latents": latents, "unet.timesteps": timesteps, "unet.context": context})
    out["unet.output"] = prediction.numpy()
    out["vae.decoded"] = pipe.vae.decode(torch.from_numpy(latents)).sample.numpy()

    noise = rng.standard_normal((1, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)).astype(np.float32)
    out["txt2img.noise"] = noise
    out["txt2img.image"] = pipe(
        prompt=PROMPTS[:1],
        negative_prompt=NEGATIVE_PROMPTS[:1],
        num_inference_steps=4,
        guidance_scale=7.5,
        latents=torch.from_numpy(noise),
        output_type="np",
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
    ).images
    return out


def write_ckpt(weights: dict[str, np.ndarray], path: Path) -> None:
    """A float16 .ckpt as training code saves them: the state dict inside a dict with
    bookkeeping, and a position_ids buffer in the text encoder."""
    state = {k: torch.from_numpy(v).half() for k, v in weights.items()}
    position_ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    state[position_ids] = torch.arange(77)[None]
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, path)


def main() -> None:
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    refs: dict[str, np.ndarray] = {}
    expected: dict = {"digests": {}}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for seed, (name, architecture) in enumerate(MODELS.items()):
            folder = FIXTURES / "models" / name
            weights = folder_to_original(folder, architecture)
            path = Path(tmp) / f"{name}.safetensors"
            write_safetensors(weights, path)
            print(f"{name}.safetensors")
            pipe = load_with_diffusers(path, folder, architecture)
            check_parameters(pipe, folder, architecture, float16=False)
            for key, value in references(pipe, architecture, np.random.default_rng(seed)).items():
                refs[f"{name}.{key}"] = value
            expected["digests"][name] = digest(weights)

            if name == "tiny-sd1":
                ckpt = OUT / f"{name}.ckpt"
                write_ckpt(weights, ckpt)
                print(ckpt.name)
                pipe = load_with_diffusers(ckpt, folder, architecture)
                check_parameters(pipe, folder, architecture, float16=True)
                for key, value in references(pipe, architecture, np.random.default_rng(9)).items():
                    refs[f"{name}.ckpt.{key}"] = value
    np.savez_compressed(OUT / "reference.npz", **refs)
    (OUT / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
