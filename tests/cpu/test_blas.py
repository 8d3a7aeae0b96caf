"""On Linux, importing stable_diffusion makes MLX's matmuls bind to OpenBLAS
instead of the wheel's reference BLAS (checked with the dynamic linker's own
binding trace, not with timings)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the reference BLAS ships only in Linux wheels"
)

MATMUL = "import stable_diffusion, mlx.core as mx; mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))"


def sgemm_binding(extra_env: dict[str, str]) -> str:
    env = {**os.environ, "LD_DEBUG": "bindings", **extra_env}
    result = subprocess.run(
        [sys.executable, "-c", MATMUL], env=env, capture_output=True, text=True, check=True
    )
    lines = [
        line for line in result.stderr.splitlines() if "libmlx" in line and "`cblas_sgemm'" in line
    ]
    assert lines, "MLX never called cblas_sgemm"
    return lines[0]


def test_mlx_matmul_binds_to_openblas():
    assert "libopenblas" in sgemm_binding({})


def test_environment_variable_turns_it_off():
    assert "libopenblas" not in sgemm_binding({"MLX_SD_NO_OPENBLAS": "1"})


def test_without_openblas_a_cpu_build_warns_and_a_cuda_build_does_not(monkeypatch, recwarn):
    from stable_diffusion.cpu import blas

    monkeypatch.setattr(blas, "_candidates", lambda: [])
    monkeypatch.delenv("MLX_SD_NO_OPENBLAS", raising=False)
    with pytest.warns(UserWarning, match="cmeel-openblas is not installed"):
        assert blas.load_optimized_blas() is None
    assert not blas._mlx_runs_on_cuda()  # this environment has mlx[cpu]

    monkeypatch.setattr(blas, "_mlx_runs_on_cuda", lambda: True)
    recwarn.clear()
    assert blas.load_optimized_blas() is None
    assert not recwarn.list


# Builds as OpenBLAS describes itself (openblas_get_config, openblas_get_corename): the
# wheels of cmeel-openblas 0.3.31 and 0.3.29, and Debian 12's libopenblas0-pthread.
BUILDS = {
    "pip-avx512": ("OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX MAX_THREADS=4", "SKYLAKEX"),
    "pip-avx2": ("OpenBLAS 0.3.29 NO_AFFINITY ZEN MAX_THREADS=4", "ZEN"),
    "system": ("OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY Zen MAX_THREADS=64", "Zen"),
}
AVX2_CPU = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512_CPU = AVX2_CPU | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


@pytest.fixture
def described(monkeypatch) -> list[str]:
    """`blas._describe` answers from BUILDS (a missing one fails to load, as without
    libgfortran); returns the paths it was asked about."""
    from stable_diffusion.cpu import blas

    asked = []

    def describe(path):
        asked.append(path)
        if path not in BUILDS:
            raise OSError("libgfortran.so.5: cannot open shared object file")
        return blas.Build(path, *BUILDS[path])

    monkeypatch.setattr(blas, "_describe", describe)
    return asked


@pytest.mark.parametrize(
    "candidates, flags, cores, chosen, looked_at",
    [
        # pip's build for AVX-512 on an AVX2 CPU: the system's instead.
        (["pip-avx512", "system"], AVX2_CPU, 2, "system", 2),
        # pip's runs here and may use both cores: the system's is not even loaded.
        (["pip-avx512", "system"], AVX512_CPU, 2, "pip-avx512", 1),
        (["pip-avx2", "system"], AVX512_CPU, 2, "pip-avx2", 1),
        # 16 cores: pip's builds stop at 4 threads, the system's may use them all.
        (["pip-avx2", "system"], AVX2_CPU, 16, "system", 2),
        (["pip-avx2"], AVX2_CPU, 16, "pip-avx2", 1),
        # Flags unknown (not Linux's /proc/cpuinfo): trusted, as before this check.
        (["pip-avx512"], frozenset(), 2, "pip-avx512", 1),
        (["missing", "pip-avx2"], AVX2_CPU, 2, "pip-avx2", 2),
        (["pip-avx512", "missing"], AVX2_CPU, 2, None, 2),
    ],
)
def test_the_build_chosen_runs_on_this_cpu(described, candidates, flags, cores, chosen, looked_at):
    from stable_diffusion.cpu import blas

    build, passed_over = blas.choose(iter(candidates), flags, cores)
    assert (build and build.path) == chosen
    assert len(described) == looked_at
    if "pip-avx512" in candidates and flags == AVX2_CPU:
        assert any(
            "pip-avx512" in why and "built for SKYLAKEX CPUs only" in why and "avx512f" in why
            for why in passed_over
        )


@pytest.mark.parametrize(
    "build, fix",
    [
        ("pip-avx512", "cmeel-openblas runs on any x86-64 CPU with AVX2"),
        ("missing", "libgfortran5"),
    ],
)
def test_without_a_build_that_runs_here_a_warning_names_the_fix(described, monkeypatch, build, fix):
    from stable_diffusion.cpu import blas, features

    monkeypatch.setattr(blas, "_candidates", lambda: iter([build]))
    monkeypatch.setattr(features, "cpu_flags", lambda: AVX2_CPU)
    monkeypatch.setattr(blas, "_openblas", None)  # whatever happens, nothing is bound
    monkeypatch.delenv("MLX_SD_NO_OPENBLAS", raising=False)
    with pytest.warns(UserWarning, match="slow reference BLAS") as caught:
        assert blas.load_optimized_blas() is None
    assert fix in str(caught[0].message) and blas._openblas is None


def test_the_installed_build_describes_itself_and_runs_here():
    """The library that MLX was bound to at import is one the check lets through."""
    from stable_diffusion.cpu import OPTIMIZED_BLAS, blas, features

    assert OPTIMIZED_BLAS is not None
    build = blas._describe(str(OPTIMIZED_BLAS))
    assert build.config.startswith("OpenBLAS ") and build.target
    assert not build.missing_flags(features.cpu_flags())
