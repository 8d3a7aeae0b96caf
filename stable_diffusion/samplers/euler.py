"""Euler (diffusers' EulerDiscreteScheduler, without churn): the deterministic
first-order k-diffusion sampler."""

from __future__ import annotations

from typing import Any, ClassVar

import mlx.core as mx

from ..config import SchedulerConfig
from .base import LINEAR_BETAS, Run, Sampler, SigmaRun
from .schedule import (
    finite_terminal_sigma,
    img2img_first_step,
    sigma_init_noise,
    sigma_schedule,
)


class EulerRun(SigmaRun):
    def step(
        self, model_output: mx.array, x: mx.array, i: int, noise: mx.array | None = None
    ) -> mx.array:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        sample = x.astype(mx.float32)
        denoised = self.denoised(model_output.astype(mx.float32), sample, sigma)
        derivative = (sample - denoised) / float(sigma)
        return (sample + derivative * float(sigma_next - sigma)).astype(x.dtype)


class Euler(Sampler):
    run_class: type[SigmaRun] = EulerRun
    diffusers_defaults: ClassVar[dict[str, Any]] = {
        **LINEAR_BETAS,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    }
    schedules = ("karras", "exponential")

    def __init__(self, config: SchedulerConfig, schedule: str | None = None) -> None:
        super().__init__(config, schedule)
        self.alphas_cumprod = finite_terminal_sigma(self.alphas_cumprod, self.config)

    def _start(self, num_steps: int, strength: float) -> Run:
        timesteps, sigmas = sigma_schedule(self.config, self.alphas_cumprod, num_steps)
        first = img2img_first_step(num_steps, strength)
        return self.run_class(
            timesteps[first:],
            sigmas[first:],
            sigma_init_noise(sigmas, self.config),
            self.config.prediction_type,
        )
