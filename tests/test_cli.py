"""The scripts as a user runs them, on the tiny models: right inputs and wrong ones."""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tomllib
from PIL import Image, PngImagePlugin

from stable_diffusion.images import read_parameters
from stable_diffusion.parameters import GenerationParameters
from tests.helpers import FIXTURES, ROOT, run

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
        (["--sampler", "nope"], "Unknown sampler 'nope'; choose one of: euler, euler_karras"),
        (["--sampler", "ddim", "--schedule", "karras"], "the DDIM sampler has no karras"),
        (["--schedule", "polyexponential"], "Unknown schedule 'polyexponential'"),
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
    ("args", "message"),
    [
        # mx.random.key takes 64-bit unsigned seeds (2**70 was a traceback).
        (["--seed", str(2**70)], "--seed must be at most 18446744073709551615"),
        (["--cfg", "nan"], "--cfg must be a finite number (got nan)"),
        (["--cfg", "inf"], "--cfg must be a finite number (got inf)"),
        (["--n_images", "100000"], "--n_images must be at most 64"),
        (["--decoding_batch_size", str(10**20)], "--decoding_batch_size must be at most 64"),
        (["--decoding_batch_size", "0"], "--decoding_batch_size must be at least 1"),
        (["--steps", "1001"], "--steps must be at most 1000"),
        (["--width", "16384"], "--width must be at most 8192"),
        (["--image-size", "-64"], "image size must be positive"),
    ],
)
def test_numbers_out_of_range_are_refused_before_loading(tmp_path, args, message):
    # The model does not exist: the error is about the number, so it came first.
    defaults = ["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o.png")]
    result = run("txt2image.py", "a cat", *defaults, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("strength", "image_name", "message"),
    [
        ("1.5", "in.png", "--strength must be between 0 and 1"),
        ("-0.1", "in.png", "--strength must be between 0 and 1"),
        ("nan", "in.png", "--strength must be a finite number"),
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
    result = run(
        "txt2image.py", "--from-image", str(first), "--use-saved-model", "--output", str(again)
    )
    assert result.returncode == 0, result.stderr
    assert "Seed: 11" in result.stdout
    assert read_parameters(again) == read_parameters(first)
    assert np.array_equal(np.array(Image.open(again)), np.array(Image.open(first)))


def test_from_image_without_parameters_is_a_clear_error(tmp_path):
    plain = input_image(tmp_path / "plain.png")
    result = run("txt2image.py", "--from-image", str(plain), "--output", str(tmp_path / "o.png"))
    assert result.returncode == 2
    assert "has no generation parameters" in result.stderr


def test_random_seed_is_printed_and_recorded(tmp_path):
    output = tmp_path / "out.png"
    result = run(
        "txt2image.py", "a cat", "--model", TINY_SD2, "--steps", "1", "--output", str(output)
    )
    assert result.returncode == 0, result.stderr
    printed = [line for line in result.stdout.splitlines() if line.startswith("Seed: ")]
    assert printed == [f"Seed: {read_parameters(output).seed}"]


def test_from_image_names_its_model_but_does_not_load_it(tmp_path, monkeypatch):
    """A PNG can name any path or hub repo, with terminal control sequences in it: without
    --use-saved-model the script says which model the image names, without the control
    sequences, and loads the default model, here not in the (empty, offline) cache."""
    image = tmp_path / "made.png"
    parameters = GenerationParameters(
        prompt="a cat",
        steps=2,
        sampler="euler",
        cfg_scale=7.0,
        seed=3,
        width=64,
        height=64,
        model="evil/repo\x1b]0;owned\x07\x1b[8m",
        loras=(("detail\x1b[2J", 0.5),),
    )
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters.to_text())
    Image.new("RGB", (64, 64)).save(image, pnginfo=info)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = run("txt2image.py", "--from-image", str(image), "--output", str(tmp_path / "o.png"))
    assert result.returncode == 2
    assert "the image was made with the model 'evil/repo'; using the default sdxl" in result.stdout
    assert "LoRAs (detail:0.5)" in result.stdout
    assert "\x1b" not in result.stdout + result.stderr
    assert "'stabilityai/sdxl-turbo' is not in the local Hugging Face cache" in result.stderr
    assert "evil/repo" not in result.stderr


def test_from_image_with_another_model_uses_that_one(tmp_path):
    first = tmp_path / "first.png"
    args = ["--steps", "1", "--seed", "2"]
    assert (
        run("txt2image.py", "a cat", "--model", TINY_SD2, *args, "--output", str(first)).returncode
        == 0
    )
    again = tmp_path / "again.png"
    result = run(
        "txt2image.py", "--from-image", str(first), "--model", TINY_SDXL, "--output", str(again)
    )
    assert result.returncode == 0, result.stderr
    assert f"made with the model '{TINY_SD2}'; using --model {TINY_SDXL}" in result.stdout
    assert read_parameters(again).model == TINY_SDXL


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["a cat", "--use-saved-model"], "--use-saved-model goes with --from-image"),
        (
            ["--from-image", "IMAGE", "--use-saved-model", "--model", TINY_SD2],
            "--use-saved-model goes with --from-image, and without --model",
        ),
    ],
)
def test_use_saved_model_needs_an_image_and_no_model(tmp_path, args, message):
    image = input_image(tmp_path / "in.png")
    args = [str(image) if a == "IMAGE" else a for a in args]
    result = run("txt2image.py", *args, "--output", str(tmp_path / "o.png"))
    assert result.returncode == 2
    assert message in result.stderr


def poisoned_model(tmp_path: Path, component: str, key: str) -> Path:
    """tiny-sd2 with the weight `key` of `component` all NaN."""
    model = tmp_path / "nan-model"
    shutil.copytree(TINY_SD2, model)
    path = model / component / "diffusion_pytorch_model.safetensors"
    weights = mx.load(str(path))
    weights[key] = mx.full(weights[key].shape, float("nan"))
    mx.save_safetensors(str(path), weights)
    return model


@pytest.mark.parametrize(
    ("component", "key", "message"),
    [
        ("unet", "conv_out.bias", "the denoised latents hold NaN or infinite values"),
        ("vae", "decoder.conv_out.bias", "the decoded images hold NaN or infinite values"),
    ],
)
def test_non_finite_result_is_an_error_and_saves_nothing(tmp_path, component, key, message):
    model = poisoned_model(tmp_path, component, key)
    output = tmp_path / "out.png"
    result = run(
        "txt2image.py",
        "a cat",
        "--model",
        str(model),
        "--steps",
        "2",
        "--seed",
        "0",
        "--output",
        str(output),
        "--save-individual",
    )
    assert result.returncode == 1
    assert message in result.stderr
    assert "weights with NaN or infinite values" in result.stderr
    assert "Nothing was saved." in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.glob("*.png")) == []


def _sigint_as_from_a_terminal() -> None:
    """In the child: SIGINT delivered as from a terminal. A shell without job control starts
    background commands (and so this test, under some runners) with SIGINT ignored, and a
    child inherits its parent thread's blocked signals too. (Once, in the full suite, the
    child ran to its end with exit status 0; the cause was not confirmed, a blocked signal
    being one that fits.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_ends_with_one_line_and_saves_nothing(tmp_path):
    output = tmp_path / "out.png"
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "txt2image.py"),
            "a cat",
            "--model",
            TINY_SD2,
            "--steps",
            "1000",
            "--output",
            str(output),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=_sigint_as_from_a_terminal,
    )
    try:
        # The seed is printed once the model is loaded, as denoising starts.
        assert process.stdout.readline().startswith("Seed: ")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert stderr.rstrip().endswith("Interrupted; nothing was saved.")
    assert "Traceback" not in stderr
    assert not output.exists()


def test_entry_points_run_the_scripts_mains():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {
        "sd-txt2image": "stable_diffusion.cli:txt2image_main",
        "sd-image2image": "stable_diffusion.cli:image2image_main",
    }
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name))
    for shim, main in (("txt2image.py", "txt2image_main"), ("image2image.py", "image2image_main")):
        assert f"from stable_diffusion.cli import {main}" in (ROOT / shim).read_text()


def test_sampler_list_prints_every_name():
    result = run("txt2image.py", "--sampler", "list")
    assert result.returncode == 0, result.stderr
    for row in (
        "euler_a        Euler a        euler_ancestral  karras, exponential",
        "dpm++2m_sde    DPM++ 2M SDE   dpmpp_2m_sde     karras, exponential",
        "ddim           DDIM           ddim             -",
    ):
        assert row in result.stdout


def test_a1111_sampler_and_schedule_names(tmp_path):
    # A1111 1.9+ writes the sampler and the schedule apart; ours is the same sampler.
    output = tmp_path / "out.png"
    result = run(
        "txt2image.py", "a cat", "--model", TINY_SD2, "--steps", "2", "--seed", "3",
        "--sampler", "Euler a", "--schedule", "Karras", "--output", str(output),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = read_parameters(output)
    assert saved.sampler == "euler_a_karras"
    assert "Sampler: Euler a, Schedule type: Karras," in saved.to_text()
