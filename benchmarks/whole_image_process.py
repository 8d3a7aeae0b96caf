"""Whole images by diffusers' own pipeline, on PyTorch and on OpenVINO, in a process of its
own (as `reference_process.py`, and for the same reasons), started by `whole_image.py`:

    python -m benchmarks.whole_image_process SIDE SPEC.json OUTPUT.json

SIDE is `pytorch` (the pipeline as diffusers runs it, float32, on all the cores this process
may use) or `openvino` (the same pipeline with its UNet and decoder converted by
`openvino.convert_model` at the image's shapes and compiled for the CPU, in float32 and in
OpenVINO's default precision, one after the other; the text encoders stay on PyTorch: a
small share of the image). SPEC.json names the model folder, the tiny decoder's folder (or
null: the model's VAE), the steps, the guidance scale (0: none), the size, the prompt and
the repeats. OUTPUT.json gets each variant's median seconds per image (text encoding, the
steps and the decode; loading and a one-step warm-up image excluded) and the setup.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderTiny,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from .reference_process import usable_cores


def load_pipeline(spec: dict[str, Any]) -> DiffusionPipeline:
    """The model folder as a diffusers pipeline, float32, with the tiny decoder if asked."""
    extra: dict[str, Any] = {}
    if spec["decoder"] is not None:
        extra["vae"] = AutoencoderTiny.from_pretrained(spec["decoder"])
    index = json.loads((Path(spec["folder"]) / "model_index.json").read_text())
    if index["_class_name"] == "StableDiffusionXLPipeline":
        return StableDiffusionXLPipeline.from_pretrained(spec["folder"], **extra)
    return StableDiffusionPipeline.from_pretrained(
        spec["folder"], safety_checker=None, requires_safety_checker=False, **extra
    )


def image_seconds(pipe: DiffusionPipeline, spec: dict[str, Any]) -> float:
    """Median seconds of one image, after a one-step image that warms every phase up."""

    def image(steps: int) -> Any:
        return pipe(
            spec["prompt"],
            num_inference_steps=steps,
            guidance_scale=spec["cfg"],
            height=spec["size"],
            width=spec["size"],
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )

    image(1)
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        image(spec["steps"])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _unet_example(pipe: DiffusionPipeline, spec: dict[str, Any]) -> list[torch.Tensor]:
    """The UNet's inputs at the image's shapes, in `openvino_process._UNetCall`'s order."""
    config = pipe.unet.config
    batch = 2 if spec["cfg"] > 1 else 1
    latent = spec["size"] // pipe.vae_scale_factor
    example = [
        torch.zeros(batch, config.in_channels, latent, latent),
        torch.tensor(999.0),
        torch.zeros(batch, 77, config.cross_attention_dim),
    ]
    if config.addition_embed_type == "text_time":
        time_dims = 6 * config.addition_time_embed_dim
        embeds = config.projection_class_embeddings_input_dim - time_dims
        example += [torch.zeros(batch, embeds), torch.zeros(batch, 6)]
    return example


def openvino_pipeline(pipe: DiffusionPipeline, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Converts the pipeline's UNet and decoder to OpenVINO IR in `work` (once: later rounds
    reuse it) and frees their PyTorch weights; the compiled models are set by `use`."""
    import openvino as ov

    from .openvino_process import _Decode, _UNetCall

    latent = spec["size"] // pipe.vae_scale_factor
    parts = {
        "unet": (_UNetCall(pipe.unet), _unet_example(pipe, spec)),
        "decoder": (
            _Decode(pipe.vae),
            [torch.zeros(1, pipe.vae.config.latent_channels, latent, latent)],
        ),
    }
    for name, (module, example) in parts.items():
        if not (work / f"{name}.xml").exists():
            with torch.no_grad():
                model = ov.convert_model(module, example_input=tuple(example))
            ov.save_model(model, work / f"{name}.xml", compress_to_fp16=False)
            del model
    # The pipeline reads the modules' configs, dtypes and devices, never their weights again.
    for module in (pipe.unet, pipe.vae):
        for parameter in module.parameters():
            parameter.data = torch.empty(0)
    gc.collect()
    return {"core": ov.Core(), "work": work}


def use(pipe: DiffusionPipeline, converted: dict[str, Any], config: dict[str, str]) -> str:
    """Point the pipeline's UNet and decoder at their IR compiled with `config`: the
    precision OpenVINO picked."""
    core, work = converted["core"], converted["work"]
    unet = core.compile_model(core.read_model(work / "unet.xml"), "CPU", config)
    decoder = core.compile_model(core.read_model(work / "decoder.xml"), "CPU", config)
    unet_request, decoder_request = unet.create_infer_request(), decoder.create_infer_request()

    def unet_forward(
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        **_: Any,
    ) -> tuple[torch.Tensor]:
        inputs = [sample.numpy(), np.asarray(timestep, np.float32).reshape(())]
        inputs.append(encoder_hidden_states.numpy())
        if added_cond_kwargs:
            inputs += [
                added_cond_kwargs["text_embeds"].numpy(),
                added_cond_kwargs["time_ids"].numpy(),
            ]
        return (torch.from_numpy(np.array(unet_request.infer(inputs)[0])),)

    def decode(latents: torch.Tensor, **_: Any) -> tuple[torch.Tensor]:
        return (torch.from_numpy(np.array(decoder_request.infer([latents.numpy()])[0])),)

    pipe.unet.forward = unet_forward
    pipe.vae.decode = decode
    return str(unet.get_property("INFERENCE_PRECISION_HINT").to_string())


def main(side: str, spec: dict[str, Any], output: Path) -> None:
    torch.set_num_threads(usable_cores())
    results: dict[str, Any] = {"cores": usable_cores()}
    pipe = load_pipeline(spec)  # diffusers' pipelines run under no_grad
    pipe.set_progress_bar_config(disable=True)
    if side == "pytorch":
        results["threads"] = torch.get_num_threads()
        results["pytorch"] = image_seconds(pipe, spec)
    else:
        work = Path(spec["folder"]) / ("openvino-tiny" if spec["decoder"] else "openvino-full")
        work.mkdir(exist_ok=True)
        converted = openvino_pipeline(pipe, spec, work)
        variants = {"openvino": {"INFERENCE_PRECISION_HINT": "f32"}, "openvino_default": {}}
        for variant, config in variants.items():
            results[f"{variant}_precision"] = use(pipe, converted, config)
            results[variant] = image_seconds(pipe, spec)
            gc.collect()
    results["load_average"] = os.getloadavg()[0]
    output.write_text(json.dumps(results))


if __name__ == "__main__":
    side, spec_file, output_file = sys.argv[1:]
    main(side, json.loads(Path(spec_file).read_text()), Path(output_file))
