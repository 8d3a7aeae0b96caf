import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# First, so that MLX binds to the optimized BLAS before any test imports mlx.core.
import stable_diffusion  # noqa: F401
from tests.helpers import FIXTURES


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(autouse=True, scope="session")
def float32_without_onednn() -> Iterator[None]:
    """`fast_cpu()` computes float32 with OpenBLAS, Winograd and numpy in every test and the
    scripts and servers the tests start (session-wide: module fixtures start servers), on
    any CPU: oneDNN's float32 (its default on CPUs with AVX-512 where oneDNN is installed)
    runs where a test asks for it (`onednn_float32`)."""
    from stable_diffusion.cpu import onednn

    with pytest.MonkeyPatch.context() as session:
        session.setenv(onednn.FLOAT32_DISABLE_VARIABLE, "1")
        yield


@pytest.fixture
def onednn_float32(monkeypatch) -> list[str]:
    """`fast_cpu()` computes float32 through oneDNN, on any CPU, and every convolution that
    Winograd does not take runs there however few its pixels (the tiny models' are below
    the threshold); returns what ran through oneDNN ("linear", "conv2d", "attention",
    "head_attention"), to check that it ran. CI installs oneDNN on
    Linux x86-64 (requirements-bfloat16.txt): there the test fails rather than skips
    without it."""
    from stable_diffusion.cpu import layers, onednn

    if not onednn.installed() and not (os.environ.get("CI") and onednn.on_linux_x86()):
        pytest.skip(f"oneDNN is not installed: {onednn.FIX}")
    monkeypatch.setattr(onednn, "float32_by_default", lambda: True)
    monkeypatch.setattr(layers, "_ONEDNN_FLOAT32_MIN_PIXELS", 1)
    ran: list[str] = []
    for name in ("linear", "conv2d", "attention", "head_attention"):
        original = getattr(onednn, name)

        def recorded(*args, _name=name, _original=original, **kwargs):
            assert not onednn.bfloat16_active()
            ran.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(onednn, name, recorded)
    return ran


@pytest.fixture(params=["F4", "F2"])
def winograd_everywhere(request, monkeypatch) -> list[tuple[int, ...]]:
    """On the CPU within `fast_cpu()`, every 3x3 stride-1 convolution of a float32 image
    runs by Winograd (each test once by F(4x4, 3x3), once by F(2x2, 3x3)), however few its
    channels and pixels (the tiny models' are below the thresholds); returns the shapes of
    the images it convolved, to check that it ran. The test enters `fast_cpu()` with its
    models."""
    from stable_diffusion.cpu import layers, winograd

    algorithm = getattr(winograd, request.param)
    monkeypatch.setattr(layers, "_WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(layers, "_WINOGRAD_MIN_PIXELS", 1)
    monkeypatch.setattr(
        layers, "_WINOGRAD_F4_MIN_PIXELS", 1 if algorithm is winograd.F4 else float("inf")
    )
    convolved = []
    conv3x3 = winograd.conv3x3

    def recorded(x, kernel, bias, used):
        assert used is algorithm
        convolved.append(x.shape)
        return conv3x3(x, kernel, bias, used)

    monkeypatch.setattr(winograd, "conv3x3", recorded)
    return convolved
