"""Noise-schedule math shared by the samplers.

All of it is numpy, evaluated once per `Sampler.start()`, and follows diffusers'
arithmetic step by step (float32 tables, the same rounding, the same interpolation),
because the model sees the timesteps: an off-by-one there changes the image."""

from __future__ import annotations

import math

import numpy as np

from ..config import SchedulerConfig


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """ᾱ_t for t = 0 … T-1, as float32 like diffusers' torch tables."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n).astype(np.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n).astype(np.float32) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise ValueError(f"Unsupported beta_schedule {config.beta_schedule!r}")
    if config.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return _cumprod(1.0 - betas)


def _cumprod(alphas: np.ndarray) -> np.ndarray:
    # torch.cumprod accumulates float32 in double on the CPU; doing the same keeps the
    # tables bit-identical to diffusers'.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """The Glide cosine schedule ("squaredcos_cap_v2")."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale √ᾱ so that the last timestep is pure noise (arXiv 2305.08891, Alg. 1)."""
    sqrt_ab = np.sqrt(_cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def finite_terminal_sigma(alphas_cumprod: np.ndarray, config: SchedulerConfig) -> np.ndarray:
    """The sigma-based schedulers keep ᾱ_T slightly above the zero that the zero-SNR
    rescale gives, so that σ_T = √((1-ᾱ)/ᾱ) stays finite (2**-24: fp16's smallest
    subnormal, diffusers' choice)."""
    if not config.rescale_betas_zero_snr:
        return alphas_cumprod
    alphas_cumprod = alphas_cumprod.copy()
    alphas_cumprod[-1] = 2**-24
    return alphas_cumprod


def spaced_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
    """Descending model timesteps for the k-diffusion and DDIM schedulers, as float64.

    "linspace" ones are fractional (Euler and Heun use them as they are, DDIM rounds);
    "leading" and "trailing" ones are whole numbers (Table 2 of arXiv 2305.08891)."""
    total = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, total - 1, num_steps)[::-1].copy()
    if config.timestep_spacing == "leading":
        ratio = total // num_steps
        return (np.arange(num_steps, dtype=np.float64) * ratio)[::-1] + config.steps_offset
    if config.timestep_spacing == "trailing":
        return np.arange(total, 0, -total / num_steps).round() - 1
    raise ValueError(f"Unsupported timestep_spacing {config.timestep_spacing!r}")


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """σ_t = √((1-ᾱ_t)/ᾱ_t) of every training timestep t (ascending), float32."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def interpolate_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """σ at (possibly fractional) timesteps, linear in t between training steps."""
    return np.interp(timesteps, np.arange(len(sigmas)), sigmas)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Descending sigmas evenly spaced in σ^(1/ρ), ρ = 7 (arXiv 2206.00364, eq. 5)."""
    rho = 7.0
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps of `sigmas`, interpolating linearly in log σ."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_train_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_train_sigmas) - 2)
    high = low + 1
    w = (log_train_sigmas[low] - log_sigma) / (log_train_sigmas[low] - log_train_sigmas[high])
    w = np.clip(w, 0, 1)
    return (1 - w) * low + w * high


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Descending sigmas evenly spaced in log σ."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def sigma_schedule(
    config: SchedulerConfig, alphas_cumprod: np.ndarray, num_steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps and sigmas of the k-diffusion schedulers (Euler, Euler a, Heun), float32.

    The sigmas have one more entry than the timesteps: the final σ (0, or the smallest
    training σ with final_sigmas_type "sigma_min")."""
    timesteps = spaced_timesteps(config, num_steps).astype(np.float32)
    train = train_sigmas(alphas_cumprod)
    sigmas = interpolate_sigmas(timesteps, train)
    if config.use_karras_sigmas or config.use_exponential_sigmas:
        # Between the spaced schedule's end points, unless the config sets them.
        low = float(sigmas[-1]) if config.sigma_min is None else config.sigma_min
        high = float(sigmas[0]) if config.sigma_max is None else config.sigma_max
        spacing = karras_sigmas if config.use_karras_sigmas else exponential_sigmas
        sigmas = spacing(low, high, num_steps)
        timesteps = sigma_to_t(sigmas, np.log(train))
    final = train[0] if config.final_sigmas_type == "sigma_min" else 0.0
    return timesteps.astype(np.float32), np.concatenate([sigmas, [final]]).astype(np.float32)


def sigma_init_noise(sigmas: np.ndarray, config: SchedulerConfig) -> float:
    """Standard deviation of txt2img's starting latent for the k-diffusion schedulers.

    With "leading" spacing the first timestep is below T-1 and diffusers scales the
    noise by √(σ_max² + 1) rather than σ_max; kept, since models were tuned on it."""
    sigma_max = sigmas.max()
    if config.timestep_spacing in ("linspace", "trailing"):
        return float(sigma_max)
    return float((sigma_max**2 + 1) ** 0.5)


def img2img_first_step(num_steps: int, strength: float) -> int:
    """Index of the first of `num_steps` steps that img2img runs at `strength`.

    As diffusers' StableDiffusionImg2ImgPipeline.get_timesteps, except that at least one
    step always runs: diffusers runs none when int(num_steps * strength) == 0."""
    init_steps = min(int(num_steps * strength), num_steps)
    return num_steps - max(init_steps, 1)
