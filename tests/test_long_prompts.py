"""Prompts longer than 77 tokens are encoded in 75-token chunks, not truncated,
matching a reference computation in transformers + diffusers
(tests/reference/long_prompts.py). Tolerance as in test_pipeline.py."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion import StableDiffusion
from tests.helpers import FIXTURES
from tests.reference.inputs import LONG_NEGATIVE_PROMPT, LONG_PROMPT

REFERENCE = dict(np.load(FIXTURES / "reference" / "long_prompts.npz"))


@pytest.mark.parametrize("model", ["tiny-sd2", "tiny-sdxl"])
def test_long_prompt_matches_chunked_reference(model):
    sd = StableDiffusion(str(FIXTURES / "models" / model), float16=False)
    noise = mx.array(REFERENCE["noise"].transpose(0, 2, 3, 1))
    latents = sd.generate_latents(
        LONG_PROMPT,
        negative_text=LONG_NEGATIVE_PROMPT,
        num_steps=3,
        cfg_weight=7.5,
        sampler="euler",
        latents=noise,
    )
    for x in latents:
        mx.eval(x)
    images = np.array(sd.decode(x))
    np.testing.assert_allclose(images, REFERENCE[f"{model}.images"], atol=2e-4, rtol=0)


def test_long_prompt_is_not_truncated():
    sd = StableDiffusion(str(FIXTURES / "models" / "tiny-sd2"), float16=False)
    context, _ = sd._encode_texts([LONG_PROMPT], sd._chunk_count([LONG_PROMPT]))
    expected = REFERENCE["tiny-sd2.context"]
    assert context.shape == expected.shape and context.shape[1] > 77
    np.testing.assert_allclose(np.array(context), expected, atol=1e-4)
