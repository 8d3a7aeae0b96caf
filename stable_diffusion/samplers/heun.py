"""Heun (diffusers' HeunDiscreteScheduler): a second-order sampler that evaluates the
model twice per noise level, so its run has 2·steps - 1 model timesteps."""

from __future__ import annotations

from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from ..config import SchedulerConfig
from .base import CONFIG_SIGMA_RANGE, LINEAR_BETAS, Run, Sampler, SigmaRun, clip_range
from .schedule import img2img_first_step, sigma_init_noise, sigma_schedule


class HeunRun(SigmaRun):
    """Even steps are Euler predictions from σ_k to σ_(k+1); odd steps evaluate the model
    at the prediction and redo the move with the mean of both slopes. The last step,
    to σ = 0, stays a plain Euler step."""

    def __init__(
        self,
        timesteps: np.ndarray,
        sigmas: np.ndarray,
        init_noise_sigma: float,
        prediction_type: str,
    ) -> None:
        super().__init__(timesteps, sigmas, init_noise_sigma, prediction_type)
        self._predictor: tuple[mx.array, mx.array, float] | None = None

    def step(
        self, model_output: mx.array, x: mx.array, i: int, noise: mx.array | None = None
    ) -> mx.array:
        sample = x.astype(mx.float32)
        model_output = model_output.astype(mx.float32)
        if i % 2 == 0:
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            derivative = (sample - self.denoised(model_output, sample, sigma)) / float(sigma)
            dt = float(sigma_next - sigma)
            self._predictor = (sample, derivative, dt)
            return (sample + derivative * dt).astype(x.dtype)

        if self._predictor is None:
            raise ValueError("Heun: steps must run in order, starting from step 0")
        start, first_derivative, dt = self._predictor
        self._predictor = None
        sigma = self.sigmas[i]
        derivative = (sample - self.denoised(model_output, sample, sigma)) / float(sigma)
        return (start + (first_derivative + derivative) / 2 * dt).astype(x.dtype)


class Heun(Sampler):
    diffusers_defaults: ClassVar[dict[str, Any]] = {
        **LINEAR_BETAS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        **CONFIG_SIGMA_RANGE,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }
    schedules = ("karras", "exponential")

    def __init__(self, config: SchedulerConfig, schedule: str | None = None) -> None:
        if config.rescale_betas_zero_snr:
            # diffusers' Heun has no such option: its first sigma would be infinite.
            raise ValueError("The heun sampler does not support rescale_betas_zero_snr")
        super().__init__(config, schedule)

    def _start(self, num_steps: int, strength: float) -> Run:
        timesteps, sigmas = sigma_schedule(self.config, self.alphas_cumprod, num_steps)
        # Every noise level but the first and the final 0 is visited twice.
        timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
        sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        first = 2 * img2img_first_step(num_steps, strength)
        run = HeunRun(
            timesteps[first:],
            sigmas[first:],
            sigma_init_noise(sigmas, self.config),
            self.config.prediction_type,
        )
        run.clip_range = clip_range(self.config)
        return run
