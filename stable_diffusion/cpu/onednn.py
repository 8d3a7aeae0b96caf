"""Matmuls, convolutions, attention and norms through oneDNN: in bfloat16 for
`fast_cpu(bfloat16=True)`, in float32 for `fast_cpu()` on CPUs with AVX-512.

On CPUs with AVX512_BF16 oneDNN's bfloat16 matmul runs about twice as fast as OpenBLAS's
float32 one on the UNets' shapes, with AMX three to seven times; MLX has no fast CPU
bfloat16 matmul, and OpenBLAS's builds at hand none at all (docs/performance.md). The
activations stay float32 where they are added to or normalized (the residual stream, the
convolutions' outputs): a matmul or convolution converts a float32 input to bfloat16 with
oneDNN's own reorder (vectorized, unlike a numpy pass); the layers whose outputs only feed
matmuls (layer norms, attention's projections and output, GEGLU) write them in bfloat16,
which the next matmul reads as it is. Each multiplies by the weight converted once per
`fast_cpu()` block into oneDNN's packed layout (half the weight's float32 size), sums in
float32 and adds the bias (and a GELU, or a product, as post-ops) in the same pass.
oneDNN 3.2's "fpmath" attribute (float32 inputs, bfloat16 compute) only applies with AMX;
on AVX512_BF16 it computes in float32, no faster, so the conversion is explicit.
Attention (`attention`, in either precision) converts every head's columns of the
projections in place, then runs two matmuls per block of heads and rows, the first
exponentiating its scores as a post-op into the powers, so that no pass over the scores
runs in numpy.

On CPUs with AVX-512, `fast_cpu()` without bfloat16 computes in float32 here where oneDNN
was measured faster than OpenBLAS (`float32_by_default`): the linear layers (their weights
as they are, no packed copy), GEGLU, the norms, attention (`attention`; on the longest
sequences each head's columns read in place by `head_attention`), Winograd's products
(`batched_matmul`) and the convolutions that Winograd does not take on images from 64x64
pixels (the layers decide).

The library comes from the optional `onednn-cpu-gomp` wheel (requirements-bfloat16.txt),
called through ctypes (its C API, oneDNN 3.x); `unavailable_reason` says why bfloat16
compute cannot run. Like `kernels.py`, the matmuls are eager: they evaluate their inputs.
"""

from __future__ import annotations

import contextvars
import ctypes
import importlib.metadata
import math
import os
import platform
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import features
from .store import kept_from_first_use

PACKAGE = "onednn-cpu-gomp"
FIX = "pip install -r requirements-bfloat16.txt"
# Set (not "0"): float32 stays with OpenBLAS, Winograd and numpy (`float32_by_default`).
FLOAT32_DISABLE_VARIABLE = "MLX_SD_NO_ONEDNN_FLOAT32"
_LIBRARY_NAME = "libdnnl.so.3"
_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

# oneDNN's C API values (dnnl_types.h, oneDNN 3.x).
_CPU_ENGINE = 1
_IN_ORDER_STREAM = 1
_BF16, _F32 = 2, 3
_FORMAT_ANY = 1
_FORWARD_TRAINING, _FORWARD_INFERENCE = 64, 96
_CONVOLUTION_DIRECT = 1
_ELTWISE = {"scale": 38, "exp": 42, "silu": 44, "gelu": 49}  # scale: linear; silu: swish
_BINARY = {"plus": 0x1FFF0, "times": 0x1FFF1, "minus": 0x1FFF5}
_ARG_FIRST_POST_OP_OPERAND = 32768 | 2  # DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1
_QUERY_WEIGHTS_MD = 131
_ARG_SRC, _ARG_SRC_1, _ARG_DST, _ARG_WEIGHTS, _ARG_BIAS = 1, 2, 17, 33, 41
_ARG_MEAN, _ARG_VARIANCE, _ARG_SCALE, _ARG_SHIFT = 49, 50, 51, 52
_USE_SCALE_AND_SHIFT = 0x2 | 0x4  # dnnl_use_scale | dnnl_use_shift
_ARG_FROM, _ARG_TO = _ARG_SRC, _ARG_DST
_MAX_DIMS = 12
_Dims = ctypes.c_int64 * _MAX_DIMS
_DTYPES = {mx.float32: _F32, mx.bfloat16: _BF16}
_Handle = ctypes.c_void_p

# What the CPU layers compute in through oneDNN in this context: _BF16, _F32 or None.
_COMPUTE: contextvars.ContextVar[int | None] = contextvars.ContextVar("onednn", default=None)
_thread_scratch = threading.local()


# What an image's PNG parameters record when bfloat16 computed it (pixels differ from
# float32's).
COMPUTE_BFLOAT16 = ("Compute", "bfloat16")


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


def on_linux_x86() -> bool:
    """Where oneDNN's wheel installs (requirements-bfloat16.txt's markers)."""
    machine = platform.machine().lower()
    return sys.platform.startswith("linux") and machine in ("x86_64", "amd64")


def unavailable_reason() -> str | None:
    """Why bfloat16 compute cannot run here, with the fix; None where it can."""
    if not on_linux_x86():
        return (
            f"bfloat16 compute needs Linux on x86-64 (this is {sys.platform} on "
            f"{platform.machine()}): run without --bfloat16"
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


def installed() -> bool:
    """Whether oneDNN can be loaded here (float32 compute needs no CPU feature)."""
    return on_linux_x86() and _library_path() is not None


def float32_by_default() -> bool:
    """Whether `fast_cpu()` computes float32 through oneDNN: where it is installed and the
    CPU has AVX-512, on which its float32 matmuls ran 1.4x OpenBLAS 0.3.29's and its
    convolutions on the VAE's 512x512 images 2.7x the shifted matmuls (docs/performance.md),
    unless `FLOAT32_DISABLE_VARIABLE` is set. Not measured on other CPUs, which keep
    OpenBLAS."""
    disabled = os.environ.get(FLOAT32_DISABLE_VARIABLE, "") not in ("", "0")
    return not disabled and features.has_avx512() and installed()


@contextmanager
def enabled(bfloat16: bool = True) -> Iterator[None]:
    """Within this block the CPU layers compute through oneDNN: in bfloat16 (`require`
    first) or float32 (`installed` first). Leaving the outermost block frees this thread's
    conversion buffer (`_source_scratch`: a VAE decode's can take hundreds of MB)."""
    token = _COMPUTE.set(_BF16 if bfloat16 else _F32)
    try:
        yield
    finally:
        _COMPUTE.reset(token)
        if _COMPUTE.get() is None:
            _thread_scratch.__dict__.pop("buffer", None)


def active() -> bool:
    """Whether the CPU layers compute through oneDNN here, in either precision."""
    return _COMPUTE.get() is not None


def bfloat16_active() -> bool:
    return _COMPUTE.get() == _BF16


def _compute() -> int:
    compute = _COMPUTE.get()
    assert compute is not None, "oneDNN compute outside onednn.enabled()"
    return compute


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

    def descriptor(self, shape: tuple[int, ...], strides: tuple[int, ...] | None, dtype: int):
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
                "run a primitive",
            )
            self.check(self.dnnl.dnnl_stream_wait(self.stream), "finish a primitive")
        finally:
            for memory in memories:
                self.dnnl.dnnl_memory_destroy(memory)


@cache
def _library() -> _Library:
    if not installed():
        raise Unavailable(f"oneDNN ({PACKAGE}) is not installed for this platform: {FIX}")
    # OpenMP's threads (oneDNN's) otherwise spin after each call, taking the cores from the
    # numpy kernels and OpenBLAS between the calls: an SDXL step 4.32 -> 3.07 s with this.
    # A short spin before sleeping spares back-to-back calls the threads' wake-up: bfloat16
    # steps 3-6% faster (docs/performance.md). Read when the library loads; the user's own
    # settings stand.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")
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
class _Packing:
    """An operand in its own layout (`plain`) -> the layout a primitive asks for (`packed`,
    `size` bytes); `reorder` is None where the two are the same."""

    plain: _Handle
    packed: _Handle
    size: int
    reorder: _Handle | None

    @staticmethod
    def of(library: _Library, descriptor: _Handle, plain: _Handle) -> _Packing:
        """The packing of `descriptor`'s primitive's weights (its second operand)."""
        query = library.dnnl.dnnl_primitive_desc_query_md
        packed = _Handle(query(descriptor, _QUERY_WEIGHTS_MD, 0))
        same = library.dnnl.dnnl_memory_desc_equal(plain, packed)
        reorder = None if same else library.reorder(plain, packed)
        return _Packing(plain, packed, library.dnnl.dnnl_memory_desc_get_size(packed), reorder)

    def pack(self, array: np.ndarray) -> np.ndarray:
        """`array` (laid out as `plain`) in the packed layout: a new buffer, or `array`."""
        if self.reorder is None:
            return array
        out = np.empty(self.size, np.uint8)
        _library().execute(
            self.reorder,
            [(_ARG_FROM, self.plain, array.ctypes.data), (_ARG_TO, self.packed, out.ctypes.data)],
        )
        return out


@dataclass(frozen=True)
class _Plan:
    """The primitives of one matmul or convolution of a given shape, computed in bfloat16
    or float32: a float32 input -> a bfloat16 copy (None in float32; a bfloat16 input is
    taken as it is); the float32 weight (its own strides) as the primitive takes it; the
    primitive itself (float32 bias, output in float32 or bfloat16: `destination`)."""

    source: _Handle
    computed_source: _Handle
    weight: _Packing
    bias: _Handle | None
    destination: _Handle
    convert_source: _Handle | None
    compute: _Handle


def _plan(
    library: _Library,
    descriptor: _Handle,
    source: tuple[tuple[int, ...], tuple[int, ...]],
    dtype: int,
    weight: _Handle,
    bias: _Handle | None,
    destination: _Handle,
) -> _Plan:
    """A `_Plan` from a primitive descriptor made on `source`'s (shape, strides) in `dtype`
    (_BF16 or _F32)."""
    source_f32 = library.descriptor(*source, _F32)
    computed_source = library.descriptor(*source, dtype)
    return _Plan(
        source=source_f32,
        computed_source=computed_source,
        weight=_Packing.of(library, descriptor, weight),
        bias=bias,
        destination=destination,
        convert_source=None if dtype == _F32 else library.reorder(source_f32, computed_source),
        compute=library.primitive(descriptor),
    )


# One plan per shape met: a few dozen per model and image size, small (no buffers).
_PLANS: dict[tuple, Any] = {}  # _Plan, _Attention or _PerChannel


def _matmul_descriptor(
    library: _Library,
    source: _Handle,
    weights: _Handle,
    destination: _Handle,
    attributes: _Handle | None,
    bias: _Handle | None,
    what: str,
) -> _Handle:
    descriptor = _Handle()
    library.check(
        library.dnnl.dnnl_matmul_primitive_desc_create(
            ctypes.byref(descriptor), library.engine, source, weights, bias, destination, attributes
        ),
        what,
    )
    return descriptor


def _matmul(
    rows: int,
    inner: int,
    columns: int,
    bias: bool,
    dtype: int,
    then: str | None = None,
    output: int = _F32,
) -> _Plan:
    """A linear layer's plan, its results in `output` (_F32 or _BF16); `then` "gelu"
    applies the exact GELU to its results, "times" multiplies them by a (rows, columns)
    operand of the results' type (`_ARG_FIRST_POST_OP_OPERAND`). In bfloat16 the weight is
    packed; in float32 the matmul reads it as it is, as fast as packed on the UNets' shapes
    (docs/performance.md) and with no copy in memory."""
    key = "matmul", rows, inner, columns, bias, dtype, then, output
    if key not in _PLANS:
        library = _library()
        source = (rows, inner), (inner, 1)
        bias_md = library.descriptor((1, columns), (columns, 1), _F32) if bias else None
        destination = library.descriptor((rows, columns), (columns, 1), output)
        weight = library.descriptor((inner, columns), (1, inner), _F32)  # weight.T
        descriptor = _matmul_descriptor(
            library,
            library.descriptor(*source, dtype),
            weight if dtype == _F32 else library.descriptor((inner, columns), None, dtype),
            destination,
            None if then is None else _post_ops((then,), destination),
            bias_md,
            f"plan a matmul of {rows}x{inner} by {inner}x{columns}",
        )
        _PLANS[key] = _plan(library, descriptor, source, dtype, weight, bias_md, destination)
    return _PLANS[key]


def _post_ops(steps: tuple[str | tuple[str, float], ...], operand: _Handle) -> _Handle:
    """Primitive attributes applying `steps` in turn to each result: "exp", "gelu" (exact),
    "silu", ("scale", factor), or with a float32 operand described by `operand` (only as
    the first step, at `_ARG_FIRST_POST_OP_OPERAND`), "times", "plus" or "minus"."""
    library = _library()
    attributes, post_ops = _Handle(), _Handle()
    library.check(library.dnnl.dnnl_primitive_attr_create(ctypes.byref(attributes)), "set up")
    library.check(library.dnnl.dnnl_post_ops_create(ctypes.byref(post_ops)), "set up")
    for step in steps:
        step, factor = step if isinstance(step, tuple) else (step, 1.0)
        if step in _BINARY:
            status = library.dnnl.dnnl_post_ops_append_binary(post_ops, _BINARY[step], operand)
        else:
            status = library.dnnl.dnnl_post_ops_append_eltwise(
                post_ops, _ELTWISE[step], ctypes.c_float(factor), ctypes.c_float(0)
            )
        library.check(status, f"set up a {step}")
    library.check(library.dnnl.dnnl_primitive_attr_set_post_ops(attributes, post_ops), "set up")
    return attributes


@dataclass(frozen=True)
class _PerChannel:
    """A primitive over a float32 (rows, channels) image with per-channel operands (a scale
    and shift, a layer norm's weight and bias) or results (a mean and variance), its output
    image described by `output` (float32 or bfloat16)."""

    image: _Handle
    per_channel: _Handle
    compute: _Handle
    output: _Handle


def scale_shift(
    x: np.ndarray, out: np.ndarray, scale: np.ndarray, shift: np.ndarray, silu: bool
) -> None:
    """out = x * scale + shift, then its SiLU if `silu`, for float32 (rows, channels)
    arrays and per-channel float32 `scale` and `shift`, in one oneDNN pass on all cores.
    (Written in bfloat16, this ran oneDNN 3.2's reference code, 50x slower.)"""
    rows, channels = x.shape
    key = "scale_shift", rows, channels, silu
    if key not in _PLANS:
        library = _library()
        image = library.descriptor((rows, channels), (channels, 1), _F32)
        per_channel = library.descriptor((1, channels), (channels, 1), _F32)
        steps = ("plus", "silu") if silu else ("plus",)
        descriptor = _Handle()
        library.check(
            library.dnnl.dnnl_binary_primitive_desc_create(
                ctypes.byref(descriptor),
                library.engine,
                _BINARY["times"],
                image,
                per_channel,
                image,
                _post_ops(steps, per_channel),
            ),
            "plan a scale and shift",
        )
        _PLANS[key] = _PerChannel(image, per_channel, library.primitive(descriptor), image)
    plan: _PerChannel = _PLANS[key]
    _library().execute(
        plan.compute,
        [
            (_ARG_SRC, plan.image, x.ctypes.data),
            (_ARG_SRC_1, plan.per_channel, scale.ctypes.data),
            (_ARG_DST, plan.output, out.ctypes.data),
            (_ARG_FIRST_POST_OP_OPERAND, plan.per_channel, shift.ctypes.data),
        ],
    )


def channel_statistics(x: np.ndarray, scratch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each channel's mean and variance (about the mean, over the rows) of a float32 (rows,
    channels) array, from oneDNN's batch normalization (a pass for the means, another for
    the centred squares, float32 sums), which also writes the per-channel normalized array
    into `scratch` (float32, x's shape; unused here): the UNets' group norms 2-5x faster
    than with numpy's sums (docs/performance.md)."""
    rows, channels = x.shape
    key = "channel_statistics", rows, channels
    library = _library()
    if key not in _PLANS:
        # One image of `rows` pixels in `_nhwc` layout (an unused axis's stride too: else
        # oneDNN takes it for another layout and runs its reference code, 40x slower).
        image = library.descriptor(*_nhwc((1, rows, 1, channels)), _F32)
        descriptor = _Handle()
        library.check(
            library.dnnl.dnnl_batch_normalization_forward_primitive_desc_create(
                ctypes.byref(descriptor),
                library.engine,
                _FORWARD_TRAINING,
                image,
                image,
                ctypes.c_float(0),
                ctypes.c_uint(0),
                None,
            ),
            "plan a group norm's statistics",
        )
        per_channel = library.descriptor((channels,), (1,), _F32)
        _PLANS[key] = _PerChannel(image, per_channel, library.primitive(descriptor), image)
    plan: _PerChannel = _PLANS[key]
    mean, variance = np.empty(channels, np.float32), np.empty(channels, np.float32)
    library.execute(
        plan.compute,
        [
            (_ARG_SRC, plan.image, x.ctypes.data),
            (_ARG_DST, plan.image, scratch.ctypes.data),
            (_ARG_MEAN, plan.per_channel, mean.ctypes.data),
            (_ARG_VARIANCE, plan.per_channel, variance.ctypes.data),
        ],
    )
    return mean, variance


def layer_norm(
    x: mx.array, weight: mx.array, bias: mx.array, eps: float, output: mx.Dtype = mx.float32
) -> mx.array:
    """Layer norm over float32 `x`'s last axis, scaled and shifted, into a new `output`
    array (float32 or bfloat16): one oneDNN primitive (float32 arithmetic), 6x faster than
    `kernels.layer_norm` on the UNets' shapes (docs/performance.md)."""
    channels = x.shape[-1]
    rows = x.size // channels
    key = "layer_norm", rows, channels, eps, output
    library = _library()
    if key not in _PLANS:
        image = library.descriptor((rows, channels), (channels, 1), _F32)
        out_md = library.descriptor((rows, channels), (channels, 1), _DTYPES[output])
        descriptor = _Handle()
        library.check(
            library.dnnl.dnnl_layer_normalization_forward_primitive_desc_create(
                ctypes.byref(descriptor),
                library.engine,
                _FORWARD_INFERENCE,
                image,
                out_md,
                None,
                ctypes.c_float(eps),
                ctypes.c_uint(_USE_SCALE_AND_SHIFT),
                None,
            ),
            "plan a layer norm",
        )
        per_channel = library.descriptor((channels,), (1,), _F32)
        _PLANS[key] = _PerChannel(image, per_channel, library.primitive(descriptor), out_md)
    plan: _PerChannel = _PLANS[key]
    x = mx.contiguous(x)
    out = mx.contiguous(mx.zeros(x.shape, output))
    weight, bias = weight.astype(mx.float32), bias.astype(mx.float32)
    mx.eval(x, out, weight, bias)
    library.execute(
        plan.compute,
        [
            (_ARG_SRC, plan.image, np.asarray(x).ctypes.data),
            (_ARG_DST, plan.output, numpy(out).ctypes.data),
            (_ARG_SCALE, plan.per_channel, np.asarray(weight).ctypes.data),
            (_ARG_SHIFT, plan.per_channel, np.asarray(bias).ctypes.data),
        ],
    )
    return out


@dataclass(frozen=True)
class ConvShape:
    """A 2D convolution of (batch, height, width, channels) images by an (out, kernel
    height, kernel width, in) weight, as MLX lays them out (no groups)."""

    image: tuple[int, int, int, int]
    weight: tuple[int, int, int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def _axes(self) -> list[tuple[int, int, int, int, int]]:
        """(input size, kernel size, stride, padding, dilation) along height and width."""
        return list(
            zip(
                self.image[1:3],
                self.weight[1:3],
                self.stride,
                self.padding,
                self.dilation,
                strict=True,
            )
        )

    @property
    def output(self) -> tuple[int, int, int, int]:
        height, width = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in self._axes())
        return self.image[0], height, width, self.weight[0]

    @property
    def padding_right(self) -> tuple[int, ...]:
        """oneDNN's bottom and right padding: what makes its output size MLX's (which
        drops the input pixels a stride leaves over)."""
        return tuple(
            (out - 1) * s - n + d * (k - 1) + 1 - p
            for out, (n, k, s, p, d) in zip(self.output[1:3], self._axes(), strict=True)
        )


def _nhwc(shape: tuple[int, int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """oneDNN's (batch, channels, height, width) dims with the strides of MLX's
    (batch, height, width, channels) layout."""
    n, h, w, c = shape
    return (n, c, h, w), (h * w * c, 1, w * c, c)


def _convolution(shape: ConvShape, bias: bool, dtype: int) -> _Plan:
    key = "convolution", shape, bias, dtype
    if key not in _PLANS:
        library = _library()
        out_channels, kernel_height, kernel_width, in_channels = shape.weight
        output = shape.output
        source = _nhwc(shape.image)
        bias_md = library.descriptor((out_channels,), (1,), _F32) if bias else None
        destination = library.descriptor(*_nhwc(output), _F32)
        descriptor = _Handle()
        library.check(
            library.dnnl.dnnl_convolution_forward_primitive_desc_create(
                ctypes.byref(descriptor),
                library.engine,
                _FORWARD_INFERENCE,
                _CONVOLUTION_DIRECT,
                library.descriptor(*source, dtype),
                library.descriptor(
                    (out_channels, in_channels, kernel_height, kernel_width), None, dtype
                ),
                bias_md,
                destination,
                _Dims(*shape.stride),
                _Dims(*(d - 1 for d in shape.dilation)),  # oneDNN counts the gaps
                _Dims(*shape.padding),
                _Dims(*shape.padding_right),
                None,
            ),
            f"plan a convolution of {shape}",
        )
        # MLX's (out, kh, kw, in) weight as oneDNN's (out, in, kh, kw) dims.
        weight = library.descriptor(
            (out_channels, in_channels, kernel_height, kernel_width),
            (
                kernel_height * kernel_width * in_channels,
                1,
                kernel_width * in_channels,
                in_channels,
            ),
            _F32,
        )
        _PLANS[key] = _plan(library, descriptor, source, dtype, weight, bias_md, destination)
    return _PLANS[key]


def _float32(weight: mx.array) -> np.ndarray:
    """A weight in float32, row-major, read in place where it is both already (numpy
    evaluates it; an MLX `contiguous` would cost an evaluation at each call)."""
    if weight.dtype != mx.float32:
        weight = weight.astype(mx.float32)
    return np.ascontiguousarray(weight)


def _weight(
    plan: _Plan, weight: mx.array, owner: object | None, rows: slice = slice(None)
) -> np.ndarray:
    """`weight[rows]` as `plan` takes it: packed for `owner` from its first use until the
    `fast_cpu()` block ends (made again when `weight` or the plan changes:
    `store.kept_from_first_use`; for this call only without an owner), or as it is."""
    if plan.weight.reorder is None:
        return _float32_rows(weight, rows)
    if owner is None:
        return _pack(plan, weight, rows)
    return kept_from_first_use(owner, (weight, plan), lambda: _pack(plan, weight, rows))


def _pack(plan: _Plan, weight: mx.array, rows: slice) -> np.ndarray:
    return plan.weight.pack(_float32_rows(weight, rows))


def _float32_rows(weight: mx.array, rows: slice) -> np.ndarray:
    """A float32 weight's rows sliced in numpy, a view: `mx.contiguous` of MLX's slice
    copies them (3 ms for half of SD 1.5's largest GEGLU weight, at every call)."""
    if weight.dtype == mx.float32:
        return _float32(weight)[rows]
    return _float32(weight[rows])


def _source_scratch(elements: int) -> np.ndarray:
    """A bfloat16 buffer for this thread, kept between calls until the `enabled` block ends:
    a fresh one would page-fault its way in at every matmul."""
    scratch = getattr(_thread_scratch, "buffer", None)
    if scratch is None or scratch.size < elements:
        scratch = _thread_scratch.buffer = np.empty(elements, np.uint16)
    return scratch


@dataclass(frozen=True)
class _Product:
    """A float32 batched matmul of plain row-major operands."""

    first: _Handle
    second: _Handle
    result: _Handle
    compute: _Handle


def batched_matmul(a: mx.array, b: mx.array) -> mx.array:
    """a @ b for float32 (batch, rows, inner) and (batch, inner, columns) arrays, in float32,
    into a new array: Winograd's products, 1.3-1.9x OpenBLAS 0.3.29's on the models' shapes
    on AVX-512 (docs/performance.md)."""
    (batch, rows, inner), columns = a.shape, b.shape[-1]
    key = "batched_matmul", batch, rows, inner, columns
    if key not in _PLANS:
        library = _library()
        first, second, result = (
            library.descriptor((batch, m, n), (m * n, n, 1), _F32)
            for m, n in ((rows, inner), (inner, columns), (rows, columns))
        )
        descriptor = _matmul_descriptor(
            library, first, second, result, None, None, f"plan a matmul of {a.shape} by {b.shape}"
        )
        _PLANS[key] = _Product(first, second, result, library.primitive(descriptor))
    plan: _Product = _PLANS[key]
    a, b = (mx.contiguous(x.astype(mx.float32)) for x in (a, b))
    out = mx.contiguous(mx.zeros((batch, rows, columns), mx.float32))
    mx.eval(a, b, out)
    _library().execute(
        plan.compute,
        [
            (_ARG_SRC, plan.first, np.asarray(a).ctypes.data),
            (_ARG_WEIGHTS, plan.second, np.asarray(b).ctypes.data),
            (_ARG_DST, plan.result, np.asarray(out).ctypes.data),
        ],
    )
    return out


def numpy(a: mx.array) -> np.ndarray:
    """A contiguous float32 or bfloat16 array's buffer in numpy (evaluated first), no copy:
    a bfloat16 one as its bits (uint16), which numpy has no type for, read through the
    buffer protocol (BufferError if strided; a view in MLX would be one more evaluation, a
    round trip to MLX's thread: docs/performance.md)."""
    if a.dtype == mx.bfloat16:
        return np.frombuffer(a, np.uint16).reshape(a.shape)
    return np.asarray(a)


def _run(
    plan: _Plan,
    x: mx.array,
    packed: np.ndarray,
    bias: mx.array | None,
    output_shape: tuple[int, ...],
    output: mx.Dtype = mx.float32,
    times: mx.array | None = None,
) -> mx.array:
    """`plan` on `x`, computed with the `packed` weight into a new `output` array
    (multiplied by `times`, of its type, where the plan says so). A float32 `x` computed
    in bfloat16 is converted in this thread's scratch buffer; a bfloat16 one is read as it
    is (only in bfloat16 blocks)."""
    x = mx.contiguous(x)
    out = mx.contiguous(mx.zeros(output_shape, output))
    if bias is not None:
        bias = bias.astype(mx.float32)
    if times is not None:
        times = mx.contiguous(times.astype(output))
    mx.eval(*(a for a in (x, out, bias, times) if a is not None))
    library = _library()
    source = numpy(x)
    if x.dtype == mx.bfloat16:
        assert plan.convert_source is not None, "a bfloat16 input outside bfloat16 blocks"
    elif plan.convert_source is not None:
        source = _source_scratch(x.size)
        library.execute(
            plan.convert_source,
            [
                (_ARG_FROM, plan.source, np.asarray(x).ctypes.data),
                (_ARG_TO, plan.computed_source, source.ctypes.data),
            ],
        )
    args = [
        (_ARG_SRC, plan.computed_source, source.ctypes.data),
        (_ARG_WEIGHTS, plan.weight.packed, packed.ctypes.data),
        (_ARG_DST, plan.destination, numpy(out).ctypes.data),
    ]
    if bias is not None and plan.bias is not None:
        args.append((_ARG_BIAS, plan.bias, np.asarray(bias).ctypes.data))
    if times is not None:
        args.append((_ARG_FIRST_POST_OP_OPERAND, plan.destination, numpy(times).ctypes.data))
    library.execute(plan.compute, args)
    return out


def linear(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None,
    owner: object,
    rows: slice = slice(None),
    gelu: bool = False,
    times: mx.array | None = None,
    output: mx.Dtype = mx.float32,
) -> mx.array:
    """x @ w.T (+ bias) in this block's precision with float32 sums, into an `output`
    array (bfloat16: only in bfloat16 blocks), for `x` of any leading shape (float32, or
    bfloat16 in bfloat16 blocks), where w is the (columns, inner) `weight[rows]`; with
    `gelu`, the exact GELU of that; with `times`, that times `times` (of the result's
    shape), in the same pass. A packed w is kept for `owner` (`_weight`)."""
    inner, columns = x.shape[-1], len(range(weight.shape[0])[rows])
    then = "gelu" if gelu else "times" if times is not None else None
    plan = _matmul(
        x.size // inner, inner, columns, bias is not None, _compute(), then, _DTYPES[output]
    )
    packed = _weight(plan, weight, owner, rows)
    return _run(plan, x, packed, bias, (*x.shape[:-1], columns), output, times)


def conv2d(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
    dilation: int | tuple[int, int],
    owner: object | None,
) -> mx.array:
    """MLX's `conv2d(x, weight, stride, padding, dilation)` (+ bias) in this block's
    precision with float32 sums, for a float32 (batch, height, width, in) `x` and an (out,
    kernel height, kernel width, in) weight, packed for `owner` (`_weight`; None: for this
    call only)."""
    stride, padding, dilation = (
        (n, n) if isinstance(n, int) else tuple(n) for n in (stride, padding, dilation)
    )
    shape = ConvShape(x.shape, weight.shape, stride, padding, dilation)  # type: ignore[arg-type]
    plan = _convolution(shape, bias is not None, _compute())
    return _run(plan, x, _weight(plan, weight, owner), bias, shape.output)


# Powers per attention block (4 MB in bfloat16): fewer, larger blocks ran faster up to this
# size, on 1024 and 4096 keys (docs/performance.md).
_ATTENTION_POWERS = 1 << 21
# Inner sizes of multiples of this run on AMX's tiles; others on slower kernels.
_AMX_MULTIPLE = 32
_ONES = {_BF16: 0x3F80, _F32: 1.0}
_ELEMENTS = {_BF16: np.uint16, _F32: np.float32}


@dataclass(frozen=True)
class _Conversion:
    """A reorder between two (shape, strides) layouts, from float32 or bfloat16 (`source`'s
    type) to float32 or bfloat16 (`dtype`)."""

    source: _Handle
    destination: _Handle
    reorder: _Handle

    @staticmethod
    def of(
        library: _Library,
        shape: tuple[int, ...],
        source: tuple[int, ...],
        to: tuple[int, ...],
        dtype: int,
        source_dtype: int,
    ) -> _Conversion:
        source_md = library.descriptor(shape, source, source_dtype)
        destination = library.descriptor(shape, to, dtype)
        return _Conversion(source_md, destination, library.reorder(source_md, destination))

    def run(self, source: int, destination: int) -> None:
        arguments = [(_ARG_FROM, self.source, source), (_ARG_TO, self.destination, destination)]
        _library().execute(self.reorder, arguments)


@dataclass(frozen=True)
class _AttentionPlan:
    """The primitives of attention over (heads, length, width) operands, in bfloat16 or
    float32: every head's columns of the projections (float32 or bfloat16) converted at
    once into the operands' buffers (queries with their shift column, keys transposed above
    their row of ones, values beside their column of ones; in bfloat16, `width`, the
    queries' and keys' inner size, is a multiple of `_AMX_MULTIPLE`); then per block of
    `group` heads and `rows` queries (all of them where the group has more than one head:
    each block's operands dense, as oneDNN's brgemm kernels take them), the keys and values
    packed, the scores scaled and exponentiated (post-ops) into powers, and the powers
    times the values into float32."""

    dtype: int
    rows: int
    group: int
    width: int
    take_queries: _Conversion
    take_keys: _Conversion
    take_values: _Conversion
    keys: _Packing
    values: _Packing
    queries: _Handle
    powers: _Handle
    output: _Handle
    exponentiate: _Handle
    weigh: _Handle


def _attention_blocks(length: int, keys: int, heads: int) -> tuple[int, int]:
    """(rows, heads) per block of at most `_ATTENTION_POWERS` powers: all of a group of
    heads' rows (the most heads that fit, a divisor of `heads`), else one head's rows in
    blocks."""
    if length * keys > _ATTENTION_POWERS:
        return max(1, _ATTENTION_POWERS // keys), 1
    fitting = min(heads, _ATTENTION_POWERS // (length * keys))
    return length, max(g for g in range(1, fitting + 1) if heads % g == 0)


def _dense(*shape: int) -> tuple[int, ...]:
    """Row-major strides of `shape`."""
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


def _attention_plan(
    length: int, keys: int, heads: int, dim: int, dtype: int, source: int
) -> _AttentionPlan:
    key = "attention", length, keys, heads, dim, dtype, source
    if key not in _PLANS:
        library = _library()
        rows, group = _attention_blocks(length, keys, heads)
        multiple = _AMX_MULTIPLE if dtype == _BF16 else 1
        width = -(-(dim + 1) // multiple) * multiple
        padded_length = -(-length // rows) * rows
        columns = heads * dim
        queries = library.descriptor((group, rows, width), _dense(group, rows, width), dtype)
        powers = library.descriptor((group, rows, keys), _dense(group, rows, keys), dtype)
        output = library.descriptor((group, rows, dim + 1), _dense(group, rows, dim + 1), _F32)
        what = "plan an attention matmul"
        exponentiate = _matmul_descriptor(
            library,
            queries,
            library.descriptor((group, width, keys), None, dtype),
            powers,
            _post_ops((("scale", dim**-0.5), "exp"), powers),
            None,
            what,
        )
        weigh = _matmul_descriptor(
            library,
            powers,
            library.descriptor((group, keys, dim + 1), None, dtype),
            output,
            None,
            None,
            what,
        )
        plain_keys = library.descriptor((group, width, keys), _dense(group, width, keys), dtype)
        plain_values = library.descriptor(
            (group, keys, dim + 1), _dense(group, keys, dim + 1), dtype
        )
        _PLANS[key] = _AttentionPlan(
            dtype=dtype,
            rows=rows,
            group=group,
            width=width,
            take_queries=_Conversion.of(
                library,
                (heads, length, dim),
                (dim, columns, 1),
                _dense(heads, padded_length, width),
                dtype,
                source,
            ),
            take_keys=_Conversion.of(
                library,
                (heads, dim, keys),
                (dim, 1, columns),
                _dense(heads, width, keys),
                dtype,
                source,
            ),
            take_values=_Conversion.of(
                library,
                (heads, keys, dim),
                (dim, columns, 1),
                _dense(heads, keys, dim + 1),
                dtype,
                source,
            ),
            keys=_Packing.of(library, exponentiate, plain_keys),
            values=_Packing.of(library, weigh, plain_values),
            queries=queries,
            powers=powers,
            output=output,
            exponentiate=library.primitive(exponentiate),
            weigh=library.primitive(weigh),
        )
    return _PLANS[key]


def attention(
    queries: np.ndarray, keys: np.ndarray, values: np.ndarray, shifts: np.ndarray, out: np.ndarray
) -> None:
    """out[h, i] = sum over keys j of e^(s[i, h, j] - shifts[i, h]) [values[j, h], 1], where
    s[i, h, j] = queries[i, h] . keys[j, h] / sqrt(dim), for (length, heads * dim) queries,
    (keys, heads * dim) keys and values (all float32, or all bfloat16 as their bits, uint16,
    in bfloat16 blocks), float32 (length, heads) shifts and a float32 (heads,
    length, dim + 1) `out` (its heads apart: oneDNN's brgemm kernels write dense blocks
    only), in this block's precision: in bfloat16 the operands, the shifts and the powers
    are rounded to it; scores, powers and sums are computed in float32 (a shifted score
    above 88 overflows). Reads the heads' columns in place (oneDNN's conversions); a group
    of heads' keys and values are packed once for all its blocks of rows."""
    length, heads = shifts.shape
    dim, key_count = queries.shape[1] // heads, len(keys)
    source = _BF16 if queries.dtype == np.uint16 else _F32
    plan = _attention_plan(length, key_count, heads, dim, _compute(), source)
    rows, group, element = plan.rows, plan.group, _ELEMENTS[plan.dtype]
    # The primitives take whole blocks (the packed layouts depend on the rows): the queries
    # padded with rows of zeros, a shorter last block's output written aside.
    padded_length = -(-length // rows) * rows
    all_queries = np.zeros((heads, padded_length, plan.width), element)
    all_keys = np.zeros((heads, plan.width, key_count), element)
    all_values = np.empty((heads, key_count, dim + 1), element)
    all_keys[:, dim] = all_values[..., dim] = _ONES[plan.dtype]
    plan.take_queries.run(queries.ctypes.data, all_queries.ctypes.data)
    plan.take_keys.run(keys.ctypes.data, all_keys.ctypes.data)
    plan.take_values.run(values.ctypes.data, all_values.ctypes.data)
    negated = shifts.T * np.float32(-(dim**0.5))  # in the unscaled scores' units
    if plan.dtype == _BF16:
        negated = numpy(mx.contiguous(mx.array(negated).astype(mx.bfloat16)))
    all_queries[:, :length, dim] = negated
    # Reused from call to call, as the matmuls' conversion buffer (a bfloat16 one: two
    # elements per float32 power).
    scratch = group * rows * key_count * np.dtype(element).itemsize // 2
    powers = _source_scratch(scratch)[:scratch].view(element)
    last_block = np.empty((rows, dim + 1), np.float32)
    library = _library()
    for first in range(0, heads, group):
        packed_keys = plan.keys.pack(all_keys[first : first + group])
        packed_values = plan.values.pack(all_values[first : first + group])
        for start in range(0, padded_length, rows):
            whole = start + rows <= length
            block_out = out[first, start:] if whole else last_block
            library.execute(
                plan.exponentiate,
                [
                    (_ARG_SRC, plan.queries, all_queries[first, start].ctypes.data),
                    (_ARG_WEIGHTS, plan.keys.packed, packed_keys.ctypes.data),
                    (_ARG_DST, plan.powers, powers.ctypes.data),
                ],
            )
            library.execute(
                plan.weigh,
                [
                    (_ARG_SRC, plan.powers, powers.ctypes.data),
                    (_ARG_WEIGHTS, plan.values.packed, packed_values.ctypes.data),
                    (_ARG_DST, plan.output, block_out.ctypes.data),
                ],
            )
            if not whole:
                out[first, start:] = last_block[: length - start]


# Powers per float32 attention block (32 MB): gemm's kernels on the heads' strided columns
# ran faster on larger blocks, up to about this (docs/performance.md).
_FLOAT32_ATTENTION_POWERS = 1 << 23


@dataclass(frozen=True)
class _HeadAttention:
    """The float32 primitives of one head's attention over a block of rows, reading and
    writing the heads' columns in place: the queries' block times the keys, less a shift
    given at each call (over the scale), scaled and exponentiated (post-ops), into powers;
    the powers times the values (with their column of ones) into the output's columns."""

    queries: _Handle
    keys: _Handle
    powers: _Handle
    shift: _Handle
    values: _Handle
    output: _Handle
    exponentiate: _Handle
    weigh: _Handle


def _head_attention(rows: int, keys: int, heads: int, dim: int) -> _HeadAttention:
    key = "head_attention", rows, keys, heads, dim
    if key not in _PLANS:
        scale = dim**-0.5
        library = _library()
        powers = library.descriptor((rows, keys), (keys, 1), _F32)
        shift = library.descriptor((1, 1), (1, 1), _F32)
        queries = library.descriptor((rows, dim), (heads * dim, 1), _F32)
        keys_md = library.descriptor((dim, keys), (1, heads * dim), _F32)  # keys.T
        values = library.descriptor((keys, dim + 1), (heads * (dim + 1), 1), _F32)
        output = library.descriptor((rows, dim + 1), (heads * (dim + 1), 1), _F32)
        what = "plan an attention matmul"
        exponentiate = _matmul_descriptor(
            library,
            queries,
            keys_md,
            powers,
            _post_ops(("minus", ("scale", scale), "exp"), shift),
            None,
            what,
        )
        weigh = _matmul_descriptor(library, powers, values, output, None, None, what)
        _PLANS[key] = _HeadAttention(
            queries=queries,
            keys=keys_md,
            powers=powers,
            shift=shift,
            values=values,
            output=output,
            exponentiate=library.primitive(exponentiate),
            weigh=library.primitive(weigh),
        )
    return _PLANS[key]


def head_attention(
    queries: np.ndarray, keys: np.ndarray, values: np.ndarray, shifts: np.ndarray, out: np.ndarray
) -> None:
    """out[i, h] = sum over keys j of e^(s[i, h, j] - c) [values[j, h], 1], where s[i, h, j]
    = queries[i, h] . keys[j, h] / sqrt(dim), for float32 (length, heads * dim) queries,
    (keys, heads * dim) keys, (keys, heads, dim + 1) values ending in a column of ones and
    a (length, heads, dim + 1) `out`. Each head's block of rows subtracts one shift c, the
    largest of its rows' `shifts` ((length, heads)): no power overflows, and a row whose
    own shift lies far below the block's underflows (its last column near 0: the caller
    computes it again). Reads and writes every head's columns in place: no copies of the
    operands."""
    length, heads, value_width = out.shape
    dim, key_count = value_width - 1, len(keys)
    rows = min(max(1, _FLOAT32_ATTENTION_POWERS // key_count), length)
    powers = np.empty(rows * key_count, np.float32)
    scale = dim**-0.5
    shift = np.zeros(1, np.float32)  # c / scale, for the primitive
    library = _library()
    for start in range(0, length, rows):
        block = slice(start, min(start + rows, length))
        plan = _head_attention(block.stop - start, key_count, heads, dim)
        block_shifts = shifts[block].max(axis=0) / scale
        for head in range(heads):
            shift[0] = block_shifts[head]
            library.execute(
                plan.exponentiate,
                [
                    (_ARG_SRC, plan.queries, queries[start, head * dim :].ctypes.data),
                    (_ARG_WEIGHTS, plan.keys, keys[0, head * dim :].ctypes.data),
                    (_ARG_DST, plan.powers, powers.ctypes.data),
                    (_ARG_FIRST_POST_OP_OPERAND, plan.shift, shift.ctypes.data),
                ],
            )
            library.execute(
                plan.weigh,
                [
                    (_ARG_SRC, plan.powers, powers.ctypes.data),
                    (_ARG_WEIGHTS, plan.values, values[0, head].ctypes.data),
                    (_ARG_DST, plan.output, out[start, head].ctypes.data),
                ],
            )
