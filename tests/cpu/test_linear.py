"""The CPU's linear layers within `fast_cpu()`: quantized weights dequantized as each layer
runs, exactly, with the quantized matmul's result; the bias added after the matmul."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from stable_diffusion import fast_cpu, loading
from stable_diffusion.cpu import layers as cpu_layers
from stable_diffusion.models import layers


@pytest.mark.parametrize("bits", [3, 4, 8])  # 3: mx.dequantize, not the fused pass
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_quantized_linear_matches_mlx_quantized_matmul(bits, bias):
    """On the CPU the weight is dequantized and multiplied in float32 (MLX's quantized
    matmul is much slower there): same result as the quantized matmul, 1e-5 relative."""
    model = nn.Sequential(layers.Linear(128, 96, bias=bias))
    loading.quantize(model, bits=bits)
    layer = model.layers[0]
    assert type(layer) is layers.QuantizedLinear and layer.bits == bits
    x = mx.random.normal((2, 7, 128), key=mx.random.key(3))
    with mx.stream(mx.cpu), fast_cpu(model):
        assert type(layer) is cpu_layers.QuantizedLinear
        ours = np.array(layer(x))
        theirs = np.array(nn.QuantizedLinear.__call__(layer, x))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_cpu_dequantization_is_exact(bits, dtype):
    layer = layers.Linear(256, 48)
    layer.set_dtype(dtype)
    quantized = layer.to_quantized(group_size=64, bits=bits)
    # The exact values: mx.dequantize with the scales and biases in float32.
    expected = mx.dequantize(
        quantized.weight,
        quantized.scales.astype(mx.float32),
        quantized.biases.astype(mx.float32),
        group_size=64,
        bits=bits,
    )
    with mx.stream(mx.cpu):
        ours = cpu_layers.dequantize(quantized)
    assert ours.dtype == mx.float32
    np.testing.assert_array_equal(np.array(ours), np.array(expected))
