"""A1111's hires fix against its reference (tests/reference/hires_fix.py): diffusers'
txt2img, A1111's upscaling (PyTorch's `interpolate`, or decode + PIL Lanczos + encode), then
diffusers' img2img, on the tiny models with given noise and the Euler sampler.

Tolerances: pixels within 2e-4 (PIXEL_TOLERANCE) end to end; the latent upscaling alone
within 1e-5 of PyTorch's (float32 rounding of the interpolation weights)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from stable_diffusion import StableDiffusion, cli, fast_cpu, tiling, upscale
from stable_diffusion.images import read_parameters, to_uint8
from stable_diffusion.parameters import GenerationParameters
from stable_diffusion.settings import HiresFix
from tests.helpers import FIXTURES, PIXEL_TOLERANCE, assert_close, final, nchw, nhwc, run
from tests.reference.inputs import (
    HIRES_CASES,
    HIRES_NEGATIVE_PROMPT,
    HIRES_PROMPT,
    HIRES_STEPS,
    HIRES_STRENGTH,
    IMAGE_SIZE,
    LATENT_UPSCALE_MODES,
    LATENT_UPSCALE_SIZES,
    hires_case_name,
)

REFERENCE = dict(np.load(FIXTURES / "reference" / "hires_fix.npz"))


@pytest.fixture(scope="module")
def pipelines():
    cache: dict[tuple[str, bool], StableDiffusion] = {}

    def get(model: str, tiled: bool = False) -> StableDiffusion:
        if (model, tiled) not in cache:
            folder = str(FIXTURES / "models" / model)
            cache[model, tiled] = StableDiffusion(folder, float16=False, tiled_vae=tiled)
        return cache[model, tiled]

    return get


def hires_fix(sd: StableDiffusion, upscaler: str, scale: float, **kwargs):
    return sd.generate_latents_hires(
        HIRES_PROMPT,
        HiresFix(scale=scale, steps=HIRES_STEPS, strength=HIRES_STRENGTH, upscaler=upscaler),
        negative_text=HIRES_NEGATIVE_PROMPT,
        num_steps=HIRES_STEPS,
        cfg_weight=7.5,
        sampler="euler",
        **kwargs,
    )


@pytest.mark.parametrize(
    ("upscaler", "size"), [(u, s) for u in LATENT_UPSCALE_MODES for s in LATENT_UPSCALE_SIZES]
)
def test_latent_upscaling_matches_pytorch_interpolate(upscaler, size):
    resized = upscale.resize_latents(nhwc(REFERENCE["latents"]), *size, upscaler)
    expected = REFERENCE[f"{upscaler}.{size[0]}x{size[1]}"]
    np.testing.assert_allclose(nchw(resized), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("model", "upscaler", "scale", "tiled"), HIRES_CASES)
def test_hires_fix_matches_the_reference(pipelines, monkeypatch, model, upscaler, scale, tiled):
    sd = pipelines(model, tiled)
    tiled_calls = []
    original = tiling.tiled
    monkeypatch.setattr(tiling, "tiled", lambda *a: tiled_calls.append(a) or original(*a))
    latents = hires_fix(
        sd,
        upscaler,
        scale,
        latents=nhwc(REFERENCE["noise"]),
        noise=nhwc(REFERENCE[f"hires_noise.x{scale}"]),
    )
    assert len(latents) == HIRES_STEPS + int(HIRES_STEPS * HIRES_STRENGTH)
    images = np.array(sd.decode(final(latents)))
    expected = REFERENCE[hires_case_name(model, upscaler, scale, tiled)]
    assert images.shape == (1, int(IMAGE_SIZE * scale), int(IMAGE_SIZE * scale), 3)
    np.testing.assert_allclose(images, expected, atol=PIXEL_TOLERANCE, rtol=0)
    # With the tiled VAE: Lanczos decodes (one tile) and encodes (2x: tiled), and the final
    # decode is tiled.
    assert len(tiled_calls) == (3 if tiled and upscaler == "Lanczos" else 0)


def test_hires_fix_is_its_library_parts_with_per_image_seeds(pipelines):
    """generate_latents, upscale_latents, generate_latents_from_latents with the same
    seed: the second pass's noise is image i's seed + i drawn at the new size."""
    sd = pipelines("tiny-sd1")
    hires = hires_fix(sd, "Latent", 2.0, n_images=2, seed=5)
    together = np.array(final(hires))
    first = sd.generate_latents(
        HIRES_PROMPT,
        n_images=2,
        num_steps=HIRES_STEPS,
        cfg_weight=7.5,
        negative_text=HIRES_NEGATIVE_PROMPT,
        seed=5,
        sampler="euler",
    )
    upscaled = sd.upscale_latents(final(first), 2 * IMAGE_SIZE, 2 * IMAGE_SIZE, "latent")
    second = sd.generate_latents_from_latents(
        upscaled,
        HIRES_PROMPT,
        strength=HIRES_STRENGTH,
        n_images=2,
        num_steps=HIRES_STEPS,
        cfg_weight=7.5,
        negative_text=HIRES_NEGATIVE_PROMPT,
        seed=5,
        sampler="euler",
    )
    np.testing.assert_array_equal(together, np.array(final(second)))
    # Image 1 alone, from its own seed (a batch of 2 rounds some products differently).
    assert_close(final(hires_fix(sd, "Latent", 2.0, seed=6)), together[1:])


def test_hires_settings_and_parameters(pipelines):
    sd = pipelines("tiny-sd1")
    latents = hires_fix(sd, "latent-nearest", 2.0, seed=3)
    settings = latents.settings
    assert (settings.width, settings.height, settings.strength) == (IMAGE_SIZE, IMAGE_SIZE, None)
    assert settings.hires == HiresFix(2.0, HIRES_STEPS, HIRES_STRENGTH, "Latent (nearest)")
    text = settings.parameters().to_text()
    assert text.endswith(
        f"Size: {IMAGE_SIZE}x{IMAGE_SIZE}, Denoising strength: {HIRES_STRENGTH}, "
        f"Hires upscale: 2, Hires steps: {HIRES_STEPS}, Hires upscaler: Latent (nearest)"
    )


@pytest.mark.parametrize(
    ("hires", "message"),
    [
        (HiresFix(scale=0.5), "hires scale must be between 1 and 8"),
        (HiresFix(scale=float("nan")), "hires scale must be a finite number"),
        (HiresFix(scale=1.3), "makes 64x64 into 83x83"),
        (HiresFix(scale=200.0), "hires scale must be between 1 and 8"),
        (HiresFix(steps=1001), "hires steps must be at most 1000"),
        (HiresFix(steps=-1), "hires steps must be at least 0"),
        (HiresFix(strength=1.5), "hires strength must be between 0 and 1"),
        (HiresFix(strength=float("inf")), "hires strength must be a finite number"),
        (HiresFix(upscaler="R-ESRGAN 4x+"), "unknown hires upscaler"),
        (HiresFix(resize=(1004, 0)), "makes 64x64 into 1004x1004"),
        (HiresFix(resize=(0, 0)), "gives no size"),
    ],
)
def test_bad_hires_settings_are_refused_before_any_step(pipelines, hires, message):
    sd = pipelines("tiny-sd1")
    with pytest.raises(ValueError, match=message):
        sd.generate_latents_hires("a cat", hires, num_steps=2, seed=0)


def test_hires_resize_crops_to_the_size_asked_for(pipelines):
    """A1111's `Hires resize`: upscaled to cover the size, then center-cropped."""
    sd = pipelines("tiny-sd1")
    latents = sd.generate_latents_hires(
        "a cat", HiresFix(resize=(128, 96), steps=1), num_steps=2, seed=0
    )
    assert final(latents).shape == (1, 96 // 8, 128 // 8, 4)
    assert (
        latents.settings.parameters()
        .to_text()
        .endswith(
            "Denoising strength: 0.7, Hires resize: 128x96, Hires steps: 1, Hires upscaler: Latent"
        )
    )
    x = mx.arange(6, dtype=mx.float32).reshape(1, 2, 3, 1)
    up = sd.upscale_latents(x, 48, 32, "latent-nearest", crop_to=(32, 16))
    # Nearest: rows 0 0 1 1 and columns 0 0 1 1 2 2, less a latent each side (1 row each).
    np.testing.assert_array_equal(np.array(up)[0, :, :, 0], [[0, 1, 1, 2], [3, 4, 4, 5]])


# -- the script ------------------------------------------------------------------------------


def test_script_makes_the_librarys_images_and_from_image_makes_them_again(pipelines, tmp_path):
    """--hires-* as the library's generate_latents_hires, pixel for pixel (Lanczos with the
    tiled VAE: decode, encode and final decode through the tiles); the PNG records A1111's
    fields, and --from-image makes the same file again."""
    output = tmp_path / "hires.png"
    options = ["--model", str(FIXTURES / "models" / "tiny-sd1"), "--tiled-vae", "--n_images", "2"]
    options += ["--steps", "3", "--sampler", "euler", "--save-individual"]
    result = run(
        "txt2image.py",
        "a castle",
        *options,
        "--seed",
        "7",
        "--hires-scale",
        "2",
        "--hires-steps",
        "2",
        "--hires-strength",
        "0.6",
        "--hires-upscaler",
        "LANCZOS",
        "--output",
        str(output),
    )
    assert result.returncode == 0, result.stderr
    sd = pipelines("tiny-sd1", tiled=True)
    hires = HiresFix(scale=2, steps=2, strength=0.6, upscaler="Lanczos")
    for i in range(2):
        latents = sd.generate_latents_hires(
            "a castle", hires, num_steps=3, seed=7 + i, sampler="euler"
        )
        with fast_cpu():  # as the script runs
            expected = to_uint8(sd.decode(final(latents)))[0]
        saved = tmp_path / f"hires-{i}.png"
        np.testing.assert_array_equal(np.array(Image.open(saved)), expected)
        assert (
            read_parameters(saved)
            .to_text()
            .endswith(
                f"Seed: {7 + i}, Size: 64x64, Model: {FIXTURES / 'models' / 'tiny-sd1'}, "
                "Denoising strength: 0.6, Hires upscale: 2, Hires steps: 2, Hires upscaler: Lanczos"
            )
        )
    again = tmp_path / "again.png"
    result = run("txt2image.py", "--from-image", str(output), *options, "--output", str(again))
    assert result.returncode == 0, result.stderr
    assert again.read_bytes() == output.read_bytes()


def test_from_image_takes_an_a1111_hires_fix():
    """A1111 leaves `Hires upscaler` out when the API was not given one: its default,
    Latent, is what runs; options on the command line win."""
    text = (
        "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x768, "
        "Denoising strength: 0.45, Hires upscale: 1.5, Hires steps: 12"
    )
    p = cli.parser("txt2img")
    args = p.parse_args(["--hires-steps", "3"])
    cli.apply_saved_parameters(args, GenerationParameters.from_text(text))
    assert cli.hires_fix(args) == HiresFix(scale=1.5, steps=3, strength=0.45, upscaler="Latent")
    # Either size option replaces the image's size; the rest still comes from the image.
    args = p.parse_args(["--hires-resize", "1024x0"])
    cli.apply_saved_parameters(args, GenerationParameters.from_text(text))
    assert cli.hires_fix(args) == HiresFix(
        steps=12, strength=0.45, upscaler="Latent", resize=(1024, 0)
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hires-scale", "0.5"], "--hires-scale must be between 1 and 8"),
        (["--hires-scale", "nan"], "--hires-scale must be a finite number"),
        (["--hires-scale", "1.3"], "--hires-scale makes 512x512 into 665x665"),
        (["--hires-scale", "2", "--width", "8192"], "makes 8192x512 into 16384x1024"),
        (["--hires-scale", "2", "--hires-steps", "1001"], "--hires-steps must be at most 1000"),
        (["--hires-scale", "2", "--hires-strength", "2"], "--hires-strength must be between 0"),
        (["--hires-scale", "2", "--hires-strength", "inf"], "--hires-strength must be a finite"),
        (["--hires-scale", "2", "--hires-upscaler", "R-ESRGAN"], "unknown hires upscaler"),
        (["--hires-steps", "3"], "--hires-steps need --hires-scale (or --hires-resize)"),
        (["--hires-resize", "1024"], "'1024' is not WxH"),
        (["--hires-resize", "0x0"], "--hires-resize 0x0 gives no size"),
        (["--hires-resize", "1024x0", "--hires-scale", "2"], "not both"),
    ],
)
def test_bad_hires_options_are_refused_before_loading(tmp_path, args, message):
    defaults = ["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o.png")]
    result = run("txt2image.py", "a cat", "--width", "512", "--height", "512", *defaults, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
