"""Sizes whose latent does not divide by the UNet's total downsampling (72x88: 9x11
latents on UNets that downsample by 2 and 4): txt2img and img2img against diffusers
(fixtures written by tests/reference/odd_sizes.py), plain and within `fast_cpu()` (with
oneDNN's float32 too).

Tolerance, float32: every pixel within 2e-4 of the reference."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion import StableDiffusion, fast_cpu
from tests.helpers import FIXTURES
from tests.reference.inputs import (
    ODD_HEIGHT,
    ODD_IMG2IMG_STRENGTH,
    ODD_NEGATIVE_PROMPT,
    ODD_PROMPT,
    ODD_STEPS,
    ODD_WIDTH,
)

PIXEL_TOLERANCE = 2e-4
REFERENCE = dict(np.load(FIXTURES / "reference" / "odd_sizes.npz"))


def nhwc(x: np.ndarray) -> mx.array:
    return mx.array(x.transpose(0, 2, 3, 1))


def final(latents) -> mx.array:
    for x in latents:
        mx.eval(x)
    return x


@pytest.mark.parametrize(
    "fast", [False, True, "onednn"], ids=["plain", "fast_cpu", "fast_cpu_onednn_float32"]
)
@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_odd_latent_sizes_match_diffusers(model, fast, winograd_everywhere, request):
    ran_in_onednn = request.getfixturevalue("onednn_float32") if fast == "onednn" else []
    sd = StableDiffusion(str(FIXTURES / "models" / model), float16=False)
    common = dict(
        negative_text=ODD_NEGATIVE_PROMPT, num_steps=ODD_STEPS, cfg_weight=7.5, sampler="euler"
    )
    with fast_cpu() if fast else mx.stream(mx.cpu):
        txt2img = sd.generate_latents(
            ODD_PROMPT,
            width=ODD_WIDTH,
            height=ODD_HEIGHT,
            latents=nhwc(REFERENCE["noise"]),
            **common,
        )
        images = np.array(sd.decode(final(txt2img)))
        img2img = sd.generate_latents_from_image(
            REFERENCE["image"].astype(np.float32) / 255,
            ODD_PROMPT,
            strength=ODD_IMG2IMG_STRENGTH,
            noise=nhwc(REFERENCE["img2img_noise"]),
            **common,
        )
        from_image = np.array(sd.decode(final(img2img)))
    np.testing.assert_allclose(images, REFERENCE[f"{model}.txt2img"], atol=PIXEL_TOLERANCE, rtol=0)
    np.testing.assert_allclose(
        from_image, REFERENCE[f"{model}.img2img"], atol=PIXEL_TOLERANCE, rtol=0
    )
    assert bool(winograd_everywhere) == bool(fast)
    assert bool(ran_in_onednn) == (fast == "onednn")
