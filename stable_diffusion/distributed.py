"""Data-parallel generation over MLX's distributed engine, for runs started by `mlx.launch`.

Each rank makes its share of the images (of one prompt, or of a prompts file's lines), and
rank 0 gathers them and alone writes the files. Images are drawn from per-image seeds
(`noise.py`), so which rank makes an image does not change it: a run over N ranks saves
the same pixels as one process.

A process that `mlx.launch` did not start never initializes the distributed engine."""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .settings import MAX_IMAGES, MAX_SIDE

# What `mlx.launch` sets for each rank: MLX_RANK for the ring and JACCL backends, MPI's own
# variables for the MPI backend.
_LAUNCH_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
# A rank's PNG texts in one gather: far beyond any real parameters (a few kB per image).
_MAX_TEXT_BYTES = 64 * 2**20


class RankLost(RuntimeError):
    """A gather failed: another rank stopped (or its link did). When a rank dies mid-gather,
    MLX's ring backend fails the collective or hands back what its buffers held, so what
    arrived is checked (shapes within bounds, a checksum per rank) before it is used."""


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

    Two collectives: each rank's shape, text length and checksum, then its pixels and text,
    padded to the largest. Raises RankLost if a rank stopped meanwhile (what arrived is
    checked: never another rank's garbage for images)."""
    payload = np.frombuffer(json.dumps(list(texts)).encode(), np.uint8)
    if ranks.group is None:
        return [Result(images, list(texts))]
    checksum = _checksum(images, payload)
    header = np.array([*images.shape, payload.size, checksum], dtype=np.int32)
    headers = [[int(v) for v in h] for h in _all_gather(ranks, header)]
    for rank, h in enumerate(headers):
        n, height, width, channels, text = h[:5]
        if not (
            0 <= n <= MAX_IMAGES
            and 0 <= height <= MAX_SIDE
            and 0 <= width <= MAX_SIDE
            and channels == 3
            and 0 < text <= _MAX_TEXT_BYTES
        ):
            raise RankLost(f"rank {rank}'s images did not arrive (another rank stopped?)")
    sizes = [int(np.prod(h[:4])) + h[4] for h in headers]
    flat = np.zeros(max(sizes), np.uint8)
    flat[: images.size] = images.reshape(-1)
    flat[images.size : images.size + payload.size] = payload
    gathered = _all_gather(ranks, flat)
    results = []
    for rank, (row, h) in enumerate(zip(gathered, headers, strict=True)):
        n_pixels = int(np.prod(h[:4]))
        pixels, text = row[:n_pixels], row[n_pixels : n_pixels + h[4]]
        if _checksum(pixels, text) != h[5]:
            raise RankLost(f"rank {rank}'s images arrived damaged (another rank stopped?)")
        results.append(Result(pixels.reshape(h[:4]), json.loads(text.tobytes().decode())))
    return results


def _checksum(pixels: np.ndarray, text: np.ndarray) -> int:
    """CRC-32 of a rank's pixels and text, in 31 bits (an int32 of the header)."""
    crc = zlib.crc32(np.ascontiguousarray(pixels).data)
    return zlib.crc32(np.ascontiguousarray(text).data, crc) & 0x7FFFFFFF


def _all_gather(ranks: Ranks, values: np.ndarray) -> np.ndarray:
    """(size, *values.shape): every rank's `values`, which must have one shape. RankLost if
    the collective fails."""
    try:
        gathered = mx.distributed.all_gather(
            mx.array(values)[None], group=ranks.group, stream=mx.cpu
        )
        return np.array(gathered)
    except RuntimeError as e:  # the ring backend's "connection to a peer was lost"
        raise RankLost(f"another rank stopped ({e})") from None


def in_rank_order(results: Sequence[Result]) -> Result:
    """The gathered results of one prompt's images as one batch."""
    kept = [result for result in results if len(result.images)]
    return Result(
        np.concatenate([result.images for result in kept]),
        [text for result in kept for text in result.texts],
    )
