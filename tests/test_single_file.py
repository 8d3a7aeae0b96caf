"""Single-file checkpoints (.safetensors / .ckpt in the original layout) against diffusers'
own single-file loader, on the tiny models (fixtures from tests/reference/single_file.py).

The .safetensors files are written here by `tests/reference/original_layout.py` from the
tiny diffusers folders; their digest must equal that of the files diffusers loaded when the
references were recorded. The .ckpt (float16, pickled, in {"state_dict": ...}) is stored.

Tolerances, float32: components within 1e-4 of the reference relative to its largest value;
pixels within 2e-4 end to end."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from stable_diffusion import StableDiffusion
from stable_diffusion.config import (
    PRESETS,
    AutoencoderConfig,
    PipelineConfig,
    SchedulerConfig,
    TextEncoderConfig,
    UNetConfig,
    read_json,
)
from stable_diffusion.loading import load_components, single_file
from stable_diffusion.loading.single_file import SingleFileError, detect_architecture
from stable_diffusion.models.clip import CLIPTextModel
from stable_diffusion.models.unet import UNetModel
from stable_diffusion.models.vae import Autoencoder
from stable_diffusion.samplers import make_sampler
from stable_diffusion.tokenizer import Tokenizer
from stable_diffusion.weights import diffusers as diffusers_keys
from stable_diffusion.weights import original
from tests.helpers import FIXTURES
from tests.reference import original_layout
from tests.reference.inputs import NEGATIVE_PROMPTS, PROMPTS
from tests.reference.original_layout import digest, folder_to_original, write_safetensors

MODELS = {"tiny-sd1": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
FILES = [*MODELS, "tiny-sd1.ckpt"]
PIXEL_TOLERANCE = 2e-4
EXPECTED = json.loads((FIXTURES / "single_file" / "expected.json").read_text())


def tiny_config(name: str) -> PipelineConfig:
    """The tiny model's config, as the presets give it for full-size models."""
    folder = FIXTURES / "models" / name
    is_xl = MODELS[name] == "sdxl"
    encoders = ["text_encoder", "text_encoder_2"] if is_xl else ["text_encoder"]
    tokenizers = ["tokenizer", "tokenizer_2"] if is_xl else ["tokenizer"]
    return PipelineConfig(
        unet=UNetConfig.from_dict(read_json(folder / "unet" / "config.json")),
        vae=AutoencoderConfig.from_dict(read_json(folder / "vae" / "config.json")),
        text_encoders=tuple(
            TextEncoderConfig.from_dict(read_json(folder / e / "config.json")) for e in encoders
        ),
        scheduler=SchedulerConfig.from_dict(read_json(folder / "scheduler/scheduler_config.json")),
        pad_tokens=tuple(Tokenizer.from_folder(folder / t).pad_token for t in tokenizers),
    )


def assert_close(ours: mx.array, reference: np.ndarray, rtol: float = 1e-4) -> None:
    ours = np.array(ours.astype(mx.float32))
    assert ours.shape == reference.shape
    error = np.abs(ours - reference).max()
    assert error <= rtol * np.abs(reference).max() + 1e-5, f"max abs error {error}"


def nhwc(x: np.ndarray) -> mx.array:
    return mx.array(x.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("single_file")
    paths = {"tiny-sd1.ckpt": FIXTURES / "single_file" / "tiny-sd1.ckpt"}
    for name, architecture in MODELS.items():
        weights = folder_to_original(FIXTURES / "models" / name, architecture)
        assert digest(weights) == EXPECTED["digests"][name], "not the file diffusers checked"
        paths[name] = folder / f"{name}.safetensors"
        write_safetensors(weights, paths[name])
    return paths


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "single_file" / "reference.npz"))


@pytest.fixture(scope="module", params=FILES)
def loaded(request, checkpoints, reference):
    name = request.param
    model = name.removesuffix(".ckpt")
    sd = StableDiffusion(str(checkpoints[name]), float16=False, config=tiny_config(model))
    prefix = f"{model}.ckpt." if name.endswith(".ckpt") else f"{model}."
    ref = {k[len(prefix) :]: v for k, v in reference.items() if k.startswith(prefix)}
    return sd, ref


def test_architecture_is_detected(loaded):
    sd, _ = loaded
    expected = MODELS[Path(sd.model_name).name.split(".")[0]]
    assert sd.components.architecture == expected
    assert sd.is_xl == (expected == "sdxl")


def test_tokenizers_and_text_encoders_match_diffusers(loaded):
    sd, ref = loaded
    names = ["text_encoder", "text_encoder_2"][: len(sd.text_encoders)]
    for name, tokenizer, encoder in zip(names, sd.tokenizers, sd.text_encoders, strict=True):
        ids = tokenizer.encode(PROMPTS)
        np.testing.assert_array_equal(np.array(ids), ref[f"{name}.input_ids"])
        output = encoder(mx.array(ids))
        assert_close(output.last_hidden_state, ref[f"{name}.last_hidden_state"])
        assert_close(output.pooled, ref[f"{name}.pooled"])


def test_unet_and_vae_match_diffusers(loaded):
    sd, ref = loaded
    extra = {}
    if sd.is_xl:
        extra = {
            "text_embeds": mx.array(ref["unet.text_embeds"]),
            "time_ids": mx.array(ref["unet.time_ids"]),
        }
    output = sd.unet(
        nhwc(ref["unet.latents"]),
        mx.array(ref["unet.timesteps"]),
        mx.array(ref["unet.context"]),
        **extra,
    )
    assert_close(mx.array(np.array(output).transpose(0, 3, 1, 2)), ref["unet.output"])
    decoded = sd.vae.decode(nhwc(ref["unet.latents"]))
    assert_close(mx.array(np.array(decoded).transpose(0, 3, 1, 2)), ref["vae.decoded"])


def test_txt2img_matches_diffusers(loaded):
    sd, ref = loaded
    latents = sd.generate_latents(
        PROMPTS[:1],
        negative_text=NEGATIVE_PROMPTS[0],
        num_steps=4,
        cfg_weight=7.5,
        sampler="euler",
        latents=nhwc(ref["txt2img.noise"]),
    )
    for x in latents:
        mx.eval(x)
    images = np.array(sd.decode(x))
    np.testing.assert_allclose(images, ref["txt2img.image"], atol=PIXEL_TOLERANCE, rtol=0)


# -- variants of the layout that real files have -------------------------------------------


def outputs(sd: StableDiffusion) -> list[np.ndarray]:
    ids = mx.array(sd.tokenizers[0].encode(PROMPTS))
    return [np.array(encoder(ids).last_hidden_state) for encoder in sd.text_encoders]


def test_sd1_text_encoder_without_text_model_level(checkpoints, tmp_path):
    """Old SD 1.x files name the CLIP weights without `text_model.`."""
    weights = folder_to_original(FIXTURES / "models" / "tiny-sd1", "sd1")
    prefix = "cond_stage_model.transformer.text_model."
    old = {k.replace(prefix, "cond_stage_model.transformer."): v for k, v in weights.items()}
    write_safetensors(old, tmp_path / "old.safetensors")
    config = tiny_config("tiny-sd1")
    expected = outputs(StableDiffusion(str(checkpoints["tiny-sd1"]), float16=False, config=config))
    got = outputs(StableDiffusion(str(tmp_path / "old.safetensors"), float16=False, config=config))
    np.testing.assert_array_equal(got[0], expected[0])


def test_sd2_unused_last_open_clip_layer_is_dropped(checkpoints, tmp_path):
    """Real SD 2.x files hold all 24 OpenCLIP layers; the model uses 23 (penultimate)."""
    weights = folder_to_original(FIXTURES / "models" / "tiny-sd2", "sd2")
    layer = "cond_stage_model.model.transformer.resblocks."
    extra = {
        k.replace(f"{layer}2.", f"{layer}3."): v for k, v in weights.items() if f"{layer}2." in k
    }
    write_safetensors({**weights, **extra}, tmp_path / "sd2.safetensors")
    config = tiny_config("tiny-sd2")
    expected = outputs(StableDiffusion(str(checkpoints["tiny-sd2"]), float16=False, config=config))
    got = outputs(StableDiffusion(str(tmp_path / "sd2.safetensors"), float16=False, config=config))
    np.testing.assert_array_equal(got[0], expected[0])


def test_float16_and_quantized(checkpoints):
    config = tiny_config("tiny-sdxl")
    sd = StableDiffusion(str(checkpoints["tiny-sdxl"]), float16=True, quantize=True, config=config)
    assert sd.unet.conv_in.weight.dtype == mx.float16
    x = None
    for x in sd.generate_latents("a cat", num_steps=2, seed=0, cfg_weight=5.0):
        mx.eval(x)
    assert np.isfinite(np.array(sd.decode(x))).all()


# -- configuration -------------------------------------------------------------------------


def test_prediction_type_and_image_size_are_honored(checkpoints):
    config = tiny_config("tiny-sd1")
    sd = StableDiffusion(
        str(checkpoints["tiny-sd1"]),
        float16=False,
        config=config,
        prediction_type="v_prediction",
        image_size=128,
    )
    assert sd.components.scheduler_config.prediction_type == "v_prediction"
    assert (sd.defaults.width, sd.defaults.height) == (128, 128)
    default = StableDiffusion(str(checkpoints["tiny-sd1"]), float16=False, config=config)
    assert default.components.scheduler_config.prediction_type == "epsilon"
    assert default.defaults.width == 64
    with pytest.raises(ValueError, match="prediction type"):
        StableDiffusion(str(checkpoints["tiny-sd1"]), config=config, prediction_type="sample")


def test_presets_per_architecture():
    sd1, sd2, sd2_base, xl = (
        single_file.preset_for("sd1"),
        single_file.preset_for("sd2"),
        single_file.preset_for("sd2", "epsilon"),
        single_file.preset_for("sdxl"),
    )
    # SD 1.5's scheduler config has no prediction_type: every sampler's default applies.
    assert sd1.unet.sample_size * 8 == 512 and sd1.scheduler.prediction_type is None
    assert make_sampler("euler", sd1.scheduler).config.prediction_type == "epsilon"
    # SD 2.x files do not say which they are: the 768 v-prediction model unless told.
    assert sd2.unet.sample_size * 8 == 768 and sd2.scheduler.prediction_type == "v_prediction"
    assert sd2_base.unet.sample_size * 8 == 512 and sd2_base.scheduler.prediction_type == "epsilon"
    assert xl.unet.sample_size * 8 == 1024 and xl.is_xl
    for preset in (sd1, sd2, xl):
        schedule = preset.scheduler
        assert (schedule.beta_schedule, schedule.beta_start, schedule.beta_end) == (
            "scaled_linear",
            0.00085,
            0.012,
        )
        assert schedule.steps_offset == 1
    # As the hub repos diffusers takes single files' configs from: SD 1.x/2.x lack
    # timestep_spacing, so that each sampler's own default applies.
    assert (sd1.scheduler.timestep_spacing, sd2.scheduler.timestep_spacing) == (None, None)
    assert xl.scheduler.timestep_spacing == "leading"
    assert single_file.with_overrides(sd1, "v_prediction", 768).unet.sample_size == 96


def _layout(model: nn.Module) -> dict[str, np.ndarray]:
    """A model's parameters in the diffusers layout (convolutions OIHW), as zero-stride
    arrays: names and shapes of a full-size model without its memory."""
    out = {}
    for key, shape in _shapes(model).items():
        if len(shape) == 4:
            shape = (shape[0], shape[3], *shape[1:3])
        out[key] = np.broadcast_to(np.float32(0), shape)
    return out


def _shapes(weights: dict | nn.Module) -> dict[str, tuple[int, ...]]:
    if isinstance(weights, nn.Module):
        weights = dict(nn.utils.tree_flatten(weights.parameters()))
    return {k: tuple(v.shape) for k, v in weights.items()}


@pytest.mark.parametrize("preset", ["sd-1.5", "sd-2.1", "sdxl"])
def test_full_size_layouts_map_onto_the_presets(preset):
    """The full-size architectures, not only the tiny ones: every weight of each preset's
    modules, written in the original layout by the inverse mapping that diffusers' loader
    proved on the tiny models, maps back onto the same names and shapes. SD 2.x files
    hold a 24th OpenCLIP layer that the model does not use."""
    config = PRESETS[preset]
    unet = UNetModel(config.unet)
    ldm = original_layout.unet_to_original(_layout(unet), dataclasses.asdict(config.unet))
    ldm = {k.removeprefix("model.diffusion_model."): v for k, v in ldm.items()}
    mapped = diffusers_keys.map_unet(original.map_unet(ldm, config.unet))
    assert _shapes(mapped) == _shapes(unet)

    vae = Autoencoder(config.vae)
    ldm = original_layout.vae_to_original(_layout(vae), dataclasses.asdict(config.vae))
    ldm = {k.removeprefix("first_stage_model."): v for k, v in ldm.items()}
    mapped = diffusers_keys.map_vae(original.map_vae(ldm, config.vae))
    assert _shapes(mapped) == _shapes(vae)

    for encoder_config in config.text_encoders:
        encoder = CLIPTextModel(encoder_config)
        expected = _shapes(encoder)
        weights = _layout(encoder)
        if encoder_config.hidden_act == "quick_gelu":  # OpenAI CLIP-L
            mapped = original.map_clip(original_layout.clip_to_original(weights, ""))
        else:
            rng = np.random.default_rng(0)
            ldm = original_layout.open_clip_to_original(
                weights, "", encoder_config.hidden_size, rng
            )
            last = encoder_config.num_hidden_layers - 1
            ldm.update(
                {
                    k.replace(f"resblocks.{last}.", f"resblocks.{last + 1}."): v
                    for k, v in ldm.items()
                    if f"resblocks.{last}." in k
                }
            )
            # Lazy: splitting the fused projections computes nothing.
            ldm = {k: mx.zeros(v.shape) if "in_proj" in k else v for k, v in ldm.items()}
            mapped = original.map_open_clip(ldm, encoder_config)
        assert _shapes(mapped) == expected


def test_wrong_config_kind_is_refused(checkpoints):
    with pytest.raises(SingleFileError, match=r"SD 1\.x checkpoint but the given config has 2"):
        StableDiffusion(str(checkpoints["tiny-sd1"]), config=tiny_config("tiny-sdxl"))


def test_mismatched_shapes_name_the_component(checkpoints):
    """A tiny SD 1.x file is not a full-size SD 1.5: the error says what does not fit."""
    with pytest.raises(SingleFileError, match=r"UNet.*wrong shape.*detected an SD 1.x"):
        StableDiffusion(str(checkpoints["tiny-sd1"]), float16=False)


# -- unsupported files ---------------------------------------------------------------------


def fake(**overrides) -> dict[str, mx.array]:
    """A tiny set of SD 1.x-like keys; each test changes one thing."""
    keys = {
        "model.diffusion_model.input_blocks.0.0.weight": mx.zeros((8, 4, 3, 3)),
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": mx.zeros(8),
        "first_stage_model.decoder.conv_in.weight": mx.zeros((8, 4, 3, 3)),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": mx.zeros(8),
    }
    keys.update(overrides)
    return {k: v for k, v in keys.items() if v is not None}


UNSUPPORTED = {
    "instruct-pix2pix": (
        fake(**{"model.diffusion_model.input_blocks.0.0.weight": mx.zeros((8, 8, 3, 3))}),
        "8 input channels",
    ),
    "sd3": (
        {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": mx.zeros((3, 1))},
        "transformer (MMDiT/DiT) model such as SD3",
    ),
    "flux": ({"double_blocks.0.img_attn.qkv.weight": mx.zeros((3, 1))}, "Flux"),
    "lora as model": (
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": mx.zeros((4, 8))},
        "pass the file with --lora",
    ),
    "peft lora as model": (
        {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": mx.zeros((4, 8))},
        "this is a LoRA",
    ),
    "vae only": (
        {
            "encoder.down.0.block.0.conv1.weight": mx.zeros(1),
            "decoder.up.0.block.0.conv1.weight": mx.zeros(1),
        },
        "VAE-only",
    ),
    "diffusers component": (
        {"down_blocks.0.resnets.0.conv1.weight": mx.zeros(1)},
        "diffusers layout",
    ),
    "controlnet": ({"control_model.input_blocks.0.0.weight": mx.zeros(1)}, "ControlNet"),
    "refiner": (
        fake(
            **{
                "cond_stage_model.transformer.text_model.final_layer_norm.weight": None,
                "conditioner.embedders.0.model.ln_final.weight": mx.zeros(8),
            }
        ),
        "SDXL refiner",
    ),
    "unet only": (
        fake(**{"cond_stage_model.transformer.text_model.final_layer_norm.weight": None}),
        "no text encoder",
    ),
    "no vae": (fake(**{"first_stage_model.decoder.conv_in.weight": None}), "has no VAE"),
    "something else": ({"weight": mx.zeros(1), "bias": mx.zeros(1)}, "not a Stable Diffusion"),
}


@pytest.mark.parametrize("kind", UNSUPPORTED)
def test_unsupported_files_are_named(kind):
    weights, message = UNSUPPORTED[kind]
    with pytest.raises(SingleFileError, match=re.escape(message)):
        detect_architecture(weights)


def test_detection_of_supported_layouts():
    assert detect_architecture(fake()) == "sd1"
    inpainting = fake(**{"model.diffusion_model.input_blocks.0.0.weight": mx.zeros((8, 9, 3, 3))})
    assert detect_architecture(inpainting) == "sd1"
    sd2 = fake(
        **{
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": None,
            "cond_stage_model.model.ln_final.weight": mx.zeros(8),
        }
    )
    assert detect_architecture(sd2) == "sd2"
    xl = fake(
        **{
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": None,
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": mx.zeros(8),
            "conditioner.embedders.1.model.ln_final.weight": mx.zeros(8),
        }
    )
    assert detect_architecture(xl) == "sdxl"


def test_unsupported_file_error_names_the_file(tmp_path):
    path = tmp_path / "pix2pix.safetensors"
    mx.save_safetensors(str(path), UNSUPPORTED["instruct-pix2pix"][0])
    with pytest.raises(SingleFileError, match=r"pix2pix\.safetensors cannot be loaded.*pix2pix"):
        StableDiffusion(str(path))
    with pytest.raises(ValueError, match="does not exist"):
        StableDiffusion(str(tmp_path / "missing.ckpt"))


def test_cli_names_what_does_not_fit_in_a_single_file(checkpoints, tmp_path):
    """The script takes a single file and --prediction-type, and reports a file that does
    not fit the preset of its architecture."""
    output = tmp_path / "out.png"
    result = subprocess.run(
        [
            sys.executable,
            "txt2image.py",
            "a cat",
            "--model",
            str(checkpoints["tiny-sd1"]),
            "--prediction-type",
            "epsilon",
            "--steps",
            "1",
            "--seed",
            "1",
            "--output",
            str(output),
            "--no-float16",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=120,
    )
    # The tiny model is not a full-size SD 1.5, which is what the script assumes.
    assert result.returncode == 2
    assert "detected an SD 1.x checkpoint" in result.stderr


@pytest.mark.parametrize("name", list(MODELS))
def test_one_door_gives_folders_and_single_files_the_same_components(checkpoints, name):
    """`load_components` on a model folder and on the same weights as one file: the same
    architecture facts and the same weights; only what a single file cannot say differs
    (the sampler, A1111's default there; the architecture, detected from its keys)."""
    from_folder = load_components(FIXTURES / "models" / name, mx.float32)
    from_file = load_components(checkpoints[name], mx.float32, config=tiny_config(name))
    assert (from_folder.architecture, from_file.architecture) == (None, MODELS[name])
    assert from_folder.is_xl == from_file.is_xl == (MODELS[name] == "sdxl")
    assert from_folder.force_zeros_for_empty_prompt == from_file.force_zeros_for_empty_prompt
    assert from_folder.scheduler_config == from_file.scheduler_config
    assert from_file.default_sampler == "dpm++2m_karras"
    assert from_folder.native_size == from_file.native_size == 64
    assert (from_folder.path, from_file.path) == (FIXTURES / "models" / name, checkpoints[name])
    for a, b in zip(
        [*from_folder.text_encoders, from_folder.unet, from_folder.vae],
        [*from_file.text_encoders, from_file.unet, from_file.vae],
        strict=True,
    ):
        for (key, x), (_, y) in zip(
            sorted(nn.utils.tree_flatten(a.parameters())),
            sorted(nn.utils.tree_flatten(b.parameters())),
            strict=True,
        ):
            np.testing.assert_array_equal(np.array(x), np.array(y), err_msg=key)


def test_native_size_of_a_folder_can_be_overridden():
    folder = FIXTURES / "models" / "tiny-sd2"
    assert load_components(folder, mx.float32, image_size=128).native_size == 128
    with pytest.raises(ValueError, match=r"image size must be a positive multiple of 8, at most"):
        load_components(folder, mx.float32, image_size=100)
    with pytest.raises(ValueError, match="config is only for single-file checkpoints"):
        load_components(folder, mx.float32, config=tiny_config("tiny-sd2"))
