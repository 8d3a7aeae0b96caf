"""DPM-Solver++(2M) (diffusers' DPMSolverMultistepScheduler, algorithm_type
"dpmsolver++" or "sde-dpmsolver++", solver_order 2, midpoint solver, and diffusers'
defaults lower_order_final=True, final_sigmas_type="zero"), optionally on Karras sigmas.

It works on variance-preserving latents x = α·x0 + σ·ε and steps in
λ = log(α/σ), reusing the previous step's x0 prediction for the second order."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..config import SchedulerConfig
from .base import Run, Sampler, vp_prediction
from .schedule import (
    finite_terminal_sigma,
    img2img_first_step,
    interpolate_sigmas,
    karras_sigmas,
    sigma_to_t,
    train_sigmas,
)


class DPMSolverRun(Run):
    def __init__(
        self, timesteps: np.ndarray, sigmas: np.ndarray, prediction_type: str, sde: bool
    ) -> None:
        # `sigmas` are k-diffusion sigmas (the last one 0); the VP latent's α_t and σ_t
        # follow from them.
        self.sigmas = sigmas
        self.alphas = 1 / (sigmas**2 + 1) ** 0.5
        self.vp_sigmas = sigmas * self.alphas
        with np.errstate(divide="ignore"):  # λ = +inf at the final σ = 0
            self.lambdas = np.log(self.alphas) - np.log(self.vp_sigmas)
        first = (float(self.alphas[0]), float(self.vp_sigmas[0]))
        super().__init__(timesteps, 1.0, first, prediction_type)
        self.stochastic = sde
        self._previous_x0: mx.array | None = None

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
        # and on the last one: diffusers' lower_order_final, with the final σ = 0.
        if 0 < i < len(self.timesteps) - 1:
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

    karras = False
    sde = False

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.alphas_cumprod = finite_terminal_sigma(self.alphas_cumprod, config)

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
        sigmas = train_sigmas(self.alphas_cumprod)
        if self.karras:
            karras = karras_sigmas(float(sigmas[0]), float(sigmas[-1]), num_steps)
            timesteps = sigma_to_t(karras, np.log(sigmas))
            # diffusers rounds, except for the cosine schedule, where int64 truncates.
            if self.config.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps, sigmas = timesteps.astype(np.int64), karras
        else:
            timesteps = self._timesteps(num_steps)
            sigmas = interpolate_sigmas(timesteps, sigmas)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        first = img2img_first_step(num_steps, strength)
        return DPMSolverRun(
            timesteps[first:], sigmas[first:], self.config.prediction_type, self.sde
        )


class DPMSolverMultistepKarras(DPMSolverMultistep):
    """dpm++2m_karras"""

    karras = True


class DPMSolverSDE(DPMSolverMultistep):
    """dpm++2m_sde"""

    sde = True


class DPMSolverSDEKarras(DPMSolverMultistep):
    """dpm++2m_sde_karras"""

    karras = True
    sde = True
