"""Use an optimized BLAS for MLX on Linux CPUs.

The Linux `mlx[cpu]` wheel links a slow reference BLAS. Loading OpenBLAS (from the
`cmeel-openblas` wheel) with global symbols before `mlx.core` is imported makes MLX's BLAS
calls bind to it: many times faster matmuls and convolutions (docs/performance.md). Set
MLX_SD_NO_OPENBLAS=1 to turn it off.

OpenBLAS's idle threads spin for a while after each call by default, stealing a core
from the numpy work that runs between MLX's matmuls (`kernels.py`); unless
OPENBLAS_THREAD_TIMEOUT is set already, they go to sleep after 2^4 cycles instead.

`matmul_into` and `one_thread_per_call` let `kernels.attention` call the same OpenBLAS
from several threads, one small single-threaded matmul each.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

DISABLE_VARIABLE = "MLX_SD_NO_OPENBLAS"

_ROW_MAJOR, _NO_TRANSPOSE, _TRANSPOSE = 101, 111, 112  # CBLAS's enum values
_openblas: ctypes.CDLL | None = None


def _candidates() -> list[Path]:
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}
    return [Path(root) / "cmeel.prefix" / "lib" / "libopenblas.so.0" for root in roots if root]


def load_optimized_blas() -> Path | None:
    """Load OpenBLAS globally; returns its path, or None where it does not apply."""
    if not sys.platform.startswith("linux") or os.environ.get(DISABLE_VARIABLE, "") not in (
        "",
        "0",
    ):
        return None
    library = next((p for p in _candidates() if p.is_file()), None)
    if library is None:
        if _mlx_runs_on_cuda():
            return None  # its work runs on the GPU
        warnings.warn(
            "cmeel-openblas is not installed: MLX will use its slow reference BLAS on this CPU "
            "(pip install -r requirements.txt)",
            stacklevel=2,
        )
        return None
    if "mlx.core" in sys.modules:
        warnings.warn(
            "mlx.core was imported before stable_diffusion, so MLX may keep its slow reference "
            "BLAS: import stable_diffusion first",
            stacklevel=2,
        )
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # read when the library loads
    global _openblas
    try:
        _openblas = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        warnings.warn(
            f"could not load OpenBLAS ({e}); MLX will use its slow reference BLAS. "
            "OpenBLAS needs the GNU Fortran runtime: apt-get install libgfortran5 "
            "(dnf install libgfortran)",
            stacklevel=2,
        )
        return None
    _bind(_openblas)
    return library


def _mlx_runs_on_cuda() -> bool:
    """Whether MLX is the CUDA build (`mlx[cuda]`), asked before `mlx.core` is imported."""
    for name in ("mlx-cuda-12", "mlx-cuda-13", "mlx-cuda"):
        with suppress(importlib.metadata.PackageNotFoundError):
            importlib.metadata.distribution(name)
            return True
    return False


def _bind(library: ctypes.CDLL) -> None:
    matrix, size = ctypes.c_void_p, ctypes.c_int
    library.cblas_sgemm.argtypes = [size] * 6 + [
        ctypes.c_float,
        matrix,
        size,
        matrix,
        size,
        ctypes.c_float,
        matrix,
        size,
    ]
    library.cblas_sgemm.restype = None
    library.openblas_get_num_threads.restype = size
    library.openblas_set_num_threads.argtypes = [size]


def _row_stride(matrix: np.ndarray) -> int:
    if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.strides[1] != 4:
        raise ValueError(
            f"need a float32 matrix with contiguous rows, got {matrix.dtype} "
            f"{matrix.shape} with strides {matrix.strides}"
        )
    return matrix.strides[0] // 4


def matmul_into(a: np.ndarray, b: np.ndarray, out: np.ndarray, scale: float = 1.0) -> None:
    """out = scale * a @ b, for float32 matrices whose rows are contiguous (views of larger
    arrays included); `b` may instead have contiguous columns (the transpose of such a
    view). Through the loaded OpenBLAS, without numpy's overhead; with numpy where OpenBLAS
    is not loaded. Releases the GIL."""
    if _openblas is None:
        np.matmul(a, b, out=out)
        if scale != 1:
            out *= scale
        return
    if a.shape[1] != b.shape[0] or out.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"cannot multiply {a.shape} by {b.shape} into {out.shape}")
    b_transposed = b.ndim == 2 and b.strides[0] == 4 and b.strides[1] != 4
    strides = _row_stride(a), _row_stride(b.T if b_transposed else b), _row_stride(out)
    _openblas.cblas_sgemm(
        _ROW_MAJOR,
        _NO_TRANSPOSE,
        _TRANSPOSE if b_transposed else _NO_TRANSPOSE,
        a.shape[0],
        b.shape[1],
        a.shape[1],
        scale,
        a.ctypes.data,
        strides[0],
        b.ctypes.data,
        strides[1],
        0.0,
        out.ctypes.data,
        strides[2],
    )


@contextmanager
def one_thread_per_call() -> Iterator[None]:
    """Within this block, OpenBLAS runs each call on its caller's thread alone, for callers
    that spread many small matmuls over the cores themselves (OpenBLAS splitting each of
    them again costs more than it gains). The setting is process-wide: MLX's own matmuls
    running meanwhile in another thread would use one core."""
    if _openblas is None:
        yield
        return
    threads = _openblas.openblas_get_num_threads()
    _openblas.openblas_set_num_threads(1)
    try:
        yield
    finally:
        _openblas.openblas_set_num_threads(threads)
