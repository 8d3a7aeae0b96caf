"""References for the prompt conventions people bring from A1111, on the tiny models.

* Weighting: A1111's rules (modules/sd_hijack_clip.py, sd_emphasis.py "Original") written
  here in PyTorch on transformers' CLIP: each fragment tokenized on its own, chunks of 75
  tokens (a BREAK starts one), each chunk's hidden states multiplied by the token weights
  and rescaled to the chunk's mean before weighting; SDXL does it per text encoder. The
  fragments are given (tests/reference/inputs.py), not parsed by our code.
* Clip skip: diffusers' `encode_prompt(clip_skip=N - 1)` (A1111's N). diffusers' pipelines
  apply clip_skip to the prompt only; A1111 to the negative prompt as well, so the negative
  prompt's embeddings are diffusers' encode_prompt of it with the same clip_skip.
* Textual inversion: embedding files written here in A1111's and diffusers' layouts, loaded
  by diffusers' `load_textual_inversion`.

Each case records the text encoders' output and the images of a few Euler steps (given
noise) of the diffusers pipeline on those embeddings.

Run from the repository root (needs requirements-dev.txt):

    python -m tests.reference.prompt_conventions
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

from tests.reference.inputs import (
    CLIP_SKIP,
    CONVENTION_STEPS,
    DIFFUSERS_EMBEDDING,
    DIFFUSERS_EMBEDDING_PROMPT,
    DIFFUSERS_EMBEDDING_TOKEN,
    EMBEDDING_NEGATIVE_PROMPT,
    EMBEDDING_PROMPT,
    IMAGE_SIZE,
    MODELS,
    REFERENCE,
    WEIGHTED_FRAGMENTS,
    WEIGHTED_NEGATIVE_FRAGMENTS,
    WEIGHTED_NEGATIVE_PROMPT,
    WEIGHTED_PROMPT,
)

EMBEDDINGS = MODELS.parent / "embeddings"
CFG = 7.5


def weighted_chunks(tokenizer, segments) -> tuple[list[list[int]], list[list[float]]]:
    rows, weights = [], []
    for index, segment in enumerate(segments):
        ids, token_weights = [], []
        for text, weight in segment:
            fragment = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
            ids += fragment
            token_weights += [weight] * len(fragment)
        if index and index == len(segments) - 1 and not ids:
            break
        for start in range(0, max(len(ids), 1), 75):
            chunk = ids[start : start + 75]
            row = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
            rows.append(row + [tokenizer.pad_token_id] * (77 - len(row)))
            chunk_weights = [1.0, *token_weights[start : start + 75]]
            weights.append(chunk_weights + [1.0] * (77 - len(chunk_weights)))
    return rows, weights


def emphasis(z: torch.Tensor, weights: list[list[float]]) -> torch.Tensor:
    # sd_emphasis.EmphasisOriginal.after_transformers, for each chunk of one prompt.
    out = []
    for chunk, chunk_weights in zip(z, weights, strict=True):
        original_mean = chunk.mean()
        chunk = chunk * torch.tensor(chunk_weights)[:, None]
        out.append(chunk * (original_mean / chunk.mean()))
    return torch.stack(out)


def weighted_embeddings(pipe, prompts: list, is_xl: bool):
    """(hidden states, pooled) of each prompt's fragments, padded to a common chunk count."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if is_xl:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    n_chunks = max(len(weighted_chunks(t, p)[0]) for t, _ in pairs for p in prompts)
    hidden, pooled = [[] for _ in prompts], [None for _ in prompts]
    for tokenizer, encoder in pairs:
        empty_rows, empty_weights = weighted_chunks(tokenizer, [[("", 1.0)]])
        for i, segments in enumerate(prompts):
            rows, weights = weighted_chunks(tokenizer, segments)
            padding = n_chunks - len(rows)
            rows, weights = rows + empty_rows * padding, weights + empty_weights * padding
            output = encoder(torch.tensor(rows), output_hidden_states=True)
            z = output.hidden_states[-2] if is_xl else output.last_hidden_state
            hidden[i].append(emphasis(z, weights).reshape(1, -1, z.shape[-1]))
            if encoder is getattr(pipe, "text_encoder_2", None):
                pooled[i] = output.text_embeds[:1]
    return [torch.cat(h, dim=-1) for h in hidden], pooled


def run(pipe, noise, is_xl, embeds, negative_embeds=None, cfg=CFG) -> np.ndarray:
    kwargs = {"prompt_embeds": embeds[0]}
    if negative_embeds is not None:
        kwargs["negative_prompt_embeds"] = negative_embeds[0]
    if is_xl:
        kwargs["pooled_prompt_embeds"] = embeds[1]
        if negative_embeds is not None:
            kwargs["negative_pooled_prompt_embeds"] = negative_embeds[1]
    return pipe(
        **kwargs,
        num_inference_steps=CONVENTION_STEPS,
        guidance_scale=cfg,
        latents=torch.from_numpy(noise),
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        output_type="np",
    ).images


def encode(pipe, prompt: str, is_xl: bool, clip_skip: int | None = None):
    """diffusers' encode_prompt of `prompt` alone: (hidden states, pooled or None)."""
    if is_xl:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, device="cpu", do_classifier_free_guidance=False, clip_skip=clip_skip
        )
        return embeds, pooled
    encoder = pipe.text_encoder
    if clip_skip is not None and not hasattr(encoder, "text_model"):
        # transformers 5 moved CLIPTextModel's final_layer_norm up a level; diffusers 0.42's
        # clip_skip path still reads text_encoder.text_model.final_layer_norm.
        encoder.text_model = SimpleNamespace(final_layer_norm=encoder.final_layer_norm)
    embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False, clip_skip=clip_skip)
    return embeds, None


def weighting(out: dict, name: str, pipe, noise, is_xl: bool) -> None:
    (hidden, negative_hidden), (pooled, negative_pooled) = weighted_embeddings(
        pipe, [WEIGHTED_FRAGMENTS, WEIGHTED_NEGATIVE_FRAGMENTS], is_xl
    )
    assert hidden.shape[1] == 2 * 77, "BREAK must start a second chunk"
    out[f"{name}.weighted.context"] = hidden.numpy()
    out[f"{name}.weighted.negative_context"] = negative_hidden.numpy()
    out[f"{name}.weighted.images"] = run(
        pipe, noise, is_xl, (hidden, pooled), (negative_hidden, negative_pooled)
    )


def clip_skip(out: dict, name: str, pipe, noise, is_xl: bool) -> None:
    skip = CLIP_SKIP - 1  # diffusers counts the layers skipped
    embeds = encode(pipe, WEIGHTED_PROMPT, is_xl, skip)
    negative = encode(pipe, WEIGHTED_NEGATIVE_PROMPT, is_xl, skip)
    out[f"{name}.clip_skip.context"] = embeds[0].numpy()
    out[f"{name}.clip_skip.images"] = run(pipe, noise, is_xl, embeds, negative)
    # Without guidance the negative prompt plays no part: diffusers' own pipeline call.
    out[f"{name}.clip_skip.images_cfg1"] = pipe(
        WEIGHTED_PROMPT,
        num_inference_steps=CONVENTION_STEPS,
        guidance_scale=1.0,
        clip_skip=skip,
        latents=torch.from_numpy(noise),
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        output_type="np",
    ).images


def write_embedding_files(rng: np.random.Generator) -> None:
    def vectors(n: int, dims: int = 32) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal((n, dims)).astype(np.float32) * 0.02)

    sd1 = EMBEDDINGS / "tiny-sd1"
    sd1.mkdir(parents=True, exist_ok=True)
    # As A1111's textual_inversion.Embedding.save writes it.
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vectors(2)},
            "name": "foxstyle",
            "step": 1000,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
        },
        sd1 / "foxstyle.pt",
    )
    save_file({"emb_params": vectors(3)}, sd1 / "snowy.safetensors")
    sdxl = EMBEDDINGS / "tiny-sdxl"
    sdxl.mkdir(parents=True, exist_ok=True)
    save_file({"clip_l": vectors(2), "clip_g": vectors(2)}, sdxl / "foxstyle.safetensors")
    diffusers_folder = EMBEDDINGS / "tiny-sd1-diffusers"
    diffusers_folder.mkdir(parents=True, exist_ok=True)
    save_file({DIFFUSERS_EMBEDDING_TOKEN: vectors(1)[0]}, diffusers_folder / DIFFUSERS_EMBEDDING)


def textual_inversion(out: dict, name: str, noise, is_xl: bool) -> None:
    pipe = DiffusionPipeline.from_pretrained(MODELS / name)
    if is_xl:
        state = load_file(EMBEDDINGS / name / "foxstyle.safetensors")
        pipe.load_textual_inversion(
            state["clip_l"],
            token="foxstyle",
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
        )
        pipe.load_textual_inversion(
            state["clip_g"],
            token="foxstyle",
            text_encoder=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer_2,
        )
    else:
        pipe.load_textual_inversion(str(EMBEDDINGS / name / "foxstyle.pt"), token="foxstyle")
        pipe.load_textual_inversion(str(EMBEDDINGS / name / "snowy.safetensors"), token="snowy")
    embeds = encode(pipe, EMBEDDING_PROMPT, is_xl)
    negative = encode(pipe, EMBEDDING_NEGATIVE_PROMPT, is_xl)
    out[f"{name}.embedding.context"] = embeds[0].numpy()
    out[f"{name}.embedding.negative_context"] = negative[0].numpy()
    out[f"{name}.embedding.images"] = pipe(
        EMBEDDING_PROMPT,
        negative_prompt=EMBEDDING_NEGATIVE_PROMPT,
        num_inference_steps=CONVENTION_STEPS,
        guidance_scale=CFG,
        latents=torch.from_numpy(noise),
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        output_type="np",
    ).images
    if not is_xl:
        pipe = DiffusionPipeline.from_pretrained(MODELS / name)
        pipe.load_textual_inversion(str(EMBEDDINGS / "tiny-sd1-diffusers" / DIFFUSERS_EMBEDDING))
        out[f"{name}.diffusers_embedding.context"] = encode(
            pipe, DIFFUSERS_EMBEDDING_PROMPT, is_xl
        )[0].numpy()


def main() -> None:
    rng = np.random.default_rng(19)
    write_embedding_files(rng)
    noise = rng.standard_normal((1, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)).astype(np.float32)
    out: dict[str, np.ndarray] = {"noise": noise}
    for name in ("tiny-sd1", "tiny-sd2", "tiny-sdxl"):
        is_xl = name == "tiny-sdxl"
        pipe = DiffusionPipeline.from_pretrained(MODELS / name)
        with torch.no_grad():
            weighting(out, name, pipe, noise, is_xl)
            clip_skip(out, name, pipe, noise, is_xl)
            if name != "tiny-sd2":
                textual_inversion(out, name, noise, is_xl)
        print(f"{name}: done")
    np.savez_compressed(REFERENCE / "prompt_conventions.npz", **out)


if __name__ == "__main__":
    main()
