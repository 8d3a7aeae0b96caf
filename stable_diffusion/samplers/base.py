"""What every sampler shares: the `Sampler` → `Run` protocol, argument checks, and the
two ways a model output turns into a clean-image prediction.

A `Sampler` is built once per scheduler config; `start()` makes a `Run`, which holds
one generation's schedule (numpy tables, computed once) and any multistep history.
Step math is MLX, in float32, and stays lazy. Its scalar coefficients are computed from
the float32 tables in numpy float32, as diffusers computes them in torch float32: at
large σ (zero-SNR schedules start at σ ≈ 4096) the steps cancel large terms, and only
the same roundings give the same latents. They reach MLX as Python floats (an
np.float32 on the left of an mx.array would turn the product into a numpy array)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from ..config import SchedulerConfig
from .schedule import alphas_cumprod


class Run(ABC):
    """One sampling run. Call `step(…, i)` for i = 0, 1, … len(timesteps) - 1, in order."""

    stochastic: bool = False

    def __init__(
        self,
        timesteps: np.ndarray,
        init_noise_sigma: float,
        prediction_type: str,
    ) -> None:
        self.timesteps: list[float] = [float(t) for t in timesteps]
        self.init_noise_sigma = init_noise_sigma
        self.prediction_type = prediction_type

    def initial_latents(self, noise: mx.array) -> mx.array:
        """txt2img's starting latent from standard normal `noise`."""
        return (noise.astype(mx.float32) * self.init_noise_sigma).astype(noise.dtype)

    @abstractmethod
    def noise_scales(self, i: int) -> tuple[float, float]:
        """(signal, noise) of step `i`'s input latent x = signal·x0 + noise·ε, as the
        diffusers scheduler's `add_noise` at timesteps[i]."""

    def noised_latents(self, x0: mx.array, noise: mx.array, i: int = 0) -> mx.array:
        """Clean latent `x0` noised to step `i`'s level: img2img's starting latent (i = 0),
        and inpainting's unmasked region before each later step."""
        signal, sigma = self.noise_scales(i)
        x = x0.astype(mx.float32) * signal + noise.astype(mx.float32) * sigma
        return x.astype(x0.dtype)

    def scale_model_input(self, x: mx.array, i: int) -> mx.array:
        return x

    @abstractmethod
    def step(
        self, model_output: mx.array, x: mx.array, i: int, noise: mx.array | None = None
    ) -> mx.array:
        """The latent after step `i`, given the model's output on step `i`'s input.

        `noise` (standard normal, x's shape) is required if `stochastic`, else ignored."""

    def _step_noise(self, noise: mx.array | None) -> mx.array:
        if noise is None:
            raise ValueError(f"{type(self).__name__}.step() needs standard normal `noise`")
        return noise.astype(mx.float32)


class SigmaRun(Run):
    """A run of the k-diffusion samplers, whose latents are x = x0 + σ·ε, not scaled
    to unit variance; the model sees x / √(σ² + 1)."""

    def __init__(
        self,
        timesteps: np.ndarray,
        sigmas: np.ndarray,
        init_noise_sigma: float,
        prediction_type: str,
    ) -> None:
        super().__init__(timesteps, init_noise_sigma, prediction_type)
        self.sigmas = sigmas
        self.clip_range: float | None = None  # Heun's clip_sample

    def noise_scales(self, i: int) -> tuple[float, float]:
        return 1.0, float(self.sigmas[i])

    def scale_model_input(self, x: mx.array, i: int) -> mx.array:
        sigma = self.sigmas[i]
        return (x.astype(mx.float32) / float((sigma**2 + 1) ** 0.5)).astype(x.dtype)

    def denoised(self, model_output: mx.array, x: mx.array, sigma: np.float32) -> mx.array:
        """The x0 prediction at noise level σ (float32 inputs)."""
        if self.prediction_type == "epsilon":
            x0 = x - float(sigma) * model_output
        else:  # v-prediction, in k-diffusion form: c_out·v + c_skip·x
            c_out = -sigma / (sigma**2 + 1) ** 0.5
            x0 = model_output * float(c_out) + x / float(sigma**2 + 1)
        return clip(x0, self.clip_range)


def clip(x0: mx.array, clip_range: float | None) -> mx.array:
    """diffusers' clip_sample: the x0 prediction clamped to ±clip_range (None: as is)."""
    return x0 if clip_range is None else mx.clip(x0, -clip_range, clip_range)


def clip_range(config: SchedulerConfig) -> float | None:
    return float(config.clip_sample_range) if config.clip_sample else None


def vp_prediction(
    model_output: mx.array, x: mx.array, alpha: np.float32, sigma: np.float32, prediction_type: str
) -> tuple[mx.array, mx.array]:
    """(x0, ε) predicted from a variance-preserving latent x = α·x0 + σ·ε (float32 inputs)."""
    alpha, sigma = float(alpha), float(sigma)
    if prediction_type == "epsilon":
        return (x - sigma * model_output) / alpha, model_output
    return alpha * x - sigma * model_output, alpha * model_output + sigma * x


# Most diffusers schedulers' defaults for the training noise schedule.
LINEAR_BETAS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}

# diffusers' Heun and DPM-Solver have no sigma_min / sigma_max options, yet their Karras
# and exponential schedules use them when the config has them (they test
# hasattr(self.config, "sigma_min"), and from_config keeps unknown keys).
CONFIG_SIGMA_RANGE: dict[str, Any] = {"sigma_min": None, "sigma_max": None}

# The noise schedules a sampler can take instead of its config's (see SCHEDULES in
# samplers/__init__.py), as the config keys that select them in diffusers.
SCHEDULE_KEYS: dict[str, dict[str, bool]] = {
    "karras": {"use_karras_sigmas": True, "use_exponential_sigmas": False},
    "exponential": {"use_karras_sigmas": False, "use_exponential_sigmas": True},
}


class Sampler(ABC):
    """A sampling algorithm bound to a model's noise schedule.

    `diffusers_defaults` are the `__init__` defaults of the matching diffusers scheduler
    class for the SchedulerConfig fields it has: `SchedulerClass.from_config` applies
    them to the keys a config lacks and ignores the fields the class does not have, and
    so does `Sampler`. `schedules` are those it takes in place of the config's."""

    diffusers_defaults: ClassVar[dict[str, Any]]
    schedules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: SchedulerConfig, schedule: str | None = None) -> None:
        defaults = self.config_defaults(schedule)
        known = dataclasses.replace(SchedulerConfig(), **{k: getattr(config, k) for k in defaults})
        if schedule is not None:
            if schedule not in self.schedules:
                choices = ", ".join(self.schedules) or "none"
                raise ValueError(
                    f"The {type(self).__name__} sampler has no {schedule!r} schedule "
                    f"(schedules it takes: {choices})"
                )
            known = dataclasses.replace(known, **SCHEDULE_KEYS[schedule])
        self.config = known.resolved(defaults)
        self.alphas_cumprod = alphas_cumprod(self.config)

    def config_defaults(self, schedule: str | None) -> dict[str, Any]:
        """The config keys this sampler reads, with their defaults, on `schedule`."""
        return self.diffusers_defaults

    def start(self, num_steps: int, strength: float = 1.0) -> Run:
        """A fresh run of `num_steps` steps; with `strength` < 1 (img2img), the last part
        of it, as diffusers' img2img pipelines choose, but always at least one step."""
        if (
            isinstance(num_steps, bool)
            or not isinstance(num_steps, numbers.Integral)
            or num_steps < 1
        ):
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        if num_steps > self.config.num_train_timesteps:
            raise ValueError(
                f"num_steps={num_steps} exceeds the model's "
                f"{self.config.num_train_timesteps} training timesteps"
            )
        if not (isinstance(strength, numbers.Real) and math.isfinite(strength)):
            raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
        if not 0 < strength <= 1:
            raise ValueError(
                f"strength must be in (0, 1], got {strength} "
                "(strength 0 would leave the input image unchanged)"
            )
        return self._start(int(num_steps), float(strength))

    @abstractmethod
    def _start(self, num_steps: int, strength: float) -> Run: ...
