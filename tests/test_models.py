"""Parity of each model component with diffusers/transformers on the tiny
random-weight models (fixtures written by tests/reference/tiny_models.py).

Tolerance, float32: max |ours - reference| <= 1e-4 * max |reference| (+ 1e-5
absolute for values near zero)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion import loading
from tests.helpers import FIXTURES, assert_close, nchw, nhwc, reference
from tests.reference.inputs import PROMPTS

MODELS = ["tiny-sd1", "tiny-sd2", "tiny-sdxl"]


@pytest.mark.parametrize("model", MODELS)
def test_text_encoders_match_transformers(model):
    ref = reference(model)
    names = ["text_encoder", "text_encoder_2"] if model == "tiny-sdxl" else ["text_encoder"]
    for name in names:
        folder = FIXTURES / "models" / model
        tokenizer = loading.load_tokenizer(folder / name.replace("text_encoder", "tokenizer"))
        ids = tokenizer.encode(PROMPTS)
        np.testing.assert_array_equal(np.array(ids), ref[f"{name}.input_ids"])
        encoder = loading.load_text_encoder(folder / name, mx.float32)
        output = encoder(mx.array(ids))
        assert_close(output.last_hidden_state, ref[f"{name}.last_hidden_state"])
        assert_close(output.penultimate_hidden_state, ref[f"{name}.penultimate_hidden_state"])
        assert_close(output.pooled, ref[f"{name}.pooled"])


@pytest.mark.parametrize("model", MODELS)
def test_unet_matches_diffusers(model):
    assert_unet_matches(model, reference(model))


def assert_unet_matches(model: str, ref: dict[str, np.ndarray]) -> None:
    unet = loading.load_unet(FIXTURES / "models" / model / "unet", mx.float32)
    extra = {}
    if model == "tiny-sdxl":
        extra = {
            "text_embeds": mx.array(ref["unet.text_embeds"]),
            "time_ids": mx.array(ref["unet.time_ids"]),
        }
    output = unet(
        nhwc(ref["unet.latents"]),
        mx.array(ref["unet.timesteps"]),
        mx.array(ref["unet.context"]),
        **extra,
    )
    assert_close(mx.array(nchw(output)), ref["unet.output"])


@pytest.mark.parametrize("model", MODELS)
def test_vae_matches_diffusers(model):
    assert_vae_matches(model, reference(model))


def assert_vae_matches(model: str, ref: dict[str, np.ndarray]) -> None:
    vae = loading.load_vae(FIXTURES / "models" / model / "vae", mx.float32)
    mean, std = vae.encode(nhwc(ref["vae.images"]))
    assert_close(mx.array(nchw(mean)), ref["vae.encoded_mean"])
    assert_close(mx.array(nchw(std)), ref["vae.encoded_std"])
    decoded = vae.decode(nhwc(ref["unet.latents"]))
    assert_close(mx.array(nchw(decoded)), ref["vae.decoded"])


@pytest.mark.parametrize("model", MODELS)
def test_by_winograd_matches_diffusers(model, winograd_everywhere):
    """Every convolution by Winograd (each algorithm in turn), UNet and VAE."""
    ref = reference(model)
    assert_unet_matches(model, ref)
    assert_vae_matches(model, ref)
    assert winograd_everywhere, "no convolution ran by Winograd"


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
    full = loading.load_unet(folder, mx.float32)(*args)
    half = loading.load_unet(folder, mx.float16)
    assert half.conv_in.weight.dtype == mx.float16
    out = half(*args)
    assert out.dtype == mx.float32
    assert_close(out, np.array(full), rtol=3e-3)
