"""oneDNN's float32 compute, `fast_cpu()`'s default on CPUs with AVX-512 where oneDNN is
installed (`onednn.float32_by_default`): where it applies, which convolutions take it at
the real thresholds, and its results against float64; and the norms, which run in oneDNN
in float32 arithmetic under either precision.

Tolerance: a float32 matmul's sums are off by far less than 1e-5 of sum |x_i| |w_i| at
these sizes (against bfloat16's 2.01 * 2^-8 of it: tests/cpu/test_bfloat16.py). The models'
parity with diffusers on this path is in tests/cpu/test_kernels.py and
tests/test_odd_sizes.py."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion import fast_cpu
from stable_diffusion.cpu import features, kernels, onednn, winograd
from stable_diffusion.cpu import layers as cpu_layers
from stable_diffusion.models import layers, unet
from tests.helpers import (
    CONVOLUTIONS,
    ROOT,
    attention_bound,
    convolve_float64,
    extreme_scores,
    group_norm_float64,
    needs_bfloat16,
    recorded_recomputations,
)

# Before the `onednn_float32` fixture lowers it.
MIN_PIXELS = cpu_layers._ONEDNN_FLOAT32_MIN_PIXELS
FLOAT32_BOUND = 1e-5


def assert_float32_close(ours: mx.array, x: np.ndarray, weight: np.ndarray, bias=None):
    """Within FLOAT32_BOUND of sum |x_i| |w_i| of x @ weight.T (+ bias) in float64."""
    x64, w64 = x.astype(np.float64), weight.astype(np.float64)
    exact = x64 @ w64.T + (0 if bias is None else np.asarray(bias, np.float64))
    scale = np.abs(x64) @ np.abs(w64).T
    error = np.abs(np.array(ours, np.float64).reshape(exact.shape) - exact)
    assert (error <= FLOAT32_BOUND * scale).all(), (error / scale).max()


def test_float32_by_default_where_avx512_and_onednn_unless_disabled(monkeypatch):
    avx512 = {"avx2", "fma", *features.AVX512}
    for flags, installed, disabled, expected in [
        (avx512, True, "", True),
        (avx512, True, "0", True),
        (avx512, True, "1", False),
        ({"avx2", "fma"}, True, "", False),  # not measured on AVX2 CPUs: OpenBLAS stays
        (avx512, False, "", False),
    ]:
        monkeypatch.setattr(features, "cpu_flags", lambda flags=flags: frozenset(flags))
        monkeypatch.setattr(onednn, "installed", lambda installed=installed: installed)
        monkeypatch.setenv(onednn.FLOAT32_DISABLE_VARIABLE, disabled)
        assert onednn.float32_by_default() == expected


def test_fast_cpu_computes_float32_in_onednn_where_it_is_the_default(monkeypatch):
    layer = layers.Linear(8, 8)
    for default in (False, True):
        monkeypatch.setattr(onednn, "float32_by_default", lambda default=default: default)
        with fast_cpu(layer):
            assert onednn.active() == default and not onednn.bfloat16_active()
        assert not onednn.active()


@pytest.mark.parametrize("bias", [True, False])
def test_linear_layers_multiply_in_float32_with_their_own_weights(
    onednn_float32, monkeypatch, bias
):
    """No packed copy: the matmul reads the weight where MLX keeps it."""
    packs = []
    pack = onednn._pack
    monkeypatch.setattr(onednn, "_pack", lambda *a: packs.append(a) or pack(*a))
    layer = layers.Linear(320, 96, bias=bias)
    x = mx.random.normal((2, 37, 320), key=mx.random.key(1))
    with fast_cpu(layer):
        outputs = [layer(x) for _ in range(3)]
    assert onednn_float32 == ["linear"] * 3 and not packs
    for ours in outputs:
        assert ours.shape == (2, 37, 96) and ours.dtype == mx.float32
        assert_float32_close(
            ours,
            np.array(x).reshape(-1, 320),
            np.array(layer.weight),
            np.array(layer.bias) if bias else None,
        )


def test_float16_weights_multiply_in_float32(onednn_float32):
    layer = layers.Linear(64, 32)
    layer.update({"weight": layer.weight.astype(mx.float16), "bias": layer.bias})
    x = mx.random.normal((5, 64), key=mx.random.key(2))
    with fast_cpu(layer):
        ours = layer(x)
    assert onednn_float32 == ["linear"] and ours.dtype == mx.float32
    weight = np.array(layer.weight.astype(mx.float32))
    assert_float32_close(ours, np.array(x), weight, np.array(layer.bias))


def test_geglu_in_float32(onednn_float32, monkeypatch):
    """Each half of the projection multiplies with its rows of the weight read in place
    (`mx.contiguous` of MLX's slice copies them, from 256 rows of 64 here)."""
    weights = []
    run = onednn._run
    monkeypatch.setattr(onednn, "_run", lambda *a: weights.append(a[2]) or run(*a))
    geglu = unet.GEGLU(64, 512)
    x = mx.random.normal((1, 16, 64), key=mx.random.key(3))
    with fast_cpu(geglu):
        ours = np.array(geglu(x))
    assert onednn_float32 == ["linear", "linear"]
    whole = np.asarray(geglu.proj.weight)
    assert [w.shape for w in weights] == [(512, 64)] * 2
    assert all(np.shares_memory(w, whole) for w in weights)
    projected = np.array(x, np.float64) @ np.array(geglu.proj.weight, np.float64).T
    projected += np.array(geglu.proj.bias, np.float64)
    hidden, gate = np.split(projected, 2, axis=-1)
    erf = np.vectorize(math.erf)
    expected = hidden * gate * 0.5 * (1 + erf(gate / math.sqrt(2)))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("kernel, stride, padding, dilation, size", CONVOLUTIONS)
def test_convolutions_in_float32(onednn_float32, kernel, stride, padding, dilation, size):
    conv = layers.Conv2d(24, 40, kernel, stride=stride, padding=padding)
    conv.dilation = dilation
    x = mx.random.normal((2, size, size + 3, 24), key=mx.random.key(4))
    with fast_cpu(conv):
        ours = conv(x)
    # 3x3 stride-1 convolutions of these small images: one matmul of their patches.
    patches = (kernel, stride, padding, dilation) == (3, 1, 1, 1)
    assert onednn_float32 == ["linear" if patches else "conv2d"]
    expected = mx.conv2d(x, conv.weight, stride, padding, dilation)
    assert ours.shape == expected.shape and ours.dtype == mx.float32
    pixels, weight, _ = convolve_float64(
        np.array(x), np.array(conv.weight), stride, padding, dilation
    )
    assert_float32_close(ours, pixels, weight, conv.bias)


@pytest.mark.parametrize(
    "image, channels, kernel, stride, ran",
    [
        ((64, 64), (8, 8), 3, 1, ["conv2d"] * 3),  # the VAE's narrow layers (no Winograd)
        ((64, 64), (8, 16), 1, 1, ["conv2d"] * 3),  # shortcuts
        ((64, 64), (8, 8), 3, 2, ["conv2d"] * 3),  # downsamplers
        ((64, 63), (8, 8), 3, 1, []),  # under MIN_PIXELS
        ((32, 32), (256, 256), 3, 1, ["conv2d"]),  # Winograd's, from the second call
        ((15, 17), (8, 8), 3, 1, ["linear"] * 3),  # the UNets' 8x8: a matmul of patches
        ((16, 16), (8, 8), 3, 1, []),  # over _PATCHES_MAX_PIXELS: MLX's
    ],
)
def test_which_convolutions_take_onednn_float32(
    onednn_float32, monkeypatch, image, channels, kernel, stride, ran
):
    monkeypatch.setattr(cpu_layers, "_ONEDNN_FLOAT32_MIN_PIXELS", MIN_PIXELS)
    by_winograd = []
    conv3x3 = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: by_winograd.append(1) or conv3x3(*a))
    conv = layers.Conv2d(*channels, kernel, stride=stride, padding=kernel // 2)
    x = mx.random.normal((1, *image, channels[0]), key=mx.random.key(5))
    with fast_cpu(conv):
        outputs = [conv(x) for _ in range(3)]
    assert onednn_float32 == ran
    assert len(by_winograd) == (2 if channels[0] == 256 else 0)
    expected = mx.conv2d(x, conv.weight, stride, kernel // 2) + conv.bias
    for ours in outputs:
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


@pytest.fixture(
    params=[pytest.param(True, marks=needs_bfloat16, id="bfloat16"), pytest.param(False, id="f32")]
)
def onednn_block(request):
    """`fast_cpu` with oneDNN computing in bfloat16, then float32."""
    if not request.param:
        request.getfixturevalue("onednn_float32")
    return lambda *models: fast_cpu(*models, bfloat16=request.param)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("size", [(9, 7), (129, 128)])
def test_group_norm_normalizes_in_onednn_in_float32(onednn_block, monkeypatch, silu, size):
    """Where oneDNN computes, every group norm (the UNets' small latents too) runs
    `kernels.group_norm`, its normalizing pass (and SiLU) in oneDNN, its statistics too up to
    `_ONEDNN_STATISTICS_MAX_PIXELS` (numpy's above): float32 arithmetic, within 1e-5 of
    float64 on channels far from zero (where E[x^2] - E[x]^2 would cancel)."""
    calls = []
    for name in ("scale_shift", "channel_statistics"):
        function = getattr(onednn, name)
        monkeypatch.setattr(onednn, name, lambda *a, f=function, n=name: calls.append(n) or f(*a))
    norm = layers.GroupNorm(4, 32, 1e-5)
    norm.weight = mx.random.normal((32,), key=mx.random.key(1))
    norm.bias = mx.random.normal((32,), key=mx.random.key(2))
    offsets = mx.random.uniform(-20, 20, (32,), key=mx.random.key(4))
    x = 2 * mx.random.normal((2, *size, 32), key=mx.random.key(3)) + offsets
    with onednn_block(norm):
        ours = np.array(norm(x, silu_after=silu))
    small = size[0] * size[1] <= kernels._ONEDNN_STATISTICS_MAX_PIXELS
    # One pass per image, and the statistics' passes where oneDNN computes them.
    assert calls == (["channel_statistics", "scale_shift"] if small else ["scale_shift"]) * 2
    expected = group_norm_float64(x, 4, norm.weight, norm.bias, 1e-5, silu)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_layer_norm_runs_in_onednn_in_float32(onednn_block):
    """Float32 arithmetic; where its output feeds matmuls (`feeds_matmuls`), written in
    bfloat16 in bfloat16 blocks: exactly the float32 result rounded."""
    norm = layers.LayerNorm(48, eps=1e-5)
    norm.weight = mx.random.normal((48,), key=mx.random.key(1))
    norm.bias = mx.random.normal((48,), key=mx.random.key(2))
    x = 3 * mx.random.normal((2, 37, 48), key=mx.random.key(3)) + 10
    with onednn_block(norm):
        normalized = norm(x)
        for_matmuls = norm(x, feeds_matmuls=True)
        bfloat16 = onednn.bfloat16_active()
    assert normalized.dtype == mx.float32
    assert for_matmuls.dtype == (mx.bfloat16 if bfloat16 else mx.float32)
    np.testing.assert_array_equal(
        np.array(for_matmuls.astype(mx.float32)),
        np.array(normalized.astype(for_matmuls.dtype).astype(mx.float32)),
    )
    ours = np.array(normalized)
    x64 = np.array(x, np.float64)
    centred = x64 - x64.mean(axis=-1, keepdims=True)
    expected = centred / np.sqrt(np.square(centred).mean(axis=-1, keepdims=True) + 1e-5)
    expected = expected * np.array(norm.weight) + np.array(norm.bias)
    assert ("layer_norm", 74, 48, 1e-5, mx.float32) in onednn._PLANS
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_attention_in_float32(onednn_float32, monkeypatch):
    """Attention runs as oneDNN's float32 matmuls, its scale and exp in between: by groups
    of heads where they fit (`onednn.attention`; 4 heads of 300 x 77 in groups of 2, two
    entries), from `_SHARED_SHIFT_MIN_SCORES` scores per head reading each head's columns
    in place, a block of rows sharing its shift (`onednn.head_attention`; blocks of 400 of
    1100 rows, the last one shorter): float32's rounding."""
    monkeypatch.setattr(kernels, "_SHARED_SHIFT_MIN_SCORES", 1100 * 1100)
    monkeypatch.setattr(onednn, "_FLOAT32_ATTENTION_POWERS", 400 * 1100)
    monkeypatch.setattr(onednn, "_ATTENTION_POWERS", 2 * 300 * 77)
    monkeypatch.setattr(onednn, "_PLANS", {})
    for heads, dim, length, key_count, ran in (
        (2, 40, 1100, 1100, "head_attention"),
        (4, 24, 300, 77, "attention"),
    ):
        q = 0.5 * mx.random.normal((2, length, heads * dim), key=mx.random.key(5))
        k, v = (
            0.5 * mx.random.normal((2, key_count, heads * dim), key=mx.random.key(i))
            for i in (6, 7)
        )
        onednn_float32.clear()
        with fast_cpu():
            ours = np.array(kernels.attention(q, k, v, heads, causal=False))
        assert onednn_float32 == [ran] * 2
        exact, _ = attention_bound(np.array(q), np.array(k), np.array(v), heads)
        np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-5 * np.abs(exact).max())
    assert [key[1] for key in onednn._PLANS if key[0] == "head_attention"] == [400, 300]
    assert onednn._attention_blocks(300, 77, 4) == (300, 2)
    assert onednn._attention_blocks(300, 77, 3) == (300, 1)  # 2 of 3 heads fit: not a divisor


@pytest.fixture(params=["attention", "head_attention"])
def float32_attention(request, onednn_float32, monkeypatch) -> str:
    """Each test once by `onednn.attention` (each row its own shift), once by
    `onednn.head_attention` (a block's rows share theirs)."""
    if request.param == "head_attention":
        monkeypatch.setattr(kernels, "_SHARED_SHIFT_MIN_SCORES", 1)
    onednn_float32.clear()
    return request.param


def test_float32_attention_recomputes_underflowed_rows(
    float32_attention, onednn_float32, monkeypatch
):
    """test_kernels.py's extreme scores at oneDNN's lengths: queries along axis 0 score 450
    on every other key (exp overflows without the shift); queries along axis 1 score near
    0 under the same bound, which their shift underflows: recomputed exactly. The others
    are float32's."""
    length = 1024
    q, k, v = extreme_scores(length)
    recomputed = recorded_recomputations(monkeypatch)
    with fast_cpu():
        out = np.array(kernels.attention(mx.array(q), mx.array(k), mx.array(v), 1, False))
    expected, _ = attention_bound(q, k, v, 1)
    assert onednn_float32 == [float32_attention]
    assert sum(recomputed) == length // 2
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * abs(v).max())


def test_float32_attention_shifts_each_head_by_its_own_bound(
    float32_attention, onednn_float32, monkeypatch
):
    """A head of extreme scores next to a head of ordinary ones: the second's scores are
    not shifted by the first's bound (which would underflow them all): nothing is
    recomputed."""
    length = 1024
    extreme = extreme_scores(length)
    extreme[0][0, 1::2] = extreme[0][0, ::2]  # every query along axis 0: none underflows
    rng = np.random.default_rng(3)
    q, k, v = (
        np.concatenate([a, rng.standard_normal(a.shape).astype(np.float32)], axis=-1)
        for a in extreme
    )
    recomputed = recorded_recomputations(monkeypatch)
    with fast_cpu():
        out = np.array(kernels.attention(mx.array(q), mx.array(k), mx.array(v), 2, False))
    expected, _ = attention_bound(q, k, v, 2)
    assert onednn_float32 == [float32_attention] and not recomputed
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * abs(v).max())


@pytest.mark.parametrize(
    "given, expected",
    [
        ({}, ("PASSIVE", "10000")),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, ("ACTIVE", None)),
        ({"GOMP_SPINCOUNT": "0"}, ("PASSIVE", "0")),
    ],
)
def test_openmp_waits_briefly_then_sleeps_unless_told_otherwise(onednn_float32, given, expected):
    """oneDNN's OpenMP threads sleep between calls (they would take the cores from numpy and
    OpenBLAS) after a short spin, set before the library loads; the user's settings stand."""
    script = (
        "import os; from stable_diffusion.cpu import onednn; onednn._library(); "
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    )
    environment = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**environment, **given},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == [str(value) for value in expected]
