"""A script's rank for tests/test_distributed.py, under `mlx.launch`: runs txt2image.py as
usual, except that rank 1 is killed (SIGKILL) once rank 0 has saved its own images, as a
machine that fails mid-run."""

from __future__ import annotations

import os
import runpy
import signal
import sys
import time
from pathlib import Path

# The repository, as for the scripts themselves (this file's own folder is first on the path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if os.environ.get("MLX_RANK") == "1":
    from stable_diffusion import cli

    decode = cli.decode

    def decode_then_die(*args, **kwargs):
        output = Path(os.environ["RANK0_SAVES"])
        deadline = time.monotonic() + 120
        while not output.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
        return decode(*args, **kwargs)

    cli.decode = decode_then_die

script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
