"""The random noise of a generation, drawn image by image.

As in AUTOMATIC1111, image i of a run with seed s uses seed s + i, for its initial noise
and for the noise of stochastic samplers' steps: any image can be made again alone, with
its own seed, whatever the batch it was made in or the machine (rank) that made it."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx


def image_seeds(seed: int, count: int) -> list[int]:
    """The seeds of a run's `count` images: `seed`, `seed + 1`, ..."""
    return [seed + i for i in range(count)]


class ImageNoise:
    """Standard normal noise for a batch, each image's drawn from its own seed's stream."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = tuple(seeds)
        self._keys = [mx.random.key(seed) for seed in self.seeds]

    def draw(self, image_shape: Sequence[int]) -> mx.array:
        """The next (len(seeds), *image_shape) draw; each image's stream advances by one."""
        parts = []
        for i, key in enumerate(self._keys):
            self._keys[i], draw_key = mx.random.split(key)
            parts.append(mx.random.normal((1, *image_shape), key=draw_key))
        return parts[0] if len(parts) == 1 else mx.concatenate(parts)
