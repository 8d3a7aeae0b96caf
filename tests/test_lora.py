"""LoRAs merged into the tiny models against diffusers' load_lora_weights + fuse_lora
(fixtures from tests/reference/lora.py): kohya and diffusers/PEFT files, several strengths,
two LoRAs at once, SD 1.x/2.x/SDXL (SGM names). Unloading restores the weights exactly;
files that do not fit give clear errors and change nothing.

Tolerance, float32: max |ours - reference| <= 1e-4 * max |reference| + 1e-5."""

from __future__ import annotations

import argparse
import json
import pickle
import re
import zipfile

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from stable_diffusion import StableDiffusion, fast_cpu
from stable_diffusion.cli import lora_spec
from stable_diffusion.images import read_parameters
from stable_diffusion.lora import read_lora
from tests.helpers import FIXTURES, run

LORAS = FIXTURES / "lora"
CASES = json.loads((LORAS / "cases.json").read_text())


def lora(name: str) -> str:
    return str(LORAS / f"{name}.safetensors")


def nhwc(x: np.ndarray) -> mx.array:
    return mx.array(x.transpose(0, 2, 3, 1))


def outputs(sd: StableDiffusion, model: str) -> dict[str, np.ndarray]:
    """UNet and text encoder outputs on the inputs the reference used."""
    ref = np.load(FIXTURES / "reference" / f"{model}.npz")
    extra = {}
    if sd.is_xl:
        extra = {name: mx.array(ref[f"unet.{name}"]) for name in ("text_embeds", "time_ids")}
    timesteps, context = mx.array(ref["unet.timesteps"]), mx.array(ref["unet.context"])
    unet = sd.unet(nhwc(ref["unet.latents"]), timesteps, context, **extra)
    out = {"unet": np.array(unet).transpose(0, 3, 1, 2)}
    for name, encoder in zip(("text_encoder", "text_encoder_2"), sd.text_encoders, strict=False):
        ids = mx.array(ref[f"{name}.input_ids"])
        out[name] = np.array(encoder(ids).last_hidden_state)
    return out


def weights(sd: StableDiffusion) -> dict[str, np.ndarray]:
    models = {"unet": sd.unet, **{f"te{i}": e for i, e in enumerate(sd.text_encoders)}}
    return {
        f"{name}.{key}": np.array(value)
        for name, model in models.items()
        for key, value in nn.utils.tree_flatten(model.parameters())
    }


def assert_close(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    error = np.abs(ours - reference).max()
    assert error <= 1e-4 * np.abs(reference).max() + 1e-5, f"max abs error {error}"


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return dict(np.load(LORAS / "reference.npz"))


@pytest.fixture(scope="module")
def base_models() -> dict[str, StableDiffusion]:
    """One pipeline per model, without LoRAs, shared by the tests that do not change it."""
    models = {case["model"] for case in CASES.values()}
    return {m: StableDiffusion(str(FIXTURES / "models" / m), float16=False) for m in models}


@pytest.mark.parametrize("case", CASES)
def test_merged_loras_match_diffusers_fuse_lora(case, reference, base_models):
    model, loras = CASES[case]["model"], CASES[case]["loras"]
    sd = StableDiffusion(
        str(FIXTURES / "models" / model),
        float16=False,
        loras=[(lora(name), strength) for name, strength in loras],
    )
    ours = outputs(sd, model)
    base = outputs(base_models[model], model)
    touched = {layer.component for name, _ in loras for layer in read_lora(lora(name))}
    for key, value in ours.items():
        assert_close(value, reference[f"{case}.{key}"])
        # The LoRAs change what they touch (so that the comparison above means something).
        assert (np.abs(value - base[key]).max() > 1e-3) == (key in touched), key
    assert sd.loras == [(lora(name), strength) for name, strength in loras]


def test_unload_restores_the_weights_exactly(base_models):
    model = "tiny-sd1"
    sd = StableDiffusion(str(FIXTURES / "models" / model), float16=False)
    original = weights(sd)
    sd.load_lora(lora("sd1_kohya"), 0.7)
    sd.load_lora(lora("sd1_peft"), -0.5)
    changed = weights(sd)
    assert sum(not np.array_equal(changed[k], v) for k, v in original.items()) == 83
    sd.unload_loras()
    assert sd.loras == []
    restored = weights(sd)
    assert all(np.array_equal(restored[k], v) for k, v in original.items())
    for key, value in outputs(sd, model).items():
        np.testing.assert_array_equal(value, outputs(base_models[model], model)[key])


def test_load_lora_later_equals_loading_at_construction(reference):
    sd = StableDiffusion(str(FIXTURES / "models" / "tiny-sdxl"), float16=False)
    sd.load_lora(lora("sdxl_kohya"), 0.75)
    for key, value in outputs(sd, "tiny-sdxl").items():
        assert_close(value, reference[f"sdxl_kohya_0.75.{key}"])


def test_strength_zero_changes_nothing(base_models):
    sd = StableDiffusion(str(FIXTURES / "models" / "tiny-sd2"), float16=False)
    original = weights(sd)
    sd.load_lora(lora("sd2_kohya"), 0.0)
    assert all(np.array_equal(weights(sd)[k], v) for k, v in original.items())


def test_float16_model_stays_float16(reference):
    sd = StableDiffusion(str(FIXTURES / "models" / "tiny-sd1"), float16=True)
    sd.load_lora(lora("sd1_kohya"), 1.0)
    assert all(v.dtype == mx.float16 for _, v in nn.utils.tree_flatten(sd.unet.parameters()))
    ours = outputs(sd, "tiny-sd1")["unet"]
    expected = reference["sd1_kohya_1.0.unet"]
    assert np.abs(ours - expected).max() < 1e-2 * np.abs(expected).max()


def test_alpha_defaults_to_the_rank_and_scales_per_layer(tmp_path):
    """kohya's rule (diffusers 0.42 differs, see tests/reference/lora.py): no alpha means
    alpha = rank, and each layer's alpha scales that layer."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    rng = np.random.default_rng(1)
    pair = {
        f"{name}.lora_down.weight": rng.standard_normal((4, 16)).astype(np.float32),
        f"{name}.lora_up.weight": rng.standard_normal((16, 4)).astype(np.float32),
    }
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"

    def delta(alpha):
        tensors = dict(pair) if alpha is None else {**pair, f"{name}.alpha": np.float32(alpha)}
        sd = StableDiffusion(str(FIXTURES / "models" / "tiny-sd1"), float16=False)
        before = weights(sd)[layer]
        sd.load_lora(save(tmp_path / f"{alpha}.safetensors", tensors))
        return weights(sd)[layer] - before

    expected = pair[f"{name}.lora_up.weight"] @ pair[f"{name}.lora_down.weight"]
    np.testing.assert_allclose(delta(None), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(delta(4), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(delta(2), expected / 2, rtol=1e-5, atol=1e-5)


def test_older_diffusers_spellings_and_alpha_keys(tmp_path):
    """The PEFT fixture rewritten with `.lora.down/.lora.up` (and attention-processor
    `to_q_lora` names for the UNet attention) and `<module>.alpha` keys instead of the
    metadata merges to exactly the same weights."""
    peft = {k: np.array(v) for k, v in mx.load(lora("sd1_peft")).items()}
    alphas = {"unet": 5.0, "text_encoder": 7.0}
    old = {}
    for key, value in peft.items():
        module, _, part = key.rpartition(".lora_")
        kind = "down" if part == "A.weight" else "up"
        component = module.split(".")[0]
        match = re.fullmatch(r"(unet\..*\.attn\d)\.(to_q|to_v|to_out\.0)", module)
        if match:
            name = match[2].removesuffix(".0")
            old[f"{match[1]}.processor.{name}_lora.{kind}.weight"] = value
            old[f"{module}.alpha"] = np.float32(alphas[component])
        else:
            old[f"{module}.lora.{kind}.weight"] = value
            old[f"{module}.alpha"] = np.float32(alphas[component])
    folder = str(FIXTURES / "models" / "tiny-sd1")
    new_style = StableDiffusion(folder, float16=False, loras=[(lora("sd1_peft"), 0.8)])
    old_path = save(tmp_path / "old.safetensors", old)
    old_style = StableDiffusion(folder, float16=False, loras=[(old_path, 0.8)])
    expected = weights(new_style)
    assert all(np.array_equal(v, expected[k]) for k, v in weights(old_style).items())


# -- quantized models ----------------------------------------------------------------------


def test_quantized_model_merges_before_quantizing_and_unloads_to_the_plain_quantized():
    folder = str(FIXTURES / "models" / "tiny-sdxl")
    merged_first = StableDiffusion(
        folder, float16=False, quantize=True, loras=[(lora("sdxl_kohya"), 0.75)]
    )
    plain = StableDiffusion(folder, float16=False, quantize=True)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in plain.unet.named_modules())
    later = StableDiffusion(folder, float16=False, quantize=True)
    later.load_lora(lora("sdxl_kohya"), 0.75)
    # Dequantize-merge-requantize is close to merging first (both quantize W + delta once
    # more or less), and far from no LoRA.
    a, b, c = (outputs(sd, "tiny-sdxl")["unet"] for sd in (merged_first, later, plain))
    assert np.abs(a - b).max() < 0.1 * np.abs(a - c).max()
    for sd in (merged_first, later):
        sd.unload_loras()
        restored = weights(sd)
        assert all(np.array_equal(restored[k], v) for k, v in weights(plain).items())


# -- bad files -----------------------------------------------------------------------------


def save(path, tensors: dict[str, np.ndarray]) -> str:
    mx.save_safetensors(str(path), {k: mx.array(v) for k, v in tensors.items()})
    return str(path)


def kohya(tmp_path, name="lora_unet_down_blocks_0_attentions_0_proj_in", down=(4, 16), up=(16, 4)):
    rng = np.random.default_rng(0)
    return save(
        tmp_path / "bad.safetensors",
        {
            f"{name}.lora_down.weight": rng.standard_normal(down).astype(np.float32),
            f"{name}.lora_up.weight": rng.standard_normal(up).astype(np.float32),
        },
    )


@pytest.fixture
def sd1():
    return StableDiffusion(str(FIXTURES / "models" / "tiny-sd1"), float16=False)


def assert_refused(sd: StableDiffusion, path: str, message: str) -> None:
    before = weights(sd)
    with pytest.raises(ValueError, match=message):
        sd.load_lora(path)
    after = weights(sd)
    assert all(np.array_equal(after[k], v) for k, v in before.items()), "weights changed"
    assert sd.loras == []


def test_lora_for_another_architecture(sd1):
    # SDXL's SGM names partly resolve on SD 1.x, partly not; text_encoder_2 does not exist.
    assert_refused(sd1, lora("sdxl_kohya"), r"match no layer of this model.*another architecture")
    sdxl = StableDiffusion(str(FIXTURES / "models" / "tiny-sdxl"), float16=False)
    assert_refused(sdxl, lora("sd1_kohya"), r"match no layer of this model.*another architecture")


def test_unknown_layers_are_listed(sd1, tmp_path):
    path = kohya(tmp_path, name="lora_unet_down_blocks_0_attentions_0_nonexistent")
    assert_refused(sd1, path, r"1 of its 1 LoRA layers match no layer.*attentions_0_nonexistent")


def test_wrong_shapes_and_ranks(sd1, tmp_path):
    assert_refused(sd1, kohya(tmp_path, down=(4, 8)), r"update of shape \(16, 8\).*\(16, 16\)")
    assert_refused(sd1, kohya(tmp_path, up=(16, 3)), "disagree on the rank")
    assert_refused(sd1, kohya(tmp_path, down=(4, 16, 3)), "not a low-rank pair")


def test_incomplete_and_unsupported_files(sd1, tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = save(tmp_path / "half.safetensors", {f"{name}.lora_down.weight": np.ones((4, 16))})
    assert_refused(sd1, path, r"has no up \(lora_B\) weight")
    path = save(tmp_path / "loha.safetensors", {f"{name}.hada_w1_a": np.ones((4, 16))})
    assert_refused(sd1, path, "LoHa/LoKr")
    path = save(tmp_path / "other.safetensors", {"some.weight": np.ones(3)})
    assert_refused(sd1, path, "not a LoRA in the kohya or diffusers/PEFT format")
    nan = np.ones((4, 16), np.float32)
    nan[0, 0] = np.nan
    path = save(
        tmp_path / "nan.safetensors",
        {f"{name}.lora_down.weight": nan, f"{name}.lora_up.weight": np.ones((16, 4), np.float32)},
    )
    assert_refused(sd1, path, "NaN or infinite")
    path = save(
        tmp_path / "alpha.safetensors",
        {
            f"{name}.lora_down.weight": np.ones((4, 16), np.float32),
            f"{name}.lora_up.weight": np.ones((16, 4), np.float32),
            f"{name}.alpha": np.ones(2, np.float32),
        },
    )
    assert_refused(sd1, path, "expected one number")
    with pytest.raises(ValueError, match="finite"):
        sd1.load_lora(lora("sd1_kohya"), float("nan"))


def test_a_model_file_is_not_a_lora(sd1):
    unet = FIXTURES / "models" / "tiny-sd1" / "unet" / "diffusion_pytorch_model.safetensors"
    assert_refused(sd1, str(unet), "not a LoRA")


def test_a_pickled_lora_cannot_run_code(sd1, tmp_path):
    """A .pt LoRA is read by the restricted unpickler: a global that would run code is
    refused before it is looked up."""

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"state_dict": Exploit()}, protocol=2))
    assert_refused(sd1, str(path), r"refusing to load __builtin__\.print")


# -- command line --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("style.safetensors", ("style.safetensors", 1.0)),
        ("style.safetensors:0.6", ("style.safetensors", 0.6)),
        ("style.safetensors:-1", ("style.safetensors", -1.0)),
        (r"C:\loras\style.safetensors", (r"C:\loras\style.safetensors", 1.0)),
        (r"C:\loras\style.safetensors:0.8", (r"C:\loras\style.safetensors", 0.8)),
        ("dir:with:colons/x.safetensors", ("dir:with:colons/x.safetensors", 1.0)),
    ],
)
def test_lora_spec(spec, expected):
    assert lora_spec(spec) == expected


@pytest.mark.parametrize("spec", [":0.5", "x.safetensors:nan", "x.safetensors:inf"])
def test_bad_lora_spec(spec):
    with pytest.raises(argparse.ArgumentTypeError):
        lora_spec(spec)


def test_scripts_take_loras_and_record_them(tmp_path):
    output = tmp_path / "out.png"
    model = str(FIXTURES / "models" / "tiny-sd1")
    result = run(
        "txt2image.py",
        "a cat",
        "--model",
        model,
        "--steps",
        "1",
        "--seed",
        "0",
        "--lora",
        f"{lora('sd1_kohya')}:0.7",
        "--lora",
        lora("sd1_peft"),
        "--output",
        str(output),
    )
    assert result.returncode == 0, result.stderr
    assert read_parameters(output).loras == (("sd1_kohya", 0.7), ("sd1_peft", 1.0))

    result = run(
        "image2image.py",
        str(output),
        "a dog",
        "--model",
        model,
        "--lora",
        lora("sdxl_kohya"),
        "--output",
        str(tmp_path / "dog.png"),
    )
    assert result.returncode == 2
    assert "match no layer of this model" in result.stderr
    result = run("txt2image.py", "a cat", "--model", model, "--lora", str(tmp_path / "no.pt"))
    assert result.returncode == 2
    assert "no.pt: no such file" in result.stderr


def test_read_lora_formats():
    kohya = {layer.name: layer for layer in read_lora(lora("sd1_kohya"))}
    assert kohya["down_blocks_0_resnets_0_conv1"].down.shape[2:] == (3, 3)  # LoCon
    peft = read_lora(lora("sd1_peft"))
    assert {layer.component for layer in peft} == {"unet", "text_encoder"}
    assert {layer.alpha for layer in peft} == {5.0, 7.0}  # from the file's metadata


def test_lora_merged_after_a_winograd_run_changes_its_convolutions(winograd_everywhere, reference):
    """The convolutions' transformed kernels, kept from a first run, follow the weights a
    LoRA merges afterwards."""
    sd = StableDiffusion(str(FIXTURES / "models" / "tiny-sdxl"), float16=False)
    with mx.stream(mx.cpu), fast_cpu():
        outputs(sd, "tiny-sdxl")
        sd.load_lora(lora("sdxl_kohya"), 0.75)
        for key, value in outputs(sd, "tiny-sdxl").items():
            assert_close(value, reference[f"sdxl_kohya_0.75.{key}"])
    assert winograd_everywhere
