"""Models named by hub repo id resolve through huggingface_hub's cache: offline
here, with the tiny model placed in a cache laid out as the hub client lays it."""

from __future__ import annotations

import shutil

import huggingface_hub.constants
import pytest

from stable_diffusion import StableDiffusion
from stable_diffusion.loading.hub import ModelNotFoundError, resolve_model, weight_files
from tests.helpers import FIXTURES

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--tiny--sd2"
    shutil.copytree(FIXTURES / "models" / "tiny-sd2", repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    # The hub client reads these variables once, at import: set both.
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / REVISION


def test_repo_id_loads_from_the_cache_offline(hub_cache):
    assert resolve_model("tiny/sd2") == hub_cache
    sd = StableDiffusion("tiny/sd2", float16=False)
    assert sd.components.path == hub_cache


def test_uncached_repo_offline_names_the_fix(hub_cache):
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set"):
        resolve_model("tiny/not-there")


def test_float16_variant_preferred_when_present(tmp_path):
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert weight_files(tmp_path, prefer_float16=True)[0].name.endswith(".fp16.safetensors")
    assert weight_files(tmp_path, prefer_float16=False)[0].name == (
        "diffusion_pytorch_model.safetensors"
    )


def test_sharded_weights_in_order(tmp_path):
    names = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (2, 1)]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in weight_files(tmp_path, False)] == sorted(names)


def test_folder_without_safetensors_says_so(tmp_path):
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"found: diffusion_pytorch_model\.bin"):
        weight_files(tmp_path, False)
