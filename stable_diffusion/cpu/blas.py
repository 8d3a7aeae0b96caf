"""Use an optimized BLAS for MLX on Linux CPUs.

The Linux `mlx[cpu]` wheel links a slow reference BLAS. Loading OpenBLAS (from the
`cmeel-openblas` wheel) with global symbols before `mlx.core` is imported makes MLX's BLAS
calls bind to it: many times faster matmuls and convolutions (docs/performance.md). Set
MLX_SD_NO_OPENBLAS=1 to turn it off.

A wheel's OpenBLAS may be built for one CPU family only and die with "Illegal instruction"
on others; so each one found (pip's, then the system's) is asked what it was built for
first, and passed over, with a warning naming the fix, where this CPU lacks what its
kernels use (`choose`).

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
import re
import subprocess
import sys
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import features

DISABLE_VARIABLE = "MLX_SD_NO_OPENBLAS"

_ROW_MAJOR, _NO_TRANSPOSE, _TRANSPOSE = 101, 111, 112  # CBLAS's enum values
_openblas: ctypes.CDLL | None = None


# The instruction sets (as /proc/cpuinfo names them) that the kernels of an OpenBLAS built
# for one target only (no DYNAMIC_ARCH) use: such a build dies with "Illegal instruction"
# at its first matmul on a CPU without them. cmeel-openblas's wheels are such builds, each
# for the CPU its release was built on (0.3.29: ZEN, 0.3.23 and 0.3.31: SKYLAKEX).
# Older targets need nothing that a CPU running this package lacks.
_AVX2 = ("avx", "avx2", "fma")
_AVX512 = (*_AVX2, *features.AVX512)
_TARGET_FLAGS = {
    "SANDYBRIDGE": ("avx",),
    "BULLDOZER": ("avx", "fma4"),
    "PILEDRIVER": ("avx", "fma"),
    "STEAMROLLER": ("avx", "fma"),
    "EXCAVATOR": _AVX2,
    "HASWELL": _AVX2,
    "ZEN": _AVX2,
    "SKYLAKEX": _AVX512,
    "COOPERLAKE": (*_AVX512, "avx512_bf16"),
    "SAPPHIRERAPIDS": (*_AVX512, "avx512_bf16", "amx_bf16", "amx_tile"),
    "ARMV8SVE": ("sve",),
    "A64FX": ("sve",),
    "NEOVERSEV1": ("sve",),
    "NEOVERSEN2": ("sve", "sve2"),
    "NEOVERSEV2": ("sve", "sve2"),
    "ARMV9SME": ("sve", "sve2", "sme"),
}
INSTALL_FIX = (
    "pip install -r requirements.txt (its cmeel-openblas runs on any x86-64 CPU with AVX2), "
    "or install your system's OpenBLAS (apt-get install libopenblas0), which is used where "
    "pip's cannot run"
)


@dataclass(frozen=True)
class Build:
    """An OpenBLAS library found here, as it describes itself."""

    path: str
    config: str  # openblas_get_config(): "OpenBLAS 0.3.29 NO_AFFINITY ZEN MAX_THREADS=4"
    target: str  # openblas_get_corename(): the kernels' CPU ("ZEN"; "Zen" chosen at run time)

    @property
    def dynamic(self) -> bool:
        """Kernels for every CPU, chosen when the library loads."""
        return "DYNAMIC_ARCH" in self.config.split()

    @property
    def max_threads(self) -> int:
        found = re.search(r"MAX_THREADS=(\d+)", self.config)
        return int(found.group(1)) if found else 1 << 16

    def missing_flags(self, flags: frozenset[str]) -> list[str]:
        """The instruction sets its kernels use that a CPU with `flags` lacks (none where
        the flags are unknown)."""
        if self.dynamic or not flags:
            return []
        return [f for f in _TARGET_FLAGS.get(self.target.upper(), ()) if f not in flags]


def _pip_candidates() -> list[Path]:
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}
    paths = [Path(root) / "cmeel.prefix" / "lib" / "libopenblas.so.0" for root in roots if root]
    return [path for path in paths if path.is_file()]


def _system_libraries() -> list[str]:
    """The system's OpenBLAS libraries, by path: by its name alone the dynamic linker would
    hand back pip's if loaded already (the same soname)."""
    for ldconfig in ("/sbin/ldconfig", "ldconfig"):
        with suppress(OSError, subprocess.SubprocessError):
            listing = subprocess.run(
                [ldconfig, "-p"], capture_output=True, text=True, timeout=10, check=True
            ).stdout
            return [
                line.rpartition(" => ")[2]
                for line in listing.splitlines()
                if line.strip().startswith("libopenblas.so.0 ")
            ]
    return []


def _candidates() -> Iterator[str]:
    """pip's OpenBLAS, then the system's (looked up only if asked)."""
    yield from (str(path) for path in _pip_candidates())
    yield from _system_libraries()


def _describe(path: str) -> Build:
    """Load `path` with local symbols (MLX does not bind to it yet) and read its build.
    Loading runs no kernel: a build for the wrong CPU loads fine."""
    library = ctypes.CDLL(path)
    library.openblas_get_config.restype = ctypes.c_char_p
    library.openblas_get_corename.restype = ctypes.c_char_p
    return Build(
        path,
        library.openblas_get_config().decode().strip(),
        library.openblas_get_corename().decode(),
    )


def choose(
    candidates: Iterable[str], flags: frozenset[str], cores: int
) -> tuple[Build | None, list[str]]:
    """The OpenBLAS to bind MLX to: the first of `candidates` that runs on this CPU and may
    use all its `cores` (builds cap their threads), else the runnable one that may use the
    most; with why each other was passed over."""
    best: Build | None = None
    passed_over = []
    for path in candidates:
        try:
            build = _describe(path)
        except (OSError, AttributeError) as e:
            passed_over.append(f"{path} could not be loaded ({e})")
            continue
        missing = build.missing_flags(flags)
        if missing:
            passed_over.append(
                f"{path} ({build.config}) was built for {build.target} CPUs only: its kernels "
                f"use {', '.join(missing)}, which this CPU lacks (it would stop with 'Illegal "
                "instruction')"
            )
        elif best is None or min(build.max_threads, cores) > min(best.max_threads, cores):
            best = build
        if best is not None and best.max_threads >= cores:
            break
    return best, passed_over


def load_optimized_blas() -> Path | None:
    """Load OpenBLAS globally; returns its path, or None where it does not apply."""
    if not sys.platform.startswith("linux") or os.environ.get(DISABLE_VARIABLE, "") not in (
        "",
        "0",
    ):
        return None
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # read when the library loads
    build, passed_over = choose(_candidates(), features.cpu_flags(), os.cpu_count() or 1)
    if build is None:
        if _mlx_runs_on_cuda():
            return None  # its work runs on the GPU
        why = "; ".join(passed_over) or "cmeel-openblas is not installed"
        gfortran = any("libgfortran" in reason for reason in passed_over)
        warnings.warn(
            f"{why}: MLX will use its slow reference BLAS on this CPU. "
            + (
                "OpenBLAS needs the GNU Fortran runtime: apt-get install libgfortran5 "
                "(dnf install libgfortran)"
                if gfortran
                else INSTALL_FIX
            ),
            stacklevel=2,
        )
        return None
    if "mlx.core" in sys.modules:
        warnings.warn(
            "mlx.core was imported before stable_diffusion, so MLX may keep its slow reference "
            "BLAS: import stable_diffusion first",
            stacklevel=2,
        )
    global _openblas
    # Loaded again with global symbols: the same library, now the one MLX's calls bind to.
    _openblas = ctypes.CDLL(build.path, mode=ctypes.RTLD_GLOBAL)
    _bind(_openblas)
    return Path(build.path)


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
