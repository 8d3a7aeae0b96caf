"""The tiny autoencoder (TAESD) against diffusers' AutoencoderTiny, on a random-weight
TAESD at the real architecture and config (fixtures written by
tests/reference/tiny_autoencoder.py).

Tolerance, float32: max |ours - reference| <= 1e-4 * max |reference| (+ 1e-5 absolute);
pixels in [0, 1]: 2e-4."""

from __future__ import annotations

import argparse
import json

import huggingface_hub.constants
import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from stable_diffusion import StableDiffusion, fast_cpu
from stable_diffusion.cli import apply_saved_parameters, write_preview
from stable_diffusion.config import TinyAutoencoderConfig
from stable_diffusion.images import read_parameters
from stable_diffusion.loading.folder import load_tiny_autoencoder
from stable_diffusion.loading.hub import ModelNotFoundError, resolve_component
from stable_diffusion.parameters import GenerationParameters
from tests.helpers import FIXTURES, PIXEL_TOLERANCE, assert_close, final, nchw, nhwc, run
from tests.reference.inputs import NEGATIVE_PROMPTS, PROMPTS

TAESD = FIXTURES / "models" / "taesd"


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "reference" / "tiny_autoencoder.npz"))


@pytest.fixture(scope="module")
def taesd():
    return load_tiny_autoencoder(TAESD, mx.float32)


def test_config_is_the_real_one():
    values = json.loads((TAESD / "config.json").read_text())
    assert values["_class_name"] == "AutoencoderTiny"
    config = TinyAutoencoderConfig.from_dict(values)
    assert config == TinyAutoencoderConfig()  # the defaults are TAESD's


def test_encoder_matches_diffusers(taesd, ref):
    assert_close(mx.array(nchw(taesd.encode(nhwc(ref["images"])))), ref["encoded"])


def test_decoder_matches_diffusers(taesd, ref):
    assert_close(mx.array(nchw(taesd.decode(nhwc(ref["latents"])))), ref["decoded"])


def test_unsupported_activation_is_refused():
    with pytest.raises(ValueError, match="act_fn 'gelu'"):
        TinyAutoencoderConfig.from_dict({"act_fn": "gelu"})


def test_weights_of_another_architecture_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_decoder_blocks": [3, 3, 3, 2]}))
    (tmp_path / "diffusion_pytorch_model.safetensors").symlink_to(
        TAESD / "diffusion_pytorch_model.safetensors"
    )
    with pytest.raises(ValueError, match="missing: decoder"):
        load_tiny_autoencoder(tmp_path, mx.float32)


def test_component_folder_resolves_to_itself():
    assert resolve_component(str(TAESD)) == TAESD


def test_uncached_component_offline_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match=r"HF_HUB_OFFLINE is set.*--vae"):
        resolve_component("madebyollin/taesd")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        resolve_component(str(tmp_path))


@pytest.fixture(scope="module")
def sd_tiny():
    return StableDiffusion(str(FIXTURES / "models" / "tiny-sd1"), float16=False, decoder=str(TAESD))


def test_txt2img_with_the_tiny_decoder_matches_diffusers(sd_tiny, ref):
    """diffusers' pipeline with `pipe.vae = AutoencoderTiny(...)`, same noise, Euler."""
    latents = sd_tiny.generate_latents(
        PROMPTS,
        negative_text=NEGATIVE_PROMPTS,
        num_steps=4,
        cfg_weight=7.5,
        sampler="euler",
        latents=nhwc(ref["txt2img.noise"]),
    )
    images = np.array(sd_tiny.decode(final(latents)))
    np.testing.assert_allclose(images, ref["txt2img"], atol=PIXEL_TOLERANCE, rtol=0)
    assert sd_tiny.vae_name == "taesd"


def test_preview_is_the_tiny_decoding_when_loaded(sd_tiny, ref):
    latents = nhwc(ref["latents"])
    preview = sd_tiny.preview(latents)
    assert preview.dtype == np.uint8 and preview.shape == (2, 64, 64, 3)
    expected = np.round(np.array(sd_tiny.decode(latents)) * 255)
    np.testing.assert_array_equal(preview, expected)


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_cheap_preview_is_comfyuis_latent_to_rgb_map(model):
    """Without the tiny decoder: ComfyUI's latent_rgb_factors (comfy/latent_formats.py),
    each latent shown as an 8x8 block."""
    sd = StableDiffusion(str(FIXTURES / "models" / model), float16=False)
    # One latent per channel direction; rows of the published tables (SD15 / SDXL).
    latents = mx.array(np.eye(4, dtype=np.float32).reshape(1, 2, 2, 4))
    factors = {
        "tiny-sd1": ([0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [0, 0, 0]),
        "tiny-sdxl": (
            [0.3651, 0.4232, 0.4341],
            [-0.2533, -0.0042, 0.1068],
            [0.1084, -0.0175, -0.0011],
        ),
    }[model]
    first, second, bias = (np.array(f) for f in factors)
    preview = sd.preview(latents)
    assert preview.shape == (1, 16, 16, 3)
    # The top-left latent is channel 0's unit vector, its right neighbour channel 1's.
    for block, expected in (
        (preview[0, :8, :8], first + bias),
        (preview[0, :8, 8:], second + bias),
    ):
        assert (block == np.round((expected + 1) / 2 * 255)).all()


def test_txt2image_with_tiny_decoder_and_previews(tmp_path):
    output = tmp_path / "out.png"
    result = run(
        "txt2image.py",
        "a cat",
        "--model",
        str(FIXTURES / "models" / "tiny-sd1"),
        "--vae",
        str(TAESD),
        "--steps",
        "2",
        "--preview",
        "1",
        "--seed",
        "3",
        "--output",
        str(output),
    )
    assert result.returncode == 0, result.stderr
    assert "Denoising (preview every 1 steps: out.preview.png)" in result.stderr
    assert ("VAE", "taesd") in read_parameters(output).extras
    # The last preview is of the final latents, by the same decoder: the image itself.
    with Image.open(output) as image, Image.open(tmp_path / "out.preview.png") as preview:
        np.testing.assert_array_equal(np.array(preview), np.array(image))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "out.preview.png"]


def test_bad_preview_interval_is_refused(tmp_path):
    result = run("txt2image.py", "a cat", "--preview", "0", "--output", str(tmp_path / "o.png"))
    assert result.returncode == 2 and "--preview must be at least 1" in result.stderr


def test_by_winograd_matches_diffusers(taesd, ref, winograd_everywhere):
    """Every 3x3 convolution by Winograd within `fast_cpu()`, as the scripts decode."""
    with mx.stream(mx.cpu), fast_cpu():
        decoded = taesd.decode(nhwc(ref["latents"]))
        encoded = taesd.encode(nhwc(ref["images"]))
        mx.eval(decoded, encoded)
    assert winograd_everywhere
    assert_close(mx.array(nchw(decoded)), ref["decoded"])
    assert_close(mx.array(nchw(encoded)), ref["encoded"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"latent_channels": "4"}, "latent_channels must be a positive integer"),
        ({"latent_channels": True}, "latent_channels must be a positive integer"),
        ({"num_decoder_blocks": [3, -1, 3, 1]}, "num_decoder_blocks must be positive integers"),
        ({"encoder_block_out_channels": []}, "encoder_block_out_channels must be positive"),
        ({"scaling_factor": "1"}, "scaling_factor must be positive"),
        ({"num_encoder_blocks": [1, 3, 3]}, "encoder channels and blocks differ in length"),
    ],
)
def test_hostile_configs_are_refused_with_the_field_named(values, message):
    with pytest.raises(ValueError, match=message):
        TinyAutoencoderConfig.from_dict(values)


def test_tiny_autoencoder_for_other_latents_is_refused(tmp_path):
    """E.g. SD3's TAESD (16 channels) with an SD model: refused when loading, not after
    the denoising."""
    config = json.loads((TAESD / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "latent_channels": 16}))
    weights = mx.load(str(TAESD / "diffusion_pytorch_model.safetensors"))
    for key in ("encoder.layers.14.weight", "decoder.layers.0.weight"):
        shape = list(weights[key].shape)
        shape[0 if key.startswith("encoder") else 1] = 16
        weights[key] = mx.zeros(shape, dtype=weights[key].dtype)
    weights["encoder.layers.14.bias"] = mx.zeros((16,), dtype=mx.float16)
    mx.save_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), weights)
    with pytest.raises(ValueError, match="takes 16-channel latents, this model makes 4"):
        StableDiffusion(str(FIXTURES / "models" / "tiny-sd1"), decoder=str(tmp_path))


def test_missing_vae_folder_is_a_clear_cli_error(tmp_path):
    result = run(
        "txt2image.py",
        "a cat",
        "--model",
        str(FIXTURES / "models" / "tiny-sd1"),
        "--vae",
        str(tmp_path / "nowhere"),
        "--output",
        str(tmp_path / "o.png"),
    )
    assert result.returncode == 2 and "no such component folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_rerun_from_an_image_keeps_the_tiny_decoder():
    args = argparse.Namespace(vae=None, prompt=None, use_saved_model=False, model=None, lora=[])
    saved = GenerationParameters(
        prompt="a cat",
        steps=1,
        sampler="euler",
        cfg_scale=0,
        seed=1,
        width=64,
        height=64,
        extras={"VAE": "taesd"},
    )
    apply_saved_parameters(args, saved)
    assert args.vae == "taesd"


def test_unwritable_preview_is_reported_and_leaves_no_file(sd_tiny, tmp_path, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    write_preview(sd_tiny, mx.zeros((1, 8, 8, 4)), tmp_path / "out.preview.png", 1)
    assert "No space left on device" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
