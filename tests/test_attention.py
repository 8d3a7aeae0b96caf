"""The CPU's eager attention (numpy softmax, opt-in) computes what the lazy
default computes: parity with diffusers/transformers on the tiny models, same
tolerance as tests/test_models.py. The default never takes the eager path."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion import eager_cpu_attention, layers, loading
from tests.conftest import FIXTURES
from tests.test_models import assert_close, nchw, nhwc, reference


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_eager_attention_matches_reference(model):
    ref = reference(model)
    folder = FIXTURES / "models" / model
    encoder = loading.load_text_encoder(folder / "text_encoder", mx.float32)
    unet = loading.load_unet(folder / "unet", mx.float32)
    vae = loading.load_vae(folder / "vae", mx.float32)
    extra = {}
    if model == "tiny-sdxl":
        extra = {
            "text_embeds": mx.array(ref["unet.text_embeds"]),
            "time_ids": mx.array(ref["unet.time_ids"]),
        }
    with mx.stream(mx.cpu), eager_cpu_attention():
        hidden = encoder(mx.array(ref["text_encoder.input_ids"])).last_hidden_state
        noise = unet(
            nhwc(ref["unet.latents"]),
            mx.array(ref["unet.timesteps"]),
            mx.array(ref["unet.context"]),
            **extra,
        )
        decoded = vae.decode(nhwc(ref["unet.latents"]))
    assert_close(hidden, ref["text_encoder.last_hidden_state"])
    assert_close(mx.array(nchw(noise)), ref["unet.output"])
    assert_close(mx.array(nchw(decoded)), ref["vae.decoded"])


def test_default_attention_stays_lazy(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the eager attention ran outside eager_cpu_attention()")

    monkeypatch.setattr(layers, "_attention_cpu", refuse)
    q = mx.random.normal((1, 16, 8))
    out = layers.attention(q, q, q, heads=2)
    with eager_cpu_attention():
        pass
    assert np.isfinite(np.array(layers.attention(q, q, q, heads=2))).all()
    assert out.shape == (1, 16, 8)


def softmax_attention_float64(q, k, v, heads, causal):
    """Textbook multi-head attention in float64 numpy."""
    batch, q_len, width = q.shape
    dim = width // heads

    def split(x):
        return np.asarray(x, np.float64).reshape(batch, -1, heads, dim).transpose(0, 2, 1, 3)

    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(dim)
    if causal:
        scores[..., np.triu(np.ones(scores.shape[-2:], bool), 1)] = -np.inf
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return (weights @ split(v)).transpose(0, 2, 1, 3).reshape(batch, q_len, width)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_rows", [1, 5, 64])  # one row, uneven blocks, one block
def test_blocked_cpu_attention_matches_float64(monkeypatch, causal, block_rows):
    q_len = k_len = 23
    monkeypatch.setattr(layers, "_SCORE_BLOCK_ELEMENTS", block_rows * k_len)
    rng = np.random.default_rng(0)
    q, k, v = (3 * rng.standard_normal((2, n, 12), np.float32) for n in (q_len, k_len, k_len))
    with mx.stream(mx.cpu):
        out = layers._attention_cpu(mx.array(q), mx.array(k), mx.array(v), 3, causal)
    expected = softmax_attention_float64(q, k, v, 3, causal)
    np.testing.assert_allclose(np.array(out), expected, rtol=1e-5, atol=1e-5)
