"""The samplers against diffusers' schedulers.

tests/reference/schedulers.py drove each diffusers scheduler with a fake model and
recorded the timesteps, sigmas and latents in tests/fixtures/samplers; here the same
fake model drives our samplers. Tolerances: timesteps equal to float32 precision
(relative 1e-6); sigmas within relative 1e-5 (diffusers' float32 betas come from
torch.linspace, which rounds a few of them differently from numpy); latents within
relative error 1e-4 of the largest reference magnitude of that step (both sides compute
in float32, in different orders).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion.config import SchedulerConfig
from stable_diffusion.samplers import (
    SAMPLERS,
    a1111_names,
    a1111_samplers,
    a1111_schedulers,
    join_name,
    make_sampler,
    sampler_from_a1111,
    sampler_names,
)

FIXTURES = Path(__file__).parent / "fixtures" / "samplers"
INDEX = json.loads((FIXTURES / "cases.json").read_text())
with np.load(FIXTURES / "arrays.npz") as _arrays:
    ARRAYS = dict(_arrays.items())
NOISE = mx.array(ARRAYS["noise"])

SD15 = SchedulerConfig.from_dict(INDEX["configs"]["sd15"])
LATENT_RTOL = 1e-4


def fake_model(x: mx.array, t: float) -> mx.array:
    """The stand-in UNet of tests/reference/schedulers.py (same formula)."""
    return mx.tanh(1.3 * x + 0.5 * math.sin(t / 123.0)) + 0.2 * math.cos(t / 71.0)


def assert_close(ours: mx.array, expected: np.ndarray, what: str) -> None:
    error = np.abs(np.array(ours) - expected).max() / np.abs(expected).max()
    assert error <= LATENT_RTOL, f"{what}: relative error {error:.2e}"


@pytest.mark.parametrize("case", INDEX["cases"], ids=lambda c: f"{c['sampler']}:{c['id']}")
def test_matches_diffusers(case: dict[str, Any]) -> None:
    config = SchedulerConfig.from_dict(INDEX["configs"][case["config"]])
    img2img = case["strength"] is not None
    run = make_sampler(case["sampler"], config).start(case["steps"], case["strength"] or 1.0)

    np.testing.assert_allclose(run.timesteps, case["timesteps"], rtol=1e-6, atol=0)
    rows = slice(case["at"], case["at"] + len(case["timesteps"]) + 1)
    sigmas = ARRAYS.get(f"{case['sampler']}/sigmas")
    if sigmas is not None:
        np.testing.assert_allclose(run.sigmas, sigmas[rows], rtol=1e-5, atol=0)
    expected = ARRAYS[f"{case['sampler']}/latents"][rows]

    x = run.noised_latents(NOISE[1], NOISE[0]) if img2img else run.initial_latents(NOISE[0])
    assert_close(x, expected[0], "starting latent")
    for i, t in enumerate(run.timesteps):
        model_output = fake_model(run.scale_model_input(x, i), t)
        x = run.step(model_output, x, i, noise=NOISE[2 + i] if run.stochastic else None)
        assert_close(x, expected[i + 1], f"after step {i} (t={t})")


def test_fixtures_cover_every_sampler_and_schedule_on_hub_configs() -> None:
    names = set(sampler_names())
    assert {"euler_a_karras", "heun_exponential", "dpm++2m_sde_karras", "lcm"} <= names
    for config in ("hub_sd15", "hub_sd21", "hub_sd21_base", "hub_sdxl", "hub_sdxl_turbo"):
        assert {c["sampler"] for c in INDEX["cases"] if c["config"] == config} == names


@pytest.mark.parametrize("name", SAMPLERS)
def test_defaults_are_the_diffusers_classes(name: str) -> None:
    # The keys a config lacks take these; cases.json recorded diffusers' signatures.
    class_name = {
        "euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
        "heun": "HeunDiscreteScheduler",
        "ddim": "DDIMScheduler",
        "dpm++2m": "DPMSolverMultistepScheduler",
        "dpm++2m_sde": "DPMSolverMultistepScheduler",
        "lcm": "LCMScheduler",
    }[name]
    theirs = INDEX["defaults"][class_name]
    if name in ("heun", "dpm++2m", "dpm++2m_sde"):
        # Not in their signatures, yet read from configs that have them (see
        # CONFIG_SIGMA_RANGE); the dpm_karras_sigma_min cases show it.
        theirs = {**theirs, "sigma_min": None, "sigma_max": None}
    fields = SchedulerConfig.__dataclass_fields__
    assert SAMPLERS[name].diffusers_defaults == {k: v for k, v in theirs.items() if k in fields}


def test_missing_keys_take_each_samplers_defaults() -> None:
    # SD 1.5's file has no timestep_spacing: diffusers' Euler spaces "linspace", DDIM
    # "leading" (the timesteps of test_matches_diffusers on hub_sd15 show the same).
    config = SchedulerConfig.from_dict(INDEX["configs"]["hub_sd15"])
    assert config.timestep_spacing is None
    assert make_sampler("euler", config).config.timestep_spacing == "linspace"
    assert make_sampler("ddim", config).config.timestep_spacing == "leading"
    assert make_sampler("euler", config).start(4).timesteps[0] == 999.0
    assert make_sampler("ddim", config).start(4).timesteps[0] == 751.0


def test_unknown_sampler_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"Unknown sampler 'plms'.*euler_a.*dpm\+\+2m_karras"):
        make_sampler("plms", SD15)
    with pytest.raises(ValueError, match=r"Unknown sampler 'ddim_karras'"):
        make_sampler("ddim_karras", SD15)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("num_steps", [0, -3, 2.5, True, 1001])
def test_start_rejects_bad_step_counts(name: str, num_steps: Any) -> None:
    with pytest.raises(ValueError, match="num_steps"):
        make_sampler(name, SD15).start(num_steps)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("strength", [0, 0.0, -0.2, 1.01, math.nan, math.inf])
def test_start_rejects_strength_outside_0_1(name: str, strength: float) -> None:
    with pytest.raises(ValueError, match=r"strength must be"):
        make_sampler(name, SD15).start(10, strength)


@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - {"lcm"}))
@pytest.mark.parametrize("strength", [1e-6, 0.01, 0.099])
def test_at_least_one_step_runs(name: str, strength: float) -> None:
    # diffusers would run no step here: int(10 * strength) == 0.
    run = make_sampler(name, SD15).start(10, strength)
    assert run.timesteps == make_sampler(name, SD15).start(10).timesteps[-1:]


def test_lcm_img2img_runs_one_step_per_grid_timestep_at_most() -> None:
    # LCM's grid holds the multiples of 20, minus 1; strength keeps its lower part, with
    # int(50 * strength) timesteps, where diffusers raises if fewer than the steps.
    lcm = make_sampler("lcm", SD15)
    assert lcm.start(10, 0.01).timesteps == [19.0]
    assert lcm.start(10, 0.099).timesteps == [79.0, 59.0, 39.0, 19.0]
    assert lcm.start(2, 0.099).timesteps == [79.0, 39.0]


@pytest.mark.parametrize("name", SAMPLERS)
def test_img2img_runs_the_tail_of_the_schedule(name: str) -> None:
    full = make_sampler(name, SD15).start(20).timesteps
    part = make_sampler(name, SD15).start(20, 0.45).timesteps
    if name == "lcm":
        # LCM runs all 20 steps, on the lower 45% of its timestep grid.
        assert len(part) == 20 and max(part) < 0.45 * 1000
    else:
        assert part == full[len(full) - len(part) :]
        assert len(part) == (2 * 9 - 1 if name == "heun" else 9)


@pytest.mark.parametrize("name", SAMPLERS)
def test_stochastic_steps_need_noise(name: str) -> None:
    run = make_sampler(name, SD15).start(4)
    x = run.initial_latents(NOISE[0])
    if run.stochastic:
        with pytest.raises(ValueError, match="noise"):
            run.step(fake_model(run.scale_model_input(x, 0), run.timesteps[0]), x, 0)
    else:
        run.step(fake_model(run.scale_model_input(x, 0), run.timesteps[0]), x, 0)


@pytest.mark.parametrize("name", SAMPLERS)
def test_steps_keep_the_latent_dtype(name: str) -> None:
    run = make_sampler(name, SD15).start(3)
    x = run.initial_latents(NOISE[0].astype(mx.float16))
    assert x.dtype == mx.float16
    for i, t in enumerate(run.timesteps):
        x_in = run.scale_model_input(x, i)
        assert x_in.dtype == mx.float16
        x = run.step(fake_model(x_in, t), x, i, noise=NOISE[2 + i])
        assert x.dtype == mx.float16
    assert run.noised_latents(NOISE[1].astype(mx.float16), NOISE[0]).dtype == mx.float16


@pytest.mark.parametrize("name", SAMPLERS)
def test_steps_stay_lazy(name: str) -> None:
    # mx.vmap traces with placeholder arrays: reading a value (.item(), numpy) fails.
    def first_step(noise: mx.array, x0: mx.array) -> mx.array:
        run = make_sampler(name, SD15).start(5, 0.8)
        x = run.noised_latents(x0, noise)
        model_output = fake_model(run.scale_model_input(x, 0), run.timesteps[0])
        return run.step(model_output, x, 0, noise=noise)

    traced = mx.vmap(first_step)(NOISE[:2], NOISE[2:4])
    np.testing.assert_allclose(traced[1], first_step(NOISE[1], NOISE[3]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["heun", "dpm++2m"])
def test_multistep_samplers_refuse_to_skip_the_first_step(name: str) -> None:
    run = make_sampler(name, SD15).start(4)
    x = run.initial_latents(NOISE[0])
    with pytest.raises(ValueError, match="in order"):
        run.step(fake_model(run.scale_model_input(x, 1), run.timesteps[1]), x, 1)


def test_heun_refuses_zero_snr_schedules() -> None:
    config = SchedulerConfig.from_dict(INDEX["configs"]["cosine_zsnr"])
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        make_sampler("heun", config)


def test_lcm_refuses_more_steps_than_its_grid() -> None:
    with pytest.raises(ValueError, match="original_inference_steps"):
        make_sampler("lcm", SD15).start(51)


@pytest.mark.parametrize(
    ("name", "schedule_type", "ours"),
    [
        # A1111 1.9+ (apart), A1111 before 1.9 (one name), ComfyUI, ours.
        ("DPM++ 2M", "Karras", ("dpm++2m", "karras")),
        ("DPM++ 2M Karras", None, ("dpm++2m", "karras")),
        ("DPM++ 2M Karras", "Automatic", ("dpm++2m", "karras")),
        ("DPM++ 2M", "Automatic", ("dpm++2m", None)),
        ("Euler a", "Exponential", ("euler_a", "exponential")),
        ("dpmpp_2m_sde", "karras", ("dpm++2m_sde", "karras")),
        ("euler_ancestral", None, ("euler_a", None)),
        ("dpm++2m_sde_karras", None, ("dpm++2m_sde", "karras")),
        ("heun", "exponential", ("heun", "exponential")),
    ],
)
def test_sampler_names_from_a1111_comfyui_and_ours(name, schedule_type, ours) -> None:
    assert sampler_from_a1111(name, schedule_type) == ours


@pytest.mark.parametrize(
    ("name", "schedule_type", "message"),
    [
        ("DPM++ SDE", None, "Unknown sampler 'DPM\\+\\+ SDE'"),
        ("DDIM", "Karras", "DDIM sampler has no karras schedule"),
        ("Euler", "Polyexponential", "Unknown schedule 'Polyexponential'"),
        ("DPM++ 2M Karras", "Exponential", "already has the karras schedule"),
    ],
)
def test_unknown_or_conflicting_names_are_refused(name, schedule_type, message) -> None:
    with pytest.raises(ValueError, match=message):
        sampler_from_a1111(name, schedule_type)


@pytest.mark.parametrize("name", sampler_names())
def test_every_name_round_trips_through_a1111s(name: str) -> None:
    display, schedule_type = a1111_names(name)
    assert join_name(display, schedule_type) == name
    make_sampler(name, SD15)  # every listed name makes a sampler


def test_a1111_names_prefer_the_legacy_combined_form() -> None:
    assert a1111_names("dpm++2m_karras") == ("DPM++ 2M Karras", None)
    assert a1111_names("dpm++2m", "karras") == ("DPM++ 2M Karras", None)
    assert a1111_names("euler_karras") == ("Euler", "Karras")
    assert ("Euler a", ["euler_a", "euler_ancestral"]) in a1111_samplers()
    assert a1111_schedulers() == [
        ("automatic", "Automatic"),
        ("karras", "Karras"),
        ("exponential", "Exponential"),
    ]
