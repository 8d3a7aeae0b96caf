"""A1111's "Inpaint area: Only masked" (inpaint_full_res): the crop region's arithmetic
against hand-computed cases of A1111's formulas, the crop's resizing and the paste back,
the infotext fields, and `image2image.py --only-masked` on the tiny model: only the
masked area changes, at the input's size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stable_diffusion.images import read_parameters
from stable_diffusion.inpainting import (
    blur_mask,
    crop_masked_area,
    crop_region,
    expand_crop_region,
    parameters_extras,
)
from stable_diffusion.parameters import GenerationParameters
from tests.test_inpainting_cli import image2image, pixels

LANCZOS = Image.Resampling.LANCZOS


def box_mask(height: int, width: int, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    mask = np.zeros((height, width), np.float32)
    mask[y1:y2, x1:x2] = 1
    return mask


# Expected values worked by hand from A1111's modules/masking.py: get_crop_region_v2
# (bounding box, each side grown by the padding and clipped to the image) then
# expand_crop_region (the short side grown by int(desired - current), half before (floor),
# the rest after; shifted back inside the image; cut at its edge).
CROP_CASES = [
    # expand_crop_region's docstring example: a 128x32 mask processed at 512x512 -> 128x128.
    # desired height 128, grow int(128 - 32) = 96: y1 200 - 48, y2 232 + 48.
    ((512, 512), (100, 200, 228, 232), 0, (512, 512), (100, 200, 228, 232), (100, 152, 228, 280)),
    # padding 32: (68, 168, 260, 264) is 192x96; grow 96: y 168 - 48, 264 + 48.
    ((512, 512), (100, 200, 228, 232), 32, (512, 512), (68, 168, 260, 264), (68, 120, 260, 312)),
    # Top-left corner: the padding clipped at 0 -> (0, 0, 72, 42); grow int(72 - 42) = 30:
    # y1 -15, y2 57; y1 < 0 shifts both down by 15 -> (0, 0, 72, 72).
    ((512, 512), (0, 0, 40, 10), 32, (512, 512), (0, 0, 72, 42), (0, 0, 72, 72)),
    # Bottom-right corner of 300x200 at 512x256 (ratio 2): padding 10 clipped -> (270, 140,
    # 300, 200), 30x60 < 2: desired width 120, grow 90: x1 225, x2 345; x2 past 300 shifts
    # both left by 45 -> (180, 140, 300, 200).
    ((200, 300), (280, 150, 300, 200), 10, (512, 256), (270, 140, 300, 200), (180, 140, 300, 200)),
    # The image too short for the ratio: 100x50 at 64x64, desired height 100, grow 50: y1
    # -25, y2 75 -> shifted up by 25 -> (-50, 50) -> shifted down by 50 -> (0, 100) -> cut
    # at 50.
    ((50, 100), (0, 0, 100, 50), 0, (64, 64), (0, 0, 100, 50), (0, 0, 100, 50)),
    # 10x10 at 64x96: desired height 10 / (64 / 96) = 15.000000000000002, grow int(5.0...) =
    # 5: y1 50 - 2, y2 60 + 3 (the odd pixel after).
    ((200, 200), (50, 50, 60, 60), 0, (64, 96), (50, 50, 60, 60), (50, 48, 60, 63)),
]


@pytest.mark.parametrize(("shape", "box", "padding", "size", "region", "expanded"), CROP_CASES)
def test_crop_region_is_a1111s(shape, box, padding, size, region, expanded):
    mask = box_mask(*shape, *box)
    assert crop_region(mask, padding) == region
    assert expand_crop_region(region, size, shape[::-1]) == expanded


def test_crop_region_counts_every_nonzero_8bit_level():
    """The blurred mask's faintest levels are in the box (A1111 takes the 8-bit mask's
    bounding box); a level that rounds to 0 is not."""
    mask = np.zeros((20, 20), np.float32)
    mask[5, 7] = 1 / 255
    mask[15, 15] = 0.4 / 255
    assert crop_region(mask, 0) == (7, 5, 8, 6)
    assert crop_region(np.zeros((20, 20), np.float32), 32) is None


def test_an_empty_mask_is_refused():
    with pytest.raises(ValueError, match="the mask is empty"):
        crop_masked_area(np.zeros((64, 64, 3), np.float32), np.zeros((64, 64)), (64, 64), 32)


def test_the_crop_is_resized_and_filled_as_a1111():
    """A1111's resize_image mode 2 ("resize and fill"): a 100x50 crop at 64x64 is scaled to
    64 x (50 * 64 // 100) = 64x32 (Lanczos), pasted at y = 32 - 16 = 16, and the 16-row
    bands above and below are the edge rows stretched."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 100, 3), dtype=np.uint8)
    mask = np.ones((50, 100), np.float32)
    area = crop_masked_area(image.astype(np.float32) / 255, mask, (64, 64), 0)
    assert area.region == (0, 0, 100, 50)
    crop = np.round(area.image * 255).astype(np.uint8)
    assert crop.shape == (64, 64, 3)
    scaled = np.asarray(Image.fromarray(image).resize((64, 32), LANCZOS))
    np.testing.assert_array_equal(crop[16:48], scaled)
    for band in (crop[:16], crop[48:]):
        assert (band == band[:1]).all()
    np.testing.assert_array_equal(area.mask, np.ones((64, 64)))


@pytest.mark.parametrize("box", [(20, 24, 44, 40), (0, 0, 12, 30), (40, 50, 64, 64)])
def test_paste_changes_only_the_masked_area(box):
    """Outside the blurred mask the input stays exactly; where the mask is 1 the pixels are
    the generated crop scaled back to the region (A1111's resize_image mode 1, Lanczos);
    masks inside and on the borders (corners) of the image."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = blur_mask(box_mask(64, 64, *box), 2)
    area = crop_masked_area(image.astype(np.float32) / 255, mask, (32, 48), 4)
    generated = rng.integers(0, 256, (2, 48, 32, 3), dtype=np.uint8)
    pasted = area.paste(generated)
    assert pasted.shape == (2, 64, 64, 3)
    x1, y1, x2, y2 = area.region
    assert (x2 - x1) * 48 == pytest.approx((y2 - y1) * 32, abs=48)  # the processing's ratio
    outside = mask == 0
    for index in range(2):
        np.testing.assert_array_equal(pasted[index][outside], image[outside])
        back = np.zeros_like(image)
        back[y1:y2, x1:x2] = np.asarray(
            Image.fromarray(generated[index]).resize((x2 - x1, y2 - y1), LANCZOS)
        )
        full = mask == 1
        np.testing.assert_array_equal(pasted[index][full], back[full])


def test_each_image_is_cropped_and_pasted_into_its_own():
    """Several inputs (the server's init images) share the mask's region: crop i comes
    from image i, and generated image i goes back into image i."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    mask = box_mask(40, 40, 10, 10, 20, 20)
    area = crop_masked_area(images.astype(np.float32) / 255, mask, (16, 16), 2)
    assert area.region == (8, 8, 22, 22) and area.image.shape == (2, 16, 16, 3)
    for index in range(2):
        crop = Image.fromarray(images[index]).crop(area.region).resize((16, 16), LANCZOS)
        np.testing.assert_array_equal(np.round(area.image[index] * 255), np.asarray(crop))
    pasted = area.paste(np.zeros((2, 16, 16, 3), np.uint8))
    for index in range(2):
        np.testing.assert_array_equal(pasted[index][mask == 0], images[index][mask == 0])
        assert (pasted[index][mask == 1] == 0).all()


def test_paste_back_crops_to_the_region():
    """Mode 1 ("crop and resize") when the region has not the processing's ratio (the image
    was too short): 64x64 back into 100x50 is scaled to 100x100 and its middle kept."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (50, 100, 3), dtype=np.uint8)
    area = crop_masked_area(image.astype(np.float32) / 255, np.ones((50, 100)), (64, 64), 0)
    generated = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    scaled = np.asarray(Image.fromarray(generated[0]).resize((100, 100), LANCZOS))
    np.testing.assert_array_equal(area.paste(generated)[0], scaled[25:75])


def test_only_masked_parameters_round_trip():
    saved = GenerationParameters(
        prompt="a door",
        steps=20,
        sampler="euler",
        cfg_scale=7.0,
        seed=1,
        width=512,
        height=512,
        strength=0.75,
        extras=parameters_extras(4, "original", False, only_masked_padding=32),
    )
    text = saved.to_text()
    assert "Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32" in text
    assert GenerationParameters.from_text(text) == saved
    assert GenerationParameters.from_text(text).only_masked_padding() == 32
    line = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
    a1111 = GenerationParameters.from_text(
        f"x\n{line}, Denoising strength: 0.75, Inpaint area: Only masked, Masked area padding: 0"
    )
    assert a1111.only_masked_padding() == 0
    assert GenerationParameters.from_text(f"x\n{line}").only_masked_padding() is None
    whole = GenerationParameters.from_text(f"x\n{line}, Inpaint area: Whole picture")
    assert whole.only_masked_padding() is None
    unpadded = GenerationParameters.from_text(f"x\n{line}, Inpaint area: Only masked")
    assert unpadded.only_masked_padding() == 32  # A1111's UI default
    for bad in ("lots", "-3"):
        odd = GenerationParameters.from_text(
            f"x\n{line}, Inpaint area: Only masked, Masked area padding: {bad}"
        )
        with pytest.raises(ValueError, match="Masked area padding"):
            odd.only_masked_padding()


@pytest.fixture
def inputs(tmp_path):
    """A 150x100 input (not multiples of 64: processed at 128x128) and masks."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    for name, box in (("mask", (60, 30, 90, 60)), ("corner", (120, 70, 150, 100))):
        mask = box_mask(100, 150, *box)
        Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / f"{name}.png")
    Image.new("L", (150, 100)).save(tmp_path / "empty.png")
    return tmp_path, image


@pytest.mark.parametrize("name", ["mask", "corner"])
def test_only_masked_changes_only_the_masked_area(inputs, name):
    tmp, image = inputs
    mask_path = tmp / f"{name}.png"
    result, output = image2image(tmp, "--mask", str(mask_path), "--only-masked")
    assert result.returncode == 0, result.stderr
    assert "Only masked: repainting" in result.stdout
    out = pixels(output)
    assert out.shape == image.shape  # the input's size, not rounded
    with Image.open(mask_path) as m:
        mask = np.asarray(m, np.float32) / 255
    kept = blur_mask(mask, 4) == 0
    np.testing.assert_array_equal(out[kept], image[kept])
    assert np.abs(out[mask == 1].astype(int) - image[mask == 1]).mean() > 10
    saved = read_parameters(output)
    assert (saved.width, saved.height) == (128, 128)  # the processing size, as A1111
    extras = dict(saved.extras)
    assert extras["Inpaint area"] == "Only masked" and extras["Masked area padding"] == "32"


def test_from_image_brings_only_masked_back(inputs):
    """The saved "Inpaint area" and padding come back with --from-image and --mask: the
    same image again; not with --no-only-masked."""
    tmp, _ = inputs
    mask = str(tmp / "mask.png")
    result, first = image2image(tmp, "--mask", mask, "--only-masked", "--only-masked-padding", "8")
    assert result.returncode == 0, result.stderr
    again = tmp / "again.png"
    result, _ = image2image(tmp, "--from-image", str(first), "--mask", mask, "--output", str(again))
    assert result.returncode == 0, result.stderr
    assert read_parameters(again) == read_parameters(first)
    assert dict(read_parameters(again).extras)["Masked area padding"] == "8"
    np.testing.assert_array_equal(pixels(again), pixels(first))
    whole = tmp / "whole.png"
    result, _ = image2image(
        tmp, "--from-image", str(first), "--mask", mask, "--no-only-masked", "--output", str(whole)
    )
    assert result.returncode == 0, result.stderr
    assert "Inpaint area" not in dict(read_parameters(whole).extras)
    assert pixels(whole).shape == (128, 128, 3)  # the whole picture, rounded


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--only-masked"], "--only-masked goes with --mask, and not with --outpaint"),
        (
            ["--mask", "mask.png", "--only-masked", "--outpaint", "0,8,0,0"],
            "--only-masked goes with --mask, and not with --outpaint",
        ),
        (["--mask", "mask.png", "--only-masked-padding", "8"], "goes with --only-masked"),
        (
            ["--mask", "mask.png", "--only-masked", "--only-masked-padding", "-1"],
            "--only-masked-padding must be 0 to 4096",
        ),
        (["--mask", "empty.png", "--only-masked"], "--mask: the mask is empty"),
    ],
)
def test_only_masked_errors_before_loading(inputs, args, message):
    tmp, _ = inputs
    args = [str(tmp / a) if a.endswith(".png") else a for a in args]
    result, output = image2image(tmp, *args, model="/no/such/model")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "no such model" not in result.stderr
    assert not output.exists()
