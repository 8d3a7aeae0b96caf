"""DPM-Solver++(2M) (diffusers' DPMSolverMultistepScheduler, algorithm_type
"dpmsolver++" or "sde-dpmsolver++", solver_order 2, midpoint solver), on the config's
sigmas, or Karras or exponential ones.

It works on variance-preserving latents x = α·x0 + σ·ε and steps in
λ = log(α/σ), reusing the previous step's x0 prediction for the second order."""

from __future__ import annotations

from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from ..config import SchedulerConfig
from .base import CONFIG_SIGMA_RANGE, LINEAR_BETAS, Run, Sampler, vp_prediction
from .schedule import (
    exponential_sigmas,
    finite_terminal_sigma,
    img2img_first_step,
    interpolate_sigmas,
    karras_sigmas,
    sigma_to_t,
    train_sigmas,
)


class DPMSolverRun(Run):
    def __init__(
        self,
        timesteps: np.ndarray,
        sigmas: np.ndarray,
        prediction_type: str,
        sde: bool,
        second_order_last: bool,
    ) -> None:
        # `sigmas` are k-diffusion sigmas (the last one 0 or σ_min); the VP latent's α_t
        # and σ_t follow from them.
        self.sigmas = sigmas
        self.alphas = 1 / (sigmas**2 + 1) ** 0.5
        self.vp_sigmas = sigmas * self.alphas
        with np.errstate(divide="ignore"):  # λ = +inf at the final σ = 0
            self.lambdas = np.log(self.alphas) - np.log(self.vp_sigmas)
        super().__init__(timesteps, 1.0, prediction_type)
        self.stochastic = sde
        self._second_order_last = second_order_last
        self._previous_x0: mx.array | None = None

    def noise_scales(self, i: int) -> tuple[float, float]:
        return float(self.alphas[i]), float(self.vp_sigmas[i])

    def step(
        self, model_output: mx.array, x: mx.array, i: int, noise: mx.array | None = None
    ) -> mx.array:
        noise = self._step_noise(noise) if self.stochastic else None
        sample = x.astype(mx.float32)
        alpha_s, sigma_s = self.alphas[i], self.vp_sigmas[i]
        alpha_t, sigma_t = self.alphas[i + 1], self.vp_sigmas[i + 1]
        h = self.lambdas[i + 1] - self.lambdas[i]
        x0, _ = vp_prediction(
            model_output.astype(mx.float32), sample, alpha_s, sigma_s, self.prediction_type
        )

        if self.stochastic:
            x_coef, x0_coef = sigma_t / sigma_s * np.exp(-h), alpha_t * (1 - np.exp(-2.0 * h))
        else:
            x_coef, x0_coef = sigma_t / sigma_s, -(alpha_t * (np.exp(-h) - 1.0))
        prev = float(x_coef) * sample + float(x0_coef) * x0
        # Second order from the previous x0, except on the first step (no history yet)
        # and, unless the sampler says otherwise, on the last one.
        last = i == len(self.timesteps) - 1
        if i > 0 and (self._second_order_last or not last):
            if self._previous_x0 is None:
                raise ValueError("DPM-Solver: steps must run in order, starting from step 0")
            r0 = (self.lambdas[i] - self.lambdas[i - 1]) / h
            d1 = float(1.0 / r0) * (x0 - self._previous_x0)
            prev = prev + float(0.5 * x0_coef) * d1
        self._previous_x0 = x0
        if noise is not None:
            prev = prev + float(sigma_t * np.sqrt(1.0 - np.exp(-2.0 * h))) * noise
        return prev.astype(x.dtype)


class DPMSolverMultistep(Sampler):
    """dpm++2m"""

    diffusers_defaults: ClassVar[dict[str, Any]] = {
        **LINEAR_BETAS,
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        **CONFIG_SIGMA_RANGE,
        "final_sigmas_type": "zero",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    schedules = ("karras", "exponential")
    sde = False

    def __init__(self, config: SchedulerConfig, schedule: str | None = None) -> None:
        super().__init__(config, schedule)
        self.alphas_cumprod = finite_terminal_sigma(self.alphas_cumprod, self.config)

    def _timesteps(self, num_steps: int) -> np.ndarray:
        """diffusers' DPM-Solver spacing, which differs from the other schedulers': it
        spaces num_steps + 1 points and drops the last."""
        total = self.config.num_train_timesteps
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            return np.linspace(0, total - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
        if spacing == "leading":
            ratio = total // (num_steps + 1)
            timesteps = (np.arange(num_steps + 1) * ratio)[::-1][:-1]
            return timesteps + self.config.steps_offset
        if spacing == "trailing":
            return np.arange(total, 0, -total / num_steps).round().astype(np.int64) - 1
        raise ValueError(f"Unsupported timestep_spacing {spacing!r}")

    def _start(self, num_steps: int, strength: float) -> Run:
        config = self.config
        train = train_sigmas(self.alphas_cumprod)
        if config.use_karras_sigmas or config.use_exponential_sigmas:
            # Over the whole training range (whatever the spacing) unless the config
            # sets it.
            low = float(train[0]) if config.sigma_min is None else config.sigma_min
            high = float(train[-1]) if config.sigma_max is None else config.sigma_max
            spacing = karras_sigmas if config.use_karras_sigmas else exponential_sigmas
            sigmas = spacing(low, high, num_steps)
            timesteps = sigma_to_t(sigmas, np.log(train))
            # diffusers rounds Karras timesteps, except for the cosine schedule; the rest
            # int64 truncates.
            if config.use_karras_sigmas and config.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)
        else:
            timesteps = self._timesteps(num_steps)
            sigmas = interpolate_sigmas(timesteps, train)
        final = train[0] if config.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [final]]).astype(np.float32)
        # diffusers' lower_order_final: the last step is first order when it ends at σ = 0,
        # with euler_at_final, or with lower_order_final on short runs.
        first_order_last = (
            config.final_sigmas_type == "zero"
            or config.euler_at_final
            or (config.lower_order_final and num_steps < 15)
        )
        first = img2img_first_step(num_steps, strength)
        return DPMSolverRun(
            timesteps[first:],
            sigmas[first:],
            config.prediction_type,
            self.sde,
            second_order_last=not first_order_last,
        )


class DPMSolverSDE(DPMSolverMultistep):
    """dpm++2m_sde"""

    sde = True
