"""AUTOMATIC1111's options that change an image: the server's own (POST /sdapi/v1/options) and
a request's `override_settings`, which hold for that request only unless it says
`override_settings_restore_afterwards: false` (then they stay, as in A1111).

Keys that take effect: `sd_model_checkpoint` (a title or name from /sdapi/v1/sd-models; a
request's override loads that model for the request, and the next request without it loads
the server's model again, each a full load, as A1111 does) and `CLIP_stop_at_last_layers`
(clip skip, 1 to 12 as A1111's setting). `sd_vae` and `eta_noise_seed_delta` take only their
defaults ("Automatic"/"None", and 0): this server decodes with the model's own VAE and has no
noise-seed offset, so other values are refused rather than ignored. Every other key is
ignored, as A1111 ignores options it does not know (most of its own change no pixels)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .catalog import Catalog, Entry

MAX_CLIP_SKIP = 12  # A1111's setting's range
_DEFAULT_VAES = ("Automatic", "None")


@dataclass(frozen=True)
class Overrides:
    """What a request or an options update sets (None: left as it is)."""

    model: Entry | None = None
    clip_skip: int | None = None


@dataclass
class Options:
    """The server's options: what requests run with unless they override them. Changed by
    POST /sdapi/v1/options and by requests that do not restore their overrides."""

    model: Entry
    clip_skip: int = 1

    def resolve(self, overrides: Overrides) -> tuple[Entry, int]:
        """The model and clip skip a request runs with."""
        clip_skip = self.clip_skip if overrides.clip_skip is None else overrides.clip_skip
        return overrides.model or self.model, clip_skip

    def apply(self, overrides: Overrides) -> None:
        self.model, self.clip_skip = self.resolve(overrides)

    def as_a1111(self) -> dict[str, Any]:
        return {
            "sd_model_checkpoint": self.model.title,
            "sd_checkpoint_hash": None,
            "CLIP_stop_at_last_layers": self.clip_skip,
            "sd_vae": "Automatic",
            "eta_noise_seed_delta": 0,
            "samples_format": "png",
        }


def read(values: Mapping[str, Any], catalog: Catalog) -> Overrides:
    """The options in `values` that take effect; ValueError naming a key whose value this
    server cannot honour. Unknown keys are ignored."""
    model = None
    name = values.get("sd_model_checkpoint")
    if name is not None:
        if not isinstance(name, str):
            raise ValueError("sd_model_checkpoint must be a model title from /sdapi/v1/sd-models")
        model = catalog.find_model(name)
    clip_skip = values.get("CLIP_stop_at_last_layers")
    if clip_skip is not None and (
        isinstance(clip_skip, bool)
        or not isinstance(clip_skip, int)
        or not 1 <= clip_skip <= MAX_CLIP_SKIP
    ):
        raise ValueError(
            f"CLIP_stop_at_last_layers must be a whole number from 1 (the last layer) to "
            f"{MAX_CLIP_SKIP}, got {clip_skip!r}"
        )
    vae = values.get("sd_vae")
    if vae is not None and vae not in _DEFAULT_VAES:
        raise ValueError(
            f"sd_vae {vae!r}: this server decodes with the model's own VAE only; give "
            "'Automatic' or leave it out"
        )
    delta = values.get("eta_noise_seed_delta")
    if delta is not None and delta != 0:
        raise ValueError(
            f"eta_noise_seed_delta {delta!r}: a noise-seed offset is not supported; give 0 or "
            "leave it out"
        )
    return Overrides(model, clip_skip)
