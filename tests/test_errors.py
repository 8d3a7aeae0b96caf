"""Bad input to the Python API: a clear ValueError/FileNotFoundError naming the
problem and the fix, raised at the call, before anything is computed."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion import StableDiffusion
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
    import shutil

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
        ({"height": 0}, "height 0 is not a positive multiple of 8"),
        ({"width": 16384, "height": 16384}, "for attention alone; this machine has"),
        ({"sampler": "nope"}, "Unknown sampler 'nope'"),
        ({"latents": mx.zeros((1, 4, 4, 4))}, "initial latents have shape"),
    ],
)
def test_generate_latents_bad_arguments(sd, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sd.generate_latents("a cat", **kwargs)


@pytest.mark.parametrize("strength", [-0.1, 1.01])
def test_strength_outside_unit_interval(sd, strength):
    image = np.zeros((64, 64, 3), np.float32)
    with pytest.raises(ValueError, match="strength must be between 0 and 1"):
        sd.generate_latents_from_image(image, "a cat", strength=strength)


def test_image_size_not_a_multiple(sd):
    image = np.zeros((60, 64, 3), np.float32)
    with pytest.raises(ValueError, match="height 60 is not a positive multiple of 8"):
        sd.generate_latents_from_image(image, "a cat", strength=0.5)
