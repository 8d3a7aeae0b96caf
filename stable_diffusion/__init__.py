"""Stable Diffusion 1.x, 2.x and SDXL in MLX."""

# First: importing `cpu` loads the optimized BLAS before anything imports mlx.core.
from .cpu import OPTIMIZED_BLAS, fast_cpu, keep_freed_memory
from .pipeline import StableDiffusion

__all__ = ["OPTIMIZED_BLAS", "StableDiffusion", "fast_cpu", "keep_freed_memory"]
