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
