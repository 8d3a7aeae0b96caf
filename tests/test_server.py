"""The server, started for real (`python -m stable_diffusion.server` on a free loopback
port) with the tiny SD 1.x model and driven by AUTOMATIC1111's most used client,
`webuiapi`, and by plain HTTP. Its images must equal, pixel for pixel, what the scripts
make with the same settings and seed."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image
from sd_parsers import ParserManager

from stable_diffusion.images import GenerationParameters, read_parameters
from tests.helpers import FIXTURES, ROOT, Server

TINY_SD1 = "tests/fixtures/models/tiny-sd1"
LORA = FIXTURES / "lora" / "sd1_kohya.safetensors"
MAX_QUEUE = 2
# Steps that keep a tiny-model job running for seconds (~10 steps/s on 2 cores), so that
# it can be watched, interrupted and abandoned mid-way.
LONG_STEPS = 150


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("server")
    models, loras, outside = tmp / "models", tmp / "loras", tmp / "outside"
    for folder in (models, loras, outside):
        folder.mkdir()
    shutil.copytree(FIXTURES / "models" / "tiny-sd2", models / "tiny-sd2")
    shutil.copy(LORA, loras / LORA.name)
    # Symlinks leading out of the folders: never listed, never loadable.
    shutil.copy(LORA, outside / "secret.safetensors")
    (loras / "escape.safetensors").symlink_to(outside / "secret.safetensors")
    (models / "escape").symlink_to(FIXTURES / "models" / "tiny-sdxl")
    return {"tmp": tmp, "models": models, "loras": loras, "output": tmp / "output"}


@pytest.fixture(scope="module")
def server(folders):
    s = Server(
        folders["tmp"],
        "--models-dir",
        str(folders["models"]),
        "--lora-dir",
        str(folders["loras"]),
        "--output-dir",
        str(folders["output"]),
        "--max-queue",
        str(MAX_QUEUE),
    )
    yield s
    s.stop()


@pytest.fixture
def api(server) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


def run_script(tmp: Path, script: str, *args: str) -> Path:
    output = tmp / f"{script}-{time.monotonic_ns()}.png"
    subprocess.run(
        [sys.executable, script, *args, "--output", str(output)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return output


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def parameters_text(image: Image.Image) -> str:
    return image.info["parameters"]


def test_txt2img_equals_the_script(api, tmp_path):
    script = run_script(
        tmp_path,
        "txt2image.py",
        "a red cube",
        "--model",
        TINY_SD1,
        "--steps",
        "4",
        "--seed",
        "7",
        "--sampler",
        "euler_a",
        "--cfg",
        "6.5",
        "--negative_prompt",
        "blurry",
        "--width",
        "64",
        "--height",
        "48",
    )
    result = api.txt2img(
        prompt="a red cube",
        negative_prompt="blurry",
        steps=4,
        seed=7,
        sampler_name="Euler a",
        cfg_scale=6.5,
        width=64,
        height=48,
    )
    (image,) = result.images
    with Image.open(script) as expected:
        np.testing.assert_array_equal(pixels(image), pixels(expected))
        assert parameters_text(image) == parameters_text(expected)
    assert result.info["seed"] == 7 and result.info["all_seeds"] == [7]
    assert result.info["infotexts"] == [parameters_text(image)]
    assert result.parameters["prompt"] == "a red cube"
    # Read back by the project's reader and by another project's (sd-parsers).
    saved = tmp_path / "from-server.png"
    image.save(saved, pnginfo=_pnginfo(image))
    assert read_parameters(saved) == read_parameters(script)
    parsed = ParserManager().parse(Image.open(saved))
    assert parsed.generator.name == "AUTOMATIC1111"
    (sampler,) = parsed.samplers
    assert sampler.name == "Euler a" and sampler.parameters["seed"] == "7"
    assert sampler.prompts[0].value == "a red cube"


@pytest.mark.parametrize(
    ("script_options", "request_fields", "size"),
    [
        (
            ["--hires-scale", "2", "--hires-steps", "3", "--hires-upscaler", "latent-nearest"],
            {"hr_scale": 2, "hr_second_pass_steps": 3, "hr_upscaler": "Latent (nearest)"},
            (128, 96),
        ),
        # A1111's hr_resize (0: the aspect ratio kept), its default upscaler (Latent).
        (["--hires-resize", "96x0"], {"hr_resize_x": 96, "hr_upscaler": None}, (96, 72)),
    ],
)
def test_txt2img_hires_fix_equals_the_script(api, tmp_path, script_options, request_fields, size):
    script = run_script(
        tmp_path,
        "txt2image.py",
        "a red cube",
        "--model",
        TINY_SD1,
        "--steps",
        "4",
        "--seed",
        "9",
        "--sampler",
        "euler_a",
        "--width",
        "64",
        "--height",
        "48",
        "--hires-strength",
        "0.6",
        *script_options,
    )
    result = api.txt2img(
        prompt="a red cube",
        steps=4,
        seed=9,
        sampler_name="Euler a",
        cfg_scale=7.5,
        width=64,
        height=48,
        enable_hr=True,
        denoising_strength=0.6,
        **request_fields,
    )
    (image,) = result.images
    assert image.size == size
    with Image.open(script) as expected:
        np.testing.assert_array_equal(pixels(image), pixels(expected))
        assert parameters_text(image) == parameters_text(expected)
    assert "Size: 64x48, " in parameters_text(image)
    assert (result.info["width"], result.info["height"]) == (64, 48)
    assert result.info["denoising_strength"] == 0.6
    extra = result.info["extra_generation_params"]
    assert extra["Hires upscaler"] == (request_fields["hr_upscaler"] or "Latent")
    if "hr_scale" in request_fields:
        assert (extra["Hires upscale"], extra["Hires steps"]) == (2, 3)
    else:
        assert extra["Hires resize"] == "96x0" and "Hires steps" not in extra
    info = api.png_info(image)  # A1111's parsed fields
    assert info.parameters["Denoising strength"] == "0.6"
    assert info.parameters["Hires upscaler"] == extra["Hires upscaler"]


def _pnginfo(image: Image.Image):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", image.info["parameters"])
    return info


def test_img2img_equals_the_script(api, tmp_path):
    source = tmp_path / "input.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(source)
    script = run_script(
        tmp_path,
        "image2image.py",
        str(source),
        "a lit fireplace",
        "--model",
        TINY_SD1,
        "--strength",
        "0.6",
        "--steps",
        "5",
        "--seed",
        "3",
        "--sampler",
        "ddim",
    )
    result = api.img2img(
        images=[Image.open(source)],
        prompt="a lit fireplace",
        denoising_strength=0.6,
        steps=5,
        seed=3,
        sampler_name="DDIM",
        cfg_scale=7.5,
        width=64,
        height=64,
    )
    (image,) = result.images
    with Image.open(script) as expected:
        np.testing.assert_array_equal(pixels(image), pixels(expected))
        assert parameters_text(image) == parameters_text(expected)


@pytest.mark.parametrize(
    ("options", "fill", "invert"),
    [([], 1, 0), (["--masked-content", "fill", "--invert-mask", "--mask-blur", "2"], 0, 1)],
)
def test_inpainting_equals_the_script(api, tmp_path, options, fill, invert):
    """A1111's mask, mask_blur, inpainting_fill and inpainting_mask_invert, as the script's
    --mask options: the same pixels (the input's outside the mask) and parameters."""
    source, mask_path = tmp_path / "input.png", tmp_path / "mask.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(source)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 20:60] = 255
    Image.fromarray(mask).save(mask_path)
    common = ["--model", TINY_SD1, "--strength", "0.6", "--steps", "3", "--seed", "4"]
    common += ["--sampler", "dpm++2m_karras"]
    script = run_script(
        tmp_path,
        "image2image.py",
        str(source),
        "a door",
        "--mask",
        str(mask_path),
        *common,
        *options,
    )
    result = api.img2img(
        images=[Image.open(source)],
        mask_image=Image.open(mask_path),
        mask_blur=2 if invert else 4,
        inpainting_fill=fill,
        inpainting_mask_invert=invert,
        inpaint_full_res=False,
        prompt="a door",
        denoising_strength=0.6,
        steps=3,
        seed=4,
        sampler_name="DPM++ 2M Karras",
        cfg_scale=7.5,
        width=64,
        height=64,
    )
    (image,) = result.images
    with Image.open(script) as expected:
        np.testing.assert_array_equal(pixels(image), pixels(expected))
        assert parameters_text(image) == parameters_text(expected)
    source_pixels = pixels(Image.open(source))
    far = np.zeros((64, 64), bool)
    if invert:
        far[14:34, 26:54] = True  # inside the white part, beyond the blur
    else:
        far[48:, :10] = True  # far from the white part
    np.testing.assert_array_equal(pixels(image)[far], source_pixels[far])
    repainted = (mask == 0) if invert else (mask == 255)
    assert np.abs(pixels(image)[repainted].astype(int) - source_pixels[repainted]).mean() > 10


def test_only_masked_equals_the_script(api, server, tmp_path):
    """A1111's "Only masked" (inpaint_full_res, webuiapi's default and A1111's API default
    for a request that leaves it out) as `image2image.py --only-masked`: the same pixels and
    parameters; the input's size kept, its pixels outside the blurred mask unchanged."""
    source, mask_path = tmp_path / "input.png", tmp_path / "mask.png"
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(source)
    mask = np.zeros((70, 100), np.uint8)
    mask[10:30, 60:90] = 255
    Image.fromarray(mask).save(mask_path)
    script = run_script(
        tmp_path,
        "image2image.py",
        str(source),
        "a window",
        "--mask",
        str(mask_path),
        "--only-masked",
        "--only-masked-padding",
        "0",
        "--masked-content",
        "fill",
        *("--model", TINY_SD1, "--steps", "3", "--seed", "6", "--sampler", "euler"),
    )
    # webuiapi's defaults: inpaint_full_res=True, inpaint_full_res_padding=0, and the
    # size, given as the script's (100x70 rounded to 128x64).
    result = api.img2img(
        images=[Image.open(source)],
        mask_image=Image.open(mask_path),
        prompt="a window",
        steps=3,
        seed=6,
        sampler_name="Euler",
        cfg_scale=7.5,
        width=128,
        height=64,
    )
    # Plain HTTP leaving out inpaint_full_res, its padding and the size.
    response = server.post(
        "img2img",
        {
            "prompt": "a window",
            "init_images": [_b64_png(Image.open(source))],
            "mask": _b64_png(Image.open(mask_path)),
            "steps": 3,
            "seed": 6,
            "sampler_name": "Euler",
            "cfg_scale": 7.5,
        },
    )
    assert response.status_code == 200, response.text
    (encoded,) = response.json()["images"]
    plain = Image.open(io.BytesIO(base64.b64decode(encoded)))
    source_pixels = pixels(Image.open(source))
    with Image.open(script) as expected:
        assert expected.size == (100, 70)
        for image in (result.images[0], plain):
            np.testing.assert_array_equal(pixels(image), pixels(expected))
            assert parameters_text(image) == parameters_text(expected)
    text = parameters_text(plain)
    assert "Size: 128x64" in text
    assert "Mask blur: 4, Masked content: fill, Inpaint area: Only masked" in text
    assert "Masked area padding: 0" in text
    kept = np.ones((70, 100), bool)
    kept[:45, 45:] = False  # the mask's box (60..90, 10..30) and its blur, with room
    np.testing.assert_array_equal(pixels(plain)[kept], source_pixels[kept])
    assert np.abs(pixels(plain)[mask == 255].astype(int) - source_pixels[mask == 255]).mean() > 10


def test_batches_and_iterations(api, tmp_path):
    """Image i of the run has seed 10 + i, as in A1111 and `txt2image.py --n_images`."""
    result = api.txt2img(
        prompt="a dog",
        steps=2,
        seed=10,
        batch_size=2,
        n_iter=2,
        sampler_name="Euler",
        cfg_scale=7.5,
        width=64,
        height=64,
    )
    assert len(result.images) == 4
    assert result.info["all_seeds"] == [10, 11, 12, 13]
    script = run_script(
        tmp_path,
        "txt2image.py",
        "a dog",
        "--model",
        TINY_SD1,
        "--steps",
        "2",
        "--seed",
        "12",
        "--n_images",
        "2",
        "--save-individual",
    )
    for i, image in enumerate(result.images[2:]):
        with Image.open(script.with_name(f"{script.stem}-{i}.png")) as expected:
            np.testing.assert_array_equal(pixels(image), pixels(expected))


def test_lists_and_options(api, server):
    samplers = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "LCM", "DPM++ 2M Karras"} <= set(samplers)
    assert {s["name"] for s in api.get_schedulers()} == {"automatic", "karras", "exponential"}
    assert api.util_get_model_names() == sorted([TINY_SD1, "tiny-sd2"])  # no "escape"
    assert [lora["name"] for lora in api.get_loras()] == ["sd1_kohya"]  # no "escape"
    assert api.util_get_current_model() == TINY_SD1
    assert api.get_options()["sd_model_checkpoint"] == TINY_SD1
    assert server.post("options", {"some_unknown_option": 1}).status_code == 200


def test_png_info(api):
    (image,) = api.txt2img(prompt="a boat", steps=1, seed=5, width=64, height=64).images
    info = api.png_info(image).json
    assert info["info"] == parameters_text(image)
    assert info["parameters"]["Prompt"] == "a boat" and info["parameters"]["Seed"] == "5"


def test_scheduler_karras(api):
    old = api.txt2img(
        prompt="x", steps=3, seed=1, sampler_name="DPM++ 2M Karras", width=64, height=64
    )
    new = api.txt2img(
        prompt="x",
        steps=3,
        seed=1,
        sampler_name="DPM++ 2M",
        scheduler="Karras",
        width=64,
        height=64,
    )
    np.testing.assert_array_equal(pixels(old.images[0]), pixels(new.images[0]))
    assert "Sampler: DPM++ 2M Karras" in parameters_text(new.images[0])


def test_save_images_never_overwrites(server, folders):
    payload = {
        "prompt": "saved",
        "steps": 1,
        "seed": 99,
        "width": 64,
        "height": 64,
        "save_images": True,
        "send_images": False,
    }
    for _ in range(2):
        response = server.post("txt2img", payload)
        assert response.status_code == 200 and response.json()["images"] == []
    saved = sorted(p.name for p in folders["output"].iterdir())
    assert saved == ["txt2img-99.png", "txt2img-99_1.png"]
    assert read_parameters(folders["output"] / saved[0]).prompt == "saved"


def test_progress_preview_and_interrupt(api, server):
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            api.txt2img, prompt="slow", steps=LONG_STEPS, n_iter=4, seed=1, width=64, height=64
        )
        progress = _wait_for_step(server, 2)
        assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
        assert progress["eta_relative"] > 2  # long enough that stopping early shows
        assert progress["state"]["sampling_steps"] == LONG_STEPS
        preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        assert preview.size == (8, 8)  # the latent's size: 64 / 8
        assert np.ptp(pixels(preview)) > 0  # not a blank image
        step_at_interrupt = progress["state"]["sampling_step"]
        api.interrupt()
        start = time.monotonic()
        result = running.result(timeout=30)
    assert time.monotonic() - start < progress["eta_relative"] / 2
    assert step_at_interrupt < LONG_STEPS / 2
    # A1111 returns what was generated so far.
    assert len(result.images) == 1 and result.info["interrupted"] is True
    assert server.progress()["state"]["job_count"] == 0


def _wait_for_step(server: Server, step: int) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        progress = server.progress()
        if progress["state"]["sampling_step"] >= step:
            return progress
        time.sleep(0.05)
    raise AssertionError("the job did not start")


def test_skip_goes_on_with_the_next_batch(api, server):
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            api.txt2img, prompt="slow", steps=LONG_STEPS, seed=1, n_iter=2, width=64, height=64
        )
        _wait_for_step(server, 2)
        api.skip()
        deadline = time.monotonic() + 30
        while server.progress()["state"]["job_no"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        api.interrupt()
        result = running.result(timeout=30)
    assert result.info["all_seeds"] == [1, 2]


def test_client_disconnect_stops_the_job(server, api):
    body = json.dumps(
        {"prompt": "abandoned", "steps": LONG_STEPS, "n_iter": 4, "width": 64, "height": 64}
    )
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/sdapi/v1/txt2img", body, {"Content-Type": "application/json"})
    progress = _wait_for_step(server, 2)
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    assert progress["state"]["sampling_step"] < LONG_STEPS / 2
    # Stopped after its current step, long before the rest of the job would have run.
    assert progress["eta_relative"] > 2
    assert server.wait_idle(timeout=progress["eta_relative"]) < progress["eta_relative"] / 2
    assert len(api.txt2img(prompt="next", steps=1, width=64, height=64).images) == 1


def test_model_switch(api, server, folders, tmp_path):
    try:
        api.util_set_model("tiny-sd2", find_closest=False)
        assert api.util_get_current_model() == "tiny-sd2"
        (image,) = api.txt2img(
            prompt="a hill",
            steps=3,
            seed=4,
            sampler_name="Euler",
            cfg_scale=7.5,
            width=64,
            height=64,
        ).images
        assert "Model: tiny-sd2" in parameters_text(image)
        script = run_script(
            tmp_path,
            "txt2image.py",
            "a hill",
            "--model",
            str(folders["models"] / "tiny-sd2"),
            "--steps",
            "3",
            "--seed",
            "4",
        )
        with Image.open(script) as expected:
            np.testing.assert_array_equal(pixels(image), pixels(expected))
    finally:
        api.util_set_model(TINY_SD1, find_closest=False)
    assert api.util_get_current_model() == TINY_SD1


CLIP_SKIP_JOB = dict(
    prompt="a quiet harbor",
    steps=3,
    seed=6,
    sampler_name="Euler",
    cfg_scale=7.5,
    width=64,
    height=64,
)
CLIP_SKIP_SCRIPT = (
    "a quiet harbor",
    *("--steps", "3", "--seed", "6", "--sampler", "euler"),
    *("--width", "64", "--height", "64"),
)


def test_override_settings_clip_skip_for_one_request(api, tmp_path):
    """A1111's override_settings: clip skip for this request only, as `--clip-skip 2`."""
    plain = api.txt2img(**CLIP_SKIP_JOB).images[0]
    result = api.txt2img(**CLIP_SKIP_JOB, override_settings={"CLIP_stop_at_last_layers": 2})
    (skipped,) = result.images
    script = run_script(
        tmp_path, "txt2image.py", *CLIP_SKIP_SCRIPT, "--model", TINY_SD1, "--clip-skip", "2"
    )
    with Image.open(script) as expected:
        np.testing.assert_array_equal(pixels(skipped), pixels(expected))
        assert parameters_text(skipped) == parameters_text(expected)
    assert "Clip skip: 2" in parameters_text(skipped) and result.info["clip_skip"] == 2
    assert not np.array_equal(pixels(skipped), pixels(plain))
    # Restored afterwards (A1111's default): the server's option is unchanged.
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1
    after = api.txt2img(**CLIP_SKIP_JOB).images[0]
    np.testing.assert_array_equal(pixels(after), pixels(plain))
    assert "Clip skip" not in parameters_text(after)


def test_override_settings_kept_when_not_restored(api):
    plain = api.txt2img(**CLIP_SKIP_JOB).images[0]
    try:
        kept = api.txt2img(
            **CLIP_SKIP_JOB,
            override_settings={"CLIP_stop_at_last_layers": 2},
            override_settings_restore_afterwards=False,
        ).images[0]
        assert api.get_options()["CLIP_stop_at_last_layers"] == 2
        later = api.txt2img(**CLIP_SKIP_JOB).images[0]
        np.testing.assert_array_equal(pixels(later), pixels(kept))
        assert "Clip skip: 2" in parameters_text(later)
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1
    back = api.txt2img(**CLIP_SKIP_JOB).images[0]
    np.testing.assert_array_equal(pixels(back), pixels(plain))


def test_override_settings_model_for_one_request(api, folders, tmp_path):
    """sd_model_checkpoint in override_settings loads that model for the request; the next
    request without it runs on the server's model again."""
    job = dict(
        prompt="a hill", steps=3, seed=4, sampler_name="Euler", cfg_scale=7.5, width=64, height=64
    )
    before = api.txt2img(**job).images[0]
    (image,) = api.txt2img(**job, override_settings={"sd_model_checkpoint": "tiny-sd2"}).images
    assert "Model: tiny-sd2" in parameters_text(image)
    script = run_script(
        tmp_path,
        "txt2image.py",
        "a hill",
        "--model",
        str(folders["models"] / "tiny-sd2"),
        "--steps",
        "3",
        "--seed",
        "4",
        "--sampler",
        "euler",
    )
    with Image.open(script) as expected:
        np.testing.assert_array_equal(pixels(image), pixels(expected))
    assert api.util_get_current_model() == TINY_SD1
    after = api.txt2img(**job).images[0]
    assert f"Model: {TINY_SD1}" in parameters_text(after)
    np.testing.assert_array_equal(pixels(after), pixels(before))


def test_lora_then_plain_request(api, tmp_path):
    plain = dict(steps=3, seed=2, sampler_name="Euler", cfg_scale=7.5, width=64, height=64)
    before = api.txt2img(prompt="a tree ", **plain).images[0]
    lora = api.txt2img(prompt="a tree <lora:sd1_kohya:0.8>", **plain).images[0]
    after = api.txt2img(prompt="a tree ", **plain).images[0]
    # The LoRA changed the image, and the weights were restored exactly after it.
    assert not np.array_equal(pixels(lora), pixels(before))
    np.testing.assert_array_equal(pixels(after), pixels(before))
    # The prompt is recorded as typed, tag included, with the LoRA's hash, as A1111 does
    # (its "addnet" hash: SHA-256 of a .safetensors file after its header).
    assert parameters_text(lora).startswith("a tree <lora:sd1_kohya:0.8>\n")
    data = LORA.read_bytes()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()
    recorded = GenerationParameters.from_text(parameters_text(lora))
    assert dict(recorded.extras)["Lora hashes"] == f"sd1_kohya: {addnet[:12]}"
    # A1111 removes the tag from the text it encodes: "a tree " with the LoRA merged at 0.8.
    script = run_script(
        tmp_path,
        "txt2image.py",
        "a tree ",
        "--model",
        TINY_SD1,
        "--steps",
        "3",
        "--seed",
        "2",
        "--lora",
        f"{LORA}:0.8",
    )
    with Image.open(script) as expected:
        np.testing.assert_array_equal(pixels(lora), pixels(expected))


def test_lora_weights_are_restored_exactly():
    """In-process, on the engine the server uses: every weight after a LoRA request equals
    the weight before it."""
    from mlx.utils import tree_flatten

    from stable_diffusion.server.engine import Engine

    engine = Engine(float16=False, quantize=False)
    engine.load(TINY_SD1, TINY_SD1)

    def weights() -> dict[str, np.ndarray]:
        sd = engine.sd
        models = {"unet": sd.unet, "text_encoder": sd.text_encoders[0]}
        return {
            f"{name}.{k}": np.array(v)
            for name, m in models.items()
            for k, v in tree_flatten(m.parameters())
        }

    before = weights()
    engine.use_loras([(LORA, 0.8)])
    merged = weights()
    engine.use_loras([])
    after = weights()
    assert any(not np.array_equal(merged[k], before[k]) for k in before)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def _b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BAD_REQUESTS = [
    ("txt2img", {"prompt": "x", "steps": "many"}, 422, "steps"),
    ("txt2img", {"prompt": "x", "steps": 0}, 422, "steps"),
    ("txt2img", {"prompt": "x", "steps": 10_000}, 422, "steps"),
    ("txt2img", {"prompt": "x", "width": 33, "height": 64}, 422, "use 32 or 40"),
    ("txt2img", {"prompt": "x", "width": 100_000}, 422, "width"),
    ("txt2img", {"prompt": "x", "width": 8192, "height": 64}, 422, "less than or equal to 4096"),
    ("txt2img", {"prompt": "x", "cfg_scale": "NaN"}, 422, "cfg_scale"),
    ("txt2img", {"prompt": "x", "seed": -5}, 422, "seed"),
    ("txt2img", {"prompt": "x", "batch_size": 1000}, 422, "batch_size"),
    ("txt2img", {"prompt": "x", "sampler_name": "Foo"}, 422, "Unknown sampler 'Foo'"),
    ("txt2img", {"prompt": "x", "scheduler": "Beta"}, 422, "Unknown schedule 'Beta'"),
    ("txt2img", {"prompt": "x", "enable_hr": True, "hr_scale": 0.5}, 422, "hr_scale"),
    ("txt2img", {"prompt": "x", "enable_hr": True, "hr_scale": "NaN"}, 422, "hr_scale"),
    ("txt2img", {"prompt": "x", "enable_hr": True, "hr_second_pass_steps": 151}, 422, "hr_second"),
    ("txt2img", {"prompt": "x", "enable_hr": True, "denoising_strength": 2}, 422, "denoising"),
    ("txt2img", {"prompt": "x", "enable_hr": True, "hr_resize_x": 10**6}, 422, "hr_resize_x"),
    (
        "txt2img",
        {"prompt": "x", "enable_hr": True, "width": 64, "height": 64, "hr_scale": 1.3},
        422,
        "hr_scale makes 64x64 into 83x83",
    ),
    # The model's default size, known when the job runs: refused before any step.
    ("txt2img", {"prompt": "x", "enable_hr": True, "hr_scale": 1.3}, 422, "into 83x83"),
    (
        "txt2img",
        {"prompt": "x", "enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"},
        422,
        "unknown hires upscaler",
    ),
    ("txt2img", {"prompt": "x", "enable_hr": True, "hr_prompt": "y"}, 422, "another prompt"),
    (
        "txt2img",
        {"prompt": "x", "enable_hr": True, "hr_checkpoint_name": "m"},
        422,
        "another model",
    ),
    (
        "txt2img",
        {"prompt": "x", "enable_hr": True, "hr_sampler_name": "DDIM"},
        422,
        "another sampler",
    ),
    ("txt2img", {"prompt": "x", "enable_hr": True, "firstphase_width": 64}, 422, "firstphase"),
    ("txt2img", {"prompt": "x <lora:nope:1>"}, 422, "unknown LoRA 'nope'"),
    ("txt2img", {"prompt": "x <lora:../loras/sd1_kohya:1>"}, 422, "unknown LoRA"),
    ("txt2img", {"prompt": "x <lora:escape:1>"}, 422, "unknown LoRA 'escape'"),
    ("txt2img", {"prompt": f"x <lora:{LORA}:1>"}, 422, "unknown LoRA"),
    ("txt2img", {"prompt": "x <lora:sd1_kohya:lots>"}, 422, "the weight a number"),
    ("txt2img", [1, 2], 422, "Input should be a valid dictionary"),
    ("options", {"sd_model_checkpoint": "../models/tiny-sd2"}, 422, "unknown model"),
    ("options", {"sd_model_checkpoint": str(ROOT / TINY_SD1)}, 422, "unknown model"),
    ("options", {"sd_model_checkpoint": "escape"}, 422, "unknown model 'escape'"),
    ("options", {"sd_model_checkpoint": 3}, 422, "sd_model_checkpoint"),
    ("options", {"CLIP_stop_at_last_layers": 0}, 422, "CLIP_stop_at_last_layers must be"),
    *(
        ("txt2img", {"prompt": "x", "override_settings": settings}, 422, message)
        for settings, message in [
            ({"CLIP_stop_at_last_layers": "two"}, "CLIP_stop_at_last_layers must be"),
            ({"CLIP_stop_at_last_layers": 13}, "from 1 (the last layer) to 12"),
            ({"CLIP_stop_at_last_layers": True}, "CLIP_stop_at_last_layers must be"),
            ({"sd_model_checkpoint": "nope"}, "override_settings: unknown model 'nope'"),
            ({"sd_model_checkpoint": "escape"}, "unknown model 'escape'"),
            ({"sd_vae": "vae-ft-mse.safetensors"}, "the model's own VAE only"),
            ({"eta_noise_seed_delta": 31337}, "eta_noise_seed_delta 31337"),
        ]
    ),
    ("txt2img", {"prompt": "x", "override_settings": [1]}, 422, "override_settings"),
    ("img2img", {"prompt": "x"}, 422, "init_images"),
    ("img2img", {"prompt": "x", "init_images": ["!!not base64!!"]}, 422, "not valid base64"),
    (
        "img2img",
        {"prompt": "x", "init_images": [base64.b64encode(b"junk").decode()]},
        422,
        "init_images[0]: cannot open the image",
    ),
    ("img2img", {"prompt": "x", "init_images": ["A" * (44 * 2**20)]}, 413, "over 32 MiB"),
    (
        "img2img",
        {
            "prompt": "x",
            "mask": _b64_png(Image.new("L", (64, 64))),
            "init_images": [_b64_png(Image.new("RGB", (64, 64)))],
        },
        422,
        "mask: the mask is empty (black everywhere, after inverting): nothing to inpaint",
    ),
    (
        "img2img",
        {
            "prompt": "x",
            "mask": _b64_png(Image.new("L", (64, 64), 255)),
            "init_images": [_b64_png(Image.new("RGB", (64, 64)))],
            "width": 33,
        },
        422,
        "width 33 is not a positive multiple of 8",
    ),
    (
        "img2img",
        {"prompt": "x", "init_images": ["x"], "inpaint_full_res_padding": -1},
        422,
        "inpaint_full_res_padding: Input should be greater than or equal to 0",
    ),
    (
        "img2img",
        {"prompt": "x", "mask": "abc", "init_images": ["x"], "inpainting_fill": 4},
        422,
        "inpainting_fill: Input should be less than or equal to 3",
    ),
    (
        "img2img",
        {"prompt": "x", "mask": "!!", "init_images": [_b64_png(Image.new("RGB", (64, 64)))]},
        422,
        "mask: not valid base64",
    ),
    (
        "img2img",
        {
            "prompt": "x",
            "mask": _b64_png(Image.new("L", (32, 64))),
            "init_images": [_b64_png(Image.new("RGB", (64, 64)))],
        },
        422,
        "mask: the mask is 32x64 but the image is 64x64",
    ),
    ("png-info", {"image": "@@@"}, 422, "not valid base64"),
]


@pytest.mark.parametrize(("route", "payload", "status", "message"), BAD_REQUESTS)
def test_bad_requests(server, route, payload, status, message):
    response = server.post(route, payload)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and message in detail
    assert "Traceback" not in response.text


def test_decompression_bomb_is_refused(server):
    bomb = _b64_png(Image.new("L", (9000, 9000)))  # 81 MP in a few kB
    assert len(bomb) < 2**20
    response = server.post("img2img", {"prompt": "x", "init_images": [bomb]})
    assert response.status_code == 422
    assert "too large" in response.json()["detail"]


def test_oversized_body_is_refused(server):
    body = b'{"prompt": "' + b"x" * (65 * 2**20) + b'"}'
    response = requests.post(
        f"{server.url}/sdapi/v1/txt2img",
        data=body,
        timeout=60,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413
    chunked = requests.post(
        f"{server.url}/sdapi/v1/txt2img",
        data=iter([body]),
        timeout=60,
        headers={"Content-Type": "application/json"},
    )
    assert chunked.status_code == 413


def test_unknown_fields_are_ignored(server):
    response = server.post(
        "txt2img",
        {
            "prompt": "x",
            "steps": 1,
            "width": 64,
            "height": 64,
            "eta": 0.5,
            "some_extension_field": {"a": 1},
            # Options this server knows at their defaults, and ones it does not know.
            "override_settings": {
                "sd_vae": "Automatic",
                "eta_noise_seed_delta": 0,
                "samples_format": "jpg",
                "some_extension_option": [1, 2],
            },
        },
    )
    assert response.status_code == 200


def test_load(server):
    """3-4x --max-queue concurrent requests: the accepted ones each get their own image
    (its parameters are its request's), the others a 503; the server's memory stays flat."""
    clients = 4 * (MAX_QUEUE + 1)

    def request(i: int) -> tuple[int, requests.Response]:
        payload = {
            "prompt": f"request {i}",
            "seed": 1000 + i,
            "steps": 8,
            "width": 64,
            "height": 64,
        }
        return i, server.post("txt2img", payload)

    def round_() -> tuple[int, int]:
        barrier = threading.Barrier(clients)

        def synchronized(i):
            barrier.wait()
            return request(i)

        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(synchronized, range(clients)))
        accepted = refused = 0
        for i, response in results:
            if response.status_code == 503:
                assert "queue is full" in response.json()["detail"]
                refused += 1
                continue
            assert response.status_code == 200, response.text
            (image,) = response.json()["images"]
            with Image.open(io.BytesIO(base64.b64decode(image))) as png:
                p = GenerationParameters.from_text(png.info["parameters"])
            assert (p.prompt, p.seed) == (f"request {i}", 1000 + i)
            accepted += 1
        return accepted, refused

    request(0)  # warm up: the first request's allocations are not a leak
    start_rss = server.rss_mib()
    totals = [round_() for _ in range(3)]
    end_rss = server.rss_mib()
    print(f"load: {totals} (accepted, refused) per round; RSS {start_rss:.0f} -> {end_rss:.0f} MiB")
    for accepted, refused in totals:
        assert accepted >= MAX_QUEUE + 1 and refused >= 1
        assert accepted + refused == clients
    assert end_rss - start_rss < 64, f"RSS grew from {start_rss:.0f} to {end_rss:.0f} MiB"


def test_auth(tmp_path):
    server = Server(tmp_path, "--api-auth", "alice:secret,bob:pw2")
    try:
        assert requests.get(f"{server.url}/sdapi/v1/options", timeout=10).status_code == 401
        wrong = requests.get(f"{server.url}/sdapi/v1/options", auth=("alice", "nope"), timeout=10)
        assert wrong.status_code == 401 and "Incorrect" in wrong.json()["detail"]
        assert requests.get(f"{server.url}/", timeout=10).status_code == 401
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="bob", password="pw2")
        assert api.util_get_current_model() == TINY_SD1
        assert len(api.txt2img(prompt="x", steps=1, width=64, height=64).images) == 1
    finally:
        server.stop()


def test_warns_when_exposed_without_auth(tmp_path):
    # Never listens: the model does not exist, and the warning comes before loading it.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stable_diffusion.server",
            "--model",
            "/nonexistent",
            "--host",
            "0.0.0.0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert "WARNING: listening on 0.0.0.0 without --api-auth" in result.stderr
    assert result.returncode != 0 and "Traceback" not in result.stderr


def test_max_queue_zero_runs_one_job_and_refuses_the_rest(tmp_path):
    server = Server(tmp_path, "--max-queue", "0")
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        assert len(api.txt2img(prompt="x", steps=1, width=64, height=64).images) == 1
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(api.txt2img, prompt="slow", steps=LONG_STEPS, width=64, height=64)
            _wait_for_step(server, 1)
            refused = server.post("txt2img", {"prompt": "y", "steps": 1})
            api.interrupt()
            running.result(timeout=30)
        assert refused.status_code == 503 and "queue is full" in refused.json()["detail"]
    finally:
        server.stop()


@pytest.mark.parametrize("resize_mode", [0, 1])
def test_img2img_resizes_to_the_requested_size(api, resize_mode):
    source = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 96, 3), np.uint8))
    result = api.img2img(
        images=[source], prompt="x", steps=2, width=128, height=64, resize_mode=resize_mode
    )
    assert result.images[0].size == (128, 64)
    assert "Size: 128x64" in parameters_text(result.images[0])
