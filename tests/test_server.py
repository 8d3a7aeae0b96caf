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
    ("txt2img", {"prompt": "x", "enable_hr": True}, 422, "hires fix"),
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
    ("img2img", {"prompt": "x"}, 422, "init_images"),
    ("img2img", {"prompt": "x", "init_images": ["!!not base64!!"]}, 422, "not valid base64"),
    (
        "img2img",
        {"prompt": "x", "init_images": [base64.b64encode(b"junk").decode()]},
        422,
        "init_images[0]: cannot open the image",
    ),
    ("img2img", {"prompt": "x", "init_images": ["A" * (44 * 2**20)]}, 413, "over 32 MiB"),
    ("img2img", {"prompt": "x", "mask": "abc", "init_images": ["x"]}, 422, "inpainting"),
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
