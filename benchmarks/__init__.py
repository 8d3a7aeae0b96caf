"""The benchmark: the full-size models with random weights, and optionally diffusers /
PyTorch on the very same weights (`python -m benchmarks.run --help`; see README.md here).

Not part of the runtime package: nothing in `stable_diffusion` imports it.
"""

import os

# The environment the benchmark was started in, before `stable_diffusion`'s import adjusts
# it for its OpenBLAS (OPENBLAS_THREAD_TIMEOUT): the PyTorch reference runs in this one.
LAUNCH_ENVIRONMENT = dict(os.environ)
