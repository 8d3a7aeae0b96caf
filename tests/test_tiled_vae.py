"""Tiled VAE decoding and encoding against diffusers' `AutoencoderKL.enable_tiling()` on
tiny-sd1's VAE (64-pixel tiles; fixtures written by tests/reference/tiled_vae.py).

Tolerance, float32: relative 1e-4 (see test_models.assert_close); pixels 2e-4."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from stable_diffusion import StableDiffusion, pipeline, tiling
from stable_diffusion.loading.folder import load_vae
from tests.helpers import FIXTURES, PIXEL_TOLERANCE, assert_close, nchw, nhwc, run

TINY_SD1 = FIXTURES / "models" / "tiny-sd1"


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "reference" / "tiled_vae.npz"))


def test_tiles_decode_and_encode_as_diffusers(ref):
    vae = load_vae(TINY_SD1 / "vae", mx.float32)
    decoded = tiling.tiled(vae.decode, nhwc(ref["latents"]), 8, 64)
    assert_close(mx.array(nchw(decoded)), ref["decoded.tiled"])
    mean = tiling.tiled(lambda x: vae.encode(x)[0], nhwc(ref["images"]), 64, 8)
    assert_close(mx.array(nchw(mean)), ref["encoded_mean.tiled"])
    # Tiling changes the result here (so the comparison above is of tiled output): the
    # random VAE's group norms and attention see one tile at a time.
    assert np.abs(ref["decoded.tiled"] - ref["decoded.untiled"]).max() > 0.1


@pytest.fixture(scope="module")
def sd_tiled():
    return StableDiffusion(str(TINY_SD1), float16=False, tiled_vae=True)


def test_pipeline_decodes_in_tiles(sd_tiled, ref):
    scaled = nhwc(ref["latents"]) * sd_tiled.vae.config.scaling_factor
    images = np.array(sd_tiled.decode(scaled)).transpose(0, 3, 1, 2)
    expected = np.clip(ref["decoded.tiled"] / 2 + 0.5, 0, 1)
    np.testing.assert_allclose(images, expected, atol=PIXEL_TOLERANCE, rtol=0)


def test_pipeline_encodes_in_tiles(sd_tiled, ref):
    latents = sd_tiled.encode_image(nhwc(ref["images"]) / 2 + 0.5)
    expected = ref["encoded_mean.tiled"] * sd_tiled.vae.config.scaling_factor
    assert_close(mx.array(nchw(latents)), expected)


def test_tiles_where_the_untiled_vae_would_not_fit(monkeypatch):
    """A size whose VAE attention exceeds the memory, but whose UNet attention does not,
    is generated with a tiled decode instead of being refused."""
    sd = StableDiffusion(str(FIXTURES / "models" / "tiny-sdxl"), float16=False)
    height, width = 128, 192
    vae_bytes = pipeline.vae_attention_bytes(sd.vae.downscale, width, height)
    unet_bytes = pipeline.attention_bytes(
        sd.unet.config, sd.vae.downscale, width, height, 1, vae=False
    )
    assert unet_bytes < vae_bytes
    monkeypatch.setattr(pipeline, "memory_size", lambda: (unet_bytes + vae_bytes) // 2)
    calls = []
    monkeypatch.setattr(tiling, "tiled", lambda *args: calls.append(args) or mx.zeros((1,)))
    latents = sd.generate_latents("a cat", num_steps=1, cfg_weight=0, width=width, height=height)
    x = next(iter(latents))
    sd.decode(x)
    assert len(calls) == 1 and calls[0][2:] == (8, 64)  # latents, pixels per tile


def test_tiled_vae_option_reaches_the_pipeline(tmp_path):
    output = tmp_path / "out.png"
    args = ["a cat", "--model", str(TINY_SD1), "--steps", "1", "--seed", "1", "--tiled-vae"]
    result = run("txt2image.py", *args, "--width", "128", "--output", str(output))
    assert result.returncode == 0, result.stderr
    sd = StableDiffusion(str(TINY_SD1), float16=False, tiled_vae=True)
    latents = sd.generate_latents("a cat", num_steps=1, seed=1, width=128, height=64)
    expected = np.round(np.array(sd.decode(next(iter(latents)))[0]) * 255)
    with Image.open(output) as image:
        assert np.abs(np.array(image).astype(int) - expected).max() <= 1
