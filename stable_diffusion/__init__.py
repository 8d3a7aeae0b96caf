"""Stable Diffusion 1.x, 2.x and SDXL in MLX."""

from .blas import load_optimized_blas

# Before anything imports mlx.core, so that MLX binds to the optimized BLAS.
OPTIMIZED_BLAS = load_optimized_blas()

from .cpu_kernels import fast_cpu  # noqa: E402
from .pipeline import StableDiffusion  # noqa: E402

__all__ = ["OPTIMIZED_BLAS", "StableDiffusion", "fast_cpu"]
