"""End-to-end parity for every deterministic sampler: whole txt2img runs (and an
img2img run with DPM++ 2M Karras) against the diffusers pipelines with the
matching scheduler, same noise (tests/reference/sampler_pipelines.py); and txt2img
on tiny models that carry a hub repo's scheduler config, keys missing as there.
Tolerance: every pixel within 2e-4 (pixels in [0, 1])."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion import StableDiffusion
from tests.helpers import FIXTURES
from tests.reference.inputs import (
    DETERMINISTIC_SAMPLERS,
    HUB_CONFIG_MODELS,
    HUB_CONFIG_SAMPLERS,
    SAMPLER_IMG2IMG_STRENGTH,
    SAMPLER_NEGATIVE_PROMPT,
    SAMPLER_PROMPT,
    SAMPLER_STEPS,
    with_hub_scheduler,
)

REFERENCE = dict(np.load(FIXTURES / "reference" / "sampler_pipelines.npz"))
PIXEL_TOLERANCE = 2e-4


def nhwc(x: np.ndarray) -> mx.array:
    return mx.array(x.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module", params=["tiny-sd2", "tiny-sdxl"])
def model(request):
    return request.param, StableDiffusion(str(FIXTURES / "models" / request.param), float16=False)


def images(sd: StableDiffusion, latents) -> np.ndarray:
    for x in latents:
        mx.eval(x)
    return np.array(sd.decode(x))


@pytest.mark.parametrize("sampler", DETERMINISTIC_SAMPLERS)
def test_txt2img_matches_diffusers(model, sampler):
    name, sd = model
    latents = sd.generate_latents(
        SAMPLER_PROMPT,
        negative_text=SAMPLER_NEGATIVE_PROMPT,
        num_steps=SAMPLER_STEPS,
        cfg_weight=7.5,
        sampler=sampler,
        latents=nhwc(REFERENCE["noise"]),
    )
    expected = REFERENCE[f"{name}.{sampler}.txt2img"]
    np.testing.assert_allclose(images(sd, latents), expected, atol=PIXEL_TOLERANCE, rtol=0)


def test_img2img_matches_diffusers(model):
    name, sd = model
    latents = sd.generate_latents_from_image(
        REFERENCE["image"].astype(np.float32) / 255,
        SAMPLER_PROMPT,
        strength=SAMPLER_IMG2IMG_STRENGTH,
        negative_text=SAMPLER_NEGATIVE_PROMPT,
        num_steps=SAMPLER_STEPS,
        cfg_weight=7.5,
        sampler="dpm++2m_karras",
        noise=nhwc(REFERENCE["img2img_noise"]),
    )
    expected = REFERENCE[f"{name}.dpm++2m_karras.img2img"]
    np.testing.assert_allclose(images(sd, latents), expected, atol=PIXEL_TOLERANCE, rtol=0)


@pytest.fixture(scope="module", params=list(HUB_CONFIG_MODELS))
def hub_config_model(request, tmp_path_factory):
    folder = with_hub_scheduler(request.param, tmp_path_factory.mktemp("hub_config"))
    return request.param, StableDiffusion(str(folder), float16=False)


@pytest.mark.parametrize("sampler", HUB_CONFIG_SAMPLERS)
def test_hub_scheduler_configs_resolve_as_diffusers(hub_config_model, sampler):
    # SD 1.5's and SD 2.1's files have no timestep_spacing: Euler, Heun and DPM++ 2M
    # take their class's "linspace", DDIM its "leading".
    name, sd = hub_config_model
    latents = sd.generate_latents(
        SAMPLER_PROMPT,
        negative_text=SAMPLER_NEGATIVE_PROMPT,
        num_steps=SAMPLER_STEPS,
        cfg_weight=7.5,
        sampler=sampler,
        latents=nhwc(REFERENCE["noise"]),
    )
    expected = REFERENCE[f"{name}.hub_config.{sampler}.txt2img"]
    np.testing.assert_allclose(images(sd, latents), expected, atol=PIXEL_TOLERANCE, rtol=0)
