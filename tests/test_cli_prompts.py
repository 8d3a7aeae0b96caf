"""The A1111 prompt conventions on the command line, on the tiny models: weighting, clip
skip, embeddings and <lora:name:weight> tags, recorded in the PNG and re-run from it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from stable_diffusion.images import read_parameters
from tests.helpers import FIXTURES, run

TINY_SD1 = str(FIXTURES / "models" / "tiny-sd1")
TINY_SDXL = str(FIXTURES / "models" / "tiny-sdxl")
EMBEDDINGS = FIXTURES / "embeddings"
PROMPT = "a (red:1.5) foxstyle, [snow] <lora:style:0.5>"


@pytest.fixture
def lora_dir(tmp_path):
    folder = tmp_path / "loras"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(FIXTURES / "lora" / "sd1_kohya.safetensors", folder / "sub" / "style.safetensors")
    return folder


def txt2image(output, *args: str):
    return run(
        "txt2image.py",
        *args,
        "--steps",
        "2",
        "--seed",
        "3",
        "--output",
        str(output),
    )


def pixels(path) -> np.ndarray:
    return np.array(Image.open(path)).astype(int)


def test_conventions_are_recorded_and_rerun(tmp_path, lora_dir):
    first = tmp_path / "first.png"
    options = ["--embedding", str(EMBEDDINGS / "tiny-sd1" / "foxstyle.pt")]
    options += ["--lora-dir", str(lora_dir)]
    result = txt2image(first, PROMPT, "--model", TINY_SD1, "--clip-skip", "2", *options)
    assert result.returncode == 0, result.stderr
    saved = read_parameters(first)
    assert saved.prompt == PROMPT  # verbatim, the tag included
    assert saved.clip_skip == 2 and saved.loras == (("style", 0.5),)
    assert "Clip skip: 2" in Image.open(first).text["parameters"]

    again = tmp_path / "again.png"
    rerun = ["--from-image", str(first), "--use-saved-model", "--output", str(again)]
    result = run("txt2image.py", *rerun, *options)
    assert result.returncode == 0, result.stderr
    assert "pass --lora" not in result.stdout  # the tag brought the LoRA back
    assert read_parameters(again) == saved
    assert np.array_equal(pixels(again), pixels(first))

    # Each convention changes the image: none of them was silently ignored.
    for changed in (
        ["--clip-skip", "1", *options],
        ["--clip-skip", "2", "--lora-dir", str(lora_dir)],  # without the embedding
    ):
        other = tmp_path / f"other{len(changed)}.png"
        result = txt2image(other, PROMPT, "--model", TINY_SD1, *changed)
        assert result.returncode == 0, result.stderr
        assert np.abs(pixels(other) - pixels(first)).max() > 0
    # The tag is --lora: the same image from the prompt without it and --lora FILE:0.5.
    without_tag = PROMPT.replace(" <lora:style:0.5>", "")
    for name, lora in (
        ("no_lora", []),
        ("lora", ["--lora", f"{lora_dir}/sub/style.safetensors:0.5"]),
    ):
        other = tmp_path / f"{name}.png"
        result = txt2image(
            other, without_tag, "--model", TINY_SD1, "--clip-skip", "2", *options[:2], *lora
        )
        assert result.returncode == 0, result.stderr
        assert np.array_equal(pixels(other), pixels(first)) == bool(lora)


@pytest.mark.parametrize(
    ("prompt", "extra", "message"),
    [
        ("a <lora:style:1>", [], "give --lora-dir FOLDER"),
        ("a <lora:missing:1>", ["--lora-dir", "LORA_DIR"], "no LoRA 'missing' in"),
        ("a <lora:../sub/style:1>", ["--lora-dir", "LORA_DIR"], "no LoRA '../sub/style'"),
        ("a <lora:outside:1>", ["--lora-dir", "LORA_DIR"], "(it has: style)"),
        ("a <lora:style:x>", ["--lora-dir", "LORA_DIR"], "<lora:name:weight>"),
        ("a (fox:1.2.3)", [], "is not a number"),
        ("a fox", ["--clip-skip", "0"], "--clip-skip must be at least 1"),
        ("a fox", ["--clip-skip", "9"], "clip skip must be between 1"),
        ("a fox", ["--embedding", "missing.pt"], "--embedding missing.pt: no such file"),
        ("a fox", ["--embeddings-dir", "missing"], "no such folder"),
        (
            "a fox",
            ["--embedding", str(EMBEDDINGS / "tiny-sdxl" / "foxstyle.safetensors")],
            "does not fit this model",
        ),
    ],
)
def test_bad_conventions_are_clear_errors(tmp_path, lora_dir, prompt, extra, message):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(lora_dir / "sub" / "style.safetensors", outside)
    (lora_dir / "outside.safetensors").symlink_to(outside)  # a link out is not looked at
    extra = [str(lora_dir) if arg == "LORA_DIR" else arg for arg in extra]
    result = txt2image(tmp_path / "out.png", prompt, "--model", TINY_SD1, *extra)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_embeddings_dir_skips_what_does_not_fit(tmp_path):
    folder = tmp_path / "embeddings"
    shutil.copytree(EMBEDDINGS / "tiny-sd1", folder / "sd1")
    shutil.copytree(EMBEDDINGS / "tiny-sdxl", folder / "sdxl")
    output = tmp_path / "out.png"
    result = txt2image(output, "foxstyle", "--model", TINY_SDXL, "--embeddings-dir", str(folder))
    assert result.returncode == 0, result.stderr
    assert "Skipped embedding" in result.stdout and "snowy.safetensors" in result.stdout
    assert "sdxl/foxstyle.safetensors" not in result.stdout
