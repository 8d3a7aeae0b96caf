from pathlib import Path

import pytest

# First, so that MLX binds to the optimized BLAS before any test imports mlx.core.
import stable_diffusion  # noqa: F401

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
