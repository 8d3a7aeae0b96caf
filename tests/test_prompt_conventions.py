"""A1111's prompt weighting, clip skip and textual inversion against the references of
tests/reference/prompt_conventions.py: text-encoder outputs within 1e-4, images within
2e-4 (as test_pipeline.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion import StableDiffusion
from stable_diffusion.prompts import parse_prompt
from stable_diffusion.weights.files import WeightFileError
from tests.helpers import FIXTURES
from tests.reference.inputs import (
    CLIP_SKIP,
    CONVENTION_STEPS,
    DIFFUSERS_EMBEDDING,
    DIFFUSERS_EMBEDDING_PROMPT,
    DIFFUSERS_EMBEDDING_TOKEN,
    EMBEDDING_FILES,
    EMBEDDING_NEGATIVE_PROMPT,
    EMBEDDING_PROMPT,
    WEIGHTED_FRAGMENTS,
    WEIGHTED_NEGATIVE_FRAGMENTS,
    WEIGHTED_NEGATIVE_PROMPT,
    WEIGHTED_PROMPT,
)

REFERENCE = dict(np.load(FIXTURES / "reference" / "prompt_conventions.npz"))
EMBEDDINGS = FIXTURES / "embeddings"
MODELS = ["tiny-sd1", "tiny-sd2", "tiny-sdxl"]
HIDDEN_TOLERANCE = 1e-4
PIXEL_TOLERANCE = 2e-4


def load(model: str) -> StableDiffusion:
    return StableDiffusion(str(FIXTURES / "models" / model), float16=False)


def images(sd: StableDiffusion, prompt: str, negative: str | None, cfg=7.5, **kwargs):
    latents = sd.generate_latents(
        prompt,
        negative_text=negative,
        num_steps=CONVENTION_STEPS,
        cfg_weight=cfg,
        sampler="euler",
        latents=mx.array(REFERENCE["noise"].transpose(0, 2, 3, 1)),
        **kwargs,
    )
    for x in latents:
        mx.eval(x)
    return np.array(sd.decode(x))


def context(sd: StableDiffusion, prompt: str, clip_skip: int = 1) -> np.ndarray:
    return np.array(sd._encode_texts([prompt], sd._chunk_count([prompt]), clip_skip)[0])


def test_reference_fragments_are_what_the_parser_gives():
    assert parse_prompt(WEIGHTED_PROMPT) == WEIGHTED_FRAGMENTS
    assert parse_prompt(WEIGHTED_NEGATIVE_PROMPT) == WEIGHTED_NEGATIVE_FRAGMENTS


@pytest.mark.parametrize("model", MODELS)
def test_weighting_matches_reference(model):
    sd = load(model)
    for prompt, key in [(WEIGHTED_PROMPT, "context"), (WEIGHTED_NEGATIVE_PROMPT, "negative")]:
        expected = REFERENCE[f"{model}.weighted.{key}" + ("_context" if key == "negative" else "")]
        n_chunks = expected.shape[1] // 77
        hidden, _ = sd._encode_texts([prompt], n_chunks)
        np.testing.assert_allclose(np.array(hidden), expected, atol=HIDDEN_TOLERANCE, rtol=0)
    result = images(sd, WEIGHTED_PROMPT, WEIGHTED_NEGATIVE_PROMPT)
    np.testing.assert_allclose(
        result, REFERENCE[f"{model}.weighted.images"], atol=PIXEL_TOLERANCE, rtol=0
    )


@pytest.mark.parametrize("model", MODELS)
def test_weights_change_the_conditioning(model):
    # The reference above would also pass if both sides ignored the weights; they do not.
    sd = load(model)
    weighted = context(sd, "a (red:1.5) fox")
    plain = context(sd, "a red fox")
    assert weighted.shape == plain.shape
    assert np.abs(weighted - plain).max() > 1e-3


@pytest.mark.parametrize("model", MODELS)
def test_clip_skip_hidden_states_match_diffusers(model):
    """diffusers tokenizes the prompt literally (no weighting) and truncates to 77: encode
    the same token rows."""
    sd = load(model)
    prompt = _literal(WEIGHTED_PROMPT)
    hidden, _ = sd._encode_texts([prompt], 1, CLIP_SKIP)
    expected = REFERENCE[f"{model}.clip_skip.context"]
    np.testing.assert_allclose(np.array(hidden), expected, atol=HIDDEN_TOLERANCE, rtol=0)
    unskipped, _ = sd._encode_texts([prompt], 1)
    assert np.abs(np.array(unskipped) - expected).max() > 1e-3


def _literal(prompt: str) -> str:
    """`prompt` escaped so that our parser reads it as plain text, as diffusers does; BREAK
    as a plain word is lowercase ("break" tokenizes the same: the tokenizer lowercases)."""
    for char in "\\()[]":
        prompt = prompt.replace(char, "\\" + char)
    return prompt.replace("BREAK", "break")


@pytest.mark.parametrize("model", MODELS)
def test_clip_skip_images_match_diffusers(model):
    sd = load(model)
    prompt, negative = _literal(WEIGHTED_PROMPT), _literal(WEIGHTED_NEGATIVE_PROMPT)
    result = images(sd, prompt, negative, clip_skip=CLIP_SKIP)
    expected = REFERENCE[f"{model}.clip_skip.images"]
    np.testing.assert_allclose(result, expected, atol=PIXEL_TOLERANCE, rtol=0)
    # diffusers' own pipeline call with clip_skip, without guidance.
    result = images(sd, prompt, None, cfg=1.0, clip_skip=CLIP_SKIP)
    expected = REFERENCE[f"{model}.clip_skip.images_cfg1"]
    np.testing.assert_allclose(result, expected, atol=PIXEL_TOLERANCE, rtol=0)


@pytest.mark.parametrize("clip_skip", [0, 4, -1])
def test_clip_skip_out_of_range_is_refused(clip_skip):
    sd = load("tiny-sd1")  # three layers
    with pytest.raises(ValueError, match="clip skip must be between 1"):
        sd.generate_latents("a fox", num_steps=1, clip_skip=clip_skip)


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_embeddings_match_diffusers(model):
    sd = load(model)
    tokens = [sd.load_embedding(EMBEDDINGS / model / name) for name in EMBEDDING_FILES[model]]
    assert tokens == [name.split(".")[0] for name in EMBEDDING_FILES[model]]
    for prompt, key in [(EMBEDDING_PROMPT, "context"), (EMBEDDING_NEGATIVE_PROMPT, "negative")]:
        expected = REFERENCE[f"{model}.embedding.{key}" + ("_context" if key == "negative" else "")]
        hidden, _ = sd._encode_texts([prompt], 1)
        np.testing.assert_allclose(np.array(hidden), expected, atol=HIDDEN_TOLERANCE, rtol=0)
    result = images(sd, EMBEDDING_PROMPT, EMBEDDING_NEGATIVE_PROMPT)
    np.testing.assert_allclose(
        result, REFERENCE[f"{model}.embedding.images"], atol=PIXEL_TOLERANCE, rtol=0
    )


def test_embedding_changes_the_conditioning():
    sd = load("tiny-sd1")
    before = context(sd, EMBEDDING_PROMPT)
    sd.load_embedding(EMBEDDINGS / "tiny-sd1" / "foxstyle.pt")
    assert np.abs(context(sd, EMBEDDING_PROMPT) - before).max() > 1e-3


def test_diffusers_embedding_names_its_token():
    sd = load("tiny-sd1")
    path = EMBEDDINGS / "tiny-sd1-diffusers" / DIFFUSERS_EMBEDDING
    assert sd.load_embedding(path) == DIFFUSERS_EMBEDDING_TOKEN
    expected = REFERENCE["tiny-sd1.diffusers_embedding.context"]
    hidden, _ = sd._encode_texts([DIFFUSERS_EMBEDDING_PROMPT], 1)
    np.testing.assert_allclose(np.array(hidden), expected, atol=HIDDEN_TOLERANCE, rtol=0)


def test_embedding_token_can_be_given():
    sd = load("tiny-sd1")
    assert sd.load_embedding(EMBEDDINGS / "tiny-sd1" / "snowy.safetensors", "frost") == "frost"
    with_embedding = context(sd, "a frost fox")
    assert np.abs(with_embedding - context(load("tiny-sd1"), "a frost fox")).max() > 1e-3


def test_embedding_for_another_model_is_refused():
    sd = load("tiny-sdxl")
    with pytest.raises(ValueError, match="does not fit this model"):
        sd.load_embedding(EMBEDDINGS / "tiny-sd1" / "snowy.safetensors")
    sd = load("tiny-sd1")
    with pytest.raises(ValueError, match="does not fit this model"):
        sd.load_embedding(EMBEDDINGS / "tiny-sdxl" / "foxstyle.safetensors")


def test_non_embedding_file_is_refused():
    sd = load("tiny-sd1")
    with pytest.raises(WeightFileError, match="not a textual-inversion embedding"):
        sd.load_embedding(FIXTURES / "lora" / "sd1_kohya.safetensors")


@pytest.mark.parametrize("model", MODELS)
def test_prompt_without_syntax_is_encoded_exactly_as_before(model):
    """Bit for bit what the text encoders give for the plain token rows (the computation
    before weighting existed), for prompts with characters the syntax gives meaning to
    elsewhere (":", an unmatched ")")."""
    sd = load(model)
    texts = [EMBEDDING_PROMPT * 8, "a cat: cute :) smile", ""]
    n_chunks = sd._chunk_count(texts)
    hidden, _ = sd._encode_texts(texts, n_chunks)
    expected = []
    for tokenizer, encoder in zip(sd.tokenizers, sd.text_encoders, strict=True):
        rows = []
        for text in texts:
            chunks = tokenizer.encode_chunks(text)
            assert tokenizer.encode_weighted_chunks(parse_prompt(text))[0] == chunks
            rows += chunks + tokenizer.encode_chunks("") * (n_chunks - len(chunks))
        output = encoder(mx.array(rows))
        states = output.penultimate_hidden_state if sd.is_xl else output.last_hidden_state
        expected.append(np.array(states).reshape(len(texts), n_chunks * 77, -1))
    assert n_chunks > 1
    assert np.array_equal(np.array(hidden), np.concatenate(expected, axis=-1))


def _save(path, tensors: dict) -> str:
    mx.save_safetensors(str(path), {k: mx.array(v) for k, v in tensors.items()})
    return str(path)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"emb_params": np.full((2, 32), np.nan, np.float32)}, "NaN or infinite"),
        ({"emb_params": np.zeros((1, 2, 32), np.float32)}, "array of floats"),
        ({"emb_params": np.zeros((2, 32), np.int32)}, "array of floats"),
        ({"emb_params": np.zeros((76, 32), np.float32)}, "a chunk takes 1 to 75"),
        ({"a": np.zeros(32, np.float32), "b": np.zeros(32, np.float32)}, "not a textual-inv"),
    ],
)
def test_malformed_embeddings_are_refused_and_change_nothing(tmp_path, tensors, message):
    sd = load("tiny-sd1")
    before = context(sd, "a stem fox")
    with pytest.raises(ValueError, match=message):
        sd.load_embedding(_save(tmp_path / "stem.safetensors", tensors))
    assert sd.text_encoders[0].text_model.embeddings._added_tokens is None
    assert np.array_equal(context(sd, "a stem fox"), before)


def test_embedding_name_without_tokens_is_refused(tmp_path):
    sd = load("tiny-sd1")
    path = _save(tmp_path / "x.safetensors", {"emb_params": np.zeros((1, 32), np.float32)})
    with pytest.raises(ValueError, match="has no tokens"):
        sd.load_embedding(path, token="   ")


def test_added_tokens_do_not_move_the_pooled_position():
    """Configs with the legacy eos id 2 pool at the highest id; an embedding's ids are
    higher than the end-of-text token's and must not be taken for it."""
    sd = load("tiny-sd1")
    encoder = sd.text_encoders[0]
    assert encoder.config.eos_token_id == 2
    sd.load_embedding(EMBEDDINGS / "tiny-sd1" / "foxstyle.pt")
    rows, _ = sd.tokenizers[0].encode_weighted_chunks([[("a foxstyle", 1.0)]])
    assert max(rows[0]) >= encoder.config.vocab_size
    output = encoder(mx.array(rows))
    eos = rows[0].index(sd.tokenizers[0].eos_id)
    np.testing.assert_array_equal(
        np.array(output.pooled[0]), np.array(output.last_hidden_state[0, eos])
    )


def test_prompt_lora_tags_must_name_loaded_loras():
    sd = load("tiny-sd1")
    with pytest.raises(ValueError, match="no LoRA 'style' is loaded"):
        sd.generate_latents("a fox <lora:style:0.5>", num_steps=1)
    # A loaded LoRA, named by its file's stem: the tag is removed before encoding.
    sd.load_lora(FIXTURES / "lora" / "sd1_kohya.safetensors", 0.5)
    tagged = context(sd, "a fox <lora:sd1_kohya:0.5>")
    assert np.array_equal(tagged, context(sd, "a fox"))


def test_weighting_in_float16_stays_finite():
    sd = StableDiffusion(str(FIXTURES / "models" / "tiny-sdxl"), float16=True)
    sd.load_embedding(EMBEDDINGS / "tiny-sdxl" / "foxstyle.safetensors")
    hidden = context(sd, "a ((foxstyle:1.4)) [snow] BREAK night", clip_skip=2)
    assert hidden.shape[1] == 2 * 77 and np.isfinite(hidden).all()
