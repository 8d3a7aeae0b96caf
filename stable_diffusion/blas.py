"""Use an optimized BLAS for MLX on Linux CPUs.

The Linux `mlx[cpu]` wheel links a reference BLAS that runs matmul at about
6 GFLOP/s. Loading OpenBLAS (from the `cmeel-openblas` wheel) with global
symbols before `mlx.core` is imported makes MLX's BLAS calls bind to it: about
30x faster matmuls and convolutions. Set MLX_SD_NO_OPENBLAS=1 to turn it off.

OpenBLAS's idle threads spin for about 0.1 s after each call by default, stealing a core
from the numpy softmax that runs between the attention matmuls (`cpu_kernels.attention`);
unless OPENBLAS_THREAD_TIMEOUT is set already, they go to sleep after 2^4 cycles instead.
"""

from __future__ import annotations

import ctypes
import os
import sys
import sysconfig
import warnings
from pathlib import Path

DISABLE_VARIABLE = "MLX_SD_NO_OPENBLAS"


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
    try:
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        warnings.warn(
            f"could not load OpenBLAS ({e}); MLX will use its slow reference BLAS. "
            "OpenBLAS needs the GNU Fortran runtime: apt-get install libgfortran5 "
            "(dnf install libgfortran)",
            stacklevel=2,
        )
        return None
    return library
