"""What a `fast_cpu()` block keeps from call to call: values too large to keep for good,
too costly to make at every call (Winograd kernels, the text context's keys and values,
oneDNN's packed weights)."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
# The current `fast_cpu()` block's store; None outside one.
_BLOCK_STORE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fast_cpu", default=None)


@dataclass(frozen=True)
class _Kept:
    sources: tuple[object, ...]
    value: object  # _MADE_ONCE until the value is asked for a second time


_MADE_ONCE = object()


@contextmanager
def block() -> Iterator[None]:
    """A store of its own for this block, freed at its end."""
    token = _BLOCK_STORE.set({})
    try:
        yield
    finally:
        _BLOCK_STORE.reset(token)


def in_block() -> bool:
    return _BLOCK_STORE.get() is not None


def kept(owner: object, sources: tuple[object, ...], make: Callable[[], T]) -> T:
    """`make()`, kept for `owner` from its second request until the `fast_cpu()` block
    ends, as long as the arrays (or other objects) it is made from (`sources`) stay the
    same objects: made again when one is replaced (a LoRA merge, a new text context).
    A value asked for once per block is not kept: a block that calls the model once (a
    one-step image, a decode) would pay its memory for nothing (the UNet's Winograd
    kernels: 2.4 GiB at SD 2.x, all of it new memory). Outside a block, made at every
    call."""
    store = _BLOCK_STORE.get()
    if store is None:
        return make()
    if _first_request(store, owner, sources):
        return make()
    entry = store[id(owner)]
    if entry.value is _MADE_ONCE:
        entry = store[id(owner)] = _Kept(sources, make())
    return entry.value  # type: ignore[return-value]


def kept_from_second_use(
    owner: object, sources: tuple[object, ...], make: Callable[[], T]
) -> T | None:
    """As `kept`, but nothing is made at the first request in a block: None, for the caller
    to compute another way (a convolution without its Winograd kernel, which a block that
    calls the model once would make for one use). Outside a block, made at every call."""
    store = _BLOCK_STORE.get()
    if store is not None and _first_request(store, owner, sources):
        return None
    return kept(owner, sources, make)


def kept_from_first_use(owner: object, sources: tuple[object, ...], make: Callable[[], T]) -> T:
    """As `kept`, but kept from the first request: for values that a block calling the
    model once holds anyway while it runs, as each layer's packed weight is until the layer
    has computed (oneDNN's packed weights: `kept` made them twice in any image of more than
    one step). Outside a block, made at every call."""
    store = _BLOCK_STORE.get()
    if store is None:
        return make()
    entry = store.get(id(owner))
    if entry is None or not _same_sources(entry, sources):
        entry = store[id(owner)] = _Kept(sources, make())
    return entry.value  # type: ignore[return-value]


def _same_sources(entry: _Kept, sources: tuple[object, ...]) -> bool:
    return len(entry.sources) == len(sources) and all(
        old is new for old, new in zip(entry.sources, sources, strict=True)
    )


def _first_request(store: dict, owner: object, sources: tuple[object, ...]) -> bool:
    """Whether this is `owner`'s first request from `sources` in the block (noted if so)."""
    entry = store.get(id(owner))
    if entry is not None and _same_sources(entry, sources):
        return False
    # The entry holds its sources, so no new array can take their ids meanwhile.
    store[id(owner)] = _Kept(sources, _MADE_ONCE)
    return True
