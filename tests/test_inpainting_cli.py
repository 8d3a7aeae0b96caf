"""Inpainting and outpainting with image2image.py on the tiny models: the saved image keeps
the input's unmasked pixels, the canvas grows as asked, the parameters record the mask as
A1111 does, and wrong masks are refused before any model loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stable_diffusion.images import read_parameters
from stable_diffusion.inpainting import blur_mask, mask_from_image, parameters_extras
from stable_diffusion.parameters import GenerationParameters
from tests.helpers import FIXTURES, run
from tests.reference.inputs import inpainting_model

TINY_SD1 = str(FIXTURES / "models" / "tiny-sd1")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 24:56] = 255
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path, image, mask.astype(np.float32) / 255


def image2image(tmp: Path, *args: str, model: str = TINY_SD1):
    output = tmp / "out.png"
    result = run(
        "image2image.py",
        str(tmp / "in.png"),
        "a red door",
        "--model",
        model,
        "--steps",
        "3",
        "--seed",
        "5",
        "--output",
        str(output),
        *args,
    )
    return result, output


def test_inpainting_keeps_the_unmasked_pixels(inputs):
    tmp, image, mask = inputs
    result, output = image2image(tmp, "--mask", str(tmp / "mask.png"))
    assert result.returncode == 0, result.stderr
    out = pixels(output)
    kept = blur_mask(mask, 4) == 0
    np.testing.assert_array_equal(out[kept], image[kept])
    assert np.abs(out[mask == 1].astype(int) - image[mask == 1]).mean() > 10
    saved = read_parameters(output)
    assert saved.strength == 0.75
    assert dict(saved.extras)["Mask blur"] == "4"
    assert "Masked content" not in dict(saved.extras)  # "original", A1111's default


def test_inverted_mask_keeps_the_white_part(inputs):
    tmp, image, mask = inputs
    result, output = image2image(
        tmp, "--mask", str(tmp / "mask.png"), "--invert-mask", "--mask-blur", "0"
    )
    assert result.returncode == 0, result.stderr
    out = pixels(output)
    np.testing.assert_array_equal(out[mask == 1], image[mask == 1])
    extras = dict(read_parameters(output).extras)
    assert extras["Mask mode"] == "Inpaint not masked" and "Mask blur" not in extras


def test_outpainting_grows_the_canvas_and_keeps_the_image(inputs):
    tmp, image, _ = inputs
    result, output = image2image(tmp, "--outpaint", "16,0,8,24", "--strength", "1")
    assert result.returncode == 0, result.stderr
    out = pixels(output)
    assert out.shape == (8 + 64 + 24, 16 + 64, 3)
    canvas_mask = np.pad(np.zeros((64, 64), np.float32), ((8, 24), (16, 0)), constant_values=1)
    kept = blur_mask(canvas_mask, 4) == 0
    np.testing.assert_array_equal(out[kept], np.pad(image, ((8, 24), (16, 0), (0, 0)))[kept])
    saved = read_parameters(output)
    assert (saved.width, saved.height) == (80, 96)
    assert dict(saved.extras)["Masked content"] == "fill"


def test_an_inpainting_model_inpaints_and_asks_for_a_mask(inputs):
    tmp, image, mask = inputs
    model = str(inpainting_model("tiny-sd1-inpainting", tmp))
    result, output = image2image(tmp, "--mask", str(tmp / "mask.png"), model=model)
    assert result.returncode == 0, result.stderr
    kept = blur_mask(mask, 4) == 0
    np.testing.assert_array_equal(pixels(output)[kept], image[kept])
    result, _ = image2image(tmp, "--overwrite", model=model)
    assert result.returncode == 2
    assert "inpainting model" in result.stderr and "--mask" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mask", "small.png"], "the mask is 32x64 but the image is 64x64"),
        (["--mask", "missing.png"], "missing.png: no such file"),
        (["--invert-mask"], "--invert-mask goes with --mask or --outpaint"),
        (["--masked-content", "fill"], "--masked-content goes with --mask or --outpaint"),
        (["--outpaint", "10,0,0,0"], "each a multiple of 8"),
        (["--outpaint", "8,8"], "LEFT,RIGHT,TOP,BOTTOM"),
        (["--outpaint", "0,9000,0,0"], "--width must be at most"),
        (["--mask", "mask.png", "--mask-blur", "-1"], "--mask-blur must be 0 to 64"),
    ],
)
def test_mask_errors_before_loading(inputs, args, message):
    tmp, _, _ = inputs
    Image.new("L", (32, 64)).save(tmp / "small.png")
    args = [str(tmp / a) if a.endswith(".png") else a for a in args]
    result, output = image2image(tmp, *args, model="/no/such/model")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "no such model" not in result.stderr
    assert not output.exists()


def test_masks_with_alpha_or_gray_levels():
    """A1111's create_binary_mask: with transparency the alpha is the mask (opaque =
    repaint, cut at 128); otherwise the gray levels."""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere: only the alpha counts
    rgba[:2, :, 3] = 255
    rgba[2, :, 3] = 129
    rgba[3, :, 3] = 128
    mask = mask_from_image(Image.fromarray(rgba, "RGBA"))
    np.testing.assert_array_equal(mask[:, 0], [1, 1, 1, 0])
    gray = mask_from_image(Image.fromarray(np.array([[0, 51], [204, 255]], np.uint8), "L"))
    np.testing.assert_allclose(gray, [[0, 0.2], [0.8, 1]])
    rgb = mask_from_image(Image.fromarray(np.full((2, 2, 3), 255, np.uint8)))
    np.testing.assert_array_equal(rgb, np.ones((2, 2)))


def test_mask_parameters_round_trip():
    extras = parameters_extras(4, "latent noise", inverted=True)
    saved = GenerationParameters(
        prompt="a door",
        steps=20,
        sampler="euler",
        cfg_scale=7.0,
        seed=1,
        width=512,
        height=512,
        strength=0.75,
        extras=extras,
    )
    text = saved.to_text()
    assert (
        "Denoising strength: 0.75, Mask blur: 4, Masked content: latent noise, "
        "Mask mode: Inpaint not masked" in text
    )
    assert GenerationParameters.from_text(text) == saved
    assert parameters_extras(0, "original", inverted=False) == ()
