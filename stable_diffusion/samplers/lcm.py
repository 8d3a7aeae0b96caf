"""LCM (diffusers' LCMScheduler): consistency-model sampling. Each step jumps to a
clean-latent estimate, then re-noises it to the next timestep with fresh noise."""

from __future__ import annotations

from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from .base import LINEAR_BETAS, Run, Sampler, clip, clip_range, vp_prediction


class LCMRun(Run):
    stochastic = True

    def __init__(
        self,
        timesteps: np.ndarray,
        alphas_cumprod: np.ndarray,
        timestep_scaling: float,
        prediction_type: str,
        clip_range: float | None,
    ) -> None:
        super().__init__(timesteps, 1.0, prediction_type)
        self.alphas_cumprod = alphas_cumprod
        self.timestep_scaling = timestep_scaling
        self.clip_range = clip_range

    def noise_scales(self, i: int) -> tuple[float, float]:
        a = self.alphas_cumprod[int(self.timesteps[i])]
        return float(a**0.5), float((1 - a) ** 0.5)

    def step(
        self, model_output: mx.array, x: mx.array, i: int, noise: mx.array | None = None
    ) -> mx.array:
        noise = self._step_noise(noise)
        t = int(self.timesteps[i])
        a = self.alphas_cumprod[t]
        x0, _ = vp_prediction(
            model_output.astype(mx.float32),
            x.astype(mx.float32),
            a**0.5,
            (1 - a) ** 0.5,
            self.prediction_type,
        )
        x0 = clip(x0, self.clip_range)
        # Consistency-model boundary condition (σ_data = 0.5): denoised = x at t = 0.
        scaled_t = np.float32(t) * np.float32(self.timestep_scaling)
        c_skip = 0.25 / (scaled_t**2 + 0.25)
        c_out = scaled_t / (scaled_t**2 + 0.25) ** 0.5
        denoised = float(c_out) * x0 + float(c_skip) * x.astype(mx.float32)
        if i == len(self.timesteps) - 1:
            return denoised.astype(x.dtype)
        a_next = self.alphas_cumprod[int(self.timesteps[i + 1])]
        prev = float(a_next**0.5) * denoised + float((1 - a_next) ** 0.5) * noise
        return prev.astype(x.dtype)


class LCM(Sampler):
    diffusers_defaults: ClassVar[dict[str, Any]] = {
        **LINEAR_BETAS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": "leading",
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    }

    def _start(self, num_steps: int, strength: float) -> Run:
        original_steps = self.config.original_inference_steps
        if num_steps > original_steps:
            raise ValueError(
                f"lcm runs at most original_inference_steps={original_steps} steps, "
                f"got num_steps={num_steps}"
            )
        # LCM samples on a coarse grid of `original_steps` training timesteps; img2img
        # (diffusers' LatentConsistencyModelImg2ImgPipeline) keeps the grid's lower
        # `strength` part and still runs num_steps steps on it. Where that part has fewer
        # than num_steps points diffusers raises; we run one step per point, at least one.
        k = self.config.num_train_timesteps // original_steps
        grid_size = max(int(original_steps * strength), 1)
        grid = (np.arange(1, grid_size + 1) * k - 1)[::-1]
        num_steps = min(num_steps, grid_size)
        picks = np.floor(np.linspace(0, grid_size, num=num_steps, endpoint=False))
        return LCMRun(
            grid[picks.astype(np.int64)],
            self.alphas_cumprod,
            self.config.timestep_scaling,
            self.config.prediction_type,
            clip_range(self.config),
        )
