"""bfloat16 matmuls through oneDNN, for `fast_cpu(bfloat16=True)`.

On CPUs with AVX512_BF16 (or AMX) oneDNN's bfloat16 matmul runs about twice as fast as
OpenBLAS's float32 one on the UNets' shapes; MLX has no fast CPU bfloat16 matmul, and
OpenBLAS's builds at hand none at all (docs/performance.md). The activations stay float32:
each matmul converts its input to bfloat16 with oneDNN's own reorder (vectorized, unlike a
numpy pass), multiplies by the weight converted once per `fast_cpu()` block into oneDNN's
packed layout, sums in float32 and adds the bias in the same pass. oneDNN 3.2's "fpmath"
attribute (float32 inputs, bfloat16 compute) only applies with AMX; on AVX512_BF16 it
computes in float32, no faster, so the conversion is explicit.

The library comes from the optional `onednn-cpu-gomp` wheel (requirements-bfloat16.txt),
called through ctypes (its C API, oneDNN 3.x); `unavailable_reason` says why it cannot run.
Like `kernels.py`, the matmuls are eager: they evaluate their inputs.
"""

from __future__ import annotations

import contextvars
import ctypes
import importlib.metadata
import platform
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import features
from .store import kept

PACKAGE = "onednn-cpu-gomp"
FIX = "pip install -r requirements-bfloat16.txt"
_LIBRARY_NAME = "libdnnl.so.3"
_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

# oneDNN's C API values (dnnl_types.h, oneDNN 3.x).
_CPU_ENGINE = 1
_IN_ORDER_STREAM = 1
_BF16, _F32 = 2, 3
_FORMAT_ANY = 1
_QUERY_WEIGHTS_MD = 131
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS, _ARG_BIAS = 1, 17, 33, 41
_ARG_FROM, _ARG_TO = _ARG_SRC, _ARG_DST
_MAX_DIMS = 12
_Dims = ctypes.c_int64 * _MAX_DIMS
_Handle = ctypes.c_void_p

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("bfloat16", default=False)
_thread_scratch = threading.local()


class Unavailable(RuntimeError):
    """bfloat16 compute was asked for where it cannot run."""


def _library_path() -> Path | None:
    try:
        files = importlib.metadata.distribution(PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = next((f for f in files if f.name == _LIBRARY_NAME), None)
    if found is None:
        return None
    path = Path(str(found.locate()))
    return path if path.is_file() else None


def cpu_has_bfloat16() -> bool:
    return bool(set(_CPU_FLAGS) & features.cpu_flags())


def unavailable_reason() -> str | None:
    """Why bfloat16 compute cannot run here, with the fix; None where it can."""
    machine = platform.machine().lower()
    if not sys.platform.startswith("linux") or machine not in ("x86_64", "amd64"):
        return (
            f"bfloat16 compute needs Linux on x86-64 (this is {sys.platform} on {machine}): "
            "run without --bfloat16"
        )
    if not cpu_has_bfloat16():
        return (
            "bfloat16 compute needs a CPU with AVX512_BF16 or AMX (/proc/cpuinfo's flags list "
            "neither avx512_bf16 nor amx_bf16): run without --bfloat16"
        )
    if _library_path() is None:
        return f"bfloat16 compute needs oneDNN ({PACKAGE}), which is not installed: {FIX}"
    return None


def require() -> None:
    """Raise `Unavailable` (naming the fix) unless bfloat16 compute can run here."""
    reason = unavailable_reason()
    if reason is not None:
        raise Unavailable(reason)


@contextmanager
def enabled() -> Iterator[None]:
    """Within this block the CPU layers' matmuls compute in bfloat16 (`require` first)."""
    token = _ENABLED.set(True)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def active() -> bool:
    return _ENABLED.get()


class _Arg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", _Handle)]


@dataclass(frozen=True)
class _Library:
    dnnl: ctypes.CDLL
    engine: _Handle
    stream: _Handle

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"oneDNN failed to {what} (dnnl_status_t {status})")

    def descriptor(self, shape: tuple[int, ...], dtype: int, strides: tuple[int, ...] | None):
        """A memory descriptor: the given strides (in elements), or any layout if None."""
        md = _Handle()
        if strides is None:
            status = self.dnnl.dnnl_memory_desc_create_with_tag(
                ctypes.byref(md), len(shape), _Dims(*shape), dtype, _FORMAT_ANY
            )
        else:
            status = self.dnnl.dnnl_memory_desc_create_with_strides(
                ctypes.byref(md), len(shape), _Dims(*shape), dtype, _Dims(*strides)
            )
        self.check(status, "describe a matrix")
        return md

    def primitive(self, descriptor: _Handle) -> _Handle:
        primitive = _Handle()
        self.check(
            self.dnnl.dnnl_primitive_create(ctypes.byref(primitive), descriptor),
            "create a primitive",
        )
        return primitive

    def reorder(self, source: _Handle, destination: _Handle) -> _Handle:
        descriptor = _Handle()
        self.check(
            self.dnnl.dnnl_reorder_primitive_desc_create(
                ctypes.byref(descriptor), source, self.engine, destination, self.engine, None
            ),
            "plan a conversion",
        )
        return self.primitive(descriptor)

    def execute(self, primitive: _Handle, args: list[tuple[int, _Handle, int]]) -> None:
        """Run `primitive` on (argument, descriptor, buffer address) triples."""
        memories = []
        try:
            for _, md, address in args:
                memory = _Handle()
                self.check(
                    self.dnnl.dnnl_memory_create(
                        ctypes.byref(memory), md, self.engine, _Handle(address)
                    ),
                    "wrap a buffer",
                )
                memories.append(memory)
            arguments = (_Arg * len(args))(
                *(_Arg(arg, memory) for (arg, _, _), memory in zip(args, memories, strict=True))
            )
            self.check(
                self.dnnl.dnnl_primitive_execute(primitive, self.stream, len(args), arguments),
                "run a matmul",
            )
            self.check(self.dnnl.dnnl_stream_wait(self.stream), "finish a matmul")
        finally:
            for memory in memories:
                self.dnnl.dnnl_memory_destroy(memory)


@cache
def _library() -> _Library:
    require()
    dnnl = ctypes.CDLL(str(_library_path()))
    dnnl.dnnl_primitive_desc_query_md.restype = _Handle
    dnnl.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
    engine, stream = _Handle(), _Handle()
    library = _Library(dnnl, engine, stream)
    library.check(
        dnnl.dnnl_engine_create(ctypes.byref(engine), _CPU_ENGINE, ctypes.c_size_t(0)),
        "open the CPU",
    )
    library.check(
        dnnl.dnnl_stream_create(ctypes.byref(stream), engine, ctypes.c_uint(_IN_ORDER_STREAM)),
        "open a stream",
    )
    return library


@dataclass(frozen=True)
class _Matmul:
    """The primitives of one (rows, inner, columns, bias) matmul: x (float32) -> bfloat16
    copy; weight (float32, (columns, inner) rows) -> packed bfloat16; the matmul itself."""

    source: _Handle
    source_bf16: _Handle
    weight: _Handle
    packed_weight: _Handle
    packed_bytes: int
    bias: _Handle | None
    destination: _Handle
    convert_source: _Handle
    pack_weight: _Handle
    matmul: _Handle


# One entry per shape met: a few dozen per model and image size, small (no buffers).
_MATMULS: dict[tuple[int, int, int, bool], _Matmul] = {}


def _matmul(rows: int, inner: int, columns: int, bias: bool) -> _Matmul:
    key = rows, inner, columns, bias
    if key not in _MATMULS:
        library = _library()
        source = library.descriptor((rows, inner), _F32, (inner, 1))
        source_bf16 = library.descriptor((rows, inner), _BF16, (inner, 1))
        weight = library.descriptor((inner, columns), _F32, (1, inner))  # weight.T
        bias_md = library.descriptor((1, columns), _F32, (columns, 1)) if bias else None
        destination = library.descriptor((rows, columns), _F32, (columns, 1))
        descriptor = _Handle()
        library.check(
            library.dnnl.dnnl_matmul_primitive_desc_create(
                ctypes.byref(descriptor),
                library.engine,
                source_bf16,
                library.descriptor((inner, columns), _BF16, None),
                bias_md,
                destination,
                None,
            ),
            f"plan a bfloat16 matmul of {rows}x{inner} by {inner}x{columns}",
        )
        packed = _Handle(
            library.dnnl.dnnl_primitive_desc_query_md(descriptor, _QUERY_WEIGHTS_MD, 0)
        )
        _MATMULS[key] = _Matmul(
            source=source,
            source_bf16=source_bf16,
            weight=weight,
            packed_weight=packed,
            packed_bytes=library.dnnl.dnnl_memory_desc_get_size(packed),
            bias=bias_md,
            destination=destination,
            convert_source=library.reorder(source, source_bf16),
            pack_weight=library.reorder(weight, packed),
            matmul=library.primitive(descriptor),
        )
    return _MATMULS[key]


def _pack(plan: _Matmul, weight: mx.array) -> np.ndarray:
    weight = mx.contiguous(weight.astype(mx.float32))
    mx.eval(weight)
    packed = np.empty(plan.packed_bytes, np.uint8)
    _library().execute(
        plan.pack_weight,
        [
            (_ARG_FROM, plan.weight, np.asarray(weight).ctypes.data),
            (_ARG_TO, plan.packed_weight, packed.ctypes.data),
        ],
    )
    return packed


def _source_scratch(elements: int) -> np.ndarray:
    """A bfloat16 buffer for this thread, kept between calls: a fresh one would page-fault
    its way in at every matmul."""
    scratch = getattr(_thread_scratch, "buffer", None)
    if scratch is None or scratch.size < elements:
        scratch = _thread_scratch.buffer = np.empty(elements, np.uint16)
    return scratch


def linear(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None,
    owner: object,
    matrix: Callable[[mx.array], mx.array] | None = None,
) -> mx.array:
    """x @ w.T (+ bias) in bfloat16 with float32 sums, for float32 `x` of any leading shape,
    where w is the (columns, inner) `matrix(weight)` (`weight` itself by default). w stays
    packed for `owner` until the `fast_cpu()` block ends (as `store.kept` keeps), made again
    when `weight` is replaced."""
    w = weight if matrix is None else matrix(weight)
    inner, columns = x.shape[-1], w.shape[0]
    rows = x.size // inner
    plan = _matmul(rows, inner, columns, bias is not None)
    packed = kept(owner, (weight, plan), lambda: _pack(plan, w))
    x = mx.contiguous(x)
    out = mx.contiguous(mx.zeros((*x.shape[:-1], columns), mx.float32))
    arrays = [x, out] if bias is None else [x, out, bias := bias.astype(mx.float32)]
    mx.eval(*arrays)
    library = _library()
    source_bf16 = _source_scratch(rows * inner)
    x_address = np.asarray(x).ctypes.data
    library.execute(
        plan.convert_source,
        [(_ARG_FROM, plan.source, x_address), (_ARG_TO, plan.source_bf16, source_bf16.ctypes.data)],
    )
    args = [
        (_ARG_SRC, plan.source_bf16, source_bf16.ctypes.data),
        (_ARG_WEIGHTS, plan.packed_weight, packed.ctypes.data),
        (_ARG_DST, plan.destination, np.asarray(out).ctypes.data),
    ]
    if bias is not None and plan.bias is not None:
        args.append((_ARG_BIAS, plan.bias, np.asarray(bias).ctypes.data))
    library.execute(plan.matmul, args)
    return out
