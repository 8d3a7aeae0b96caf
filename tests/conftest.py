from pathlib import Path

import pytest

# First, so that MLX binds to the optimized BLAS before any test imports mlx.core.
import stable_diffusion  # noqa: F401

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def winograd_everywhere(monkeypatch) -> list[tuple[int, ...]]:
    """On the CPU within `fast_cpu()`, every 3x3 stride-1 convolution of a float32 image
    runs by Winograd, however few its channels and pixels (the tiny models' are below the
    thresholds); returns the shapes of the images it convolved, to check that it ran."""
    import mlx.core as mx

    from stable_diffusion import fast_cpu, layers, winograd

    monkeypatch.setattr(layers, "_WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(layers, "_WINOGRAD_MIN_PIXELS", 1)
    convolved = []
    conv3x3 = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3",
                        lambda x, *args: convolved.append(x.shape) or conv3x3(x, *args))
    with mx.stream(mx.cpu), fast_cpu():
        yield convolved
