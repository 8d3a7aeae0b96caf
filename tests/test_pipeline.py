"""End-to-end parity of txt2img and img2img with the diffusers pipelines on the
tiny models, with the same initial noise and the Euler sampler (fixtures written
by tests/reference/tiny_models.py).

Tolerance, float32: every pixel within 2e-4 of the reference (pixels in [0, 1];
one 8-bit level is 3.9e-3)."""

from __future__ import annotations

import dataclasses
import gc

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from stable_diffusion import StableDiffusion, fast_cpu
from stable_diffusion.models import layers
from tests.helpers import FIXTURES, PIXEL_TOLERANCE, final
from tests.reference.inputs import NEGATIVE_PROMPTS, PROMPTS

MODELS = ["tiny-sd1", "tiny-sd2", "tiny-sdxl"]


def nhwc(x: np.ndarray) -> mx.array:
    return mx.array(x.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    sd = StableDiffusion(str(FIXTURES / "models" / request.param), float16=False)
    return sd, dict(np.load(FIXTURES / "reference" / f"{request.param}.npz"))


@pytest.mark.parametrize("cfg", [0.0, 7.5])
def test_txt2img_matches_diffusers(model, cfg):
    sd, ref = model
    latents = sd.generate_latents(
        PROMPTS,
        negative_text=NEGATIVE_PROMPTS,
        num_steps=4,
        cfg_weight=cfg,
        sampler="euler",
        latents=nhwc(ref["txt2img.noise"]),
    )
    images = np.array(sd.decode(final(latents)))
    np.testing.assert_allclose(images, ref[f"txt2img.cfg{cfg}"], atol=PIXEL_TOLERANCE, rtol=0)


@pytest.mark.parametrize("strength", [0.5, 0.75])
def test_img2img_matches_diffusers(model, strength):
    sd, ref = model
    latents = sd.generate_latents_from_image(
        ref["img2img.image"].astype(np.float32) / 255,
        PROMPTS,
        strength=strength,
        negative_text=NEGATIVE_PROMPTS,
        num_steps=4,
        cfg_weight=7.5,
        sampler="euler",
        noise=nhwc(ref["img2img.noise"]),
    )
    images = np.array(sd.decode(final(latents)))
    expected = ref[f"img2img.strength{strength}"]
    np.testing.assert_allclose(images, expected, atol=PIXEL_TOLERANCE, rtol=0)


def test_steps_in_fast_cpu_project_the_text_context_once(model, monkeypatch):
    """As the scripts run (within `fast_cpu()`), only the first two steps project the text
    context (77 tokens) to keys and values (`store.kept` keeps the second projection); the
    image still matches diffusers."""
    sd, ref = model
    context_projections = []
    linear_call = layers.Linear.__call__

    def counted(self, x):
        if x.shape[-2] == ref["unet.context"].shape[-2]:
            context_projections.append(self)
        return linear_call(self, x)

    monkeypatch.setattr(layers.Linear, "__call__", counted)
    latents = sd.generate_latents(
        PROMPTS,
        negative_text=NEGATIVE_PROMPTS,
        num_steps=4,
        cfg_weight=7.5,
        sampler="euler",
        latents=nhwc(ref["txt2img.noise"]),
    )
    latents.compute_conditioning()
    per_step = []
    with mx.stream(mx.cpu), fast_cpu():
        for x in latents:
            mx.eval(x)
            per_step.append(len(context_projections))
            context_projections.clear()
        images = np.array(sd.decode(x))
    assert per_step[0] >= per_step[1] > 0
    assert per_step[2:] == [0, 0]
    np.testing.assert_allclose(images, ref["txt2img.cfg7.5"], atol=PIXEL_TOLERANCE, rtol=0)


def test_generate_latents_is_lazy_and_yields_each_step(model):
    sd, _ = model
    steps = list(sd.generate_latents("a cat", num_steps=3, seed=0))
    assert len(steps) == 3
    assert all(isinstance(x, mx.array) for x in steps)


def test_same_seed_same_image_and_seed_zero_is_a_seed(model):
    sd, _ = model

    def run(seed):
        return np.array(final(sd.generate_latents("a cat", num_steps=2, seed=seed)))

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))


def test_low_strength_still_runs_a_step(model):
    sd, ref = model
    image = ref["img2img.image"].astype(np.float32) / 255
    latents = list(
        sd.generate_latents_from_image(image, "a cat", strength=0.05, num_steps=10, seed=0)
    )
    assert len(latents) == 1


@pytest.mark.parametrize("name", MODELS)
def test_text_encoders_can_go_before_the_first_step(name):
    """As the scripts run: conditioning computed, text encoders released (their memory
    with them), then the steps; the same latents as computing everything with the first
    step."""
    folder = str(FIXTURES / "models" / name)
    kept = StableDiffusion(folder, float16=False)
    expected = np.array(final(kept.generate_latents("a cat", num_steps=2, cfg_weight=5.0, seed=3)))
    sd = StableDiffusion(folder, float16=False)
    sd.preload()
    encoder_bytes = sum(v.nbytes for e in sd.text_encoders for _, v in tree_flatten(e.parameters()))
    latents = sd.generate_latents("a cat", num_steps=2, cfg_weight=5.0, seed=3)
    before = mx.get_active_memory()
    latents.compute_conditioning()
    sd.release_text_encoders()
    gc.collect()
    assert mx.get_active_memory() < before - 0.9 * encoder_bytes
    np.testing.assert_array_equal(np.array(final(latents)), expected)


def test_loaded_weights_are_contiguous(model):
    # Convolution weights are mapped from OIHW by a transpose; left as a strided view, every
    # convolution would copy its weight again.
    sd, _ = model
    modules = [*sd.text_encoders, sd.unet, sd.vae]
    for name, value in (item for m in modules for item in tree_flatten(m.parameters())):
        assert memoryview(value).c_contiguous, name


def test_denoising_carries_the_settings_it_runs_with(model):
    """Defaults filled in from the model, the seed drawn when none is given; the settings
    are frozen, and the PNG parameters come from them."""
    sd, _ = model
    latents = sd.generate_latents("a cat", n_images=2, negative_text="blurry", num_steps=3)
    settings = latents.settings
    assert settings.prompts == ("a cat", "a cat")
    assert settings.negative_prompts == ("blurry", "blurry")
    assert (settings.steps, settings.cfg, settings.sampler) == (
        3,
        sd.defaults.cfg,
        sd.defaults.sampler,
    )
    assert (settings.width, settings.height) == (sd.defaults.width, sd.defaults.height)
    assert 0 <= settings.seed < 2**31 and settings.strength is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 1
    parameters = settings.parameters(model="m", loras=(("detail", 0.5),))
    assert (parameters.prompt, parameters.negative_prompt, parameters.seed) == (
        "a cat",
        "blurry",
        settings.seed,
    )
    assert (parameters.model, parameters.loras, parameters.strength) == (
        "m",
        (("detail", 0.5),),
        None,
    )
    # The seed drawn reproduces the run.
    again = sd.generate_latents(
        "a cat", n_images=2, negative_text="blurry", num_steps=3, seed=settings.seed
    )
    np.testing.assert_array_equal(np.array(final(latents)), np.array(final(again)))


def test_img2img_settings_record_strength_and_the_image_size(model):
    sd, ref = model
    image = ref["img2img.image"].astype(np.float32) / 255
    settings = sd.generate_latents_from_image(image, "a cat", strength=0.25, seed=4).settings
    assert (settings.strength, settings.seed) == (0.25, 4)
    assert (settings.height, settings.width) == image.shape[-3:-1]
    assert settings.parameters().strength == 0.25


def test_parameters_hold_one_prompt(model):
    sd, _ = model
    settings = sd.generate_latents(["a cat", "a dog"], num_steps=1, seed=0).settings
    with pytest.raises(ValueError, match="one prompt and one negative prompt"):
        settings.parameters()
