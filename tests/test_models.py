"""Parity of each model component with diffusers/transformers on the tiny
random-weight models (fixtures written by tests/reference/tiny_models.py).

Tolerance, float32: max |ours - reference| <= 1e-4 * max |reference| (+ 1e-5
absolute for values near zero)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion.loading.folder import load_text_encoder, load_tokenizer, load_unet, load_vae
from tests.conftest import FIXTURES
from tests.reference.inputs import PROMPTS

MODELS = ["tiny-sd1", "tiny-sd2", "tiny-sdxl"]


def assert_close(ours: mx.array, reference: np.ndarray, rtol: float = 1e-4) -> None:
    ours = np.array(ours.astype(mx.float32))
    assert ours.shape == reference.shape
    error = np.abs(ours - reference).max()
    assert error <= rtol * np.abs(reference).max() + 1e-5, f"max abs error {error}"


def nhwc(x: np.ndarray) -> mx.array:
    return mx.array(x.transpose(0, 2, 3, 1))


def nchw(x: mx.array) -> np.ndarray:
    return np.array(x).transpose(0, 3, 1, 2)


def reference(model: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "reference" / f"{model}.npz"))


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


def assert_unet_matches(model: str, ref: dict[str, np.ndarray], unet=None) -> None:
    unet = unet or load_unet(FIXTURES / "models" / model / "unet", mx.float32)
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


def assert_vae_matches(model: str, ref: dict[str, np.ndarray], vae=None) -> None:
    vae = vae or load_vae(FIXTURES / "models" / model / "vae", mx.float32)
    mean, std = vae.encode(nhwc(ref["vae.images"]))
    assert_close(mx.array(nchw(mean)), ref["vae.encoded_mean"])
    assert_close(mx.array(nchw(std)), ref["vae.encoded_std"])
    decoded = vae.decode(nhwc(ref["unet.latents"]))
    assert_close(mx.array(nchw(decoded)), ref["vae.decoded"])


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
