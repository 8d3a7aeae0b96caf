"""Samplers (noise schedulers) in MLX, each reproducing a diffusers scheduler.

The pipeline drives them like this::

    sampler = make_sampler("euler_a", scheduler_config)
    run = sampler.start(num_steps, strength)    # strength < 1: img2img
    x = run.initial_latents(noise)              # img2img: run.noised_latents(x0, noise)
    for i, t in enumerate(run.timesteps):
        out = unet(run.scale_model_input(x, i), t, ...)
        x = run.step(out, x, i, noise=mx.random.normal(x.shape) if run.stochastic else None)

A sampler name is a sampler, optionally with a noise schedule in place of the model's:
``"dpm++2m"``, ``"dpm++2m_karras"``. `SAMPLER_TABLE` is the one list of names: ours,
A1111's (and so the PNG parameters' and A1111's API's) and ComfyUI's; the functions
below convert between them.
"""

from __future__ import annotations

import dataclasses

from ..config import SchedulerConfig
from .base import Run, Sampler
from .ddim import DDIM
from .dpm_solver import DPMSolverMultistep, DPMSolverSDE
from .euler import Euler
from .euler_ancestral import EulerAncestral
from .heun import Heun
from .lcm import LCM


@dataclasses.dataclass(frozen=True)
class SamplerEntry:
    name: str  # ours, as --sampler takes it
    a1111: str  # A1111's display name ("Sampler: ..." in the PNG parameters)
    comfyui: str  # ComfyUI's sampler_name
    sampler_class: type[Sampler]


SAMPLER_TABLE: tuple[SamplerEntry, ...] = (
    SamplerEntry("euler", "Euler", "euler", Euler),
    SamplerEntry("euler_a", "Euler a", "euler_ancestral", EulerAncestral),
    SamplerEntry("heun", "Heun", "heun", Heun),
    SamplerEntry("ddim", "DDIM", "ddim", DDIM),
    SamplerEntry("dpm++2m", "DPM++ 2M", "dpmpp_2m", DPMSolverMultistep),
    SamplerEntry("dpm++2m_sde", "DPM++ 2M SDE", "dpmpp_2m_sde", DPMSolverSDE),
    SamplerEntry("lcm", "LCM", "lcm", LCM),
)
SAMPLERS: dict[str, type[Sampler]] = {e.name: e.sampler_class for e in SAMPLER_TABLE}

# Ours (also ComfyUI's scheduler name) -> A1111's "Schedule type". No schedule (None)
# is the model's own, which A1111 calls "Automatic".
SCHEDULES: dict[str, str] = {"karras": "Karras", "exponential": "Exponential"}
_AUTOMATIC = "Automatic"
# A1111 before 1.9 named some sampler and schedule pairs as one sampler ("DPM++ 2M
# Karras"); these are written that way, which every reader knows.
_LEGACY_COMBINED = {("dpm++2m", "karras"), ("dpm++2m_sde", "karras")}


def split_name(name: str) -> tuple[str, str | None]:
    """(sampler, schedule) of one of our names: "dpm++2m_karras" -> ("dpm++2m", "karras").

    Raises ValueError, listing the valid names, for an unknown one."""
    if name in SAMPLERS:
        return name, None
    for schedule in SCHEDULES:
        base = name.removesuffix(f"_{schedule}")
        if base != name and schedule in SAMPLERS.get(base, Sampler).schedules:
            return base, schedule
    raise ValueError(f"Unknown sampler {name!r}; choose one of: {', '.join(sampler_names())}")


def join_name(sampler: str, schedule: str | None) -> str:
    """Our name for `sampler` (ours, A1111's or ComfyUI's, perhaps with a schedule
    already) on `schedule` (ours or A1111's; None keeps the name's own)."""
    base, own = sampler_from_a1111(sampler, schedule)
    return base if own is None else f"{base}_{own}"


def sampler_names() -> list[str]:
    """Every name --sampler takes, each sampler followed by its schedules."""
    return [
        name
        for e in SAMPLER_TABLE
        for name in [e.name, *(f"{e.name}_{s}" for s in e.sampler_class.schedules)]
    ]


def make_sampler(name: str, config: SchedulerConfig) -> Sampler:
    """The sampler called `name` (see `sampler_names`) on the model's noise schedule."""
    base, schedule = split_name(name)
    return SAMPLERS[base](config, schedule)


def sampler_from_a1111(name: str, schedule_type: str | None = None) -> tuple[str, str | None]:
    """(our sampler, our schedule or None) for a sampler named as A1111 writes it
    ("DPM++ 2M" with schedule_type "Karras", or "DPM++ 2M Karras"), as ComfyUI does
    ("dpmpp_2m", "karras"), or as we do ("dpm++2m_karras"; "dpm++2m", "karras").

    schedule_type None or "Automatic" keeps the name's own schedule, if any. Raises
    ValueError, naming the valid choices, for an unknown sampler or a schedule that the
    sampler does not take."""
    entry, own = _find_sampler(name.strip())
    if schedule_type is not None and schedule_type.strip() != _AUTOMATIC:
        schedule = _find_schedule(schedule_type.strip())
        if own is not None and own != schedule:
            raise ValueError(f"sampler {name!r} already has the {own} schedule")
        own = schedule
    if own is not None and own not in entry.sampler_class.schedules:
        takes = ", ".join(entry.sampler_class.schedules) or "none"
        raise ValueError(f"the {entry.a1111} sampler has no {own} schedule (it takes: {takes})")
    return entry.name, own


def a1111_names(name: str, schedule: str | None = None) -> tuple[str, str | None]:
    """(A1111's "Sampler", its "Schedule type" or None) for our sampler `name` (a
    combined one, or a plain one with `schedule`)."""
    base, own = sampler_from_a1111(name, schedule)
    entry = next(e for e in SAMPLER_TABLE if e.name == base)
    if own is None:
        return entry.a1111, None
    if (base, own) in _LEGACY_COMBINED:
        return f"{entry.a1111} {SCHEDULES[own]}", None
    return entry.a1111, SCHEDULES[own]


def a1111_samplers() -> list[tuple[str, list[str]]]:
    """(A1111 display name, aliases) of each sampler, for A1111's /sdapi/v1/samplers."""
    return [(e.a1111, [e.name, e.comfyui]) for e in SAMPLER_TABLE]


def a1111_schedulers() -> list[tuple[str, str]]:
    """(name, label) of each schedule, for A1111's /sdapi/v1/schedulers; "automatic"
    is the model's own."""
    return [("automatic", _AUTOMATIC), *SCHEDULES.items()]


def describe_samplers() -> str:
    """The text of --sampler list: every sampler, its names and its schedules."""
    lines = ["sampler        A1111 name     ComfyUI name     schedules (--schedule)"]
    for e in SAMPLER_TABLE:
        schedules = ", ".join(e.sampler_class.schedules) or "-"
        lines.append(f"{e.name:<14} {e.a1111:<14} {e.comfyui:<16} {schedules}")
    lines.append(
        "Without --schedule a sampler uses the model's own schedule. Combined names "
        "(dpm++2m_karras, 'DPM++ 2M Karras') work too."
    )
    return "\n".join(lines)


def _find_sampler(name: str) -> tuple[SamplerEntry, str | None]:
    for e in SAMPLER_TABLE:
        if name in (e.name, e.a1111, e.comfyui):
            return e, None
    for e in SAMPLER_TABLE:
        for schedule, label in SCHEDULES.items():
            if name in (f"{e.name}_{schedule}", f"{e.a1111} {label}", f"{e.comfyui}_{schedule}"):
                return e, schedule
    raise ValueError(f"Unknown sampler {name!r}; choose one of: {', '.join(sampler_names())}")


def _find_schedule(name: str) -> str:
    for schedule, label in SCHEDULES.items():
        if name in (schedule, label):
            return schedule
    raise ValueError(
        f"Unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)} "
        "(or none: the model's own)"
    )


def default_sampler(scheduler_config: dict) -> str:
    """The sampler matching a diffusers `scheduler_config.json`; DPM++ 2M Karras
    for schedulers with no counterpart here (PNDM, LMS, ...)."""
    name = scheduler_config.get("_class_name", "")
    if scheduler_config.get("algorithm_type") == "sde-dpmsolver++":
        name = "SDE " + name
    by_class = {
        "EulerDiscreteScheduler": "euler",
        "EulerAncestralDiscreteScheduler": "euler_a",
        "HeunDiscreteScheduler": "heun",
        "DDIMScheduler": "ddim",
        "LCMScheduler": "lcm",
        # Its use_karras_sigmas (and the rest) apply, as in diffusers.
        "DPMSolverMultistepScheduler": "dpm++2m",
        "SDE DPMSolverMultistepScheduler": "dpm++2m_sde",
    }
    return by_class.get(name, "dpm++2m_karras")


__all__ = [
    "SAMPLERS",
    "SAMPLER_TABLE",
    "SCHEDULES",
    "Run",
    "Sampler",
    "a1111_names",
    "a1111_samplers",
    "a1111_schedulers",
    "default_sampler",
    "describe_samplers",
    "join_name",
    "make_sampler",
    "sampler_from_a1111",
    "sampler_names",
    "split_name",
]
