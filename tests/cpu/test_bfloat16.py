"""`fast_cpu(bfloat16=True)`: the linear layers, the GEGLU (its GELU and product fused),
the convolutions and attention (not causal) multiply in bfloat16 through oneDNN (float32 sums); a
clear refusal where that cannot run.

Tolerance, from bfloat16's 8-bit significand (unit roundoff u = 2^-8): each product of two
rounded inputs is off by at most (1 + u)^2 - 1 < 2.01u of |x_i w_i|, so a sum is off by at
most 2.01u * sum |x_i| |w_i|, plus float32's own rounding (under 1e-5 of the same sum for
these sizes). The tests check each element against that bound, and that the error is
larger than float32's (the matmul did run in bfloat16); a convolution is the matmul of its
taps' pixels (`convolve_float64`), attention has a bound of its own (`attention_bound`).
The whole pipeline on the tiny
models (3 steps): pixels within 0.03 of float32's, three times the float16 tolerance of
test_precision.py: bfloat16 keeps 3 fewer bits than float16, and its measured differences
(largest 0.008-0.021 on the tiny models, docs/performance.md) are ~4x float16 compute's.

The tests that compute need the CPU feature and `onednn-cpu-gomp`
(requirements-bfloat16.txt); the refusals run everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import webuiapi
from PIL import Image

from benchmarks import bfloat16 as bfloat16_benchmark
from benchmarks import measure
from benchmarks import run as run_benchmark
from stable_diffusion import StableDiffusion, fast_cpu
from stable_diffusion.cli import txt2image_main
from stable_diffusion.cpu import features, kernels, onednn
from stable_diffusion.images import read_parameters
from stable_diffusion.models import layers, unet
from stable_diffusion.server.__main__ import main as server_main
from tests.helpers import (
    CONVOLUTIONS,
    FIXTURES,
    ROOT,
    Server,
    attention_bound,
    convolve_float64,
    extreme_scores,
    needs_bfloat16,
    recorded_recomputations,
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
@pytest.mark.parametrize("kernel, stride, padding, dilation, size", CONVOLUTIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_convolutions_multiply_in_bfloat16(kernel, stride, padding, dilation, size, bias):
    conv = layers.Conv2d(24, 40, kernel, stride=stride, padding=padding, bias=bias)
    conv.dilation = dilation
    x = mx.random.normal((2, size, size + 3, 24), key=mx.random.key(2))
    with fast_cpu(conv, bfloat16=True):
        ours = conv(x)
    expected = mx.conv2d(x, conv.weight, stride, padding, dilation)
    assert ours.shape == expected.shape and ours.dtype == mx.float32
    pixels, weight, _ = convolve_float64(
        np.array(x), np.array(conv.weight), stride, padding, dilation
    )
    assert_bfloat16_close(ours, pixels, weight, conv.bias if bias else None)


@needs_bfloat16
def test_grouped_convolution_stays_float32():
    conv = layers.Conv2d(8, 8, 3, padding=1, groups=2)
    x = mx.random.normal((1, 6, 6, 8), key=mx.random.key(4))
    with fast_cpu(conv, bfloat16=True):
        ours = conv(x)
    np.testing.assert_array_equal(np.array(ours), np.array(nn.Conv2d.__call__(conv, x)))


@needs_bfloat16
def test_upsampler_convolves_in_bfloat16():
    upsample = layers.Upsample2D(32)
    x = mx.random.normal((1, 16, 16, 32), key=mx.random.key(5))
    with fast_cpu(upsample, bfloat16=True):
        ours = upsample(x)
    upsampled = np.array(layers.upsample_nearest(x, None))
    pixels, weight, _ = convolve_float64(upsampled, np.array(upsample.conv.weight), 1, 1, 1)
    assert_bfloat16_close(ours, pixels, weight, upsample.conv.bias)


@needs_bfloat16
def test_geglu_projection_multiplies_in_bfloat16():
    """Both halves through oneDNN: the GEGLU of bfloat16-rounded inputs' products, checked
    against the float32 GEGLU of exactly those inputs (which differs by the sums, and by
    the rounding of the gate and the product: the output is written in bfloat16 for the
    next matmul)."""
    geglu = unet.GEGLU(64, 32)
    x = mx.random.normal((1, 16, 64), key=mx.random.key(3))
    with fast_cpu(geglu):
        float32 = np.array(geglu(x))
    with fast_cpu(geglu, bfloat16=True):
        product = geglu(x)
    assert product.dtype == mx.bfloat16
    ours = np.array(product.astype(mx.float32))
    rounded = unet.GEGLU(64, 32)  # the biases are added in float32 either way
    rounded.proj.weight = geglu.proj.weight.astype(mx.bfloat16).astype(mx.float32)
    rounded.proj.bias = geglu.proj.bias
    with fast_cpu(rounded):
        expected = np.array(rounded(x.astype(mx.bfloat16).astype(mx.float32)))
    assert np.abs(ours - float32).max() > 1e-4  # not float32's
    # Two roundings to bfloat16 (8 significant bits: each within 2^-8 of the value).
    np.testing.assert_allclose(ours, expected, rtol=2**-7, atol=1e-5 * np.abs(expected).max())


@needs_bfloat16
def test_primitives_are_cached_per_shape_and_weights_packed_once(monkeypatch):
    """A primitive per shape, for the process; a weight packed once per block, from its
    first use (`store.kept_from_first_use`), again for another shape or a replaced weight."""
    packs = []
    pack = onednn._pack
    monkeypatch.setattr(onednn, "_pack", lambda *a: packs.append(a) or pack(*a))
    monkeypatch.setattr(onednn, "_PLANS", {})
    layer = layers.Linear(32, 16)
    x = mx.random.normal((5, 32))
    with fast_cpu(layer, bfloat16=True):
        first, second = layer(x), layer(x)
        assert len(onednn._PLANS) == 1 and len(packs) == 1
        np.testing.assert_array_equal(np.array(first), np.array(second))
        layer(mx.random.normal((7, 32)))  # another shape: another primitive, packed again
        assert len(onednn._PLANS) == 2 and len(packs) == 2
        layer.weight = layer.weight * 2  # a replaced weight (a LoRA merge) is packed again
        layer(mx.random.normal((7, 32)))
        assert len(packs) == 3
    with fast_cpu(layer, bfloat16=True):  # a new block packs again, and reuses the primitive
        layer(mx.random.normal((7, 32)))
    assert len(onednn._PLANS) == 2 and len(packs) == 4


@needs_bfloat16
@pytest.mark.parametrize(
    "heads, dim, length, keys, powers, blocks",
    [
        (2, 40, 1100, 1100, 400 * 1100, (400, 1)),  # one head's rows in blocks, a shorter last
        (1, 64, 1100, 1100, 400 * 1100, (400, 1)),
        (2, 40, 3500, 77, 400 * 77, (400, 1)),  # cross-attention on the text's 77 keys
        (6, 40, 300, 77, 4 * 300 * 77, (300, 3)),  # groups of heads, all rows at once
    ],
)
def test_attention_computes_in_bfloat16(monkeypatch, heads, dim, length, keys, powers, blocks):
    """The UNets' (and the VAE's) attention runs in bfloat16 (oneDNN's matmuls, its exp in
    between) within the bound of `attention_bound`, in blocks of rows and of heads that hold
    at most `_ATTENTION_POWERS` powers."""
    calls = []
    attend = onednn.attention
    monkeypatch.setattr(onednn, "attention", lambda *a: calls.append(1) or attend(*a))
    monkeypatch.setattr(onednn, "_ATTENTION_POWERS", powers)
    assert onednn._attention_blocks(length, keys, heads) == blocks
    q = 0.5 * mx.random.normal((2, length, heads * dim), key=mx.random.key(5))
    k, v = (0.5 * mx.random.normal((2, keys, heads * dim), key=mx.random.key(i)) for i in (6, 7))
    with fast_cpu(bfloat16=True):
        ours = np.array(kernels.attention(q, k, v, heads, causal=False))
    assert calls == [1, 1] and ours.shape == q.shape  # once per entry
    exact, bound = attention_bound(np.array(q), np.array(k), np.array(v), heads)
    error = np.abs(ours - exact)
    assert (error <= bound).all(), (error - bound).max()
    assert error.max() > 1e-4 * np.abs(exact).max()  # float32 would be near 1e-7


@needs_bfloat16
def test_bfloat16_projections_are_read_as_they_are():
    """Bfloat16 projections (`layers.Attention` writes them so in bfloat16 blocks) go into
    oneDNN's operands unconverted and give a bfloat16 output: exactly the float32 result
    for the same values, rounded."""
    q, k, v = (mx.random.normal((2, 300, 4 * 40), key=mx.random.key(i)) for i in (5, 6, 7))
    q, k, v = (a.astype(mx.bfloat16) for a in (q, k, v))
    with fast_cpu(bfloat16=True):
        ours = kernels.attention(q, k, v, 4, causal=False)
        float32 = kernels.attention(*(a.astype(mx.float32) for a in (q, k, v)), 4, causal=False)
    assert ours.dtype == mx.bfloat16 and float32.dtype == mx.float32
    np.testing.assert_array_equal(
        np.array(ours.astype(mx.float32)), np.array(float32.astype(mx.bfloat16).astype(mx.float32))
    )


def test_bfloat16_buffers_are_read_in_place_as_their_bits():
    """`onednn.numpy` gives oneDNN a bfloat16 array's own buffer, as uint16 bits: what is
    written there is the array's value (outputs are written so), a lazy array is evaluated
    first, and a strided one is refused rather than copied."""
    lazy = mx.array([[1.0, -2.0], [0.5, 3.0]]).astype(mx.bfloat16) * 1
    bits = onednn.numpy(lazy)
    assert bits.dtype == np.uint16 and bits.shape == (2, 2)
    assert bits.tolist() == [[0x3F80, 0xC000], [0x3F00, 0x4040]]  # bfloat16's encodings
    bits[0, 0] = 0x4100  # 8.0
    assert lazy[0, 0].item() == 8.0
    with pytest.raises(BufferError):
        onednn.numpy(mx.array(np.ones((3, 2), np.float32)).astype(mx.bfloat16).T)


@needs_bfloat16
@pytest.mark.parametrize("inputs", [mx.float32, mx.bfloat16])
def test_bfloat16_attention_recomputes_underflowed_rows(monkeypatch, inputs):
    """test_kernels.py's extreme scores at bfloat16's lengths: queries along axis 0 score
    450 on every other key (exp overflows without the shift), all alike, so their weights
    are exactly uniform: off by the values' rounding only; queries along axis 1 score near 0
    under the same bound, which the shift underflows: recomputed in float32 (1e-5; bfloat16
    projections give a bfloat16 output, off by its rounding too)."""
    length = 1024
    q, k, v = (mx.array(a).astype(inputs) for a in extreme_scores(length))
    recomputed = recorded_recomputations(monkeypatch)
    with fast_cpu(bfloat16=True):
        out = kernels.attention(q, k, v, 1, False)
    assert out.dtype == inputs
    out = np.array(out.astype(mx.float32))
    expected, _ = attention_bound(*(np.array(a.astype(mx.float32)) for a in (q, k, v)), 1)
    assert sum(recomputed) == length // 2
    rounding = 2.0**-8 if inputs == mx.bfloat16 else 0
    np.testing.assert_allclose(out[0, 1::2], expected[0, 1::2], rtol=rounding, atol=1e-5)
    v_max = np.abs(np.array(v.astype(mx.float32))).max()
    np.testing.assert_allclose(out[0, ::2], expected[0, ::2], rtol=0, atol=2.0**-7 * v_max)


@needs_bfloat16
def test_transformer_block_feeds_its_matmuls_bfloat16(monkeypatch):
    """In bfloat16 blocks each layer of a transformer block whose output only feeds matmuls
    (the layer norms, the projections, attention, GEGLU) writes it in bfloat16, so every
    matmul but the text context's projections reads its input unconverted; the residual
    stream stays float32, within bfloat16's rounding of float32's block."""
    inputs = []
    linear = onednn.linear
    monkeypatch.setattr(
        onednn, "linear", lambda x, *a, **k: inputs.append(x.dtype) or linear(x, *a, **k)
    )
    block = unet.BasicTransformerBlock(64, 2, 32)
    x = mx.random.normal((1, 100, 64), key=mx.random.key(1))
    context = mx.random.normal((1, 77, 32), key=mx.random.key(2))
    with fast_cpu(block, bfloat16=True):
        ours = block(x, context)
        mx.eval(ours)
    # attn1's keys, values, queries and output; attn2's (the context's keys and values from
    # the float32 context); GEGLU's two halves and the feed-forward's output.
    bf16, f32 = mx.bfloat16, mx.float32
    assert inputs == 4 * [bf16] + 2 * [f32] + 2 * [bf16] + 3 * [bf16]
    assert ours.dtype == mx.float32
    float32 = np.array(block(x, context))  # plain MLX
    update = np.abs(float32 - np.array(x)).max()
    assert 1e-4 * update < np.abs(np.array(ours) - float32).max() < 2e-2 * update


@needs_bfloat16
def test_causal_attention_stays_float32(monkeypatch):
    """The text encoders' causal attention: float32."""
    monkeypatch.setattr(onednn, "attention", None)  # would fail if called
    q, k, v = (mx.random.normal((1, 77, 64), key=mx.random.key(i)) for i in range(3))
    with fast_cpu():
        float32 = np.array(kernels.attention(q, k, v, 2, True))
    with fast_cpu(bfloat16=True):
        ours = np.array(kernels.attention(q, k, v, 2, True))
    np.testing.assert_array_equal(ours, float32)


@needs_bfloat16
def test_script_records_bfloat16_in_the_png(tmp_path):
    """Its pixels differ from float32's: the PNG says how it was computed."""
    model = str(FIXTURES / "models" / "tiny-sd1")
    for name, extra in (("float32.png", []), ("bfloat16.png", ["--bfloat16"])):
        output = ["--output", str(tmp_path / name), *extra]
        txt2image_main(["a red sign", "--model", model, "--steps", "2", "--seed", "3", *output])
    compute = [
        dict(read_parameters(tmp_path / n).extras).get("Compute")
        for n in ("float32.png", "bfloat16.png")
    ]
    assert compute == [None, "bfloat16"]
    pixels = [
        np.asarray(Image.open(tmp_path / n), np.int16) for n in ("float32.png", "bfloat16.png")
    ]
    assert 0 < np.abs(pixels[0] - pixels[1]).max() <= 0.03 * 255 + 1


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
    assert 0 < difference < 0.03


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


@needs_bfloat16
def test_benchmark_measures_bfloat16_beside_float32(tmp_path, capsys, monkeypatch):
    computed_in = []
    measure_row = measure._measure

    def recorded(*args):
        computed_in.append(onednn.bfloat16_active())
        return measure_row(*args)

    monkeypatch.setattr(measure, "_measure", recorded)
    output = tmp_path / "results.json"
    main = ["--models", "tiny", "--size", "64", "--steps", "1", "--repeats", "1"]
    run_benchmark.main([*main, "--dtypes", "float32,bfloat16", "--output", str(output)])
    results = json.loads(output.read_text())
    assert [(r["dtype"], r["batch"]) for r in results["rows"]] == [
        (dtype, batch) for dtype in ("float32", "bfloat16") for batch in (1, 2)
    ]
    assert computed_in == [False, False, True, True]
    assert results["matmul_gflops"]["bfloat16"] > 0
    for row in results["rows"]:
        assert row["unet_step_s"] > 0 and row["vae_decode_s"] > 0 and row["image_s"] > 0
    assert "| tiny | bfloat16 | 2 |" in capsys.readouterr().out


@needs_bfloat16
def test_whole_image_benchmark_times_bfloat16_images_too(tmp_path, capsys):
    output = tmp_path / "results.json"
    run_benchmark.main(
        ["--models", "tiny", "--dtypes", "float32,bfloat16", "--size", "64", "--repeats", "1",
         "--whole-image", "--output", str(output)]
    )  # fmt: skip
    (image,) = json.loads(output.read_text())["whole_image"]
    (each,) = image["rounds"]
    assert list(each) == ["mlx", "mlx_bfloat16"] and all(s > 0 for s in each.values())
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table[0] == "| model | image | MLX s | MLX bfloat16 s |"
    assert table[1] == "|---|---|---|---|"
    assert table[2].startswith("| tiny | 2 steps, CFG 7.5, VAE |")


def test_benchmark_refuses_where_bfloat16_cannot_run(monkeypatch, capsys):
    monkeypatch.setattr(features, "cpu_flags", lambda: WITH_BFLOAT16)
    monkeypatch.setattr(onednn, "_library_path", lambda: None)
    for main, argv in (
        (bfloat16_benchmark.main, ["--model", "tiny"]),
        (run_benchmark.main, ["--models", "tiny", "--dtypes", "float32,bfloat16"]),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert "pip install -r requirements-bfloat16.txt" in capsys.readouterr().err


@needs_bfloat16
def test_server_with_bfloat16_equals_the_script(tmp_path):
    """`--bfloat16` on both: the same pixels and parameters, `Compute: bfloat16` among them."""
    script = tmp_path / "script.png"
    subprocess.run(
        [sys.executable, "txt2image.py", "a red cube", "--model", "tests/fixtures/models/tiny-sd1",
         "--steps", "3", "--seed", "5", "--width", "64", "--height", "48", "--bfloat16",
         "--sampler", "euler_a", "--cfg", "6.5",
         "--output", str(script)],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    server = Server(tmp_path, "--bfloat16", "--output-dir", str(tmp_path / "output"))
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        request = {"prompt": "a red cube", "steps": 3, "seed": 5, "width": 64, "height": 48}
        request |= {"sampler_name": "Euler a", "cfg_scale": 6.5}
        (image,) = api.txt2img(**request).images
    finally:
        server.stop()
    with Image.open(script) as expected:
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
        assert image.info["parameters"] == expected.info["parameters"]
    assert "Compute: bfloat16" in image.info["parameters"]


@needs_bfloat16
def test_leaving_the_block_frees_the_conversion_buffer():
    conv = layers.Conv2d(16, 16, 3, padding=1)
    with fast_cpu(conv, bfloat16=True):
        conv(mx.random.normal((1, 64, 64, 16)))
        assert onednn._thread_scratch.buffer.size >= 64 * 64 * 16
    assert getattr(onednn._thread_scratch, "buffer", None) is None
