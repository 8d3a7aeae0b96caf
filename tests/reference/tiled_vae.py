"""Record diffusers' tiled VAE decoding and encoding (`AutoencoderKL.enable_tiling()`)
on tiny-sd1's VAE, and the untiled results of the same inputs.

The tiny VAE's config has sample_size 64, so its tiles are 64 pixels / 8 latents: the
inputs below span 3 x 4-5 tiles, the last ones partial, as large images do. Another tile
size (our `vae_tile_size`) is diffusers' tiling with `tile_sample_min_size` and
`tile_latent_min_size` set to it: recorded for 96 pixels / 12 latents.

Run from the repository root after tests.reference.tiny_models (needs
requirements-dev.txt):

    python -m tests.reference.tiled_vae
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL

from tests.reference.inputs import MODELS, REFERENCE

# Pixels (height, width): not multiples of the tile stride, so the edge tiles are partial.
IMAGE_SHAPE = (144, 208)
# A tile size other than the config's sample_size, in pixels.
TILE_SIZE = 96


def main() -> None:
    vae = AutoencoderKL.from_pretrained(MODELS / "tiny-sd1" / "vae").eval()
    rng = np.random.default_rng(23)
    height, width = IMAGE_SHAPE
    latents = rng.standard_normal((1, 4, height // 8, width // 8)).astype(np.float32)
    images = rng.uniform(-1, 1, (1, 3, height, width)).astype(np.float32)
    out = {"latents": latents, "images": images}
    with torch.no_grad():
        for tiling in (False, True):
            (vae.enable_tiling if tiling else vae.disable_tiling)()
            name = "tiled" if tiling else "untiled"
            out[f"decoded.{name}"] = vae.decode(torch.from_numpy(latents)).sample.numpy()
            posterior = vae.encode(torch.from_numpy(images)).latent_dist
            out[f"encoded_mean.{name}"] = posterior.mean.numpy()
        vae.enable_tiling()
        vae.tile_sample_min_size = TILE_SIZE
        vae.tile_latent_min_size = TILE_SIZE // 8
        out[f"decoded.tiled_{TILE_SIZE}"] = vae.decode(torch.from_numpy(latents)).sample.numpy()
        posterior = vae.encode(torch.from_numpy(images)).latent_dist
        out[f"encoded_mean.tiled_{TILE_SIZE}"] = posterior.mean.numpy()
    for kind in ("decoded", "encoded_mean"):
        difference = np.abs(out[f"{kind}.tiled"] - out[f"{kind}.untiled"]).max()
        print(f"{kind}: tiled vs untiled max difference {difference:.3g}")
    np.savez_compressed(REFERENCE / "tiled_vae.npz", **out)
    print(f"wrote {REFERENCE / 'tiled_vae.npz'}")


if __name__ == "__main__":
    main()
