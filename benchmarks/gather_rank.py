"""One rank of `benchmarks/ranks.py`'s communication measurement, started by `mlx.launch`:
rank 0's time for `distributed.gather` of one (size, size, 3) uint8 image per rank, as the
scripts gather finished images (two collectives: the shapes, then the pixels and texts).

    python benchmarks/gather_rank.py SIZE REPEATS     # under mlx.launch; rank 0 prints GATHER {...}
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

# The repository, as for the scripts (this file's own folder is first on the path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from stable_diffusion import distributed

WARM_UP = 3


def image(rank: int, size: int) -> np.ndarray:
    return np.random.default_rng(rank).integers(0, 256, (1, size, size, 3), np.uint8)


def main() -> None:
    size, repeats = int(sys.argv[1]), int(sys.argv[2])
    ranks = distributed.ranks()
    mine = image(ranks.rank, size)
    seconds = []
    for i in range(WARM_UP + repeats):
        start = time.perf_counter()
        results = distributed.gather(ranks, mine, ["parameters"])
        if i >= WARM_UP:
            seconds.append(time.perf_counter() - start)
    # What arrived is each rank's image: the timing is of a gather that worked.
    for rank, result in enumerate(results):
        if not np.array_equal(result.images, image(rank, size)):
            raise SystemExit(f"rank {ranks.rank}: rank {rank}'s image arrived damaged")
    if ranks.is_main:
        quantiles = statistics.quantiles(seconds, n=10, method="inclusive")
        report = {
            "ranks": ranks.size,
            "image_bytes": mine.nbytes,
            "repeats": repeats,
            "median_s": statistics.median(seconds),
            "p10_s": quantiles[0],
            "p90_s": quantiles[-1],
        }
        print("GATHER " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
