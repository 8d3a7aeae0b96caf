import io
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stable_diffusion import images
from stable_diffusion.images import (
    check_output_path,
    load_image,
    make_grid,
    read_parameters,
    save_images,
    validate_size,
)
from stable_diffusion.parameters import GenerationParameters
from stable_diffusion.upscale import UPSCALERS


def read_back(path) -> Image.Image:
    """The image in a file, read whole and the file closed."""
    with Image.open(path) as image:
        return image.copy()


def params(**overrides) -> GenerationParameters:
    values = dict(
        prompt="a photo of a cat",
        negative_prompt="blurry",
        steps=20,
        sampler="euler_a",
        cfg_scale=7.0,
        seed=42,
        width=64,
        height=64,
        model="stabilityai/sdxl-turbo",
    )
    return GenerationParameters(**{**values, **overrides})


def solid(n: int = 1, size: int = 8, value: float = 0.5) -> np.ndarray:
    return np.full((n, size, size, 3), value, dtype=np.float32)


def png_chunk_types(path: Path) -> list[bytes]:
    data = path.read_bytes()
    types, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        types.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return types


TRICKY_PROMPTS = [
    "",
    "plain",
    'quotes " and \\ backslashes \\"',
    "commas, colons: and (weights:1.2)",
    "two\nlines",
    "  leading and trailing spaces  ",
    "\n\nleading newlines",
    "trailing newline\n",
    "Negative prompt: inside the prompt",
    "first\nNegative prompt: a fake negative line",
    "a\nSteps: 1, Sampler: Euler, CFG scale: 1, Seed: 1, Size: 8x8",
    "crlf\r\nline",
    "tab\tand\x00nul",
    "中文 日本語 émoji 🐱 ‮rtl",
    "line\u2028separator\x85next",
    "<lora:not_a_lora:0.5> stays in the prompt",
    '"',
    "\\",
]


# --- parameters text -------------------------------------------------------------------


def test_to_text_matches_a1111_layout():
    text = params(strength=0.5, loras=(("detail", 0.8),)).to_text()
    assert text == (
        "a photo of a cat\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 42, Size: 64x64, "
        'Model: stabilityai/sdxl-turbo, Denoising strength: 0.5, Lora: "<lora:detail:0.8>"'
    )


def test_empty_negative_prompt_is_omitted_like_a1111():
    assert params(negative_prompt="").to_text().splitlines()[1].startswith("Steps: 20")


@pytest.mark.parametrize("prompt", TRICKY_PROMPTS)
@pytest.mark.parametrize("negative", ["", 'low quality, "ugly"\nNegative prompt: x', " x "])
def test_tricky_prompts_round_trip(prompt, negative):
    p = params(prompt=prompt, negative_prompt=negative)
    assert GenerationParameters.from_text(p.to_text()) == p


@pytest.mark.parametrize(
    ("internal", "display"),
    [
        ("euler", "Euler"),
        ("euler_a", "Euler a"),
        ("ddim", "DDIM"),
        ("dpm++2m", "DPM++ 2M"),
        ("dpm++2m_karras", "DPM++ 2M Karras"),
        ("lcm", "LCM"),
        ("heun", "Heun"),
    ],
)
def test_sampler_display_names(internal, display):
    p = params(sampler=internal)
    assert f"Sampler: {display}," in p.to_text()
    assert GenerationParameters.from_text(p.to_text()).sampler == internal
    assert params(sampler=display).sampler == internal


def test_values_needing_quotes_round_trip():
    p = params(
        model='C:\\models\\my, "best" model.safetensors',
        sampler="Some: new, sampler",
        loras=(("C:\\loras\\a, b.safetensors", -0.25), ("hub/repo", 1.0)),
        extras=(
            ("Hires sampler", "Euler"),
            ("Note", ' spaced, "quoted"\nmulti-line '),
            ("Empty", ""),
        ),
        strength=1.0,
        clip_skip=2,
        seed=2**63 + 5,
    )
    assert GenerationParameters.from_text(p.to_text()) == p


def test_parses_real_a1111_text_with_unknown_fields():
    text = (
        "masterpiece, best quality, <lora:add_detail:0.5>\n"
        "Negative prompt: (worst quality:1.4), EasyNegative\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3923453, "
        "Size: 512x768, Model hash: 7f96a1a9ca, Model: anything-v5, Denoising strength: 0.4, "
        'Clip skip: 2, Hires upscale: 2, Lora hashes: "add_detail: 7c6bad76eb54", '
        "Version: v1.6.0"
    )
    p = GenerationParameters.from_text(text)
    assert p.prompt == "masterpiece, best quality, <lora:add_detail:0.5>"
    assert p.negative_prompt == "(worst quality:1.4), EasyNegative"
    assert (p.steps, p.sampler, p.cfg_scale, p.seed) == (30, "dpm++2m_karras", 7.0, 3923453)
    assert (p.width, p.height, p.model, p.strength) == (512, 768, "anything-v5", 0.4)
    assert (p.clip_skip, p.hires_scale, p.hires_steps, p.hires_upscaler) == (2, 2.0, 0, None)
    assert dict(p.extras) == {
        "Model hash": "7f96a1a9ca",
        "Lora hashes": "add_detail: 7c6bad76eb54",
        "Version": "v1.6.0",
    }
    assert GenerationParameters.from_text(p.to_text()) == p


def test_hires_fix_is_written_with_a1111_fields():
    p = params(strength=0.5, hires_scale=2, hires_steps=10, hires_upscaler="Latent")
    assert p.to_text().endswith(
        "Size: 64x64, Model: stabilityai/sdxl-turbo, Denoising strength: 0.5, "
        "Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent"
    )
    assert GenerationParameters.from_text(p.to_text()) == p
    # Hires steps only when not 0, as A1111; a resize instead of a factor; quoted names.
    p = params(strength=0.7, hires_resize=(1024, 0), hires_upscaler="Latent (nearest-exact)")
    assert p.to_text().endswith(
        "Denoising strength: 0.7, Hires resize: 1024x0, Hires upscaler: Latent (nearest-exact)"
    )
    assert GenerationParameters.from_text(p.to_text()) == p
    assert "Hires upscale: 1.5," in params(hires_scale=1.5, hires_steps=3).to_text()


@given(
    scale=st.floats(1, 8),
    steps=st.integers(0, 1000),
    strength=st.floats(0, 1),
    upscaler=st.sampled_from([None, *UPSCALERS, "R-ESRGAN 4x+", "SwinIR_4x"]),
)
def test_hires_parameters_round_trip(scale, steps, strength, upscaler):
    p = params(hires_scale=scale, hires_steps=steps, strength=strength, hires_upscaler=upscaler)
    assert GenerationParameters.from_text(p.to_text()) == p


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("Hires upscale: nan", "Hires upscale must be finite"),
        ("Hires upscale: -2", "hires scale must be a positive number"),
        ("Hires upscale: 2, Hires steps: 1.5", "Hires steps is not a number"),
        ("Hires upscale: 2, Hires steps: -1", "hires steps must be >= 0"),
        ("Hires resize: 1024", "Hires resize must look like 1024x0"),
        ("Hires steps: 10", "hires steps and upscaler need a hires scale or resize"),
    ],
)
def test_bad_hires_fields_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        GenerationParameters.from_text(f"{params().to_text()}, {fields}")


def test_clip_skip_is_written_as_a1111_does():
    assert "Clip skip" not in params().to_text()
    assert ", Clip skip: 2" in params(clip_skip=2).to_text()
    with pytest.raises(ValueError, match="clip skip must be at least 1"):
        params(clip_skip=0)
    with pytest.raises(ValueError, match="Clip skip is not a number"):
        GenerationParameters.from_text(params().to_text() + ", Clip skip: two")


@pytest.mark.parametrize(
    ("fields", "sampler", "written"),
    [
        ("Sampler: Euler a, Schedule type: Karras", "euler_a_karras",
         "Sampler: Euler a, Schedule type: Karras,"),
        ("Sampler: DPM++ 2M SDE Karras", "dpm++2m_sde_karras", "Sampler: DPM++ 2M SDE Karras,"),
        ("Sampler: DPM++ 2M SDE, Schedule type: Karras", "dpm++2m_sde_karras",
         "Sampler: DPM++ 2M SDE Karras,"),
        ("Sampler: Heun, Schedule type: Exponential", "heun_exponential",
         "Sampler: Heun, Schedule type: Exponential,"),
        ("Sampler: DPM++ 2M, Schedule type: Automatic", "dpm++2m", "Sampler: DPM++ 2M,"),
    ],
)  # fmt: skip
def test_sampler_and_schedule_type(fields, sampler, written):
    text = f"cat\nSteps: 20, {fields}, CFG scale: 7, Seed: 1, Size: 512x512"
    p = GenerationParameters.from_text(text)
    assert (p.sampler, p.extras) == (sampler, ())
    assert written in p.to_text()
    assert GenerationParameters.from_text(p.to_text()) == p


def test_unknown_schedule_type_is_kept_beside_a_known_sampler():
    text = "cat\nSteps: 2, Sampler: Euler, Schedule type: Uniform, CFG scale: 7, Seed: 1, Size: 8x8"
    p = GenerationParameters.from_text(text)
    assert (p.sampler, p.extras) == ("euler", (("Schedule type", "Uniform"),))
    assert GenerationParameters.from_text(p.to_text()) == p
    with pytest.raises(ValueError, match="would contradict it"):
        params(sampler="euler_karras", extras={"Schedule type": "Uniform"})


def test_unknown_sampler_is_kept():
    text = "cat\nSteps: 20, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 1, Size: 512x512"
    assert GenerationParameters.from_text(text).sampler == "DPM++ SDE Karras"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("just a prompt", "no generation parameters"),
        ("cat\nSteps: 20, Sampler: Euler, Seed: 1, Size: 8x8", "CFG scale"),
        (
            "cat\nSteps: x, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8",
            "Steps is not a number",
        ),
        ("cat\nSteps: 2, Sampler: Euler, CFG scale: nan, Seed: 1, Size: 8x8", "finite"),
        ("cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: big", "Size"),
    ],
)
def test_from_text_errors(text, message):
    with pytest.raises(ValueError, match=message):
        GenerationParameters.from_text(text)


@pytest.mark.parametrize(
    "overrides",
    [
        {"steps": 2.5},
        {"width": 0},
        {"cfg_scale": float("inf")},
        {"strength": 1.5},
        {"loras": (("a>b", 1.0),)},
        {"extras": {"Steps": "3"}},
        {"extras": {"bad:key": "3"}},
        {"sampler": ""},
    ],
)
def test_invalid_parameters_are_rejected(overrides):
    with pytest.raises(ValueError):
        params(**overrides)


def test_numpy_integers_are_accepted():
    assert params(seed=np.int64(7)).seed == 7


@settings(max_examples=150, deadline=None, database=None)
@given(prompt=st.text(), negative=st.text(), seed=st.integers(-(2**64), 2**64))
def test_arbitrary_prompts_round_trip_through_text(prompt, negative, seed):
    p = params(prompt=prompt, negative_prompt=negative, seed=seed)
    assert GenerationParameters.from_text(p.to_text()) == p


@settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(prompt=st.text(), negative=st.text())
def test_arbitrary_prompts_round_trip_through_png(prompt, negative):
    p = params(prompt=prompt, negative_prompt=negative)
    with tempfile.TemporaryDirectory() as directory:
        [path] = save_images(solid(size=2), Path(directory) / "out.png", p)
        assert read_parameters(path) == p


# --- saving ----------------------------------------------------------------------------


def test_saved_png_carries_parameters(tmp_path):
    p = params()
    [path] = save_images(solid(), tmp_path / "out.png", p)
    assert path == tmp_path / "out.png"
    with Image.open(path) as image:
        assert image.text["parameters"] == p.to_text()
        assert np.asarray(image).shape == (8, 8, 3)
        assert np.all(np.asarray(image) == 128)
    assert read_parameters(path) == p
    assert b"tEXt" in png_chunk_types(path)


def test_non_latin1_prompt_uses_itxt(tmp_path):
    p = params(prompt="猫 🐱")
    [path] = save_images(solid(), tmp_path / "out.png", p)
    assert b"iTXt" in png_chunk_types(path)
    assert read_parameters(path) == p


def test_lone_surrogates_do_not_lose_the_image(tmp_path):
    [path] = save_images(solid(), tmp_path / "out.png", params(prompt="bad \udcff byte"))
    assert read_parameters(path).prompt == "bad \\udcff byte"


def test_existing_file_survives(tmp_path):
    target = tmp_path / "out.png"
    [first] = save_images(solid(value=0.0), target, params(seed=1))
    before = first.read_bytes()
    [second] = save_images(solid(value=1.0), target, params(seed=2))
    assert first == target
    assert second == tmp_path / "out_1.png"
    assert target.read_bytes() == before
    assert read_parameters(second).seed == 2
    [third] = save_images(solid(), target, params(seed=3))
    assert third == tmp_path / "out_2.png"


def test_overwrite_replaces(tmp_path):
    target = tmp_path / "out.png"
    save_images(solid(value=0.0), target, params(seed=1))
    [path] = save_images(solid(value=1.0), target, params(seed=2), overwrite=True)
    assert path == target
    assert read_parameters(target).seed == 2
    assert np.all(np.asarray(read_back(target)) == 255)


def test_individual_images_with_per_image_parameters(tmp_path):
    batch = np.stack([np.full((8, 8, 3), v, np.float32) for v in (0.0, 0.5, 1.0, 0.25)])
    per_image = [params(seed=s) for s in (10, 11, 12, 13)]
    paths = save_images(batch, tmp_path / "out.png", per_image, n_rows=2, save_individual=True)
    assert [p.name for p in paths] == [
        "out.png",
        "out-0.png",
        "out-1.png",
        "out-2.png",
        "out-3.png",
    ]
    assert read_parameters(paths[0]).seed == 10
    assert [read_parameters(p).seed for p in paths[1:]] == [10, 11, 12, 13]
    assert np.asarray(read_back(paths[0])).shape == (16, 16, 3)
    assert np.all(np.asarray(read_back(paths[3])) == 255)

    again = save_images(batch, tmp_path / "out.png", per_image, n_rows=2, save_individual=True)
    assert [p.name for p in again] == [
        "out_1.png",
        "out_1-0.png",
        "out_1-1.png",
        "out_1-2.png",
        "out_1-3.png",
    ]


def test_existing_individual_name_moves_the_whole_set(tmp_path):
    (tmp_path / "out-1.png").write_bytes(b"keep me")
    paths = save_images(solid(2), tmp_path / "out.png", params(), save_individual=True)
    assert [p.name for p in paths] == ["out_1.png", "out_1-0.png", "out_1-1.png"]
    assert (tmp_path / "out-1.png").read_bytes() == b"keep me"


def test_single_image_is_not_duplicated(tmp_path):
    paths = save_images(solid(1), tmp_path / "out.png", params(), save_individual=True)
    assert [p.name for p in paths] == ["out.png"]


def test_name_taken_after_the_check_is_not_overwritten(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    monkeypatch.setattr(images, "check_output_path", lambda path, overwrite, individual: target)
    target.write_bytes(b"raced")
    [path] = save_images(solid(), target, params())
    assert path == tmp_path / "out_1.png"
    assert target.read_bytes() == b"raced"


def test_accepts_mlx_arrays_and_single_images(tmp_path):
    [a] = save_images(mx.ones((1, 8, 8, 3), dtype=mx.bfloat16), tmp_path / "a.png", params())
    [b] = save_images(np.zeros((8, 8, 3), np.float32), tmp_path / "b.png", params())
    assert np.all(np.asarray(read_back(a)) == 255)
    assert np.all(np.asarray(read_back(b)) == 0)


def test_uint8_pixels_are_saved_as_they_are(tmp_path):
    pixels = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(1, 8, 8, 3)
    [path] = save_images(pixels, tmp_path / "out.png", params())
    np.testing.assert_array_equal(np.asarray(read_back(path)), pixels[0])


def test_out_of_range_and_nan_values_are_clipped(tmp_path):
    pixels = np.array([[[[-1.0, 2.0, np.nan]]]], np.float32)
    [path] = save_images(pixels, tmp_path / "out.png", params())
    assert np.asarray(read_back(path)).tolist() == [[[0, 255, 0]]]


@pytest.mark.parametrize(
    ("images_", "parameters", "message"),
    [
        (solid(3), params(), "divisible by n_rows"),
        (np.zeros((1, 8, 8, 4), np.float32), params(), r"\(N, H, W, 3\)"),
        (np.zeros((1, 8, 8, 3), np.int16), params(), "float"),
        (solid(2), [params()], "2 images"),
        (np.zeros((0, 8, 8, 3), np.float32), [], "no images"),
    ],
)
def test_save_errors(tmp_path, images_, parameters, message):
    with pytest.raises(ValueError, match=message):
        save_images(images_, tmp_path / "out.png", parameters, n_rows=2)


# --- output paths ----------------------------------------------------------------------


def test_check_output_path_resolves_names(tmp_path):
    assert check_output_path(tmp_path / "out") == tmp_path / "out.png"
    assert check_output_path(tmp_path / "OUT.PNG") == tmp_path / "OUT.PNG"
    (tmp_path / "out.png").touch()
    assert check_output_path(tmp_path / "out.png") == tmp_path / "out_1.png"
    assert check_output_path(tmp_path / "out.png", overwrite=True) == tmp_path / "out.png"
    (tmp_path / "new-0.png").touch()
    assert check_output_path(tmp_path / "new.png", individual=2) == tmp_path / "new_1.png"
    # the writability probe leaves nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new-0.png", "out.png"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing/out.png", "does not exist"),
        ("file.txt/out.png", "is not a directory"),
        ("out.jpg", r"only PNG.*out\.png"),
        ("adir", "is a directory"),
    ],
)
def test_check_output_path_errors(tmp_path, name, message):
    (tmp_path / "file.txt").touch()
    (tmp_path / "adir").mkdir()
    with pytest.raises(ValueError, match=message):
        check_output_path(tmp_path / name)


def test_unwritable_directory_reported_clearly(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images.tempfile, "TemporaryFile", refuse)
    with pytest.raises(ValueError, match=r"not writable.*Permission denied"):
        check_output_path(tmp_path / "out.png")


# --- grids and sizes -------------------------------------------------------------------


def test_make_grid_layout():
    batch = np.arange(6, dtype=np.float32).reshape(6, 1, 1, 1) * np.ones((1, 2, 3, 3))
    grid = make_grid(batch, n_rows=2)
    assert grid.shape == (4, 9, 3)
    assert grid[::2, ::3, 0].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert make_grid(batch, n_rows=1).shape == (2, 18, 3)
    with pytest.raises(ValueError, match="divisible"):
        make_grid(batch, n_rows=4)


def test_validate_size():
    validate_size(512, 768)
    validate_size(8, 16, multiple=8)
    with pytest.raises(
        ValueError, match="width 500 is not a positive multiple of 8; use 496 or 504"
    ):
        validate_size(500, 512)
    with pytest.raises(ValueError, match=r"height 3 .* use 8$"):
        validate_size(512, 3)
    with pytest.raises(ValueError, match=r"width 0 .*; height 1000 .* use 960 or 1024"):
        validate_size(0, 1000, multiple=64)


# --- loading ---------------------------------------------------------------------------


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_load_rgb(tmp_path):
    path = save(Image.new("RGB", (64, 128), (255, 0, 51)), tmp_path / "in.png")
    pixels, message = load_image(path)
    assert pixels.dtype == np.float32
    assert pixels.shape == (128, 64, 3)
    assert message is None
    np.testing.assert_allclose(pixels[0, 0], [1.0, 0.0, 0.2], atol=1e-6)


def test_rgba_transparency_becomes_white(tmp_path):
    image = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 128))
    pixels, message = load_image(save(image, tmp_path / "in.png"))
    np.testing.assert_allclose(pixels[0, 0], [1, 1, 1])
    np.testing.assert_allclose(pixels[0, 1], [1, 0.5, 0.5], atol=0.01)
    np.testing.assert_allclose(pixels[5, 5], [1, 0, 0])
    assert "white" in message


def test_la_transparency_becomes_white(tmp_path):
    image = Image.new("LA", (64, 64), (100, 255))
    image.putpixel((0, 0), (0, 0))
    pixels, _ = load_image(save(image, tmp_path / "in.png"))
    np.testing.assert_allclose(pixels[0, 0], [1, 1, 1])
    np.testing.assert_allclose(pixels[1, 1], [100 / 255] * 3, atol=1e-6)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (64, 64), 1)
    image.putpalette([0, 0, 0, 0, 0, 255])
    image.putpixel((0, 0), 0)
    path = save(image, tmp_path / "in.png", transparency=0)
    assert read_back(path).mode == "P"
    pixels, _ = load_image(path)
    np.testing.assert_allclose(pixels[0, 0], [1, 1, 1])
    np.testing.assert_allclose(pixels[1, 1], [0, 0, 1])


def test_gif_with_transparency(tmp_path):
    image = Image.new("P", (64, 64), 1)
    image.putpalette([0, 0, 0, 0, 255, 0])
    image.putpixel((3, 3), 0)
    pixels, _ = load_image(save(image, tmp_path / "in.gif", transparency=0))
    np.testing.assert_allclose(pixels[3, 3], [1, 1, 1])
    np.testing.assert_allclose(pixels[0, 0], [0, 1, 0])


def test_grayscale(tmp_path):
    pixels, _ = load_image(save(Image.new("L", (64, 64), 51), tmp_path / "in.png"))
    assert pixels.shape == (64, 64, 3)
    np.testing.assert_allclose(pixels, 0.2, atol=1e-6)


def test_one_bit(tmp_path):
    image = Image.new("1", (64, 64), 0)
    image.putpixel((2, 2), 1)
    pixels, _ = load_image(save(image, tmp_path / "in.png"))
    assert pixels[2, 2].tolist() == [1, 1, 1]
    assert pixels[0, 0].tolist() == [0, 0, 0]


def test_cmyk(tmp_path):
    image = Image.new("CMYK", (64, 64), (0, 255, 255, 0))
    pixels, _ = load_image(save(image, tmp_path / "in.tiff"))
    np.testing.assert_allclose(pixels[0, 0], [1, 0, 0], atol=0.01)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.zeros((64, 64), np.uint16)
    values[0, :] = [65535, 32896, 1000, 0] * 16
    path = save(Image.fromarray(values), tmp_path / "in.png")
    assert read_back(path).mode.startswith("I")
    pixels, _ = load_image(path)
    np.testing.assert_allclose(pixels[0, :4, 0], [1.0, 128 / 255, 4 / 255, 0.0], atol=1e-6)


def test_exif_orientation_is_applied(tmp_path):
    # Stored landscape, red left / blue right; orientation 6 means "rotate 90° clockwise".
    image = Image.new("RGB", (128, 64), (255, 0, 0))
    image.paste((0, 0, 255), (64, 0, 128, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(image, tmp_path / "in.jpg", exif=exif.tobytes(), quality=95)
    pixels, message = load_image(path)
    assert pixels.shape == (128, 64, 3)
    np.testing.assert_allclose(pixels[32, 32], [1, 0, 0], atol=0.05)  # red is now on top
    np.testing.assert_allclose(pixels[96, 32], [0, 0, 1], atol=0.05)
    assert message is None


def test_non_multiple_size_is_resized_with_message(tmp_path):
    path = save(Image.new("RGB", (1000, 750), (0, 255, 0)), tmp_path / "in.png")
    pixels, message = load_image(path)
    assert pixels.shape == (768, 1024, 3)
    assert message.startswith("resized 1000x750 to 1024x768")
    np.testing.assert_allclose(pixels, np.broadcast_to([0, 1, 0], pixels.shape), atol=1e-6)


def test_resize_that_changes_aspect_ratio_center_crops(tmp_path):
    image = Image.new("RGB", (300, 64), (0, 0, 0))
    # 300x64 -> 320x64 is wider, so 2 rows go at the top and bottom: the white bands.
    image.paste((255, 255, 255), (0, 0, 300, 2))
    image.paste((255, 255, 255), (0, 62, 300, 64))
    pixels, message = load_image(save(image, tmp_path / "in.png"))
    assert pixels.shape == (64, 320, 3)
    assert "center-cropped 300x64 to 320x64" in message
    assert pixels.max() < 0.1


def test_tiny_image_gets_at_least_one_multiple(tmp_path):
    pixels, message = load_image(save(Image.new("RGB", (10, 3)), tmp_path / "in.png"))
    assert pixels.shape == (64, 64, 3)
    assert "10x3 to 64x64" in message
    pixels, message = load_image(tmp_path / "in.png", multiple=1)
    assert pixels.shape == (3, 10, 3) and message is None


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.png: no such file"):
        load_image(tmp_path / "nope.png")


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        load_image(tmp_path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match=r"garbage\.png.*not an image"):
        load_image(path)


def test_truncated_png(tmp_path):
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match=r"cut\.png: cannot decode"):
        load_image(path)


def test_oversized_image_is_refused(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (128, 128)), tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_INPUT_PIXELS", 64 * 64)
    with pytest.raises(ValueError, match=r"big\.png: the image is 128x128, too large"):
        load_image(path)


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (128, 128)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"bomb\.png: the image is too large"):
        load_image(path)


# --- reading parameters back -----------------------------------------------------------


def test_read_parameters_without_parameters(tmp_path):
    path = save(Image.new("RGB", (8, 8)), tmp_path / "plain.png")
    with pytest.raises(ValueError, match=r"plain\.png has no generation parameters"):
        read_parameters(path)


def test_read_parameters_from_a1111_png(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "cat\nSteps: 4, Sampler: LCM, CFG scale: 1.5, Seed: 9, Size: 8x8")
    path = save(Image.new("RGB", (8, 8)), tmp_path / "a1111.png", pnginfo=info)
    assert read_parameters(path) == GenerationParameters(
        prompt="cat", steps=4, sampler="lcm", cfg_scale=1.5, seed=9, width=8, height=8
    )


def test_read_parameters_bad_text(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "only a prompt")
    path = save(Image.new("RGB", (8, 8)), tmp_path / "bad.png", pnginfo=info)
    with pytest.raises(ValueError, match=r"bad\.png: no generation parameters found"):
        read_parameters(path)


def test_read_parameters_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_parameters(tmp_path / "nope.png")
