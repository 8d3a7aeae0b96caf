"""Freed memory kept by the process for its next allocations (Linux, glibc).

MLX allocates its CPU buffers with `malloc`, and glibc serves every request over 32 MB
(each image-sized activation, each weight) with a fresh `mmap`, handed back to the system
at `free`: the next buffer of any size is new memory again, and the kernel faults in and
zeroes each of its pages. In a 512px decode that was 5.4 GB of page faults (over a
fifth of its time), and the decode after a denoising phase could not reuse the memory the
freed UNet left (docs/performance.md, "Freed memory"). MLX's own buffer cache only reuses
buffers of the same size.
"""

from __future__ import annotations

import ctypes
import functools
import platform

# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache
def keep_freed_memory() -> bool:
    """From now on, for the rest of the process: large allocations come from glibc's heap,
    not from `mmap`, and the heap never shrinks, so what is freed serves any later request
    without page faults. The process's resident memory stays at its high-water mark
    instead of falling after each phase. Whether it applies (glibc on Linux only)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs
    # No more mmap'd chunks, then no trimming of the heap's top (-1: as unsigned, never).
    return libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
