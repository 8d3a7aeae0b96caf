"""Record what diffusers' schedulers compute, for tests/test_samplers.py.

    python -m tests.reference.schedulers

Each case drives a diffusers scheduler the way diffusers' pipelines do
(StableDiffusionPipeline for txt2img, StableDiffusionImg2ImgPipeline for img2img;
the LatentConsistencyModel pipelines for lcm) on a fixed fake model, from fixed
noise, feeding fixed noise to the stochastic steps, and writes to
tests/fixtures/samplers/:

- cases.json: the scheduler configs, the latent shape, and the cases, each with the
  model timesteps it runs and `at`, where its rows start in the arrays below;
- arrays.npz: "noise", the noise bank: [0] the starting noise, [1] img2img's clean
  latent, [2 + i] the noise of step i; and per sampler, "<sampler>/latents" (the
  starting latent, then the latent after every step) and, for the k-diffusion and
  DPM-Solver schedulers, "<sampler>/sigmas" (σ of each latent), all cases' rows
  one after the other.

Besides synthetic configs that cover every noise schedule, the cases run on the
scheduler configs that real hub repos ship (`HUB_CONFIGS`), key for key, missing keys
included, as users run them: the repo's own scheduler class reads the file, and the
sampler's class takes its `config` (`SamplerClass.from_config(pipe.scheduler.config)`),
which applies the sampler class's defaults to the keys the file lacked. cases.json also
records each scheduler class's `__init__` defaults ("defaults").

Where diffusers runs no step (img2img with int(steps * strength) == 0) or raises (lcm
when the strength leaves fewer grid timesteps than steps), the case records diffusers'
schedule under our documented rule instead: one step / one step per grid timestep.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
)
from diffusers.schedulers import (
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_lcm,
)
from diffusers.utils import logging

from tests.reference.inputs import HUB_CONFIGS

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "samplers"
LATENT_SHAPE = (1, 2, 2, 4)

_COMMON = {
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
    "clip_sample": False,
}
_SD = {
    **_COMMON,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": False,
}
# Every noise-schedule key is given here (HUB_CONFIGS and MISSING_KEYS_CONFIGS below
# lack some).
CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {**_SD, "prediction_type": "epsilon"},
    "sd2_v": {**_SD, "prediction_type": "v_prediction"},
    "turbo": {**_SD, "prediction_type": "epsilon", "timestep_spacing": "trailing"},
    "ddpm_linspace": {
        **_COMMON,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "set_alpha_to_one": True,
        "original_inference_steps": 25,
    },
    "cosine_zsnr": {
        **_COMMON,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "steps_offset": 0,
        "set_alpha_to_one": False,
        "rescale_betas_zero_snr": True,
    },
}


# Synthetic configs lacking what the hub's do not: a bare one (DDIM's clip_sample and
# set_alpha_to_one defaults are True) and a DPM-Solver one whose schedule options the
# k-diffusion samplers honour or ignore as their classes do (DPM-Solver has no
# sigma_min / sigma_max; Euler a has no schedule options at all).
MISSING_KEYS_CONFIGS: dict[str, dict[str, Any]] = {
    "bare": {
        "_class_name": "DDPMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
    },
    "dpm_karras_sigma_min": {
        "_class_name": "DPMSolverMultistepScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "use_karras_sigmas": True,
        "final_sigmas_type": "sigma_min",
        "euler_at_final": False,
        "sigma_min": 0.1,
        "sigma_max": 10.0,
        "steps_offset": 1,
    },
}

_DPM = {"solver_order": 2}
_KARRAS = {"use_karras_sigmas": True, "use_exponential_sigmas": False}
_EXPONENTIAL = {"use_karras_sigmas": False, "use_exponential_sigmas": True}
_SDE = {**_DPM, "algorithm_type": "sde-dpmsolver++"}
# Our sampler name -> the diffusers scheduler and the options that the name sets.
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {**_DPM, "algorithm_type": "dpmsolver++"}),
    "dpm++2m_karras": (
        DPMSolverMultistepScheduler,
        {**_DPM, "algorithm_type": "dpmsolver++", **_KARRAS},
    ),
    "dpm++2m_sde": (DPMSolverMultistepScheduler, _SDE),
    "dpm++2m_sde_karras": (DPMSolverMultistepScheduler, {**_SDE, **_KARRAS}),
    "lcm": (LCMScheduler, {}),
    "euler_karras": (EulerDiscreteScheduler, _KARRAS),
    "euler_exponential": (EulerDiscreteScheduler, _EXPONENTIAL),
    # diffusers' Euler a has no schedule options: it runs on the sigmas and timesteps
    # that EulerDiscreteScheduler computes with them (see set_timesteps).
    "euler_a_karras": (EulerAncestralDiscreteScheduler, _KARRAS),
    "euler_a_exponential": (EulerAncestralDiscreteScheduler, _EXPONENTIAL),
    "heun_karras": (HeunDiscreteScheduler, _KARRAS),
    "heun_exponential": (HeunDiscreteScheduler, _EXPONENTIAL),
    "dpm++2m_exponential": (
        DPMSolverMultistepScheduler,
        {**_DPM, "algorithm_type": "dpmsolver++", **_EXPONENTIAL},
    ),
    "dpm++2m_sde_exponential": (DPMSolverMultistepScheduler, {**_SDE, **_EXPONENTIAL}),
}
# diffusers' Heun has no rescale_betas_zero_snr (ours refuses it).
UNSUPPORTED = {(name, "cosine_zsnr") for name in SCHEDULERS if name.startswith("heun")}

TXT2IMG_STEPS = (1, 2, 4, 20, 25)
# (steps, strength); 0.04 × 10 steps: diffusers would run no step.
IMG2IMG = ((20, 0.3), (20, 0.5), (4, 0.5), (20, 1.0), (10, 0.04))
# Fewer on the configs with missing keys, which only change the schedule's parameters.
MISSING_KEYS_RUNS = ((1, None), (4, None), (25, None), (20, 0.5), (10, 0.04))
# Starting noise, img2img's clean latent, and one per model call (Heun: 2 per step).
NOISE_BANK_SIZE = 2 + 2 * max(TXT2IMG_STEPS)


def correctly_rounded_sqrt() -> None:
    """Make float32 sqrt (and ** 0.5) correctly rounded, as IEEE 754 asks and numpy's is.

    The torch 2.13.0+cpu build these fixtures were last made with rounds about 1 in 5
    float32 square roots to the wrong neighbour (measured: 19730 of 100000 uniform
    values in [0.001, 1) differ from the float64 root rounded to float32; numpy: 0),
    and σ_min = √((1-ᾱ_0)/ᾱ_0) of the zero-SNR schedule, where 1-ᾱ_0 cancels, then
    moves by 1.4e-3 relative, which shifts Karras timesteps by one."""
    sqrt, power = torch.Tensor.sqrt, torch.Tensor.__pow__

    def exact_sqrt(t: torch.Tensor) -> torch.Tensor:
        return sqrt(t.double()).to(t.dtype) if t.dtype == torch.float32 else sqrt(t)

    def exact_power(t: torch.Tensor, exponent: Any) -> torch.Tensor:
        return exact_sqrt(t) if exponent == 0.5 else power(t, exponent)

    torch.Tensor.sqrt, torch.Tensor.__pow__, torch.sqrt = exact_sqrt, exact_power, exact_sqrt


def fake_model(x: torch.Tensor, t: float) -> torch.Tensor:
    """A smooth stand-in for the UNet; tests/test_samplers.py has the same formula."""
    return torch.tanh(1.3 * x + 0.5 * math.sin(t / 123.0)) + 0.2 * math.cos(t / 71.0)


class NoiseFeed:
    """Replaces randn_tensor in the scheduler modules, to feed them the noise bank."""

    def __init__(self) -> None:
        self.noise: np.ndarray | None = None
        self.draws = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert self.noise is not None and tuple(shape) == self.noise.shape
        self.draws += 1
        return torch.from_numpy(self.noise).to(dtype or torch.float32)


def run_case(
    sampler: str, config: dict[str, Any], steps: int, strength: float | None, bank: np.ndarray
) -> tuple[list[float], dict[str, np.ndarray], str]:
    scheduler_class, overrides = SCHEDULERS[sampler]
    if "_class_name" in config:
        # As a pipeline loads the file, before the sampler's class takes its config.
        config = getattr(diffusers, config["_class_name"]).from_config(config).config
    scheduler = scheduler_class.from_config(config, **overrides)
    diffusers_note = "as diffusers"
    if sampler == "lcm":
        # LatentConsistencyModelImg2ImgPipeline: set_timesteps(strength=…), no slicing.
        lcm_strength = 1.0 if strength is None else strength
        grid = int(scheduler.config.original_inference_steps * lcm_strength)
        if grid < steps:
            diffusers_note = f"diffusers raises; ours runs {grid} steps"
            steps = grid
        scheduler.set_timesteps(steps, strength=lcm_strength)
        timesteps = scheduler.timesteps
    else:
        scheduler.set_timesteps(steps)
        if scheduler_class is EulerAncestralDiscreteScheduler and overrides:
            euler = EulerDiscreteScheduler.from_config(config, **overrides)
            euler.set_timesteps(steps)
            scheduler.sigmas, scheduler.timesteps = euler.sigmas, euler.timesteps
        timesteps = scheduler.timesteps
        if strength is None and hasattr(scheduler, "set_begin_index"):
            # StableDiffusionPipeline leaves the scheduler to find timesteps[0] in its
            # schedule, which is the same unless timesteps[0] repeats (Karras sigmas on a
            # zero-SNR schedule), where diffusers then skips a step and fails at the end.
            scheduler.set_begin_index(0)
        if strength is not None:
            # StableDiffusionImg2ImgPipeline.get_timesteps, with our at-least-one-step rule.
            init_steps = min(int(steps * strength), steps)
            if init_steps == 0:
                diffusers_note = "diffusers runs no step; ours runs 1"
            t_start = steps - max(init_steps, 1)
            timesteps = timesteps[t_start * scheduler.order :]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start * scheduler.order)

    noise, x0 = torch.from_numpy(bank[0]), torch.from_numpy(bank[1])
    if strength is None:
        x = noise * scheduler.init_noise_sigma
    else:
        x = scheduler.add_noise(x0, noise, timesteps[:1])
    latents = [x.numpy().copy()]
    feed = NoiseFeed()
    for module in (
        scheduling_euler_ancestral_discrete,
        scheduling_dpmsolver_multistep,
        scheduling_lcm,
    ):
        module.randn_tensor = feed
    for i, t in enumerate(timesteps):
        model_output = fake_model(scheduler.scale_model_input(x, t), float(t))
        feed.noise, feed.draws = bank[2 + i], 0
        x = scheduler.step(model_output, t, x).prev_sample
        assert feed.draws <= 1, "a step drew noise twice"
        latents.append(x.numpy().copy())

    record = {"latents": np.stack(latents).astype(np.float32)}
    if hasattr(scheduler, "sigmas"):
        begin = scheduler.begin_index or 0
        record["sigmas"] = scheduler.sigmas.numpy()[begin:].astype(np.float32)
    return [float(t) for t in timesteps], record, diffusers_note


def class_defaults() -> dict[str, dict[str, Any]]:
    """Each scheduler class's __init__ defaults (those JSON can hold)."""
    defaults = {}
    for scheduler_class, _ in SCHEDULERS.values():
        parameters = inspect.signature(scheduler_class.__init__).parameters.values()
        defaults[scheduler_class.__name__] = {
            p.name: p.default
            for p in parameters
            if isinstance(p.default, str | bool | int | float | type(None))
            and not (isinstance(p.default, float) and math.isinf(p.default))
        }
    return defaults


def main() -> None:
    logging.set_verbosity_error()
    torch.set_grad_enabled(False)
    correctly_rounded_sqrt()
    OUT.mkdir(parents=True, exist_ok=True)
    bank = np.random.default_rng(0).standard_normal((NOISE_BANK_SIZE, *LATENT_SHAPE))
    arrays = {"noise": bank.astype(np.float32)}
    cases = []
    all_configs = {**CONFIGS, **HUB_CONFIGS, **MISSING_KEYS_CONFIGS}
    for sampler in SCHEDULERS:
        rows: dict[str, list[np.ndarray]] = {"latents": [], "sigmas": []}
        at = 0
        for config_name, config in all_configs.items():
            if (sampler, config_name) in UNSUPPORTED:
                continue
            if config_name in CONFIGS:
                runs = [(steps, None) for steps in TXT2IMG_STEPS] + list(IMG2IMG)
            else:
                runs = list(MISSING_KEYS_RUNS)
            for steps, strength in runs:
                timesteps, record, note = run_case(
                    sampler, config, steps, strength, arrays["noise"]
                )
                for key, value in record.items():
                    rows[key].append(value)
                cases.append(
                    {
                        "id": f"{config_name}-{steps}" + (f"-s{strength}" if strength else ""),
                        "sampler": sampler,
                        "config": config_name,
                        "steps": steps,
                        "strength": strength,
                        "diffusers": note,
                        "timesteps": timesteps,
                        "at": at,
                    }
                )
                at += len(timesteps) + 1
        for key, value in rows.items():
            if value:
                arrays[f"{sampler}/{key}"] = np.concatenate(value)
    np.savez_compressed(OUT / "arrays.npz", **arrays)

    # One case a line: compact, yet diffable.
    lines = ",\n".join(json.dumps(case) for case in cases)
    (OUT / "cases.json").write_text(
        f'{{"latent_shape": {json.dumps(LATENT_SHAPE)},\n'
        f'"configs": {json.dumps(all_configs, indent=1)},\n'
        f'"defaults": {json.dumps(class_defaults(), indent=1)},\n'
        f'"cases": [\n{lines}\n]}}\n'
    )
    total = sum(path.stat().st_size for path in OUT.iterdir())
    print(f"{len(cases)} cases, {total / 1024:.0f} KiB in {OUT}")


if __name__ == "__main__":
    main()
