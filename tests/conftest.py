from pathlib import Path

import pytest

# First, so that MLX binds to the optimized BLAS before any test imports mlx.core.
import stable_diffusion  # noqa: F401
from tests.helpers import FIXTURES


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


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
