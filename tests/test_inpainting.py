"""Inpainting against diffusers' StableDiffusionInpaintPipeline and
StableDiffusionXLInpaintPipeline on tiny models (fixtures from
tests/reference/inpainting.py): inpainting UNets (9 input channels) as diffusers folders
and as an original-layout single file, and the ordinary 4-channel tiny models, with the
same image, mask, noise and sampler. The reference takes the VAE posterior mean as we do
(see the script).

Tolerance, float32: every pixel within 2e-4 of the reference (pixels in [0, 1]). These are
the decoded images; the A1111 overlay that pastes the input's unmasked pixels back comes
after (and is not diffusers'): tested on its own below."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion import StableDiffusion
from stable_diffusion.inpainting import apply_overlay, blur_mask, fill, overlay_mask
from tests.helpers import FIXTURES, PIXEL_TOLERANCE, final, nhwc
from tests.reference.inputs import (
    INPAINT_NEGATIVE_PROMPT,
    INPAINT_PROMPT,
    INPAINT_SAMPLERS,
    INPAINT_STEPS,
    INPAINT_STRENGTHS,
    INPAINTING,
    inpainting_mask,
    inpainting_model,
)
from tests.reference.original_layout import digest, folder_to_original, write_safetensors

REF = dict(np.load(FIXTURES / "reference" / "inpainting.npz"))
EXPECTED = json.loads((INPAINTING / "expected.json").read_text())
MODELS = ["tiny-sd1", "tiny-sdxl", "tiny-sd1-inpainting", "tiny-sdxl-inpainting"]


def inpaint(sd: StableDiffusion, strength: float, sampler: str = "euler", **kwargs) -> np.ndarray:
    latents = sd.generate_latents_from_image(
        REF["image"].astype(np.float32) / 255,
        INPAINT_PROMPT,
        strength=strength,
        negative_text=INPAINT_NEGATIVE_PROMPT,
        num_steps=INPAINT_STEPS,
        cfg_weight=7.5,
        sampler=sampler,
        noise=nhwc(REF["noise"]),
        mask=REF["mask"].astype(np.float32) / 255,
        **kwargs,
    )
    return np.array(sd.decode(final(latents)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inpainting")
    found = {name: FIXTURES / "models" / name for name in MODELS[:2]}
    for name in MODELS[2:]:
        found[name] = inpainting_model(name, tmp)
    return found


@pytest.fixture(scope="module", params=MODELS)
def model(request, folders):
    return request.param, StableDiffusion(str(folders[request.param]), float16=False)


def test_the_stored_mask_is_the_reference_inputs():
    np.testing.assert_array_equal(REF["mask"], inpainting_mask())


@pytest.mark.parametrize("strength", INPAINT_STRENGTHS)
def test_inpainting_matches_diffusers(model, strength):
    name, sd = model
    assert sd.is_inpainting == name.endswith("inpainting")
    images = inpaint(sd, strength)
    expected = REF[f"{name}.euler.{strength}"]
    np.testing.assert_allclose(images, expected, atol=PIXEL_TOLERANCE, rtol=0)


@pytest.mark.parametrize("sampler", INPAINT_SAMPLERS[1:])
def test_inpainting_with_other_samplers_matches_diffusers(folders, sampler):
    """Each sampler noises the unmasked region to its own levels between steps."""
    sd = StableDiffusion(str(folders["tiny-sd1"]), float16=False)
    images = inpaint(sd, 0.6, sampler)
    np.testing.assert_allclose(images, REF[f"tiny-sd1.{sampler}.0.6"], atol=PIXEL_TOLERANCE, rtol=0)


def test_single_file_inpainting_model_matches_diffusers(folders, tmp_path):
    """The original-layout file of the SD 1.x inpainting model (the one diffusers'
    from_single_file loaded to the folder's parameters), detected from its keys."""
    weights = folder_to_original(folders["tiny-sd1-inpainting"], "sd1")
    assert digest(weights) == EXPECTED["digests"]["tiny-sd1-inpainting.safetensors"]
    path = tmp_path / "tiny-sd1-inpainting.safetensors"
    write_safetensors(weights, path)
    # The tiny model's sizes; the input channels come from the keys.
    from tests.test_single_file import tiny_config

    sd = StableDiffusion(str(path), float16=False, config=tiny_config("tiny-sd1"))
    assert sd.is_inpainting
    for strength in INPAINT_STRENGTHS:
        expected = REF[f"tiny-sd1-inpainting.euler.{strength}"]
        np.testing.assert_allclose(inpaint(sd, strength), expected, atol=PIXEL_TOLERANCE, rtol=0)


def test_an_inpainting_model_needs_a_mask(folders):
    sd = StableDiffusion(str(folders["tiny-sd1-inpainting"]), float16=False)
    with pytest.raises(ValueError, match=r"inpainting model.*mask"):
        sd.generate_latents("a cat", num_steps=2)
    with pytest.raises(ValueError, match=r"inpainting model.*mask"):
        sd.generate_latents_from_image(np.zeros((64, 64, 3), np.float32), "a cat", num_steps=2)


def test_mask_errors(folders):
    sd = StableDiffusion(str(folders["tiny-sd1"]), float16=False)
    image = np.zeros((64, 64, 3), np.float32)
    with pytest.raises(ValueError, match="mask is 64x32 but the image is 64x64"):
        sd.generate_latents_from_image(image, "a cat", mask=np.zeros((32, 64)))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(N, H, W\), got shape \(1, 64, 64, 1\)"):
        sd.generate_latents_from_image(image, "a cat", mask=np.zeros((1, 64, 64, 1)))
    with pytest.raises(ValueError, match=r"one mask or one per generated image \(1\)"):
        sd.generate_latents_from_image(image, "a cat", mask=np.zeros((2, 64, 64)))
    with pytest.raises(ValueError, match=r"masked content 'blur'.*latent noise"):
        sd.generate_latents_from_image(
            image, "a cat", mask=np.zeros((64, 64)), masked_content="blur"
        )


@pytest.mark.parametrize("masked_content", ["latent noise", "latent nothing"])
def test_masked_content_changes_only_the_masked_start(folders, masked_content):
    """A1111's latent masked-content modes change where the masked area starts from; with
    a 4-channel model the unmasked region still ends as the image's latents."""
    sd = StableDiffusion(str(folders["tiny-sd1"]), float16=False)
    run = {
        content: sd.generate_latents_from_image(
            REF["image"].astype(np.float32) / 255,
            INPAINT_PROMPT,
            strength=0.6,
            num_steps=2,
            seed=1,
            mask=REF["mask"].astype(np.float32) / 255,
            masked_content=content,
        )
        for content in ("original", masked_content)
    }
    original, other = (np.array(final(latents)) for latents in run.values())
    unmasked = REF["mask"][::8, ::8] < 128
    np.testing.assert_array_equal(original[0][unmasked], other[0][unmasked])
    assert np.abs(original[0][~unmasked] - other[0][~unmasked]).max() > 1e-2


def test_fill_paints_only_the_masked_area():
    """A1111's "fill": the masked area takes the colors around it (here a left half red,
    a right half blue, the middle masked), the rest stays the input's."""
    image = np.zeros((64, 64, 3), np.float32)
    image[:, :32, 0] = 1
    image[:, 32:, 2] = 1
    mask = np.zeros((64, 64), np.float32)
    mask[:, 24:40] = 1
    filled = fill(image, mask)
    np.testing.assert_array_equal(filled[mask == 0], image[mask == 0])
    assert filled[:, 25, 0].min() > 0.5 > filled[:, 25, 2].max()
    assert filled[:, 38, 2].min() > 0.5 > filled[:, 38, 0].max()


def test_overlay_keeps_the_unmasked_pixels_exactly():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    mask = REF["mask"].astype(np.float32) / 255
    for blur in (0, 4):
        blurred = blur_mask(mask, blur)
        result = apply_overlay(generated, original, blurred)
        untouched = blurred == 0
        assert untouched.sum() > 500
        for image in result:
            np.testing.assert_array_equal(image[untouched], original[untouched])
        # Where the doubled mask is full, the generated pixels are kept as they are.
        full = overlay_mask(blurred) == 1
        np.testing.assert_array_equal(result[:, full], generated[:, full])
    # The blur spreads the mask: more pixels take some of the generated image.
    assert (blur_mask(mask, 4) > 0).sum() > (mask > 0).sum()


def test_mask_blur_is_a1111s_gaussian():
    """σ = 4 px, kernel of 2·int(2.5·4 + 0.5) + 1 = 21 taps: a lone white pixel spreads 10
    pixels each way, with the normalized Gaussian's weights (8-bit rounded)."""
    mask = np.zeros((41, 41), np.float32)
    mask[20, 20] = 1
    blurred = blur_mask(mask, 4)
    assert (blurred[20] > 0).sum() <= 21 and blurred[20, 9] == 0
    kernel = np.exp(-(np.arange(-10, 11) ** 2) / 32.0)
    kernel /= kernel.sum()
    row = np.round(np.round(255 * kernel[10] * kernel)) / 255
    np.testing.assert_allclose(blurred[20], np.pad(row, 10), atol=1.5 / 255)
    assert blur_mask(mask, 0) is mask


def test_one_mask_per_image_with_fill(folders):
    """Each generated image filled and inpainted with its own mask (one input image)."""
    sd = StableDiffusion(str(folders["tiny-sd1"]), float16=False)
    masks = np.zeros((2, 64, 64), np.float32)
    masks[0, :, :32] = 1
    masks[1, :, 32:] = 1
    latents = sd.generate_latents_from_image(
        REF["image"].astype(np.float32) / 255,
        INPAINT_PROMPT,
        n_images=2,
        strength=0.6,
        num_steps=2,
        seed=1,
        mask=masks,
        masked_content="fill",
    )
    image = REF["image"].astype(np.float32) / 255
    filled = np.stack([fill(image, mask) for mask in masks])
    x0 = np.array(sd.encode_image(mx.array(filled)))
    result = np.array(final(latents))
    # With a 4-channel model each image's unmasked half ends as its filled input's latents.
    np.testing.assert_allclose(result[0, :, 4:], x0[0, :, 4:], atol=1e-5)
    np.testing.assert_allclose(result[1, :, :4], x0[1, :, :4], atol=1e-5)
    assert np.abs(result[0, :, :4] - x0[0, :, :4]).max() > 1e-2
    assert np.abs(result[1, :, 4:] - x0[1, :, 4:]).max() > 1e-2
