"""The size check's memory estimate (`pipeline.unet_activation_bytes`): an upper bound of
what the UNet holds at once, that grows with the pixels since attention is computed in
blocks, and the refusal it makes before any work."""

from __future__ import annotations

import mlx.core as mx
import pytest

from stable_diffusion import pipeline
from stable_diffusion.loading.folder import load_unet
from stable_diffusion.models import layers
from tests.helpers import FIXTURES, MODELS

BATCH = 2  # as with CFG


def _measured_peak(unet, side: int) -> int:
    """MLX's peak allocation of one lazy UNet call on (BATCH, side, side) latents, above
    its inputs and weights."""
    config = unet.config
    x = mx.random.normal((BATCH, side, side, config.in_channels), key=mx.random.key(0))
    context = mx.random.normal((BATCH, 77, config.cross_attention_dim), key=mx.random.key(1))
    extra = {}
    if config.addition_embed_type:
        extra = {
            "text_embeds": mx.zeros(
                (
                    BATCH,
                    config.projection_class_embeddings_input_dim
                    - 6 * config.addition_time_embed_dim,
                )
            ),
            "time_ids": mx.zeros((BATCH, 6)),
        }
    mx.eval(x, context, *extra.values(), unet.parameters())
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(unet(x, mx.array([10.0]), context, **extra))
    return mx.get_peak_memory() - base


def _estimate_and_peak(monkeypatch, model: str, budget: int, side: int = 32) -> tuple[int, int]:
    monkeypatch.setattr(layers, "ATTENTION_SCORE_BUDGET", budget)
    unet = load_unet(FIXTURES / "models" / model / "unet", mx.float32)
    estimate = pipeline.unet_activation_bytes(unet.config, 8, side * 8, side * 8, BATCH)
    return estimate, _measured_peak(unet, side)


@pytest.mark.parametrize("model", MODELS)
def test_estimate_is_below_the_peak(monkeypatch, model):
    """With the attention in one block, its scores dominate the tiny models' peak."""
    estimate, measured = _estimate_and_peak(monkeypatch, model, 2**30)
    assert estimate <= measured, (estimate, measured)


@pytest.mark.parametrize("model", MODELS)
def test_estimate_is_near_the_peak_of_the_activations(monkeypatch, model):
    """In blocks of 256 KiB of scores, the activations dominate: below the peak (so that a
    refusal is sure), by less than 10x on these tiny models (whose fixed costs weigh
    more)."""
    estimate, measured = _estimate_and_peak(monkeypatch, model, 2**18)
    assert measured / 10 < estimate <= measured, (estimate, measured)
