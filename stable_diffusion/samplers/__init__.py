"""Samplers (noise schedulers) in MLX, each reproducing a diffusers scheduler.

The pipeline drives them like this::

    sampler = make_sampler("euler_a", scheduler_config)
    run = sampler.start(num_steps, strength)    # strength < 1: img2img
    x = run.initial_latents(noise)              # img2img: run.noised_latents(x0, noise)
    for i, t in enumerate(run.timesteps):
        out = unet(run.scale_model_input(x, i), t, ...)
        x = run.step(out, x, i, noise=mx.random.normal(x.shape) if run.stochastic else None)
"""

from __future__ import annotations

from ..config import SchedulerConfig
from .base import Run, Sampler
from .ddim import DDIM
from .dpm_solver import (
    DPMSolverMultistep,
    DPMSolverMultistepKarras,
    DPMSolverSDE,
    DPMSolverSDEKarras,
)
from .euler import Euler
from .euler_ancestral import EulerAncestral
from .heun import Heun
from .lcm import LCM

SAMPLERS: dict[str, type[Sampler]] = {
    "euler": Euler,
    "euler_a": EulerAncestral,
    "heun": Heun,
    "ddim": DDIM,
    "dpm++2m": DPMSolverMultistep,
    "dpm++2m_karras": DPMSolverMultistepKarras,
    "dpm++2m_sde": DPMSolverSDE,
    "dpm++2m_sde_karras": DPMSolverSDEKarras,
    "lcm": LCM,
}


def make_sampler(name: str, config: SchedulerConfig) -> Sampler:
    """The sampler called `name` (a key of SAMPLERS) on the model's noise schedule."""
    try:
        sampler_class = SAMPLERS[name]
    except KeyError:
        raise ValueError(
            f"Unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}"
        ) from None
    return sampler_class(config)


def default_sampler(scheduler_config: dict) -> str:
    """The sampler matching a diffusers `scheduler_config.json`; DPM++ 2M Karras
    for schedulers with no counterpart here (PNDM, LMS, ...)."""
    name = scheduler_config.get("_class_name", "")
    karras = scheduler_config.get("use_karras_sigmas", False)
    by_class = {
        "EulerDiscreteScheduler": "euler",
        "EulerAncestralDiscreteScheduler": "euler_a",
        "HeunDiscreteScheduler": "heun",
        "DDIMScheduler": "ddim",
        "LCMScheduler": "lcm",
        "DPMSolverMultistepScheduler": "dpm++2m_karras" if karras else "dpm++2m",
    }
    return by_class.get(name, "dpm++2m_karras")


__all__ = ["SAMPLERS", "Run", "Sampler", "default_sampler", "make_sampler"]
