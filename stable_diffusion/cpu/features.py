"""What this CPU can run: its instruction-set flags as Linux's /proc/cpuinfo lists them,
for the native libraries that need some (OpenBLAS's kernels, oneDNN's bfloat16)."""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86's "flags" line, Arm's "Features"); empty where
    /proc/cpuinfo cannot tell (another system)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


# x86-64-v4's AVX-512 subsets (numpy's AVX512_SKX, OpenBLAS's SKYLAKEX).
AVX512 = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")


def has_avx512() -> bool:
    return set(AVX512) <= cpu_flags()
