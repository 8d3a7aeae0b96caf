"""The scripts as a user runs them, on the tiny models: right inputs and wrong ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stable_diffusion.images import read_parameters
from tests.helpers import FIXTURES, run

TINY_SD2 = str(FIXTURES / "models" / "tiny-sd2")
TINY_SDXL = str(FIXTURES / "models" / "tiny-sdxl")


def input_image(path: Path, size: tuple[int, int] = (70, 50)) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_txt2image_saves_png_with_parameters(tmp_path):
    output = tmp_path / "cat.png"
    result = run(
        "txt2image.py",
        "a cat, sitting",
        "--model",
        TINY_SDXL,
        "--steps",
        "2",
        "--seed",
        "0",
        "--n_images",
        "2",
        "--n_rows",
        "1",
        "--output",
        str(output),
        "--negative_prompt",
        "blurry",
        "-v",
    )
    assert result.returncode == 0, result.stderr
    assert "Seed: 0" in result.stdout
    assert "peak memory" in result.stdout
    with Image.open(output) as image:
        assert image.size == (128, 64)  # two 64x64 images side by side
    parameters = read_parameters(output)
    assert parameters.prompt == "a cat, sitting"
    assert parameters.negative_prompt == "blurry"
    assert (parameters.seed, parameters.steps, parameters.width, parameters.height) == (
        0,
        2,
        64,
        64,
    )


def test_same_seed_gives_same_image_and_existing_file_survives(tmp_path):
    output = tmp_path / "out.png"
    args = ["a cat", "--model", TINY_SD2, "--steps", "2", "--seed", "5", "--output", str(output)]
    assert run("txt2image.py", *args).returncode == 0
    first = output.read_bytes()
    second = run("txt2image.py", *args)
    assert second.returncode == 0, second.stderr
    assert output.read_bytes() == first
    written = [
        Path(line.removeprefix("Saved "))
        for line in second.stdout.splitlines()
        if line.startswith("Saved ")
    ]
    assert len(written) == 1 and written[0] != output
    assert np.array_equal(np.array(Image.open(written[0])), np.array(Image.open(output)))


def test_image2image_resizes_input_and_records_strength(tmp_path):
    source = input_image(tmp_path / "in.png")
    output = tmp_path / "out.png"
    result = run(
        "image2image.py",
        "--strength",
        "0.5",
        str(source),
        "a lit fireplace",
        "--model",
        TINY_SD2,
        "--steps",
        "4",
        "--seed",
        "1",
        "--output",
        str(output),
    )
    assert result.returncode == 0, result.stderr
    assert "70x50" in result.stdout  # the script says how it resized the input
    with Image.open(output) as image:
        assert image.size[0] % 64 == 0 and image.size[1] % 64 == 0
    assert read_parameters(output).strength == 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--cfg", "-1"], "--cfg must be >= 0"),
        (["--n_images", "3", "--n_rows", "2"], "not divisible by --n_rows"),
        (["--width", "500"], "use 496 or 504"),
        (["--sampler", "nope"], "invalid choice"),
        (["--model", "/no/such/folder"], "no such model folder: /no/such/folder does not exist"),
        (["--output", "/no/such/dir/out.png"], "/no/such/dir"),
    ],
)
def test_txt2image_bad_arguments(tmp_path, args, message):
    defaults = ["--model", TINY_SD2, "--output", str(tmp_path / "o.png")]
    result = run("txt2image.py", "a cat", *defaults, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("strength", "image_name", "message"),
    [
        ("1.5", "in.png", "--strength must be between 0 and 1"),
        ("-0.1", "in.png", "--strength must be between 0 and 1"),
        ("0.5", "missing.png", "missing.png"),
    ],
)
def test_image2image_bad_arguments(tmp_path, strength, image_name, message):
    input_image(tmp_path / "in.png")
    result = run(
        "image2image.py",
        "--strength",
        strength,
        str(tmp_path / image_name),
        "a cat",
        "--model",
        TINY_SD2,
        "--output",
        str(tmp_path / "o.png"),
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_weights_give_a_clear_error(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TINY_SD2, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    result = run(
        "txt2image.py", "a cat", "--model", str(model), "--output", str(tmp_path / "o.png")
    )
    assert result.returncode == 2
    assert "diffusion_pytorch_model.safetensors" in result.stderr
    assert "Traceback" not in result.stderr


def test_offline_unknown_model_points_at_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = run(
        "txt2image.py",
        "a cat",
        "--model",
        "someone/not-cached",
        "--output",
        str(tmp_path / "o.png"),
    )
    assert result.returncode == 2
    assert "HF_HUB_OFFLINE" in result.stderr
    assert "Traceback" not in result.stderr


def test_rerun_from_an_images_parameters_reproduces_it(tmp_path):
    first = tmp_path / "first.png"
    result = run(
        "txt2image.py",
        "a red sign, at night",
        "--model",
        TINY_SD2,
        "--steps",
        "3",
        "--cfg",
        "3.5",
        "--seed",
        "11",
        "--sampler",
        "euler_a",
        "--output",
        str(first),
    )
    assert result.returncode == 0, result.stderr
    again = tmp_path / "again.png"
    result = run("txt2image.py", "--from-image", str(first), "--output", str(again))
    assert result.returncode == 0, result.stderr
    assert "Seed: 11" in result.stdout
    assert read_parameters(again) == read_parameters(first)
    assert np.array_equal(np.array(Image.open(again)), np.array(Image.open(first)))


def test_from_image_without_parameters_is_a_clear_error(tmp_path):
    plain = input_image(tmp_path / "plain.png")
    result = run("txt2image.py", "--from-image", str(plain), "--output", str(tmp_path / "o.png"))
    assert result.returncode == 2
    assert "has no generation parameters" in result.stderr
