"""A1111's shapes of the sampler and scheduler lists (names from `samplers.SAMPLER_TABLE`)."""

from __future__ import annotations

from ..samplers import (
    a1111_names,
    a1111_samplers,
    a1111_schedulers,
    join_name,
    sampler_names,
    split_name,
)


def sampler_items() -> list[dict]:
    """The `/sdapi/v1/samplers` list, as A1111 shapes it: every sampler, then the names
    older A1111 gave some sampler and schedule pairs ("DPM++ 2M Karras")."""
    items = [
        {"name": name, "aliases": aliases, "options": {}} for name, aliases in a1111_samplers()
    ]
    for name in sampler_names():
        schedule = split_name(name)[1]
        display, schedule_type = a1111_names(name)
        if schedule is not None and schedule_type is None:
            items.append({"name": display, "aliases": [name], "options": {"scheduler": schedule}})
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
        for name, label in a1111_schedulers()
    ]


def display_name(sampler: str) -> str:
    """A1111's name for our sampler `sampler` (``dpm++2m_karras`` -> ``DPM++ 2M Karras``,
    ``euler_karras`` -> ``Euler``: its schedule is A1111's scheduler field)."""
    return a1111_names(sampler)[0]


def resolve_sampler(name: str | None, scheduler: str | None, default: str) -> str:
    """Our sampler for A1111's `sampler_name` and `scheduler` ("automatic": the sampler's
    own schedule); `default` (ours) when no name is given. Raises ValueError listing the
    choices."""
    if scheduler is not None and scheduler.strip().lower() == "automatic":
        scheduler = None
    if not name:
        if scheduler is None:
            return default
        name = split_name(default)[0]
    return join_name(name, scheduler)
