"""`fast_cpu()` swaps the CPU subclasses into a model's layers and restores them on exit,
leaving the weights' keys alone; outside it the models are plain, lazy MLX."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from stable_diffusion import fast_cpu, loading
from stable_diffusion.cpu import kernels
from stable_diffusion.cpu.layers import SUBCLASSES
from stable_diffusion.loading.folder import load_text_encoder, load_unet
from stable_diffusion.models import layers
from tests.helpers import FIXTURES


def classes(model: nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_fast_cpu_swaps_every_layer_and_restores_it(model):
    folder = FIXTURES / "models" / model
    unet = load_unet(folder / "unet", mx.float32)
    encoder = load_text_encoder(folder / "text_encoder", mx.float32)
    loading.quantize(encoder, bits=8)
    before = {"unet": classes(unet), "encoder": classes(encoder)}
    keys = [k for k, _ in nn.utils.tree_flatten(unet.parameters())]
    swappable = {cls for found in before.values() for cls in found.values()} & SUBCLASSES.keys()
    assert layers.QuantizedLinear in swappable and layers.Conv2d in swappable
    with mx.stream(mx.cpu), fast_cpu():  # loaded models: tracked
        swapped = {"unet": classes(unet), "encoder": classes(encoder)}
        for name, found in swapped.items():
            assert found == {path: SUBCLASSES.get(cls, cls) for path, cls in before[name].items()}
        with fast_cpu(unet):  # nested: the outer block restores them, not this one
            pass
        assert classes(unet) == swapped["unet"]
        assert [k for k, _ in nn.utils.tree_flatten(unet.parameters())] == keys
    assert {"unet": classes(unet), "encoder": classes(encoder)} == before


def test_outside_fast_cpu_the_models_stay_lazy(monkeypatch):
    """No eager kernel runs outside a block: MLX's own attention, layer norm and GEGLU."""

    def refuse(*args, **kwargs):
        raise AssertionError("an eager kernel ran outside fast_cpu()")

    for name in ("attention", "layer_norm", "geglu_", "silu_"):
        monkeypatch.setattr(kernels, name, refuse)
    monkeypatch.setattr(mx, "eval", refuse)
    folder = FIXTURES / "models" / "tiny-sd1"
    unet = load_unet(folder / "unet", mx.float32)
    with fast_cpu(unet):
        pass
    out = unet(mx.zeros((1, 8, 8, 4)), mx.array([1.0]), mx.zeros((1, 77, 32)))
    assert out.shape == (1, 8, 8, 4)
