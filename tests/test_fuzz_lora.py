"""Damaged and hostile LoRA files: `load_lora` either merges them or raises a ValueError
with a message, and a refused file leaves the model as it was.

Mutations: byte flips anywhere in a real LoRA (header or data), truncation and trailing
junk, and well-formed safetensors with wrong shapes, ranks, dtypes, alphas and names."""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stable_diffusion import StableDiffusion
from tests.helpers import FIXTURES

pytestmark = pytest.mark.slow  # deselect with -m "not slow"; CI runs them

LORA = (FIXTURES / "lora" / "sd1_kohya.safetensors").read_bytes()
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = [
    "lora_unet_down_blocks_0_attentions_0_proj_in",
    "lora_unet_down_blocks_0_resnets_0_conv1",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te2_text_model_encoder_layers_0_mlp_fc1",
    "lora_unet_input_blocks_4_1_proj_in",
    "lora_unet_nothing_here",
    "unet.down_blocks.0.attentions.0.proj_out",
    "text_encoder.text_model.encoder.layers.1.mlp.fc2",
]
SUFFIXES = [".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.weight"]


@cache
def model() -> StableDiffusion:
    return StableDiffusion(str(FIXTURES / "models" / "tiny-sd1"), float16=False)


@cache
def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="fuzz_lora_"))


def snapshot(sd: StableDiffusion) -> list[mx.array]:
    return [v for _, v in nn.utils.tree_flatten(sd.unet.parameters())] + [
        v for _, v in nn.utils.tree_flatten(sd.text_encoders[0].parameters())
    ]


def check(data: bytes, suffix: str = ".safetensors") -> None:
    sd = model()
    path = workdir() / f"lora{suffix}"
    path.write_bytes(data)
    before = snapshot(sd)
    try:
        sd.load_lora(path, 0.5)
    except ValueError as e:
        assert str(e)
        after = snapshot(sd)
        assert all(a is b for a, b in zip(before, after, strict=True)), "a refused file changed"
        assert sd.loras == []
    else:
        sd.unload_loras()
        after = snapshot(sd)
        assert all(mx.array_equal(a, b).item() for a, b in zip(before, after, strict=True))


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(LORA) - 1), st.integers(1, 255)), max_size=8))
def test_byte_flips(flips):
    data = bytearray(LORA)
    for position, mask in flips:
        data[position] ^= mask
    check(bytes(data))


@SETTINGS
@given(st.integers(0, len(LORA)), st.binary(max_size=64))
def test_truncation_and_junk(length, junk):
    check(LORA[:length] + junk)


def tensors():
    shape = st.lists(st.integers(0, 40), min_size=0, max_size=4).map(tuple)
    dtype = st.sampled_from([np.float32, np.float16, np.int32, np.uint8])
    value = st.sampled_from([0.0, 1.0, -2.5, 1e30, np.inf, np.nan])
    return st.tuples(shape, dtype, value)


@SETTINGS
@given(
    st.dictionaries(
        st.tuples(st.sampled_from(NAMES), st.sampled_from(SUFFIXES)).map("".join),
        tensors(),
        min_size=1,
        max_size=6,
    )
)
def test_wrong_shapes_keys_and_values(entries):
    rng = np.random.default_rng(0)
    arrays = {}
    for key, (shape, dtype, value) in entries.items():
        array = rng.standard_normal(shape) * value if value else np.zeros(shape)
        with np.errstate(invalid="ignore", over="ignore"):
            arrays[key] = mx.array(array.astype(dtype))
    path = workdir() / "built.safetensors"
    mx.save_safetensors(str(path), arrays)
    check(path.read_bytes())


PEFT_LORA = FIXTURES / "lora" / "sd1_peft.safetensors"
# Alphas and JSON that a hostile lora_adapter_metadata may hold (issue 20): huge and
# non-finite numbers, absurd digit counts, wrong types, deep nesting.
HOSTILE_ALPHAS = st.one_of(
    st.sampled_from(
        ["1e400", "-1e400", "1" + "0" * 5000, "NaN", "Infinity", "1e300", "-0.0", "true", "null"]
    ),
    st.integers(0, 400).map(lambda n: "[" * n + "8" + "]" * n),
    st.integers(0, 400).map(lambda n: '{"a":' * n + "8" + "}" * n),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(max_size=8).map(lambda t: f'"{t}"'),
)


@SETTINGS
@given(alpha=HOSTILE_ALPHAS, in_pattern=st.booleans())
def test_hostile_adapter_metadata(alpha, in_pattern):
    weights = mx.load(str(PEFT_LORA))
    value = f'{{"down_blocks.0.attentions.0.proj_in": {alpha}}}' if in_pattern else alpha
    key = "unet.alpha_pattern" if in_pattern else "unet.lora_alpha"
    metadata = f'{{"{key}": {value}}}'
    path = workdir() / "metadata.safetensors"
    mx.save_safetensors(str(path), weights, metadata={"lora_adapter_metadata": metadata})
    check(path.read_bytes())


def test_fuzz_tests_found_the_model():
    """The fixture LoRA itself merges (so that the mutations start from a valid file)."""
    sd = model()
    sd.load_lora(FIXTURES / "lora" / "sd1_kohya.safetensors")
    assert len(sd.loras) == 1
    sd.unload_loras()
