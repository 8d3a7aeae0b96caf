"""The `sd-turbo` alias: stabilityai/sd-turbo with its own scheduler config, one step
without guidance, resolved offline from a hub cache holding the tiny SD 2.x model
under that repo's name."""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants
import pytest

from stable_diffusion import StableDiffusion
from stable_diffusion.samplers import make_sampler
from tests.helpers import FIXTURES

REVISION = "0123456789abcdef0123456789abcdef01234567"

# stabilityai/sd-turbo's scheduler/scheduler_config.json as the hub ships it.
SD_TURBO_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.24.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


@pytest.fixture
def sd_turbo_cache(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--stabilityai--sd-turbo"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(FIXTURES / "models" / "tiny-sd2", snapshot)
    (snapshot / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_TURBO_SCHEDULER))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_sd_turbo_alias_defaults_to_one_step_without_guidance(sd_turbo_cache):
    sd = StableDiffusion("sd-turbo", float16=False)
    assert sd.components.path == sd_turbo_cache
    assert (sd.defaults.steps, sd.defaults.cfg, sd.defaults.sampler) == (1, 0.0, "euler")
    # Trailing spacing: the one step starts from pure noise, at diffusers' timestep 999
    # (np.round(np.arange(1000, 0, -1000)) - 1); leading spacing would give timestep 1.
    run = make_sampler(sd.defaults.sampler, sd.components.scheduler_config).start(sd.defaults.steps)
    assert run.timesteps == [999.0]
