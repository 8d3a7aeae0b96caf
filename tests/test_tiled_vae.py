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


def test_other_tile_sizes_as_diffusers(ref):
    """`vae_tile_size` tiles as diffusers does with its tile_sample_min_size (and
    tile_latent_min_size) set to it: the fixture's 96-pixel tiles against the VAE's 64."""
    sd = StableDiffusion(str(TINY_SD1), float16=False, tiled_vae=True, vae_tile_size=96)
    scaled = nhwc(ref["latents"]) * sd.vae.config.scaling_factor
    images = np.array(sd.decode(scaled)).transpose(0, 3, 1, 2)
    expected = np.clip(ref["decoded.tiled_96"] / 2 + 0.5, 0, 1)
    np.testing.assert_allclose(images, expected, atol=PIXEL_TOLERANCE, rtol=0)
    latents = sd.encode_image(nhwc(ref["images"]) / 2 + 0.5)
    assert_close(
        mx.array(nchw(latents)), ref["encoded_mean.tiled_96"] * sd.vae.config.scaling_factor
    )
    # Another tiling than the native one: the comparison above is of the 96-pixel tiles.
    assert np.abs(ref["decoded.tiled_96"] - ref["decoded.tiled"]).max() > 0.1


@pytest.mark.parametrize(("tile_size", "tiles"), [(None, (8, 64)), (96, (12, 96))])
def test_tiles_where_the_untiled_vae_would_not_fit(monkeypatch, tile_size, tiles):
    """A size whose untiled decode would take over half the memory, but whose UNet
    activations fit, is generated with a tiled decode (of the VAE's native tiles unless
    another size is asked for) instead of being refused."""
    height, width = 128, 192
    sd = StableDiffusion(
        str(FIXTURES / "models" / "tiny-sdxl"), float16=False, vae_tile_size=tile_size
    )
    vae_bytes = pipeline.vae_decode_bytes(sd.vae.config, width, height)
    unet_bytes = pipeline.unet_activation_bytes(sd.unet.config, sd.vae.downscale, width, height, 1)
    assert unet_bytes < vae_bytes // 2
    monkeypatch.setattr(pipeline, "memory_size", lambda: 2 * vae_bytes - 1)
    calls = []
    monkeypatch.setattr(tiling, "tiled", lambda *args: calls.append(args) or mx.zeros((1,)))
    latents = sd.generate_latents("a cat", num_steps=1, cfg_weight=0, width=width, height=height)
    x = next(iter(latents))
    sd.decode(x)
    assert len(calls) == 1 and calls[0][2:] == tiles  # latents, pixels per tile
    monkeypatch.setattr(pipeline, "memory_size", lambda: 2 * vae_bytes)
    sd.decode(x)
    assert len(calls) == 1  # fits: untiled


@pytest.mark.parametrize("size", [0, 48, 100, 96.0, True, 8224, "512"])
def test_bad_tile_sizes_are_refused_before_loading(size):
    with pytest.raises(ValueError, match="the VAE tile size must be a multiple of 32 pixels"):
        StableDiffusion("no/such/model", vae_tile_size=size)


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


def test_tile_size_option(tmp_path):
    """--vae-tile-size tiles (as --tiled-vae with tiles of that size); a bad size is a
    clear error, not a traceback."""
    output = tmp_path / "out.png"
    args = ["a cat", "--model", str(TINY_SD1), "--steps", "1", "--seed", "1"]
    result = run("txt2image.py", *args, "--vae-tile-size", "100", "--output", str(output))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "the VAE tile size must be a multiple of 32 pixels" in result.stderr
    result = run(
        "txt2image.py", *args, "--vae-tile-size", "96", "--width", "192", "--output", str(output)
    )
    assert result.returncode == 0, result.stderr
    sd = StableDiffusion(str(TINY_SD1), float16=False, tiled_vae=True, vae_tile_size=96)
    x = next(iter(sd.generate_latents("a cat", num_steps=1, seed=1, width=192, height=64)))
    expected = np.round(np.array(sd.decode(x)[0]) * 255)
    untiled = StableDiffusion(str(TINY_SD1), float16=False)
    plain = np.round(np.array(untiled.decode(x)[0]) * 255)
    with Image.open(output) as image:
        pixels = np.array(image).astype(int)
    assert np.abs(pixels - expected).max() <= 1 < np.abs(pixels - plain).max()
