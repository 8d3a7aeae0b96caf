"""The CPU paths of `fast_cpu()` (the CPU layers, the eager numpy kernels: attention, SiLU,
GEGLU, layer norm; Winograd convolutions) compute what the lazy default computes: parity
with diffusers/transformers on the tiny models, same tolerance as tests/test_models.py, and
with float64 on their own. The default never takes the eager path."""

from __future__ import annotations

import contextlib
import math

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion import fast_cpu
from stable_diffusion.cpu import blas, fast, features, kernels
from stable_diffusion.loading.folder import load_text_encoder, load_unet, load_vae
from stable_diffusion.models import layers
from tests.helpers import (
    FIXTURES,
    MODELS,
    assert_close,
    assert_unet_matches,
    assert_vae_matches,
    extreme_scores,
    group_norm_float64,
    recorded_recomputations,
    reference,
)


@pytest.mark.parametrize("onednn", [False, True], ids=["openblas", "onednn"])
@pytest.mark.parametrize("model", MODELS)
def test_cpu_paths_match_reference(model, onednn, request):
    """Every model within `fast_cpu()` (its CPU layers, Winograd at the real thresholds), and
    with oneDNN's float32 (linear layers, norms, the convolutions Winograd does not take)."""
    ran_in_onednn = request.getfixturevalue("onednn_float32") if onednn else []
    ref = reference(model)
    folder = FIXTURES / "models" / model
    names = ["text_encoder", "text_encoder_2"] if model == "tiny-sdxl" else ["text_encoder"]
    encoders = [load_text_encoder(folder / name, mx.float32) for name in names]
    unet = load_unet(folder / "unet", mx.float32)
    vae = load_vae(folder / "vae", mx.float32)
    with mx.stream(mx.cpu), fast_cpu():
        for name, encoder in zip(names, encoders, strict=True):
            output = encoder(mx.array(ref[f"{name}.input_ids"]))
            assert_close(output.last_hidden_state, ref[f"{name}.last_hidden_state"])
            assert_close(output.penultimate_hidden_state, ref[f"{name}.penultimate_hidden_state"])
            assert_close(output.pooled, ref[f"{name}.pooled"])
        assert_unet_matches(model, ref, unet)
        assert_vae_matches(model, ref, vae)
    in_onednn = {"linear", "conv2d", "attention"}
    assert in_onednn == set(ran_in_onednn) if onednn else not ran_in_onednn


@pytest.mark.parametrize("model", MODELS)
def test_by_winograd_matches_diffusers(model, winograd_everywhere):
    """Every convolution by Winograd (each algorithm in turn), UNet and VAE."""
    ref = reference(model)
    unet = load_unet(FIXTURES / "models" / model / "unet", mx.float32)
    vae = load_vae(FIXTURES / "models" / model / "vae", mx.float32)
    with mx.stream(mx.cpu), fast_cpu(unet, vae):
        assert_unet_matches(model, ref, unet)
        assert_vae_matches(model, ref, vae)
    assert winograd_everywhere, "no convolution ran by Winograd"


def test_default_attention_stays_lazy(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the eager attention ran outside fast_cpu()")

    monkeypatch.setattr(kernels, "attention", refuse)
    q = mx.random.normal((1, 16, 8))
    out = layers.attention(q, q, q, heads=2)
    with fast_cpu():
        pass
    assert np.isfinite(np.array(layers.attention(q, q, q, heads=2))).all()
    assert out.shape == (1, 16, 8)


def test_text_context_projected_once_per_block(monkeypatch):
    """Within a `fast_cpu()` block a cross-attention projects a text context at its first
    two uses and keeps the second (`store.kept`), and projects again for another context
    array or after its key or value weights are replaced (a LoRA merge); outside a block,
    at every call. Each output matches the lazy default's."""
    from stable_diffusion.models.unet import Attention

    attention = Attention(8, heads=2, context_dims=6)
    projections = []
    linear_call = layers.Linear.__call__

    def counted(self, x):
        if self is attention.to_k or self is attention.to_v:
            projections.append(self)
        return linear_call(self, x)

    monkeypatch.setattr(layers.Linear, "__call__", counted)
    x, context = mx.random.normal((1, 5, 8)), mx.random.normal((1, 7, 6))

    def assert_same(out: mx.array, expected: mx.array) -> None:
        np.testing.assert_allclose(np.array(out), np.array(expected), rtol=1e-5, atol=1e-6)

    expected = attention(x, context)
    assert len(projections) == 2
    with mx.stream(mx.cpu), fast_cpu(attention):
        for _ in range(3):
            assert_same(attention(x, context), expected)
        assert len(projections) == 6
        assert_same(attention(x, mx.array(context)), expected)  # equal values, new array
        assert len(projections) == 8
        attention.to_v.weight = attention.to_v.weight * 2
        merged = attention(x, context)
        assert len(projections) == 10
    assert_same(merged, attention(x, context))
    assert len(projections) == 12
    with mx.stream(mx.cpu), fast_cpu(attention):
        attention(x, context)
    assert len(projections) == 14


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


@pytest.fixture(params=["base 2", "base e"])
def exponentials(request, monkeypatch) -> None:
    """Each test once with the powers taken by numpy's exp2 (chosen on CPUs with AVX-512),
    once by its exp (elsewhere), whatever this CPU would choose; and checks the chosen
    function ran."""
    chosen = kernels.BASE_2 if request.param == "base 2" else kernels.BASE_E
    calls = []
    monkeypatch.setattr(
        kernels,
        "_EXPONENTIALS",
        kernels.Exponentials(
            lambda x, out: calls.append(1) or chosen.power(x, out=out), chosen.log_e
        ),
    )
    yield
    assert calls


def test_the_exponentials_are_the_fast_ones_for_this_cpu():
    expected = kernels.BASE_2 if features.has_avx512() else kernels.BASE_E
    assert kernels._EXPONENTIALS is expected
    assert kernels.BASE_2.power(np.float32(kernels.BASE_2.headroom)) == 2.0**40
    assert kernels.BASE_E.power(np.float64(kernels.BASE_E.headroom)) == pytest.approx(2.0**40)


@pytest.fixture(params=["shifted", "exact"])
def shifted(request, monkeypatch) -> bool:
    """Each test once with the scores shifted by a bound (as on long key sequences), once by
    each row's max (as on short ones)."""
    shifted = request.param == "shifted"
    monkeypatch.setattr(kernels, "_SHIFTED_MIN_KEYS", 1 if shifted else 10**9)
    ran = []
    for name in ("_attend", "_attend_exactly"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, name=name, kernel=kernel: ran.append(name) or kernel(*a)
        )
    yield shifted
    assert set(ran) == {"_attend" if shifted else "_attend_exactly"}


@pytest.mark.parametrize("causal", [False, True])
# One row, uneven blocks, one block: (by score elements) each head alone, in groups of 2 of
# 3 heads, all 3 heads together.
@pytest.mark.parametrize("block_rows", [1, 5, 64, 200])
@pytest.mark.parametrize("openblas", [True, False])  # False: numpy's matmul, as on macOS
def test_blocked_cpu_attention_matches_float64(
    monkeypatch, exponentials, shifted, causal, block_rows, openblas
):
    q_len = k_len = 23
    monkeypatch.setattr(kernels, "_SCORE_BLOCK_ELEMENTS", block_rows * k_len)
    if not openblas:
        monkeypatch.setattr(blas, "_openblas", None)
    rng = np.random.default_rng(0)
    q, k, v = (3 * rng.standard_normal((2, n, 12), np.float32) for n in (q_len, k_len, k_len))
    with mx.stream(mx.cpu):
        out = kernels.attention(mx.array(q), mx.array(k), mx.array(v), 3, causal)
    expected = softmax_attention_float64(q, k, v, 3, causal)
    np.testing.assert_allclose(np.array(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_attention_with_extreme_scores_matches_float64(
    monkeypatch, exponentials, shifted, causal
):
    # `extreme_scores`: the rows that underflow are recomputed exactly (shifted by each
    # row's max, as the exact path does for all rows).
    length = 16
    q, k, v = extreme_scores(length)
    recomputed = recorded_recomputations(monkeypatch)
    with mx.stream(mx.cpu):
        out = kernels.attention(mx.array(q), mx.array(k), mx.array(v), 1, causal)
    expected = softmax_attention_float64(q, k, v, 1, causal)
    np.testing.assert_allclose(np.array(out), expected, rtol=1e-5, atol=1e-5)
    assert sum(recomputed) == (length // 2 if shifted else length)


needs_openblas = pytest.mark.skipif(blas._openblas is None, reason="OpenBLAS is Linux-only")


@needs_openblas
def test_blas_matmul_into_row_strided_views():
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal(shape, np.float32) for shape in ((9, 12), (7, 20)))
    out = np.full((12, 30), 7.0, np.float32)
    blas.matmul_into(a[2:7, 1:8], b[:, 3:11], out[4:9, 2:10])
    np.testing.assert_allclose(out[4:9, 2:10], a[2:7, 1:8] @ b[:, 3:11], rtol=1e-6)
    out[4:9, 2:10] = 7.0
    assert (out == 7.0).all()  # nothing written outside the view
    transposed = b[:5, 3:10].T  # contiguous columns
    blas.matmul_into(a[2:7, 1:8], transposed, out[4:9, 2:7], scale=0.5)
    np.testing.assert_allclose(out[4:9, 2:7], 0.5 * a[2:7, 1:8] @ transposed, rtol=1e-6)
    out[4:9, 2:7] = 7.0
    assert (out == 7.0).all()


@needs_openblas
@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (np.ones((2, 3)), np.ones((3, 2)), "float32"),  # float64
        (np.ones((3, 2), np.float32).T, np.ones((3, 2), np.float32), "contiguous rows"),
        (np.ones((2, 3), np.float32), np.ones((2, 2), np.float32), "cannot multiply"),
    ],
)
def test_blas_matmul_into_refuses_what_it_cannot_read(a, b, message):
    out = np.empty((a.shape[0], b.shape[1]), np.float32)
    with pytest.raises(ValueError, match=message):
        blas.matmul_into(a, b, out)


@needs_openblas
def test_one_thread_per_call_restores_the_thread_count():
    before = blas._openblas.openblas_get_num_threads()
    with blas.one_thread_per_call():
        assert blas._openblas.openblas_get_num_threads() == 1
    assert blas._openblas.openblas_get_num_threads() == before


def test_numpy_silu_matches_float64():
    # Over several chunks and threads, with the tails where exp(-x) overflows.
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            [-1000.0, -89.0, -20.0, 0.0, 20.0, 1000.0],
            10 * rng.standard_normal(3 * kernels._SILU_CHUNK + 7),
        ]
    )
    x = x.astype(np.float32)
    with mx.stream(mx.cpu):
        out = np.array(kernels.silu_(mx.array(x) + 0))
    with np.errstate(over="ignore"):
        expected = x / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("rows", [1, 7, 3 * kernels._GEGLU_CHUNK // 96 + 5])
def test_numpy_geglu_matches_float64(exponentials, rows):
    # Rows over several chunks and threads (or fewer rows than cores); gates from far in
    # both tails through 0.
    rng = np.random.default_rng(4)
    width = 48
    hidden, gate = (rng.standard_normal((rows, width)).astype(np.float32) for _ in range(2))
    gate *= np.linspace(0.1, 12, width, dtype=np.float32)
    hidden_bias, gate_bias = (rng.standard_normal(width).astype(np.float32) for _ in range(2))
    with mx.stream(mx.cpu):
        out = np.array(
            kernels.geglu_(
                mx.array(hidden) + 0, mx.array(gate), mx.array(hidden_bias), mx.array(gate_bias)
            )
        )
    gate64 = gate.astype(np.float64) + gate_bias
    erf = np.frompyfunc(math.erf, 1, 1)
    gelu = 0.5 * gate64 * (1 + erf(gate64 / math.sqrt(2)).astype(np.float64))
    expected = (hidden.astype(np.float64) + hidden_bias) * gelu
    # The erf approximation's 1.5e-7 and float32 rounding, of the output's scale.
    assert np.abs(out - expected).max() <= 5e-7 * np.abs(expected).max()


@pytest.mark.parametrize("rows", [1, 7, 3 * kernels._LAYER_NORM_CHUNK // 40 + 5])
@pytest.mark.parametrize("offset", [0, 10])
def test_numpy_layer_norm_matches_float64(monkeypatch, rows, offset):
    """Rows over several chunks and threads (or fewer rows than cores), of scales from 0.01
    to 100; offset from 0, where the variance as E[x^2] - E[x]^2 would cancel: at least as
    accurate as MLX's own layer norm on the same float32 input."""
    rng = np.random.default_rng(5)
    width = 40
    x = rng.standard_normal((2, rows, width)).astype(np.float32)
    x = x * np.geomspace(0.01, 100, rows, dtype=np.float32)[:, None] + offset
    weight, bias = (rng.standard_normal(width).astype(np.float32) for _ in range(2))
    layer = layers.LayerNorm(width, eps=1e-5)
    layer.weight, layer.bias = mx.array(weight), mx.array(bias)
    ran = []
    kernel = kernels.layer_norm
    monkeypatch.setattr(kernels, "layer_norm", lambda *a: ran.append(1) or kernel(*a))
    with mx.stream(mx.cpu):
        mlx_own = np.array(layer(mx.array(x)))
        with fast_cpu(layer):
            out = np.array(layer(mx.array(x)))
    assert len(ran) == 1
    x64 = x.astype(np.float64)
    centred = x64 - x64.mean(-1, keepdims=True)
    expected = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5) * weight + bias

    def error(y: np.ndarray) -> float:
        return float(np.abs(y - expected).max() / np.abs(expected).max())

    assert error(out) <= max(error(mlx_own), 2e-7)


@pytest.mark.parametrize("heap_keeps_freed_memory", [False, True])
def test_fast_cpu_raises_the_cache_limit_only_where_the_heap_does_not_keep(
    monkeypatch, heap_keeps_freed_memory
):
    """Where the C library keeps freed memory (glibc), MLX's buffer cache is left alone:
    its same-size reuse only touched more memory; elsewhere it is raised within the block
    and restored after it."""
    monkeypatch.setattr(
        fast.memory, "keep_freed_memory", lambda: contextlib.nullcontext(heap_keeps_freed_memory)
    )
    before = mx.set_cache_limit(12345)
    try:
        with fast_cpu():
            inside = mx.set_cache_limit(0)
            mx.set_cache_limit(inside)
        assert inside == 12345 if heap_keeps_freed_memory else inside > 12345
        assert mx.set_cache_limit(before) == 12345  # restored after it
    finally:
        mx.set_cache_limit(before)


@pytest.mark.parametrize("silu", [False, True])
def test_large_group_norm_matches_float64(silu):
    """The VAE's images (from 128x128 pixels) run `kernels.group_norm`: here with pixels
    that the chunks do not divide evenly, two images, and an offset mean (which a one-pass
    variance would lose)."""
    norm = layers.GroupNorm(8, 48, 1e-6)
    norm.weight = mx.random.normal((48,), key=mx.random.key(1))
    norm.bias = mx.random.normal((48,), key=mx.random.key(2))
    x = 3 * mx.random.normal((2, 131, 129, 48), key=mx.random.key(3)) + 100
    with fast_cpu(norm):
        ours = np.array(norm(x, silu_after=silu))
    expected = group_norm_float64(x, 8, norm.weight, norm.bias, 1e-6, silu)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
