"""A txt2img or img2img request as a job: batches, seeds, LoRAs, PNGs and A1111's `info`.

`plan` runs in the request's thread and checks everything that can be checked without the
model; `run` runs on the worker thread."""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..cpu import COMPUTE_BFLOAT16, on_cpu
from ..images import GenerationParameters, encode_png, save_images, to_uint8, validate_size
from ..inpainting import MASKED_CONTENT, MaskedArea, apply_overlay, parameters_extras
from ..prompts import extract_loras
from ..settings import API_NAMES, HiresFix, check_arguments, strength_parameters
from ..upscale import upscaler_name
from . import names, options
from .catalog import Catalog, lora_hash
from .engine import Engine, Generation
from .jobs import Cancelled, Job
from .models import Img2ImgRequest, Txt2ImgRequest
from .options import Options, Overrides

# How the request names the hires fix's numbers (`settings.check_arguments`).
HIRES_NAMES = {
    **API_NAMES,
    "hires_scale": "hr_scale",
    "hires_resize": "hr_resize_x/hr_resize_y",
    "hires_steps": "hr_second_pass_steps",
    "hires_strength": "denoising_strength",
}


@dataclass(frozen=True)
class Plan:
    """A checked request; what depends on the model (defaults) is resolved by `run`."""

    kind: str  # "txt2img" or "img2img"
    prompt: str  # as typed, LoRA tags included: what the parameters record (as A1111)
    text: str  # the prompt as encoded
    negative_prompt: str
    loras: tuple[tuple[Path, float], ...]
    sampler_name: str | None
    scheduler: str | None
    seed: int
    batch_size: int
    n_iter: int
    steps: int | None
    cfg_scale: float | None
    width: int | None
    height: int | None
    image: np.ndarray | None = None
    strength: float | None = None
    hires: HiresFix | None = None
    send_images: bool = True
    save_images: bool = False
    # Inpainting: the blurred mask (H, W), A1111's masked content, the parameters' fields.
    mask: np.ndarray | None = None
    masked_content: str = "original"
    mask_extras: tuple[tuple[str, str], ...] = ()
    area: MaskedArea | None = None  # "Only masked": the crop denoised, pasted back
    overrides: Overrides = field(default_factory=Overrides)  # override_settings
    keep_overrides: bool = False  # override_settings_restore_afterwards: false


def plan(
    request: Txt2ImgRequest | Img2ImgRequest,
    catalog: Catalog,
    default_sampler: str,
    image: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    area: MaskedArea | None = None,
) -> Plan:
    """Raises ValueError with a message for the client. `mask` is the img2img request's,
    read and blurred; with "Only masked", `area` holds the crops denoised instead."""
    if area is not None:
        image, mask = area.image, area.mask
    try:
        overrides = options.read(request.override_settings, catalog)
    except ValueError as e:
        raise ValueError(f"override_settings: {e}") from None
    text, tags = extract_loras(request.prompt)
    loras = tuple((catalog.find_lora(name).path, weight) for name, weight in tags)
    # Checked now with the current model's default; resolved again when the job runs.
    names.resolve_sampler(request.sampler(), request.scheduler, default_sampler)
    hires = request.hires() if isinstance(request, Txt2ImgRequest) else None
    if image is None:
        sizes = [request.width, request.height]
        if any(size is not None for size in sizes):
            validate_size(*(8 if size is None else size for size in sizes))
    if hires is not None:
        hires = dataclasses.replace(hires, upscaler=upscaler_name(hires.upscaler))
        check_arguments(
            hires_scale=hires.scale,
            hires_resize=hires.resize,
            width=request.width,
            height=request.height,
            names=HIRES_NAMES,
        )
    return Plan(
        kind="txt2img" if image is None else "img2img",
        prompt=request.prompt,
        text=text,
        negative_prompt=request.negative_prompt,
        loras=loras,
        sampler_name=request.sampler(),
        scheduler=request.scheduler,
        seed=request.seed if request.seed >= 0 else secrets.randbits(31),
        batch_size=request.batch_size,
        n_iter=request.n_iter,
        steps=request.steps,
        cfg_scale=request.cfg_scale,
        width=request.width if image is None else image.shape[-2],
        height=request.height if image is None else image.shape[-3],
        image=image,
        strength=getattr(request, "denoising_strength", None) if image is not None else None,
        hires=hires,
        send_images=request.send_images,
        save_images=request.save_images,
        overrides=overrides,
        keep_overrides=not request.override_settings_restore_afterwards,
        **(_inpainting(request, mask, area) if isinstance(request, Img2ImgRequest) else {}),
    )


def _inpainting(request: Img2ImgRequest, mask: np.ndarray | None, area: MaskedArea | None) -> dict:
    if mask is None:
        return {}
    content = MASKED_CONTENT[request.inpainting_fill]  # in A1111's order
    inverted = bool(request.inpainting_mask_invert)
    padding = request.inpaint_full_res_padding if area is not None else None
    extras = parameters_extras(request.mask_blur, content, inverted, padding)
    return {"mask": mask, "masked_content": content, "mask_extras": extras, "area": area}


def run(
    engine: Engine, plan: Plan, job: Job, output_dir: Path, settings: Options
) -> tuple[list[str], dict]:
    """(base64 PNGs, A1111's info) for `plan`, with the server's options `settings` and the
    request's overrides. Image i of the run has seed seed + i, as in A1111 and
    `txt2image.py --n_images`: batch k's image j uses seed + k * batch_size + j."""
    model, clip_skip = settings.resolve(plan.overrides)
    engine.use_model(model.path, model.title)
    if plan.keep_overrides:
        settings.apply(plan.overrides)
    engine.use_loras(plan.loras)
    defaults = engine.defaults
    sampler = names.resolve_sampler(plan.sampler_name, plan.scheduler, defaults.sampler)
    steps = plan.steps or defaults.steps
    cfg = defaults.cfg if plan.cfg_scale is None else plan.cfg_scale
    width = plan.width or defaults.width
    height = plan.height or defaults.height
    # The LoRAs stay in the prompt as typed; A1111 adds their hashes (civitai reads them).
    extras: tuple[tuple[str, str], ...] = ()
    if plan.loras:
        hashes = (f"{path.stem}: {lora_hash(path)}" for path, _ in plan.loras)
        extras = (("Lora hashes", ", ".join(hashes)),)
    if engine.bfloat16 and on_cpu():
        extras += (COMPUTE_BFLOAT16,)
    images, infotexts, seeds = [], [], []
    for batch in range(plan.n_iter):
        if job.interrupted:
            break
        job.start_batch(batch, plan.n_iter)
        seed = plan.seed + batch * plan.batch_size
        generation = Generation(
            text=plan.text,
            # The scripts pass no negative prompt when none is given (SDXL then uses zeros).
            negative_text=plan.negative_prompt or None,
            steps=steps,
            cfg=cfg,
            sampler=sampler,
            seed=seed,
            n_images=plan.batch_size,
            width=width,
            height=height,
            image=plan.image,
            strength=plan.strength or 0.0,
            mask=plan.mask,
            masked_content=plan.masked_content,
            hires=plan.hires,
            clip_skip=clip_skip,
        )
        latents = engine.denoise(generation, job.step)
        if job.cancelled:
            raise Cancelled
        pixels = engine.decode(latents)
        if plan.area is not None:
            pixels = plan.area.paste(pixels)  # into the whole input, as the script
        elif plan.mask is not None and plan.image is not None:
            # As the script: the input's pixels where the blurred mask is 0.
            pixels = apply_overlay(pixels, to_uint8(plan.image)[: len(pixels)], plan.mask)
        for index, image in enumerate(pixels):
            parameters = GenerationParameters(
                prompt=plan.prompt,
                negative_prompt=plan.negative_prompt,
                steps=steps,
                sampler=sampler,
                cfg_scale=cfg,
                seed=seed + index,
                width=width,
                height=height,
                model=engine.model_title,
                clip_skip=clip_skip,
                extras=extras + plan.mask_extras,
                **strength_parameters(plan.strength, plan.hires),
            )
            text = parameters.to_text()
            if plan.save_images:
                path = output_dir / f"{plan.kind}-{seed + index}.png"
                save_images(image[None], path, parameters)
            if plan.send_images:
                png = encode_png(image, parameters)
                images.append(base64.b64encode(png).decode("ascii"))
            infotexts.append(text)
            seeds.append(seed + index)
    info = {
        "prompt": plan.prompt,
        "all_prompts": [plan.prompt] * len(seeds),
        "negative_prompt": plan.negative_prompt,
        "all_negative_prompts": [plan.negative_prompt] * len(seeds),
        "seed": plan.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": width,
        "height": height,
        "sampler_name": names.display_name(sampler),
        "cfg_scale": cfg,
        "steps": steps,
        "batch_size": plan.batch_size,
        "denoising_strength": plan.hires.strength if plan.hires else plan.strength,
        "extra_generation_params": _extra_generation_params(plan.hires, extras),
        "sd_model_name": engine.model_title,
        "clip_skip": clip_skip,
        "loras": [[path.stem, weight] for path, weight in plan.loras],
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "interrupted": job.interrupted,
    }
    return images, info


def _extra_generation_params(
    hires: HiresFix | None, extras: tuple[tuple[str, str], ...]
) -> dict[str, Any]:
    """A1111's `extra_generation_params`: its hires fields, and the LoRAs' hashes."""
    fields: dict[str, Any] = {}
    if hires is not None:
        if hires.resize is None:
            fields["Hires upscale"] = hires.scale
        else:
            fields["Hires resize"] = "{}x{}".format(*hires.resize)
        if hires.steps:
            fields["Hires steps"] = hires.steps
        fields["Hires upscaler"] = hires.upscaler
    return {**fields, **dict(extras)}


def info_json(info: dict) -> str:
    return json.dumps(info, ensure_ascii=False)
