"""What makes the models fast on CPUs, behind one door: `fast_cpu()`.

Importing this package first loads OpenBLAS for MLX (`blas.py`), before anything imports
`mlx.core`. Within `fast_cpu()` the models' layers are their CPU subclasses (`layers.py`:
rational activations, group norm by per-channel sums, shifted-matmul, Winograd
(`winograd.py`), upsampling and 1x1 convolutions, dequantizing linear layers, the numpy
kernels of `kernels.py`; oneDNN's matmuls, convolutions and norms of `onednn.py`, in
bfloat16 with `fast_cpu(bfloat16=True)`, in float32 on CPUs with AVX-512) and attention
runs by `kernels.attention`; outside it the models are plain, lazy MLX.
"""

from .blas import load_optimized_blas

# Before anything imports mlx.core, so that MLX binds to the optimized BLAS.
OPTIMIZED_BLAS = load_optimized_blas()

from .fast import compute_dtype, fast_cpu, in_fast_cpu, on_cpu, track  # noqa: E402
from .memory import keep_freed_memory  # noqa: E402
from .onednn import COMPUTE_BFLOAT16  # noqa: E402
from .onednn import unavailable_reason as unavailable_bfloat16  # noqa: E402

__all__ = [
    "COMPUTE_BFLOAT16",
    "OPTIMIZED_BLAS",
    "compute_dtype",
    "fast_cpu",
    "in_fast_cpu",
    "keep_freed_memory",
    "on_cpu",
    "track",
    "unavailable_bfloat16",
]
