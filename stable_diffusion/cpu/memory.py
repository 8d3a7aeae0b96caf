"""Freed memory kept by the process for its next allocations (Linux, glibc).

MLX allocates its CPU buffers with `malloc`, and glibc serves every request over 32 MB
(each image-sized activation, each weight) with a fresh `mmap`, handed back to the system
at `free`: the next buffer of any size is new memory again, and the kernel faults in and
zeroes each of its pages. A 512px decode faulted in 5.4 GB that way (a fifth of its time),
and a decode could not reuse the memory the UNet freed before it (docs/performance.md,
"Fixed per-image costs"). MLX's own buffer cache only reuses buffers of the same size.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt's parameters and glibc's defaults for them (malloc.h, mallopt(3)).
_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD = -1, 128 * 1024
_M_MMAP_MAX, _DEFAULT_MMAP_MAX = -4, 65536
_M_ARENA_MAX, _DEFAULT_ARENA_MAX = -8, 0  # 0: glibc's default, from the cores

_lock = threading.Lock()
_depth = 0


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)  # the C library this process already runs


def _set(libc: ctypes.CDLL, mmap_max: int, trim_threshold: int, arena_max: int) -> None:
    for parameter, value in (
        (_M_MMAP_MAX, mmap_max),
        (_M_TRIM_THRESHOLD, trim_threshold),
        (_M_ARENA_MAX, arena_max),
    ):
        if libc.mallopt(parameter, value) != 1:
            raise OSError(f"glibc's mallopt refused its parameter {parameter} = {value}")


@contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """Within this block (blocks nest; the whole process is affected), memory that is
    freed stays with the process and serves later allocations of any size without page
    faults: large buffers come from glibc's heap instead of `mmap`, and the heap is never
    trimmed. Threads started within share the main heap; one started before keeps its own
    arena, whose large buffers glibc maps afresh whatever it is told, so enter the block
    before starting a thread that generates (as the server does). Leaving the outermost
    block hands the free memory back to the system (`malloc_trim`). Yields whether it
    applies: glibc on Linux only."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            # No more mmap'd chunks, no trimming of the heap (-1: as unsigned, never), and
            # threads started from now on share the main heap: a thread's own arena mmaps
            # every request over its 64 MiB heaps whatever M_MMAP_MAX says (glibc 2.35+).
            _set(libc, 0, -1, 1)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(libc, _DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD, _DEFAULT_ARENA_MAX)
                libc.malloc_trim(0)
