"""Data-parallel generation over MLX's distributed engine, for runs started by `mlx.launch`.

Each rank makes its share of the images (of one prompt, or of a prompts file's lines), and
rank 0 gathers them and alone writes the files. Images are drawn from per-image seeds
(`noise.py`), so which rank makes an image does not change it: a run over N ranks saves
the same pixels as one process.

A process that `mlx.launch` did not start never initializes the distributed engine."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

# What `mlx.launch` sets for each rank: MLX_RANK for the ring and JACCL backends, MPI's own
# variables for the MPI backend.
_LAUNCH_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


@dataclass(frozen=True)
class Result:
    """What a rank made: uint8 images (n, H, W, 3) and a text per image."""

    images: np.ndarray
    texts: list[str]


@dataclass(frozen=True)
class Ranks:
    """This process's place in a run: `rank` of `size`, and the group to talk over (None for
    a single process)."""

    rank: int = 0
    size: int = 1
    group: mx.distributed.Group | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prefix(self) -> str:
        """What this rank's messages start with: nothing for a single process."""
        return f"[rank {self.rank}] " if self.size > 1 else ""


def launched() -> bool:
    """Whether `mlx.launch` (or mpirun) started this process."""
    return any(name in os.environ for name in _LAUNCH_VARIABLES)


def ranks() -> Ranks:
    """This process's `Ranks`; a single process's unless started by `mlx.launch`."""
    if not launched():
        return Ranks()
    group = mx.distributed.init()
    if group.size() == 1:
        return Ranks()
    return Ranks(group.rank(), group.size(), group)


def shard(count: int, rank: int, size: int) -> range:
    """Which of `count` items (images, prompts) rank `rank` of `size` makes: a contiguous
    block, the first `count % size` ranks taking one more. Every item is made exactly once,
    and the blocks follow each other in rank order."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not one of {size} ranks")
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def gather(ranks: Ranks, images: np.ndarray, texts: Sequence[str]) -> list[Result]:
    """Every rank's (n, H, W, 3) uint8 images and texts (their PNG parameters), in rank
    order, on every rank. Ranks may hold different counts and sizes (prompts-file lines of
    other sizes), or nothing ((0, ...) images).

    Two collectives: each rank's shape and text length, then its pixels and text, padded
    to the largest."""
    payload = np.frombuffer(json.dumps(list(texts)).encode(), np.uint8)
    if ranks.group is None:
        return [Result(images, list(texts))]
    header = np.array([*images.shape, payload.size], dtype=np.int32)
    headers = np.array(_all_gather(ranks, header))
    sizes = [int(np.prod(h[:4])) + int(h[4]) for h in headers]
    flat = np.zeros(max(sizes), np.uint8)
    flat[: images.size] = images.reshape(-1)
    flat[images.size : images.size + payload.size] = payload
    gathered = np.array(_all_gather(ranks, flat))
    results = []
    for row, h in zip(gathered, headers, strict=True):
        n_pixels = int(np.prod(h[:4]))
        pixels = row[:n_pixels].reshape(tuple(int(d) for d in h[:4]))
        text = row[n_pixels : n_pixels + int(h[4])].tobytes().decode()
        results.append(Result(pixels, json.loads(text)))
    return results


def _all_gather(ranks: Ranks, values: np.ndarray) -> mx.array:
    """(size, *values.shape): every rank's `values`, which must have one shape."""
    return mx.distributed.all_gather(mx.array(values)[None], group=ranks.group, stream=mx.cpu)


def in_rank_order(results: Sequence[Result]) -> Result:
    """The gathered results of one prompt's images as one batch."""
    kept = [result for result in results if len(result.images)]
    return Result(
        np.concatenate([result.images for result in kept]),
        [text for result in kept for text in result.texts],
    )
