"""The tiny autoencoder (TAESD) against diffusers' AutoencoderTiny, on a random-weight
TAESD at the real architecture and config (fixtures written by
tests/reference/tiny_autoencoder.py).

Tolerance, float32: max |ours - reference| <= 1e-4 * max |reference| (+ 1e-5 absolute);
pixels in [0, 1]: 2e-4."""

from __future__ import annotations

import json

import huggingface_hub.constants
import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion import loading
from stable_diffusion.config import TinyAutoencoderConfig
from stable_diffusion.hub import ModelNotFoundError, resolve_component
from tests.conftest import FIXTURES
from tests.test_models import assert_close, nchw, nhwc

TAESD = FIXTURES / "models" / "taesd"


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "reference" / "tiny_autoencoder.npz"))


@pytest.fixture(scope="module")
def taesd():
    return loading.load_tiny_autoencoder(TAESD, mx.float32)


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
        loading.load_tiny_autoencoder(tmp_path, mx.float32)


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
