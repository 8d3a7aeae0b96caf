"""Attention in blocks of queries (`layers.scaled_dot_product_attention` above
`ATTENTION_SCORE_BUDGET`): the same results as one block, in the models too (against
diffusers), and memory bounded by the budget instead of the score matrix."""

from __future__ import annotations

import math
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion.models import layers
from tests.helpers import MODELS, ROOT, assert_unet_matches, assert_vae_matches, reference


def _reference_attention(q, k, v, heads: int, causal: bool) -> np.ndarray:
    """Softmax attention in float64 numpy, the causal mask aligned as MLX's (the last query
    sees every key)."""
    q, k, v = (np.array(x, np.float64) for x in (q, k, v))
    batch, q_len, width = q.shape
    k_len, dim = k.shape[1], width // heads
    q, k, v = (x.reshape(batch, -1, heads, dim).transpose(0, 2, 1, 3) for x in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dim)
    if causal:
        keep = np.arange(k_len)[None] <= np.arange(q_len)[:, None] + k_len - q_len
        scores = np.where(keep, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    out = (weights / weights.sum(-1, keepdims=True)) @ v
    return out.transpose(0, 2, 1, 3).reshape(batch, q_len, width)


# (batch, heads, queries, keys, head dim, causal, queries per block): blocks that leave an
# odd remainder, a single-query block, causal masks with as many and with fewer queries
# than keys (the block's mask must keep the keys MLX's "causal" keeps).
CASES = [
    (2, 3, 37, 37, 8, True, 7),
    (1, 2, 50, 77, 16, False, 9),
    (2, 5, 33, 33, 4, True, 1),
    (1, 4, 29, 45, 8, True, 6),
    (3, 1, 64, 64, 8, False, 10),
]


@pytest.mark.parametrize(("batch", "heads", "q_len", "k_len", "dim", "causal", "rows"), CASES)
def test_blocks_compute_what_one_block_does(
    monkeypatch, batch, heads, q_len, k_len, dim, causal, rows
):
    rng = np.random.default_rng(q_len)
    q = mx.array(rng.standard_normal((batch, q_len, heads * dim), np.float32))
    k, v = (mx.array(rng.standard_normal((batch, k_len, heads * dim), np.float32)) for _ in "kv")
    whole = layers.attention(q, k, v, heads, causal)
    # The budget of `rows` queries' scores.
    monkeypatch.setattr(layers, "ATTENTION_SCORE_BUDGET", batch * heads * k_len * 4 * rows)
    assert (
        layers.query_block_rows(batch * heads, q_len, k_len, layers.ATTENTION_SCORE_BUDGET) == rows
    )
    blocked = layers.attention(q, k, v, heads, causal)
    expected = _reference_attention(q, k, v, heads, causal)
    np.testing.assert_allclose(np.array(whole), expected, rtol=0, atol=2e-6)
    # float32 rounding at most: the blocks' matmuls may round a row differently.
    np.testing.assert_allclose(np.array(blocked), np.array(whole), rtol=0, atol=1e-6)


def test_float16_blocks_stay_finite(monkeypatch):
    """A boolean mask per block, not -inf added to the scores: no NaN in float16."""
    q = mx.random.normal((1, 20, 16), key=mx.random.key(1)).astype(mx.float16)
    monkeypatch.setattr(layers, "ATTENTION_SCORE_BUDGET", 2 * 20 * 4 * 3)
    out = layers.attention(q, q, q, 2, causal=True)
    assert mx.isfinite(out).all().item()


@pytest.mark.parametrize("model", MODELS)
def test_models_match_diffusers_in_blocks(monkeypatch, model):
    """The UNet's self- and cross-attention and the VAE's mid-block attention go through
    the blocks: with a budget of one query's scores every one of them is split (one query
    per block), and the models still match diffusers."""
    split = []
    rows_of = layers.query_block_rows

    def rows(batch_heads: int, q_len: int, k_len: int, budget: int) -> int:
        result = rows_of(batch_heads, q_len, k_len, budget)
        split.append(result < q_len)
        return result

    monkeypatch.setattr(layers, "ATTENTION_SCORE_BUDGET", 1)
    monkeypatch.setattr(layers, "query_block_rows", rows)
    ref = reference(model)
    assert_unet_matches(model, ref)
    n_unet = len(split)
    assert_vae_matches(model, ref)
    assert 0 < n_unet < len(split) and all(split)


# The process's anonymous resident memory, sampled every millisecond while the attention
# runs: its maximum resident set would also count shared libraries, whose pages the kernel
# may evict under memory pressure, hiding the growth.
_PEAK = """
import sys, threading, time
import stable_diffusion  # noqa: F401 (the optimized BLAS first)
import mlx.core as mx
from stable_diffusion.models import layers

def anonymous():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024

layers.ATTENTION_SCORE_BUDGET = int(sys.argv[1])
q, k, v = (mx.random.normal((1, 8192, 64), key=mx.random.key(i)) for i in range(3))
# A small call first: OpenBLAS allocates its buffers at its first product.
mx.eval(q, k, v, layers.attention(q[:, :64], k, v, 1))
before, peak, done = anonymous(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anonymous())
        time.sleep(0.001)

sampler = threading.Thread(target=sample)
sampler.start()
mx.eval(layers.attention(q, k, v, 1))
done.set()
sampler.join()
print(max(peak[0], anonymous()) - before)
"""


def _peak_bytes(budget: int) -> int:
    """The anonymous memory an 8192-token attention adds (its scores: 256 MiB) in a fresh
    process under `budget`."""
    result = subprocess.run(
        [sys.executable, "-c", _PEAK, str(budget)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def test_blocks_bound_the_memory():
    """MLX would evaluate lazy blocks side by side, holding every block's scores at once;
    chained, only the few blocks in MLX's queue of running tasks hold theirs (measured:
    4 MiB blocks of 256 MiB of scores add 41 MiB, one block 271 MiB)."""
    scores = 8192 * 8192 * 4
    whole = _peak_bytes(2 * scores)
    blocked = _peak_bytes(scores // 64)
    assert blocked < scores // 4 < scores // 2 < whole, (whole, blocked)
