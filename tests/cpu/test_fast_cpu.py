"""`fast_cpu()` swaps the CPU subclasses into a model's layers and restores them on exit,
leaving the weights' keys alone; outside it the models are plain, lazy MLX."""

from __future__ import annotations

import ctypes
import platform
import threading

import mlx.core as mx
import mlx.nn as nn
import pytest

from stable_diffusion import fast_cpu, keep_freed_memory, loading
from stable_diffusion.cpu import kernels, store
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


def test_a_value_is_kept_from_its_second_use_until_the_block_ends():
    """`store.kept` makes a value at each of its first two uses in a block (a block that
    uses it once keeps nothing) and keeps the second; a new block, or a replaced source,
    starts over."""
    made = []
    owner, source = object(), mx.zeros(1)

    def use(source: mx.array) -> int:
        return store.kept(owner, (source,), lambda: made.append(1) or len(made))

    with fast_cpu():
        assert [use(source) for _ in range(4)] == [1, 2, 2, 2]
        replaced = mx.zeros(1)
        assert [use(replaced) for _ in range(3)] == [3, 4, 4]
    with fast_cpu():
        assert [use(replaced) for _ in range(2)] == [5, 6]
    assert use(replaced) == 7  # outside a block: made at every use


def test_a_value_can_be_kept_from_its_first_use():
    """`store.kept_from_first_use`: made once per block and per sources, from the first
    use; a new block, or a replaced source, starts over."""
    made = []
    owner, source = object(), mx.zeros(1)

    def use(source: mx.array) -> int:
        return store.kept_from_first_use(owner, (source,), lambda: made.append(1) or len(made))

    with fast_cpu():
        assert [use(source) for _ in range(3)] == [1, 1, 1]
        replaced = mx.zeros(1)
        assert [use(replaced) for _ in range(2)] == [2, 2]
    with fast_cpu():
        assert [use(replaced) for _ in range(2)] == [3, 3]
    assert [use(replaced) for _ in range(2)] == [4, 5]  # outside a block: made at every use


def test_a_value_kept_from_its_second_use_can_be_left_unmade_at_the_first():
    """`store.kept_from_second_use`: None at the first use in a block (the caller computes
    without it), then as `store.kept` from the second."""
    made = []
    owner, source = object(), mx.zeros(1)

    def use(source: mx.array) -> int | None:
        return store.kept_from_second_use(owner, (source,), lambda: made.append(1) or len(made))

    with fast_cpu():
        assert [use(source) for _ in range(3)] == [None, 1, 1]
        replaced = mx.zeros(1)
        assert [use(replaced) for _ in range(3)] == [None, 2, 2]
    with fast_cpu():
        assert [use(replaced) for _ in range(2)] == [None, 3]
    assert use(replaced) == 4  # outside a block: made at every use


class _MallocInfo(ctypes.Structure):
    """glibc's struct mallinfo2."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def test_freed_memory_stays_with_the_process_within_the_block():
    """Within `keep_freed_memory()` (and so within fast_cpu()), on glibc, a large
    allocation comes from the heap rather than an mmap of its own, in any thread started
    within, and freeing it does not shrink the heap; leaving the outermost block restores
    glibc's defaults. Elsewhere nothing is changed."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        with keep_freed_memory() as applies, fast_cpu():
            assert not applies
        return
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallocInfo
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 256 << 20

    def allocate_and_free() -> tuple[_MallocInfo, _MallocInfo, _MallocInfo]:
        before = libc.mallinfo2()
        block = libc.malloc(size)
        assert block
        during = libc.mallinfo2()
        libc.free(block)
        return before, during, libc.mallinfo2()

    with keep_freed_memory() as applies:
        assert applies
        with fast_cpu():  # nested: leaving it keeps the outer block's settings
            pass
        before, during, after = allocate_and_free()
        assert during.hblkhd == before.hblkhd  # not an mmap of its own
        assert during.uordblks >= before.uordblks + size
        assert after.arena == during.arena  # the heap kept it
        assert after.fordblks >= size
        # A thread started within the block (the server's worker) shares that heap.
        in_thread: list[tuple[_MallocInfo, _MallocInfo, _MallocInfo]] = []
        worker = threading.Thread(target=lambda: in_thread.append(allocate_and_free()))
        worker.start()
        worker.join()
        before, during, after = in_thread[0]
        assert during.hblkhd == before.hblkhd
    before, during, after = allocate_and_free()
    assert during.hblkhd >= before.hblkhd + size  # glibc's default again: its own mmap
    assert after.hblkhd == before.hblkhd
