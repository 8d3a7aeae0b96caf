"""Eager numpy kernels for the CPU, used inside `fast_cpu()`.

On the CPU, MLX computes exp and division one element at a time, which made softmax and
SiLU cost more than the matmuls around them; numpy's are vectorized and release the GIL, so
they run on all cores (the rates: docs/performance.md). The attention and the GELU take
their powers of e as powers of whichever base numpy raises fastest on this CPU
(`_EXPONENTIALS`), the factor log_b(e) riding along with the queries' scale. These kernels
need their inputs
computed, which breaks MLX's laziness: so they run only within `fast_cpu()`, for loops that
evaluate every step anyway, as the scripts do. The GEGLU's gating (an erf GELU) and the
layer norm run here too: MLX computes them on one core, numpy on all of them.

The attention reads numpy views of MLX arrays it has just computed; the SiLU, the GEGLU and
the layer norm overwrite, through numpy, the buffer of an MLX array that they have just
computed and that nothing else references.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import TypeVar

import mlx.core as mx
import numpy as np

from . import blas, features, onednn

T = TypeVar("T")
_CORES = os.cpu_count() or 1
_thread_scratch = threading.local()

# Scores per attention block, one per core (4 MB of float32): big enough for efficient
# matmuls, small enough to stay near the cache and bound memory (SD 2.x at 768px has 9216
# tokens; the block sizes measured: docs/performance.md).
_SCORE_BLOCK_ELEMENTS = 1 << 20
# Keys from which the attention shifts its scores by a bound, riding along in the matmuls
# on copies of the operands, instead of by each row's max (three more passes over the
# scores): faster on SD 1.5's 4096 keys, slower on SDXL's 256, even between 1536 and 2304
# (docs/performance.md).
_SHIFTED_MIN_KEYS = 2048
# Scores per head (queries x keys) from which float32 attention reads each head's columns
# in place, a block of rows sharing its shift (`onednn.head_attention`): SD 2.x's 9216 x 9216
# at 768px 1.15x faster than `onednn.attention`'s groups, as fast at 4096 x 4096, slower
# below (docs/performance.md).
_SHARED_SHIFT_MIN_SCORES = 1 << 25


@dataclass(frozen=True)
class Exponentials:
    """e^x taken as b^(x log_b e), with numpy's float32 `power` function of base b."""

    power: Callable[..., np.ndarray]  # np.exp2 or np.exp, called with out=
    log_e: float  # log_b(e)

    @property
    def headroom(self) -> float:
        """Shifted scores are at most this: b^headroom = 2^40, and 2^40 * 1e5 keys is far
        from float32's overflow."""
        return 40 * math.log(2) * self.log_e


BASE_2 = Exponentials(np.exp2, math.log2(math.e))
BASE_E = Exponentials(np.exp, 1.0)
# numpy's float32 exp2 runs SVML's AVX-512 code where the CPU has AVX-512, twice as fast as
# its exp there; elsewhere it is scalar code, 2.4x slower than its exp (docs/performance.md).
_EXPONENTIALS = BASE_2 if features.has_avx512() else BASE_E
# A row whose powers sum to less than 2^-80 may have lost precision to underflow
# (with up to 2^17 keys its largest power may be 2^-97, and those 2^-24 of it subnormal):
# it is computed again, exactly.
_MIN_ROW_SUM = 2.0**-80
# Elements per SiLU chunk: the chunk and its scratch stay in a core's L2 cache.
_SILU_CHUNK = 1 << 15


@cache
def _threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_CORES, thread_name_prefix="fast_cpu")


def _on_all_cores(kernel: Callable[[T], object], parts: list[T]) -> list:
    return list(_threads().map(kernel, parts))


def _split_over_cores(kernel: Callable[..., object], *arrays: np.ndarray) -> list:
    """kernel(*parts) on all cores, the arrays split alike along their first axis, into as
    many parts as there are cores (or rows); the kernel's results, part by part."""
    parts = min(_CORES, len(arrays[0]))
    return _on_all_cores(
        lambda part: kernel(*part),
        list(zip(*(np.array_split(array, parts) for array in arrays), strict=True)),
    )


def _exponentiate_exactly(scores: np.ndarray, exponentials: Exponentials) -> None:
    """b^(scores - row max) in place, b the base of `exponentials`."""
    scores -= scores.max(axis=-1, keepdims=True)
    exponentials.power(scores, out=scores)


def _mask_future(scores: np.ndarray, first_row: int) -> None:
    """-inf where a block's query (row `first_row` onwards) would attend to a later key;
    `scores` is (rows, keys) or (heads, rows, keys)."""
    rows, k_len = scores.shape[-2:]
    future = np.arange(k_len)[None] > np.arange(first_row, first_row + rows)[:, None]
    scores[..., future] = -np.inf


def _attend_exactly(
    queries: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    out: np.ndarray,
    first_row: int,
    causal: bool,
    scale: float,
    dim: int,
) -> None:
    """out = softmax(scale * queries @ keys^T) @ values, in `_EXPONENTIALS`, for one block of
    rows of a group of heads; all four are column views of the (B, L, heads * dim)
    projections, `dim` columns per head."""
    columns = [slice(first, first + dim) for first in range(0, queries.shape[1], dim)]
    rows = len(queries)
    scores = _scratch(len(columns) * rows * len(keys)).reshape(len(columns), rows, len(keys))
    for head_scores, head in zip(scores, columns, strict=True):
        blas.matmul_into(queries[:, head], keys[:, head].T, head_scores, scale)
    if causal:
        _mask_future(scores, first_row)
    _exponentiate_exactly(scores, _EXPONENTIALS)
    for head_scores, head in zip(scores, columns, strict=True):
        blas.matmul_into(head_scores, values[:, head], out[:, head])
    # out with its heads as an axis of their own: a view, so the division lands in place.
    by_head = np.lib.stride_tricks.as_strided(
        out, (rows, len(columns), dim), (out.strides[0], dim * out.itemsize, out.itemsize)
    )
    by_head /= scores.sum(axis=-1).T[..., None]


def _score_shifts(q: mx.array, k: mx.array, heads: int, exponentials: Exponentials) -> mx.array:
    """(B, L, heads): how much to subtract from each query's scores (on (B, L, heads * dim)
    projections, scaled by 1 / sqrt(dim) and for `exponentials`' base) so that b^score
    cannot overflow.

    By Cauchy-Schwarz a row's scores lie within +-|q| max|k|; shifted to at most the
    headroom (`Exponentials`), their powers and sums stay finite. Subtracting this bound
    instead of each row's max saves two passes over the scores, and riding along in the
    matmul (one more column), the shift costs nothing."""
    batch, length, width = q.shape
    dim = width // heads
    q, k = q.astype(mx.float32), k.astype(mx.float32)
    key_norms = mx.sqrt(mx.square(k.reshape(batch, -1, heads, dim)).sum(axis=-1)).max(axis=1)
    query_norms = mx.sqrt(mx.square(q.reshape(batch, length, heads, dim)).sum(axis=-1))
    bounds = query_norms * key_norms[:, None] * (exponentials.log_e / math.sqrt(dim))
    return mx.maximum(bounds - exponentials.headroom, 0)


def _attend(
    queries: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    out: np.ndarray,
    first_row: int,
    causal: bool,
) -> None:
    """out = softmax(queries @ keys) @ values for one block of one head's queries, the
    scores exponents of `_EXPONENTIALS`' base, the queries carrying their shift column (see
    `_score_shifts`) and the values a column of ones, whose output is the row sums of the
    powers: no separate pass over the scores."""
    rows, k_len = len(queries), keys.shape[1]
    scores = _scratch(rows * k_len).reshape(rows, k_len)
    blas.matmul_into(queries, keys, scores)
    if causal:
        _mask_future(scores, first_row)
    _EXPONENTIALS.power(scores, out=scores)
    blas.matmul_into(scores, values, out)
    _redo_underflowed(queries, keys, values, out, first_row, causal, _EXPONENTIALS)
    out /= out[:, -1:]  # normalizing the block's output is cheaper than its probabilities


def _redo_underflowed(
    queries: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    out: np.ndarray,
    first_row: int,
    causal: bool,
    exponentials: Exponentials,
) -> None:
    """The rows of `out` (see `_attend`) whose powers summed to under `_MIN_ROW_SUM`,
    computed again with each row's own max: a row whose true max lies far below its bound
    lost its precision to underflow."""
    underflowed = np.flatnonzero(out[:, -1] < _MIN_ROW_SUM)
    if underflowed.size:
        redo = queries[underflowed] @ keys
        if causal:
            redo[np.arange(keys.shape[1])[None] > (first_row + underflowed)[:, None]] = -np.inf
        _exponentiate_exactly(redo, exponentials)
        out[underflowed] = redo @ values


def _scratch(size: int) -> np.ndarray:
    """This thread's buffer for a block of scores, reused from block to block."""
    buffer = getattr(_thread_scratch, "buffer", None)
    if buffer is None or buffer.size < size:
        buffer = _thread_scratch.buffer = np.empty(size, np.float32)
    return buffer[:size]


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int, causal: bool) -> mx.array:
    """Softmax attention over (B, L, heads * dim) inputs, in blocks of queries (of one head,
    or of a few on short sequences) spread over the cores: each block is single-threaded
    matmuls around its softmax, its scores kept in the core's own buffer. Faster on the
    UNets' shapes than MLX's multi-threaded matmuls with the softmax between them, one
    block at a time (docs/performance.md): no core waits for the other between the stages.
    Scores are exponents of `_EXPONENTIALS`' base b: softmax(s) = b^(s log_b e) / sum
    b^(s log_b e), the factor log_b(e) riding along with the scale. Where the CPU layers
    compute through oneDNN, all but causal attention (the text encoders') runs there,
    faster at every size the models have (docs/performance.md)."""
    if onednn.active() and not causal:
        if onednn.bfloat16_active() or q.shape[1] * k.shape[1] < _SHARED_SHIFT_MIN_SCORES:
            return _onednn_attention(q, k, v, heads)
        return _onednn_float32_attention(q, k, v, heads)
    attend = _shifted_attention if k.shape[1] >= _SHIFTED_MIN_KEYS else _exact_attention
    return attend(q, k, v, heads, causal)


def _in_blocks(
    attend: Callable[[int, slice, slice], None], batch: int, heads: int, q_len: int, k_len: int
) -> None:
    """attend(entry, heads, rows) for every block of rows of every group of an entry's heads,
    on all cores. A block holds up to `_SCORE_BLOCK_ELEMENTS` scores, of as many heads as
    fit while every core gets a block: on short sequences (SDXL's 256 tokens, SD's 77-token
    text) one head's block is so small that numpy's per-call costs exceed its work, and the
    threads mostly wait for each other's calls (SDXL's 256x77 cross-attention runs about
    twice as fast by groups of 20 heads: docs/performance.md)."""
    rows = min(q_len, max(1, _SCORE_BLOCK_ELEMENTS // k_len))
    group = max(1, min(_SCORE_BLOCK_ELEMENTS // (rows * k_len), math.ceil(batch * heads / _CORES)))
    group = math.ceil(heads / math.ceil(heads / group))  # as many groups, as even as can be
    jobs = [
        (entry, slice(first, min(first + group, heads)), slice(start, start + rows))
        for entry in range(batch)
        for first in range(0, heads, group)
        for start in range(0, q_len, rows)
    ]
    with blas.one_thread_per_call():
        _on_all_cores(lambda job: attend(*job), jobs)


def _exact_attention(q: mx.array, k: mx.array, v: mx.array, heads: int, causal: bool) -> mx.array:
    """Each block reads its head's columns of the projections in place and writes its
    output into place: no copies."""
    dtype = v.dtype
    q, k, v = (mx.contiguous(x.astype(mx.float32)) for x in (q, k, v))
    mx.eval(q, k, v)
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    batch, q_len, width = q.shape
    dim = width // heads
    scale = _EXPONENTIALS.log_e / math.sqrt(dim)
    out = np.empty_like(q)

    def attend(entry: int, group: slice, rows: slice) -> None:
        columns = slice(group.start * dim, group.stop * dim)
        _attend_exactly(
            q[entry, rows, columns],
            k[entry, :, columns],
            v[entry, :, columns],
            out[entry, rows, columns],
            rows.start,
            causal,
            scale,
            dim,
        )

    _in_blocks(attend, batch, heads, q_len, k.shape[1])
    return mx.array(out).astype(dtype)


def _shifted_operands(
    q: mx.array, k: mx.array, v: mx.array, heads: int
) -> tuple[mx.array, mx.array, mx.array]:
    """Each head's operands, evaluated, with the shift column and row of ones that
    `_attend` needs: queries (B*H, L, D + 1) scaled for `_EXPONENTIALS`' base, their
    negated shift as the last column; keys (B*H, D + 1, S) with a row of ones to meet the
    shift; values (B*H, S, D + 1) with a column of ones, whose output is the row sums of
    the powers."""
    batch, _, model_width = q.shape
    dim = model_width // heads

    def split_heads(x: mx.array, transpose_to: tuple[int, ...]) -> mx.array:
        x = x.astype(mx.float32).reshape(batch, -1, heads, dim).transpose(transpose_to)
        return x.reshape(batch * heads, *x.shape[2:])

    queries = split_heads(q * (_EXPONENTIALS.log_e / math.sqrt(dim)), (0, 2, 1, 3))  # (B*H, L, D)
    keys = split_heads(k, (0, 2, 3, 1))  # (B*H, D, S)
    shifts = _score_shifts(q, k, heads, _EXPONENTIALS)
    shifts = shifts.transpose(0, 2, 1).reshape(*queries.shape[:2], 1)  # (B*H, L, 1)
    queries = mx.contiguous(mx.concatenate([queries, -shifts], axis=-1))
    keys = mx.contiguous(mx.concatenate([keys, mx.ones_like(keys[:, :1])], axis=1))
    values = split_heads(v, (0, 2, 1, 3))  # (B*H, S, D)
    values = mx.contiguous(mx.concatenate([values, mx.ones_like(values[..., :1])], axis=-1))
    mx.eval(queries, keys, values)
    return queries, keys, values


def _merge_heads(out: np.ndarray, batch: int, heads: int, dtype: mx.Dtype) -> mx.array:
    """(B*H, L, D + 1) outputs of `_attend` -> (B, L, H*D), the ones' column dropped."""
    q_len, dim = out.shape[1], out.shape[2] - 1
    result = mx.array(out[..., :dim]).reshape(batch, heads, q_len, dim)
    return result.transpose(0, 2, 1, 3).reshape(batch, q_len, heads * dim).astype(dtype)


def _shifted_attention(q: mx.array, k: mx.array, v: mx.array, heads: int, causal: bool) -> mx.array:
    """Each head's operands gathered with the shift column and row of ones that `_attend`
    needs."""
    batch, q_len, width = q.shape
    dim = width // heads
    queries, keys, values = (np.asarray(a) for a in _shifted_operands(q, k, v, heads))
    out = np.empty((batch * heads, q_len, dim + 1), np.float32)

    def attend(entry: int, group: slice, rows: slice) -> None:
        for head in range(entry * heads + group.start, entry * heads + group.stop):
            _attend(
                queries[head, rows], keys[head], values[head], out[head, rows], rows.start, causal
            )

    _in_blocks(attend, batch, heads, q_len, k.shape[1])
    return _merge_heads(out, batch, heads, v.dtype)


def _normalized_heads(out: np.ndarray, dtype: mx.Dtype) -> mx.array:
    """(B, L, H, D + 1) outputs, their last column the row sums -> (B, L, H*D)."""
    batch, length, heads, value_width = out.shape
    result = mx.array(out)  # a row-major copy, whatever `out`'s strides
    result = result[..., :-1] / result[..., -1:]
    return result.reshape(batch, length, heads * (value_width - 1)).astype(dtype)


def _onednn_float32_attention(q: mx.array, k: mx.array, v: mx.array, heads: int) -> mx.array:
    """Softmax attention through oneDNN's float32 matmuls reading the projections in place
    (`onednn.head_attention`): no per-head copies of the operands. Each head's block of
    rows shares one shift, its rows' largest (`_score_shifts`); rows whose powers
    underflowed under that shared shift are computed again exactly."""
    batch, length, width = q.shape
    dim = width // heads
    dtype = v.dtype
    q, k, v = (mx.contiguous(a.astype(mx.float32)) for a in (q, k, v))
    values = v.reshape(batch, -1, heads, dim)
    values = mx.concatenate([values, mx.ones((*values.shape[:-1], 1), mx.float32)], axis=-1)
    shifts = _score_shifts(q, k, heads, BASE_E)
    mx.eval(q, k, values, shifts)
    queries, keys, values, shifts = (np.asarray(a) for a in (q, k, values, shifts))
    out = np.empty((batch, length, heads, dim + 1), np.float32)
    for entry in range(batch):
        onednn.head_attention(queries[entry], keys[entry], values[entry], shifts[entry], out[entry])
        _redo_underflowed_heads(q[entry], k[entry], v[entry], out[entry])
    return _normalized_heads(out, dtype)


def _onednn_attention(q: mx.array, k: mx.array, v: mx.array, heads: int) -> mx.array:
    """Softmax attention through oneDNN's matmuls in this block's precision
    (`onednn.attention`), each row shifted by its own `_score_shifts`; rows that
    underflowed all the same are computed again exactly, in float32. Bfloat16 projections
    (in bfloat16 blocks) are read as they are and give a bfloat16 output."""
    batch, length, width = q.shape
    dim, dtype = width // heads, v.dtype
    operands = mx.bfloat16 if dtype == mx.bfloat16 else mx.float32
    q, k, v = (mx.contiguous(a.astype(operands)) for a in (q, k, v))
    shifts = _score_shifts(q, k, heads, BASE_E)
    mx.eval(q, k, v, shifts)
    queries, keys, values, shifts = (onednn.numpy(a) for a in (q, k, v, shifts))
    out = np.empty((batch, heads, length, dim + 1), np.float32)
    for entry in range(batch):
        onednn.attention(queries[entry], keys[entry], values[entry], shifts[entry], out[entry])
        _redo_underflowed_heads(q[entry], k[entry], v[entry], out[entry].transpose(1, 0, 2))
    return _normalized_heads(out.transpose(0, 2, 1, 3), dtype)


def _redo_underflowed_heads(
    queries: mx.array, keys: mx.array, values: mx.array, out: np.ndarray
) -> None:
    """`_redo_underflowed` for each head of a (length, heads, dim + 1) output with a row
    that underflowed, from the (length, heads * dim) queries and (keys, heads * dim) keys
    and values (in float32 or bfloat16)."""
    underflowed = np.flatnonzero((out[..., -1] < _MIN_ROW_SUM).any(axis=0))
    if not len(underflowed):
        return
    dim = out.shape[2] - 1
    queries, keys, values = (np.asarray(a.astype(mx.float32)) for a in (queries, keys, values))
    for head in underflowed:
        columns = slice(head * dim, (head + 1) * dim)
        scaled_keys = keys[:, columns].T * np.float32(dim**-0.5)
        with_ones = np.concatenate([values[:, columns], np.ones((len(keys), 1), np.float32)], 1)
        _redo_underflowed(
            queries[:, columns], scaled_keys, with_ones, out[:, head], 0, False, BASE_E
        )


def _silu_in_place(values: np.ndarray) -> None:
    scratch = np.empty(min(_SILU_CHUNK, values.size), values.dtype)
    # exp(-x) overflows to inf for x < -88: x / inf = -0, SiLU's limit.
    with np.errstate(over="ignore"):
        for start in range(0, values.size, _SILU_CHUNK):
            chunk = values[start : start + _SILU_CHUNK]
            denominator = scratch[: chunk.size]
            np.negative(chunk, out=denominator)
            np.exp(denominator, out=denominator)
            denominator += 1
            chunk /= denominator


def silu_(x: mx.array) -> mx.array:
    """x * sigmoid(x), computed into x's own buffer: x must be a fresh, unshared result."""
    x = mx.contiguous(x)
    mx.eval(x)
    _split_over_cores(_silu_in_place, np.asarray(x).reshape(-1))
    return x


# GELU(g) = g (1 + erf(g / sqrt 2)) / 2, with erf(z) = 1 - poly(t) e^(-z^2) for z >= 0 and
# t = 1 / (1 + p z): Abramowitz and Stegun's 7.1.26 (error at most 1.5e-7). Folded in: z =
# g / sqrt 2 (into p and the exponent), the halving (into the coefficients), and e^(...) as
# b^(... log_b e) (`_EXPONENTIALS`).
_ERF_P = 0.3275911 / math.sqrt(2)
_HALF_ERF_COEFFICIENTS = tuple(
    0.5 * a
    for a in (  # a5 .. a1
        1.061405429,
        -1.453152027,
        1.421413741,
        -0.284496736,
        0.254829592,
    )
)
# Elements per GEGLU chunk: numpy's ~20 calls per chunk cost little against its work
# (smaller chunks ran slower: docs/performance.md), and its buffers stay in the L3 cache.
_GEGLU_CHUNK = 1 << 17


def _geglu_rows(
    hidden: np.ndarray, gate: np.ndarray, hidden_bias: np.ndarray, gate_bias: np.ndarray
) -> None:
    """hidden = (hidden + hidden_bias) * GELU(gate + gate_bias) over (rows, width) arrays."""
    step = max(1, _GEGLU_CHUNK // hidden.shape[1])
    buffers = [np.empty((step, hidden.shape[1]), np.float32) for _ in range(4)]
    for start in range(0, len(hidden), step):
        out = hidden[start : start + step]
        g, t, polynomial, tail = (buffer[: len(out)] for buffer in buffers)
        out += hidden_bias
        np.add(gate[start : start + step], gate_bias, out=g)
        np.abs(g, out=t)
        t *= _ERF_P
        t += 1
        np.reciprocal(t, out=t)
        np.multiply(t, _HALF_ERF_COEFFICIENTS[0], out=polynomial)
        for coefficient in _HALF_ERF_COEFFICIENTS[1:]:
            polynomial += coefficient
            polynomial *= t
        np.square(g, out=tail)
        tail *= -_EXPONENTIALS.log_e / 2  # e^(-g^2 / 2) = b^(g^2 * this)
        _EXPONENTIALS.power(tail, out=tail)
        tail *= polynomial  # (1 - erf(|z|)) / 2, the normal distribution's tail beyond |g|
        # g Phi(g) = (g + |g|) / 2 - |g| tail: Phi(g) is 1 - tail for g >= 0, tail below.
        # (Fast passes only: numpy's copysign and maximum take several multiplications' time.)
        np.abs(g, out=t)
        tail *= t
        g += t
        g *= 0.5
        g -= tail
        out *= g


def geglu_(
    hidden: mx.array, gate: mx.array, hidden_bias: mx.array, gate_bias: mx.array
) -> mx.array:
    """(hidden + hidden_bias) * GELU(gate + gate_bias) (the exact, erf GELU, to 1.5e-7),
    computed into hidden's buffer: hidden must be a fresh, unshared float32 result."""
    hidden, gate = mx.contiguous(hidden), mx.contiguous(gate)
    mx.eval(hidden, gate, hidden_bias, gate_bias)
    width = hidden.shape[-1]
    hidden_rows = np.asarray(hidden).reshape(-1, width)
    gate_rows = np.asarray(gate).reshape(-1, width)
    biases = np.asarray(hidden_bias, np.float32), np.asarray(gate_bias, np.float32)
    _split_over_cores(
        lambda hidden_part, gate_part: _geglu_rows(hidden_part, gate_part, *biases),
        hidden_rows,
        gate_rows,
    )
    return hidden


# Elements per layer norm chunk: numpy's ~12 calls per chunk cost little against its work
# (smaller chunks ran slower: docs/performance.md), and its rows stay in the L2 cache.
_LAYER_NORM_CHUNK = 1 << 18


def _layer_norm_rows(
    rows: np.ndarray, out: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float
) -> None:
    """out = (rows - mean) / sqrt(variance + eps) * weight + bias, row by row."""
    width = rows.shape[1]
    step = max(1, _LAYER_NORM_CHUNK // width)
    for start in range(0, len(rows), step):
        x, y = rows[start : start + step], out[start : start + step]
        mean = np.add.reduce(x, axis=1, keepdims=True)
        mean *= 1 / width
        np.subtract(x, mean, out=y)
        # Two passes (mean, then centred squares): E[x^2] - E[x]^2 cancels badly.
        scale = np.einsum("ij,ij->i", y, y)[:, None]
        scale *= 1 / width
        scale += eps
        np.sqrt(scale, out=scale)
        np.reciprocal(scale, out=scale)
        y *= scale
        y *= weight
        y += bias


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """Layer norm over x's last axis, into a fresh buffer: faster than MLX's
    `fast.layer_norm` on the UNets' shapes, which runs on one core."""
    out = mx.contiguous(mx.zeros_like(x))
    x = mx.contiguous(x)
    mx.eval(x, out, weight, bias)
    width = x.shape[-1]
    rows, out_rows = np.asarray(x).reshape(-1, width), np.asarray(out).reshape(-1, width)
    weight, bias = np.asarray(weight, np.float32), np.asarray(bias, np.float32)
    _split_over_cores(
        lambda part, out_part: _layer_norm_rows(part, out_part, weight, bias, eps), rows, out_rows
    )
    return out


# Elements per group norm chunk (1 MB of float32): smaller chunks ran slower.
_GROUP_NORM_CHUNK = 1 << 18
# Pixels up to which a group norm's statistics come from oneDNN where the CPU layers compute
# there: 2-5x faster than numpy's on the UNets' latents, no faster on the VAE's larger
# images, where its extra pass (it writes a normalized copy) costs as much as it saves
# (docs/performance.md).
_ONEDNN_STATISTICS_MAX_PIXELS = 128 * 128


def group_norm(
    x: mx.array, groups: int, weight: mx.array, bias: mx.array, eps: float, silu_after: bool
) -> mx.array:
    """Group norm of a float32 NHWC image over its channel groups, with its SiLU if
    `silu_after`, into a fresh buffer, on all cores: see `_group_norm_pixels`."""
    out = mx.contiguous(mx.zeros_like(x))
    x = mx.contiguous(x)
    mx.eval(x, out, weight, bias)
    batch, channels = x.shape[0], x.shape[-1]
    pixels = np.asarray(x).reshape(batch, -1, channels)
    out_pixels = np.asarray(out).reshape(batch, -1, channels)
    affine = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
    for entry, out_entry in zip(pixels, out_pixels, strict=True):
        _group_norm_pixels(entry, out_entry, groups, *affine, eps, silu_after)
    return out


def _group_norm_pixels(
    pixels: np.ndarray,
    out: np.ndarray,
    groups: int,
    weight: np.ndarray,
    bias: np.ndarray,
    eps: float,
    silu_after: bool,
) -> None:
    """One image's (pixels, channels) group norm into `out`: each group's mean and variance
    (float64), then the normalization, scale and shift (and SiLU) in one pass; in oneDNN
    where the CPU layers compute there, else in numpy over chunks of pixels."""
    if onednn.active() and len(pixels) <= _ONEDNN_STATISTICS_MAX_PIXELS:
        mean, variance = _groups_of_channels(*onednn.channel_statistics(pixels, out), groups)
    else:
        mean, variance = _group_statistics(pixels, groups)
    scale = weight / np.sqrt(variance + eps)
    shift, scale = (bias - mean * scale).astype(np.float32), scale.astype(np.float32)
    if onednn.active():  # one pass of oneDNN's vectorized code, 3x faster on the VAE's
        onednn.scale_shift(pixels, out, scale, shift, silu_after)
        return
    step = max(1, _GROUP_NORM_CHUNK // pixels.shape[1])

    def normalize(part: np.ndarray, out_part: np.ndarray) -> None:
        for start in range(0, len(part), step):
            y = out_part[start : start + step]
            np.multiply(part[start : start + step], scale, out=y)
            y += shift
            if silu_after:
                _silu_in_place(y.reshape(-1))

    _split_over_cores(normalize, pixels, out)


def _groups_of_channels(
    channel_mean: np.ndarray, channel_variance: np.ndarray, groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: its group's mean and variance from its channels' (each over the same
    pixels): the mean of their means; the mean of their variances plus the variance of
    their means."""
    means = channel_mean.astype(np.float64).reshape(groups, -1)
    group_mean = means.mean(axis=1, keepdims=True)
    variances = channel_variance.astype(np.float64).reshape(groups, -1)
    group_variance = (variances + np.square(means - group_mean)).mean(axis=1)
    return np.repeat(group_mean, means.shape[1]), np.repeat(group_variance, means.shape[1])


def _group_statistics(pixels: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: its group's mean and variance over (pixels, channels), in two passes
    over chunks of pixels on all cores: per-channel sums (float32 within a chunk, float64
    across), then the centred squares about each group's mean (E[x^2] - E[x]^2 cancels
    badly)."""
    channels = pixels.shape[1]
    count = len(pixels) * (channels // groups)
    step = max(1, _GROUP_NORM_CHUNK // channels)

    def per_group(kernel: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Per channel: its group's total of kernel(chunk) over the chunks, over `count`."""

        def part_total(part: np.ndarray) -> np.ndarray:
            chunks = (part[start : start + step] for start in range(0, len(part), step))
            return np.sum([kernel(chunk) for chunk in chunks], axis=0, dtype=np.float64)

        total = np.sum(_split_over_cores(part_total, pixels), axis=0)
        return np.repeat(total.reshape(groups, -1).sum(axis=1) / count, channels // groups)

    mean = per_group(lambda chunk: np.add.reduce(chunk, axis=0))
    mean32 = mean.astype(np.float32)

    def centred_squares(chunk: np.ndarray) -> np.ndarray:
        centred = np.subtract(chunk, mean32)
        np.square(centred, out=centred)
        return np.add.reduce(centred, axis=0)

    return mean, per_group(centred_squares)
