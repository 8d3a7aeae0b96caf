"""Euler a (diffusers' EulerAncestralDiscreteScheduler): each step goes below the next
noise level by an Euler step, then adds fresh noise back up to it."""

from __future__ import annotations

from typing import Any, ClassVar

import mlx.core as mx

from .base import LINEAR_BETAS, SigmaRun
from .euler import Euler


class EulerAncestralRun(SigmaRun):
    stochastic = True

    def step(
        self, model_output: mx.array, x: mx.array, i: int, noise: mx.array | None = None
    ) -> mx.array:
        noise = self._step_noise(noise)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        # Split the move to sigma_next into a deterministic part (down) and fresh noise (up)
        # with sigma_down² + sigma_up² = sigma_next².
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        sample = x.astype(mx.float32)
        denoised = self.denoised(model_output.astype(mx.float32), sample, sigma)
        derivative = (sample - denoised) / float(sigma)
        prev = sample + derivative * float(sigma_down - sigma) + noise * float(sigma_up)
        return prev.astype(x.dtype)


class EulerAncestral(Euler):
    """Its diffusers class has no schedule options, so it ignores the config's; the
    Karras and exponential schedules, as A1111 and ComfyUI offer them, are Euler's."""

    run_class = EulerAncestralRun
    diffusers_defaults: ClassVar[dict[str, Any]] = {
        **LINEAR_BETAS,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }

    def config_defaults(self, schedule: str | None) -> dict[str, Any]:
        return Euler.diffusers_defaults if schedule else self.diffusers_defaults
