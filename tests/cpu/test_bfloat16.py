"""`fast_cpu(bfloat16=True)`: the linear layers, the GEGLU's projection and 1x1 convolutions
multiply in bfloat16 through oneDNN (float32 sums); a clear refusal where that cannot run.

Tolerance, from bfloat16's 8-bit significand (unit roundoff u = 2^-8): each product of two
rounded inputs is off by at most (1 + u)^2 - 1 < 2.01u of |x_i w_i|, so a sum is off by at
most 2.01u * sum |x_i| |w_i|, plus float32's own rounding (under 1e-5 of the same sum for
these sizes). The tests check each element against that bound, and that the error is
larger than float32's (the matmul did run in bfloat16). The whole pipeline on the tiny
models (3 steps): pixels within 0.02 of float32's, twice the float16 tolerance of
test_precision.py: bfloat16 keeps 3 fewer bits than float16, and its measured differences
(0.005-0.011 on the tiny models, docs/performance.md) are ~3x float16 compute's.

The tests that compute need the CPU feature and `onednn-cpu-gomp`
(requirements-bfloat16.txt); the refusals run everywhere.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest

from benchmarks import bfloat16 as bfloat16_benchmark
from stable_diffusion import StableDiffusion, fast_cpu
from stable_diffusion.cli import txt2image_main
from stable_diffusion.cpu import features, onednn
from stable_diffusion.models import layers, unet
from stable_diffusion.server.__main__ import main as server_main
from tests.helpers import FIXTURES

# CI installs requirements-bfloat16.txt: on its machines whose CPU has AVX512_BF16 or AMX
# these tests fail rather than skip when bfloat16 compute is unavailable; on others they
# cannot run (the refusal is tested everywhere).
needs_bfloat16 = pytest.mark.skipif(
    onednn.unavailable_reason() is not None
    and not (os.environ.get("CI") and onednn.cpu_has_bfloat16()),
    reason=str(onednn.unavailable_reason()),
)
WITH_BFLOAT16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
BOUND = 2.01 * 2.0**-8 + 1e-5


def assert_bfloat16_close(ours: mx.array, x: np.ndarray, weight: np.ndarray, bias=None):
    """Within the bound of the module docstring of x @ weight.T (+ bias) in float64; and
    not float32's result."""
    x64, w64 = x.astype(np.float64), weight.astype(np.float64)
    exact = x64 @ w64.T + (0 if bias is None else np.asarray(bias, np.float64))
    scale = np.abs(x64) @ np.abs(w64).T
    error = np.abs(np.array(ours, np.float64).reshape(exact.shape) - exact)
    assert (error <= BOUND * scale).all(), (error / scale).max()
    assert (error / scale).max() > 1e-4  # float32 would be near 1e-7


@needs_bfloat16
@pytest.mark.parametrize("bias", [True, False])
def test_linear_multiplies_in_bfloat16(bias):
    layer = layers.Linear(320, 96, bias=bias)
    x = mx.random.normal((2, 37, 320), key=mx.random.key(1))
    with fast_cpu(layer, bfloat16=True):
        ours = layer(x)
    assert ours.shape == (2, 37, 96) and ours.dtype == mx.float32
    assert_bfloat16_close(
        ours,
        np.array(x).reshape(-1, 320),
        np.array(layer.weight),
        np.array(layer.bias) if bias else None,
    )


@needs_bfloat16
def test_pointwise_convolution_multiplies_in_bfloat16():
    conv = layers.Conv2d(64, 48, kernel_size=1)
    x = mx.random.normal((1, 8, 8, 64), key=mx.random.key(2))
    with fast_cpu(conv, bfloat16=True):
        ours = conv(x)
    assert ours.shape == (1, 8, 8, 48)
    weight = np.array(conv.weight).reshape(48, 64)
    assert_bfloat16_close(ours, np.array(x).reshape(-1, 64), weight, conv.bias)


@needs_bfloat16
def test_geglu_projection_multiplies_in_bfloat16():
    """Both halves through oneDNN: the GEGLU of bfloat16-rounded inputs' products, checked
    against the float32 GEGLU of exactly those inputs (which differs only by the sums)."""
    geglu = unet.GEGLU(64, 32)
    x = mx.random.normal((1, 16, 64), key=mx.random.key(3))
    with fast_cpu(geglu):
        float32 = np.array(geglu(x))
    with fast_cpu(geglu, bfloat16=True):
        ours = np.array(geglu(x))
    rounded = unet.GEGLU(64, 32)  # the biases are added in float32 either way
    rounded.proj.weight = geglu.proj.weight.astype(mx.bfloat16).astype(mx.float32)
    rounded.proj.bias = geglu.proj.bias
    with fast_cpu(rounded):
        expected = np.array(rounded(x.astype(mx.bfloat16).astype(mx.float32)))
    assert np.abs(ours - float32).max() > 1e-4  # not float32's
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@needs_bfloat16
def test_primitives_are_cached_per_shape_and_weights_packed_once(monkeypatch):
    packs = []
    pack = onednn._pack
    monkeypatch.setattr(onednn, "_pack", lambda *a: packs.append(a) or pack(*a))
    monkeypatch.setattr(onednn, "_MATMULS", {})
    layer = layers.Linear(32, 16)
    x = mx.random.normal((5, 32))
    with fast_cpu(layer, bfloat16=True):
        first, second, third = layer(x), layer(x), layer(x)
        # Packed at its first two uses (`store.kept`): the second packing is kept.
        assert len(onednn._MATMULS) == 1 and len(packs) == 2
        np.testing.assert_array_equal(np.array(first), np.array(third))
        np.testing.assert_array_equal(np.array(second), np.array(third))
        layer(mx.random.normal((7, 32)))  # another shape: another primitive, packed again
        assert len(onednn._MATMULS) == 2 and len(packs) == 3
        layer.weight = layer.weight * 2  # a replaced weight (a LoRA merge) is packed again
        layer(mx.random.normal((7, 32)))
        assert len(packs) == 4
    with fast_cpu(layer, bfloat16=True):  # a new block packs again, and reuses the primitive
        layer(x)
    assert len(onednn._MATMULS) == 2 and len(packs) == 5


@needs_bfloat16
def test_bfloat16_image_is_close_to_float32():
    def image(bfloat16: bool) -> np.ndarray:
        sd = StableDiffusion(str(FIXTURES / "models" / "tiny-sd1"), float16=False)
        with fast_cpu(bfloat16=bfloat16):
            for x in sd.generate_latents("a red sign", num_steps=3, cfg_weight=5.0, seed=7):
                mx.eval(x)
            return np.array(sd.decode(x))

    float32, bfloat16 = image(False), image(True)
    assert np.isfinite(bfloat16).all()
    difference = np.abs(bfloat16 - float32).max()
    assert 0 < difference < 0.02


@pytest.mark.parametrize(
    "simulate, message",
    [
        ("cpu", "needs a CPU with AVX512_BF16 or AMX"),
        ("library", "pip install -r requirements-bfloat16.txt"),
        ("machine", "needs Linux on x86-64"),
    ],
)
def test_unavailable_bfloat16_is_a_clear_error(monkeypatch, capsys, tmp_path, simulate, message):
    monkeypatch.setattr(features, "cpu_flags", lambda: WITH_BFLOAT16)
    if simulate == "cpu":
        monkeypatch.setattr(features, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    elif simulate == "library":
        monkeypatch.setattr(onednn, "_library_path", lambda: None)
    else:
        monkeypatch.setattr(onednn.platform, "machine", lambda: "aarch64")
    layer = layers.Linear(8, 8)
    with pytest.raises(onednn.Unavailable, match=message), fast_cpu(layer, bfloat16=True):
        pass
    assert not onednn.active()
    # The scripts and the server refuse before loading anything (no such model needed).
    for main, argv in (
        (txt2image_main, ["a prompt", "--model", "no/such-model", "--bfloat16"]),
        (server_main, ["--model", "no/such-model", "--bfloat16", "--output-dir", str(tmp_path)]),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


@needs_bfloat16
def test_benchmark_alternates_float32_and_bfloat16(capsys):
    results = bfloat16_benchmark.main(
        ["--model", "tiny", "--size", "64", "--rounds", "2", "--batches", "1,2"]
    )
    assert sorted(results) == [1, 2]
    for row in results.values():
        assert row["float32_s"] > 0 and row["bfloat16_s"] > 0 and row["speedup"] > 0
        assert 0 < row["difference"] < 0.01  # bfloat16's, not float32's (nor garbage)
    assert "tiny 64px batch 2: UNet step float32" in capsys.readouterr().out


def test_benchmark_refuses_where_bfloat16_cannot_run(monkeypatch, capsys):
    monkeypatch.setattr(features, "cpu_flags", lambda: WITH_BFLOAT16)
    monkeypatch.setattr(onednn, "_library_path", lambda: None)
    with pytest.raises(SystemExit):
        bfloat16_benchmark.main(["--model", "tiny"])
    assert "pip install -r requirements-bfloat16.txt" in capsys.readouterr().err
