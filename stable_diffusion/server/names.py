"""A1111's names for samplers and schedulers, and its ``<lora:name:weight>`` prompt syntax."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# A1111 display name -> (our sampler, our sampler with Karras sigmas or None, aliases).
# The names are A1111's (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py); the
# aliases are A1111's k-diffusion ones plus ours.
_SAMPLERS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "Euler a": ("euler_a", None, ("k_euler_a", "k_euler_ancestral", "euler_a")),
    "Euler": ("euler", None, ("k_euler", "euler")),
    "Heun": ("heun", None, ("k_heun", "heun")),
    "DPM++ 2M": ("dpm++2m", "dpm++2m_karras", ("k_dpmpp_2m", "dpm++2m")),
    "DPM++ 2M SDE": ("dpm++2m_sde", "dpm++2m_sde_karras", ("k_dpmpp_2m_sde", "dpm++2m_sde")),
    "DDIM": ("ddim", None, ("ddim",)),
    "LCM": ("lcm", None, ("k_lcm", "lcm")),
}
# Older A1111 (before 1.9) folded the schedule into the sampler's name.
_KARRAS_NAMES = {
    "DPM++ 2M Karras": "DPM++ 2M",
    "DPM++ 2M SDE Karras": "DPM++ 2M SDE",
}
# A1111's scheduler names (modules/sd_schedulers.py) that we have: "automatic" is each
# sampler's own schedule.
SCHEDULERS = {"automatic": "Automatic", "karras": "Karras"}


def sampler_items() -> list[dict]:
    """The `/sdapi/v1/samplers` list, as A1111 shapes it."""
    items = [
        {"name": name, "aliases": list(aliases), "options": {}}
        for name, (_, _, aliases) in _SAMPLERS.items()
    ]
    items += [
        {"name": name, "aliases": [_SAMPLERS[base][1]], "options": {"scheduler": "karras"}}
        for name, base in _KARRAS_NAMES.items()
    ]
    return items


def scheduler_items() -> list[dict]:
    """The `/sdapi/v1/schedulers` list, as A1111 shapes it."""
    return [
        {
            "name": name,
            "label": label,
            "aliases": None,
            "default_rho": -1,
            "need_inner_model": False,
        }
        for name, label in SCHEDULERS.items()
    ]


def display_name(sampler: str) -> str:
    """A1111's name for our sampler `sampler` (``dpm++2m_karras`` -> ``DPM++ 2M Karras``)."""
    for name, (plain, karras, _) in _SAMPLERS.items():
        if sampler == plain:
            return name
        if sampler == karras:
            return f"{name} Karras"
    return sampler


def resolve_sampler(name: str | None, scheduler: str | None, default: str) -> str:
    """Our sampler for A1111's `sampler_name` and `scheduler`; `default` (ours) when no
    name is given. Raises ValueError listing the choices."""
    scheduler_key = (scheduler or "automatic").lower()
    if scheduler_key not in SCHEDULERS:
        raise ValueError(
            f"unknown scheduler {scheduler!r}; choose one of: {', '.join(SCHEDULERS.values())}"
        )
    if not name:
        if scheduler_key == "karras":
            name = display_name(default).removesuffix(" Karras")
        else:
            return default
    if name in _KARRAS_NAMES:
        name, scheduler_key = _KARRAS_NAMES[name], "karras"
    entry = _SAMPLERS.get(name) or next(
        (entry for entry in _SAMPLERS.values() if name.lower() in entry[2]), None
    )
    if entry is None:
        choices = [*_SAMPLERS, *_KARRAS_NAMES]
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(choices)}")
    plain, karras, _ = entry
    if scheduler_key == "karras":
        if karras is None:
            raise ValueError(f"sampler {name!r} has no Karras schedule here; use Automatic")
        return karras
    return plain


# A1111's extra-network syntax (modules/extra_networks.py): <lora:name:weight>, the weight
# optional (1.0).
_LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?>")


@dataclass(frozen=True)
class LoraTag:
    name: str
    weight: float


def split_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its ``<lora:name:weight>`` tags (as A1111 removes them before
    encoding) and the tags. Raises ValueError for a weight that is not a finite number."""
    tags = []
    for match in _LORA_TAG.finditer(prompt):
        name, weight = match[1].strip(), match[2]
        try:
            value = 1.0 if weight is None or not weight.strip() else float(weight)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(
                f"{match[0]}: the LoRA weight must be a number, e.g. <lora:{name}:0.8>"
            )
        tags.append(LoraTag(name, value))
    return _LORA_TAG.sub("", prompt), tags
