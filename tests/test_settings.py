"""`settings.check_arguments`: the one range check of the Python API, the scripts and the
HTTP server, each naming the arguments its own way."""

from __future__ import annotations

import numpy as np
import pytest

from stable_diffusion.settings import API_NAMES, MAX_SEED, check_arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": "30"}, "steps must be an integer (got '30')"),
        ({"steps": True}, "steps must be an integer (got True)"),
        ({"cfg": "7.5"}, "cfg weight must be a number (got '7.5')"),
        ({"cfg": -0.5}, "cfg weight must be >= 0 (got -0.5)"),
        ({"strength": float("inf")}, "strength must be a finite number (got inf)"),
        ({"seed": MAX_SEED + 1}, f"seed must be at most {MAX_SEED}"),
        ({"decoding_batch_size": 65}, "decoding batch size must be at most 64 (got 65)"),
        ({"n_images": 2, "n_prompts": 40}, "40 prompts x 2 images is 80 images"),
        ({"width": 8200}, "width must be at most 8192 (got 8200)"),
        ({"height": 60}, "height 60 is not a positive multiple of 8; use 56 or 64"),
        ({"width": 96, "multiple": 64}, "width 96 is not a positive multiple of 64"),
    ],
)
def test_out_of_range(kwargs, message):
    with pytest.raises(ValueError) as error:
        check_arguments(**kwargs)
    assert message in str(error.value)


def test_in_range_and_numpy_numbers_pass():
    check_arguments(
        n_images=np.int64(64),
        steps=1000,
        cfg=np.float32(30.0),
        seed=MAX_SEED - 63,  # the last of the 64 images' seeds is MAX_SEED
        width=8192,
        height=64,
        strength=0.0,
        decoding_batch_size=64,
    )


def test_every_images_seed_must_fit():
    check_arguments(n_images=3, seed=MAX_SEED - 2)
    with pytest.raises(ValueError, match=f"seed must be at most {MAX_SEED - 2}"):
        check_arguments(n_images=3, seed=MAX_SEED - 1)


def test_arguments_are_named_as_the_caller_spells_them():
    names = {**API_NAMES, "steps": "num_inference_steps", "cfg": "guidance_scale"}
    with pytest.raises(ValueError, match="num_inference_steps must be at least 1"):
        check_arguments(steps=0, names=names)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        check_arguments(cfg=float("nan"), names=names)
