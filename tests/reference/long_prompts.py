"""Reference for prompts longer than CLIP's 77 tokens, computed with
transformers + diffusers on the tiny models.

Other tools (A1111, compel) split such a prompt into chunks of 75 tokens, wrap
each in start/end tokens padded to 77, encode the chunks separately and
concatenate the hidden states; the shorter of prompt and negative prompt is
padded with empty chunks, and SDXL's pooled embedding is the first chunk's.
This script does that in PyTorch and runs the diffusers pipelines on the
resulting embeddings with given noise.

Run from the repository root (needs requirements-dev.txt):

    python -m tests.reference.long_prompts
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler

from tests.reference.inputs import (
    IMAGE_SIZE,
    LONG_NEGATIVE_PROMPT,
    LONG_PROMPT,
    MODELS,
    REFERENCE,
)


def chunk_ids(tokenizer, text: str) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    chunks = [ids[i : i + 75] for i in range(0, max(len(ids), 1), 75)]
    pad = tokenizer.pad_token_id
    rows = []
    for chunk in chunks:
        row = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
        rows.append(row + [pad] * (77 - len(row)))
    return rows


def embeddings(pipe, texts: list[str], is_xl: bool):
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if is_xl:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    n_chunks = max(len(chunk_ids(t, text)) for t, _ in pairs for text in texts)
    per_text: dict[str, list] = {text: [] for text in texts}
    pooled: dict[str, torch.Tensor] = {}
    for tokenizer, encoder in pairs:
        for text in texts:
            rows = chunk_ids(tokenizer, text)
            rows += chunk_ids(tokenizer, "") * (n_chunks - len(rows))
            output = encoder(torch.tensor(rows), output_hidden_states=True)
            states = output.hidden_states[-2] if is_xl else output.last_hidden_state
            per_text[text].append(states.reshape(1, -1, states.shape[-1]))
            if encoder is getattr(pipe, "text_encoder_2", None):
                pooled[text] = output.text_embeds[:1]
    hidden = {text: torch.cat(parts, dim=-1) for text, parts in per_text.items()}
    return hidden, pooled, n_chunks


def main() -> None:
    out: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(42)
    noise = rng.standard_normal((1, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)).astype(np.float32)
    out["noise"] = noise
    for name in ("tiny-sd2", "tiny-sdxl"):
        pipe = DiffusionPipeline.from_pretrained(MODELS / name)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        is_xl = name == "tiny-sdxl"
        with torch.no_grad():
            hidden, pooled, n_chunks = embeddings(pipe, [LONG_PROMPT, LONG_NEGATIVE_PROMPT], is_xl)
            assert n_chunks > 1, "the long prompt must need several chunks"
            kwargs = {
                "prompt_embeds": hidden[LONG_PROMPT],
                "negative_prompt_embeds": hidden[LONG_NEGATIVE_PROMPT],
            }
            if is_xl:
                kwargs["pooled_prompt_embeds"] = pooled[LONG_PROMPT]
                kwargs["negative_pooled_prompt_embeds"] = pooled[LONG_NEGATIVE_PROMPT]
            images = pipe(
                **kwargs,
                num_inference_steps=3,
                guidance_scale=7.5,
                latents=torch.from_numpy(noise),
                height=IMAGE_SIZE,
                width=IMAGE_SIZE,
                output_type="np",
            ).images
        out[f"{name}.context"] = hidden[LONG_PROMPT].numpy()
        out[f"{name}.images"] = images
        print(f"{name}: {n_chunks} chunks")
    np.savez_compressed(REFERENCE / "long_prompts.npz", **out)


if __name__ == "__main__":
    main()
