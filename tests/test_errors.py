"""Bad input to the Python API: a clear ValueError/FileNotFoundError naming the
problem and the fix, raised at the call, before anything is computed."""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion import StableDiffusion, pipeline
from stable_diffusion.pipeline import NonFiniteError
from tests.helpers import FIXTURES


@pytest.fixture(scope="module")
def sd():
    return StableDiffusion(str(FIXTURES / "models" / "tiny-sd2"), float16=False)


@pytest.mark.parametrize("model", ["./no/such/model", "/nonexistent", "~/nonexistent", "a/b/c"])
def test_missing_model_folder_is_named(model):
    # "/nonexistent" has the one slash of "owner/name": it must not reach the hub client.
    with pytest.raises(FileNotFoundError, match=r"no such model folder: .* does not exist"):
        StableDiffusion(model)


@pytest.mark.parametrize("model", ["not a repo", "owner/na me", "-owner/name", "owner/..name"])
def test_malformed_repo_id(model):
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hugging Face"):
        StableDiffusion(model)


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model_index\.json"):
        StableDiffusion(str(tmp_path))


def test_component_weights_from_another_architecture(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(FIXTURES / "models" / "tiny-sd2", model)
    shutil.copy(
        FIXTURES / "models" / "tiny-sdxl" / "unet" / "diffusion_pytorch_model.safetensors",
        model / "unet",
    )
    with pytest.raises(ValueError, match="do not match the model built from its config"):
        StableDiffusion(str(model))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_steps": 0}, "steps must be at least 1"),
        ({"cfg_weight": -1.0}, "cfg weight must be >= 0"),
        ({"width": 500}, "width 500 is not a positive multiple of 8; use 496 or 504"),
        ({"height": 0}, "height 0 is not a positive multiple of 8; use 8$"),
        ({"width": -5}, "width -5 is not a positive multiple of 8; use 8$"),
        ({"sampler": "nope"}, "Unknown sampler 'nope'"),
        ({"latents": mx.zeros((1, 4, 4, 4))}, "initial latents have shape"),
        # Within what the RNG (mx.random.key: 64-bit unsigned) and the schedule take.
        ({"seed": 2**64}, "seed must be at most 18446744073709551615"),
        ({"seed": -1}, r"seed must be at least 0 \(got -1\) \(leave it out for a random one\)"),
        ({"seed": 1.5}, r"seed must be an integer \(got 1.5\)"),
        ({"cfg_weight": float("nan")}, r"cfg weight must be a finite number \(got nan\)"),
        ({"cfg_weight": float("inf")}, r"cfg weight must be a finite number \(got inf\)"),
        ({"num_steps": 1001}, r"steps must be at most 1000 \(got 1001\)"),
        ({"num_steps": 2.0}, "steps must be an integer"),
        ({"n_images": 0}, "n_images must be at least 1"),
        ({"n_images": 10**20}, "n_images must be at most 64"),
        ({"width": 2**70}, "width must be at most 8192"),
        ({"text": ["a", "b", "c"], "n_images": 22}, "3 prompts x 22 images is 66 images"),
    ],
)
def test_generate_latents_bad_arguments(sd, kwargs, message):
    kwargs = {"text": "a cat", **kwargs}
    with pytest.raises(ValueError, match=message):
        sd.generate_latents(**kwargs)


def test_size_whose_unet_activations_do_not_fit_is_refused(sd, monkeypatch):
    """Refused before any work by what the UNet's activations take, not by its attention's
    score matrix (computed in blocks): a size whose scores alone exceed the memory runs."""
    side, batch = 1024, 2  # CFG: two images per UNet call
    needed = pipeline.unet_activation_bytes(sd.unet.config, 8, side, side, batch)
    heads = max(sd.unet.config.heads_per_block)
    assert batch * heads * ((side // 8) ** 2) ** 2 * 4 > 100 * needed
    monkeypatch.setattr(pipeline, "memory_size", lambda: needed - 1)
    message = (
        rf"1024x1024 with 2 image\(s\) per UNet call needs about {needed / 2**30:.1f} GiB "
        r"for the UNet's activations alone; this machine has .* GiB. Use a smaller size"
    )
    with pytest.raises(ValueError, match=message):
        sd.generate_latents("a cat", cfg_weight=7.5, width=side, height=side)
    monkeypatch.setattr(pipeline, "memory_size", lambda: needed)
    denoising = sd.generate_latents("a cat", cfg_weight=7.5, width=side, height=side)
    assert denoising.settings.width == side  # accepted, nothing computed yet


def test_largest_seed_is_taken(sd):
    latents = sd.generate_latents("a cat", num_steps=1, seed=2**64 - 1)
    assert latents.settings.seed == 2**64 - 1
    for x in latents:
        mx.eval(x)


@pytest.mark.parametrize("strength", [-0.1, 1.01, float("nan")])
def test_strength_outside_unit_interval(sd, strength):
    image = np.zeros((64, 64, 3), np.float32)
    with pytest.raises(ValueError, match=r"strength must be (between 0 and 1|a finite number)"):
        sd.generate_latents_from_image(image, "a cat", strength=strength)


def test_image_size_not_a_multiple(sd):
    image = np.zeros((60, 64, 3), np.float32)
    with pytest.raises(ValueError, match="height 60 is not a positive multiple of 8"):
        sd.generate_latents_from_image(image, "a cat", strength=0.5)


# -- non-finite results ---------------------------------------------------------------------


def test_non_finite_latents_are_refused_before_decoding(sd):
    latents = mx.full((1, 8, 8, 4), float("nan"))
    with pytest.raises(NonFiniteError, match="the denoised latents hold NaN or infinite") as e:
        sd.decode(latents)
    message = str(e.value)
    assert "CFG weight far too large" in message and "NaN or infinite values (a damaged" in message
    assert "float16" not in message  # a float32 model cannot overflow float16


def test_overflowing_denoising_is_caught_at_decoding(sd):
    # Initial noise of 1e38: the first step's arithmetic overflows float32.
    denoising = sd.generate_latents(
        "a cat", num_steps=2, cfg_weight=7.5, seed=0, latents=mx.full((1, 8, 8, 4), 1e38)
    )
    for x in denoising:
        mx.eval(x)
    assert not mx.isfinite(x).all().item()
    with pytest.raises(NonFiniteError, match="the denoised latents"):
        sd.decode(x)


def test_non_finite_images_name_float16(tmp_path):
    """A VAE whose weights overflow: the latents are fine, the images are not; in float16
    the message names float16 and its fix first."""
    model = copy_model(tmp_path, "tiny-sd2")
    poison(model / "vae" / "diffusion_pytorch_model.safetensors", "decoder.conv_out.bias")
    sd = StableDiffusion(str(model), float16=True)
    latents = mx.zeros((1, 8, 8, 4))
    with pytest.raises(NonFiniteError, match="the decoded images hold NaN") as e:
        sd.decode(latents)
    assert "float16 overflowing (load the model in float32: float16=False, --no-float16" in str(
        e.value
    )


def test_finiteness_check_costs_little_next_to_a_step(sd):
    """The check (one reduction over the latents, one over the images) against one UNet
    step of the tiny model, whose steps are far cheaper than a real model's: medians of 20
    runs, the check under 10% of a step."""
    x = mx.random.normal((1, 8, 8, 4))
    images = mx.random.uniform(shape=(1, 64, 64, 3))
    context = mx.zeros((2, 77, sd.text_encoders[0].config.hidden_size))
    mx.eval(x, images, context)

    def step():
        mx.eval(sd.unet(mx.concatenate([x, x]), mx.array([500.0]), context))

    def check():
        sd._check_finite(x, "latents")
        sd._check_finite(images, "images")

    step_seconds, check_seconds = median_seconds(step), median_seconds(check)
    assert check_seconds < 0.1 * step_seconds, (check_seconds, step_seconds)


def median_seconds(run, repeats: int = 20) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_model(tmp_path: Path, name: str) -> Path:
    model = tmp_path / name
    shutil.copytree(FIXTURES / "models" / name, model)
    return model


def poison(path: Path, key: str, value: float = float("nan")) -> None:
    """Set every value of the weight `key` in the safetensors file `path` to `value`."""
    weights = mx.load(str(path))
    weights[key] = mx.full(weights[key].shape, value, dtype=weights[key].dtype)
    mx.save_safetensors(str(path), weights)
