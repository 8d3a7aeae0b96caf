"""Parity of each model component with diffusers/transformers on the tiny
random-weight models (fixtures written by tests/reference/tiny_models.py).

Tolerance, float32: max |ours - reference| <= 1e-4 * max |reference| (+ 1e-5
absolute for values near zero)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion.loading.folder import load_text_encoder, load_tokenizer, load_unet
from tests.helpers import (
    FIXTURES,
    MODELS,
    assert_close,
    assert_unet_matches,
    assert_vae_matches,
    nhwc,
    reference,
)
from tests.reference.inputs import PROMPTS


@pytest.mark.parametrize("model", MODELS)
def test_text_encoders_match_transformers(model):
    ref = reference(model)
    names = ["text_encoder", "text_encoder_2"] if model == "tiny-sdxl" else ["text_encoder"]
    for name in names:
        folder = FIXTURES / "models" / model
        tokenizer = load_tokenizer(folder / name.replace("text_encoder", "tokenizer"))
        ids = tokenizer.encode(PROMPTS)
        np.testing.assert_array_equal(np.array(ids), ref[f"{name}.input_ids"])
        encoder = load_text_encoder(folder / name, mx.float32)
        output = encoder(mx.array(ids))
        assert_close(output.last_hidden_state, ref[f"{name}.last_hidden_state"])
        assert_close(output.penultimate_hidden_state, ref[f"{name}.penultimate_hidden_state"])
        assert_close(output.pooled, ref[f"{name}.pooled"])


@pytest.mark.parametrize("model", MODELS)
def test_unet_matches_diffusers(model):
    assert_unet_matches(model, reference(model))


@pytest.mark.parametrize("model", MODELS)
def test_vae_matches_diffusers(model):
    assert_vae_matches(model, reference(model))


def test_unet_float16_weights_compute_in_float32_on_the_cpu():
    """float16 weights on the CPU only save memory: the activations stay float32 (float16
    matmuls miss the BLAS there), so only the weights' rounding remains: 1.7e-3 measured,
    3e-3 allowed, relative to the output's largest magnitude."""
    ref = reference("tiny-sd2")
    folder = FIXTURES / "models" / "tiny-sd2" / "unet"
    args = (
        nhwc(ref["unet.latents"]),
        mx.array(ref["unet.timesteps"]),
        mx.array(ref["unet.context"]),
    )
    full = load_unet(folder, mx.float32)(*args)
    half = load_unet(folder, mx.float16)
    assert half.conv_in.weight.dtype == mx.float16
    out = half(*args)
    assert out.dtype == mx.float32
    assert_close(out, np.array(full), rtol=3e-3)
