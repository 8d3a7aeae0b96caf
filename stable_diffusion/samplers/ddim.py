"""DDIM (diffusers' DDIMScheduler with eta = 0): deterministic steps along the
variance-preserving schedule ᾱ_t."""

from __future__ import annotations

from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from .base import LINEAR_BETAS, Run, Sampler, clip, clip_range, vp_prediction
from .schedule import img2img_first_step, spaced_timesteps


class DDIMRun(Run):
    def __init__(
        self,
        timesteps: np.ndarray,
        alpha_prods: np.ndarray,
        prev_alpha_prods: np.ndarray,
        prediction_type: str,
        clip_range: float | None,
    ) -> None:
        super().__init__(timesteps, 1.0, prediction_type)
        self.alpha_prods = alpha_prods
        self.prev_alpha_prods = prev_alpha_prods
        self.clip_range = clip_range

    def noise_scales(self, i: int) -> tuple[float, float]:
        a = self.alpha_prods[i]
        return float(a**0.5), float((1 - a) ** 0.5)

    def step(
        self, model_output: mx.array, x: mx.array, i: int, noise: mx.array | None = None
    ) -> mx.array:
        a, a_prev = self.alpha_prods[i], self.prev_alpha_prods[i]
        x0, eps = vp_prediction(
            model_output.astype(mx.float32),
            x.astype(mx.float32),
            a**0.5,
            (1 - a) ** 0.5,
            self.prediction_type,
        )
        # diffusers clips x0 only: ε stays the model's.
        x0 = clip(x0, self.clip_range)
        return (float(a_prev**0.5) * x0 + float((1 - a_prev) ** 0.5) * eps).astype(x.dtype)


class DDIM(Sampler):
    diffusers_defaults: ClassVar[dict[str, Any]] = {
        **LINEAR_BETAS,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }

    def _start(self, num_steps: int, strength: float) -> Run:
        acp = self.alphas_cumprod
        timesteps = spaced_timesteps(self.config, num_steps).round().astype(np.int64)
        # diffusers steps to t - T // num_steps whatever the spacing, and past t = 0 to
        # ᾱ = 1 (set_alpha_to_one) or to ᾱ_0.
        final = 1.0 if self.config.set_alpha_to_one else acp[0]
        prev = timesteps - self.config.num_train_timesteps // num_steps
        prev_acp = np.where(prev >= 0, acp[np.maximum(prev, 0)], final)
        first = img2img_first_step(num_steps, strength)
        return DDIMRun(
            timesteps[first:],
            acp[timesteps[first:]],
            prev_acp[first:],
            self.config.prediction_type,
            clip_range(self.config),
        )
