"""`fast_cpu()`: the one door to the CPU paths."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import mlx.core as mx
import mlx.nn as nn

from ..models.layers import attention_backend
from . import kernels, memory, onednn, store
from .layers import SUBCLASSES

# The models `fast_cpu()` gives the CPU paths when it is given none: every model loaded
# (`loading.folder.load_into` tracks them), as long as it lives.
_TRACKED: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def compute_dtype(weight_dtype: mx.Dtype) -> mx.Dtype:
    """The activations' dtype for weights stored in `weight_dtype`. On the CPU it is
    float32 whatever the weights: float16 matmuls miss the optimized BLAS there (many times
    slower: docs/performance.md), so float16 and quantized weights only save memory and are
    converted as each layer runs (the matmuls promote them)."""
    return mx.float32 if on_cpu() else weight_dtype


def track(*models: nn.Module) -> None:
    """Let `fast_cpu()` without arguments give `models` the CPU paths."""
    _TRACKED.update((id(model), model) for model in models)


def in_fast_cpu() -> bool:
    """Inside `fast_cpu()`, computing on the CPU."""
    return store.in_block() and on_cpu()


@contextmanager
def _cpu_subclasses(models: list[nn.Module]) -> Iterator[None]:
    """Each layer of `models` as its CPU subclass (as `nn.quantize` swaps layers), until
    the block ends; a layer already swapped (by an outer block) is left to that block."""
    swapped = []
    for model in models:
        for _, module in model.named_modules():
            subclass = SUBCLASSES.get(type(module))
            if subclass is not None:
                swapped.append((module, type(module)))
                module.__class__ = subclass
    try:
        yield
    finally:
        for module, original in swapped:
            module.__class__ = original


def _cache_limit() -> int:
    """MLX's buffer cache limit (setting it is the only way to read it)."""
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    return limit


@contextmanager
def _buffer_cache(limit: int) -> Iterator[None]:
    previous = mx.set_cache_limit(max(limit, _cache_limit()))
    try:
        yield
    finally:
        mx.set_cache_limit(previous)


@contextmanager
def fast_cpu(*models: nn.Module, bfloat16: bool = False) -> Iterator[None]:
    """Within this block, on the CPU, `models` (by default every loaded model: `track`) run
    their CPU paths: attention, SiLU, GEGLU and layer norm in numpy on
    all cores; wide 3x3 convolutions by Winograd, their transformed kernels kept from their
    second use until the block ends, as are the text context's keys and values
    (`store.kept`). Freed memory is reused rather than given back to the system and faulted
    in again: on Linux with glibc the process keeps what it frees within the block
    (`keep_freed_memory`; wrap the phases in one to share it between them, as the scripts
    do); elsewhere MLX keeps freed buffers of each size up to an eighth of the RAM. The
    price is laziness: each step computes as the generator advances, not at `mx.eval`. No
    effect on a GPU. Use one block per phase (denoising, decoding): leaving it frees what
    it kept (and MLX's buffers, whose sizes from a decode slowed the UNet steps after it:
    docs/performance.md). On leaving, every layer is its model class again.

    With `bfloat16`, the linear layers, convolutions and attention (all but the text
    encoders' causal attention) compute in bfloat16 through oneDNN (`onednn.py`: CPUs with
    AVX512_BF16 or AMX, the optional requirements-bfloat16.txt), each weight packed in
    bfloat16 at its first use in the block and kept until it ends (half its float32 size);
    where that cannot run,
    `onednn.Unavailable` says why and names the fix. Without it, on CPUs with AVX-512 where
    oneDNN is installed, what `onednn.py`'s docstring lists (linear layers, norms,
    attention, some convolutions) computes in float32 through oneDNN
    (`onednn.float32_by_default`). No effect on a GPU."""
    with ExitStack() as stack:
        if bfloat16 and on_cpu():
            onednn.require()
            stack.enter_context(onednn.enabled())
        elif on_cpu() and onednn.float32_by_default():
            stack.enter_context(onednn.enabled(bfloat16=False))
        stack.enter_context(store.block())
        if on_cpu():
            if not stack.enter_context(memory.keep_freed_memory()):
                ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                stack.enter_context(_buffer_cache(ram // 8))
            stack.enter_context(attention_backend(kernels.attention))
            stack.enter_context(_cpu_subclasses(list(models or _TRACKED.values())))
        yield
