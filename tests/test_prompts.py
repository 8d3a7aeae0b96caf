"""A1111's prompt syntax (stable_diffusion/prompts.py) and the weighted tokenization it feeds."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion.prompts import apply_emphasis, extract_loras, parse_prompt
from stable_diffusion.tokenizer import Tokenizer
from tests.helpers import FIXTURES

# The examples of A1111's own docstring, with the results it documents (doctests):
# AUTOMATIC1111/stable-diffusion-webui, modules/prompt_parser.py, parse_prompt_attention.
A1111_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ["a ", 1.0],
            ["house", 1.5730000000000004],
            [" ", 1.1],
            ["on", 1.0],
            [" a ", 1.1],
            ["hill", 0.55],
            [", sun, ", 1.1],
            ["sky", 1.4641000000000006],
            [".", 1.1],
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), A1111_EXAMPLES)
def test_parse_matches_a1111_docstring(text, expected):
    # Exact float equality: A1111's weights come from the same multiplications in order.
    assert parse_prompt(text) == [[tuple(fragment) for fragment in expected]]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("((word))", [("word", 1.1 * 1.1)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
        ("(several words:0.8)", [("several words", 0.8)]),
        ("a ((b:1.5) c)", [("a ", 1.0), ("b", 1.5 * 1.1), (" c", 1.1)]),
        ("a \\(b\\) \\\\", [("a (b) \\", 1.0)]),
        ("smile :) ok", [("smile :) ok", 1.0)]),  # a ")" with nothing open is text
        ("(a:1.5", [("a:1.5", 1.1)]),  # the ":1.5" needs its ")" to be a weight
        ("", [("", 1.0)]),
    ],
)
def test_parse_weights(text, expected):
    assert parse_prompt(text) == [expected]


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("a BREAK b", [[("a", 1.0)], [("b", 1.0)]]),
        ("(a BREAK b)", [[("a", 1.1)], [("b", 1.1)]]),
        ("BREAK a", [[("", 1.0)], [("a", 1.0)]]),
        ("a BREAK", [[("a", 1.0)], [("", 1.0)]]),
        ("a BREAKFAST", [[("a BREAKFAST", 1.0)]]),
        ("a break b", [[("a break b", 1.0)]]),
    ],
)
def test_parse_break(text, segments):
    assert parse_prompt(text) == segments


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)", "(a:..5)"])
def test_parse_rejects_malformed_weights(text):
    with pytest.raises(ValueError, match="is not a number"):
        parse_prompt(text)


def test_parse_rejects_weights_that_overflow():
    with pytest.raises(ValueError, match="multiply to inf"):
        parse_prompt("((a:1" + "0" * 200 + "):1" + "0" * 200 + ")")


def test_extract_loras():
    text, loras = extract_loras("a cat <lora:style:0.8>, <lora:detail> night")
    assert text == "a cat ,  night"
    assert loras == [("style", 0.8), ("detail", 1.0)]
    assert extract_loras("no tags (a:1.2)") == ("no tags (a:1.2)", [])


@pytest.mark.parametrize(
    "text", ["<lora:x:abc>", "<lora::1>", "<lora:x:0.8:0.5>", "<lora:x:nan>", "<lora:x:inf>"]
)
def test_extract_loras_rejects_malformed_tags(text):
    with pytest.raises(ValueError, match="<lora:name:weight>"):
        extract_loras(text)


def test_emphasis_restores_each_chunks_mean():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 5, 3)).astype(np.float32) + 0.5
    weights = np.array([[1, 1.1, 1.5, 1, 1], [1, 1, 1, 0.5, 1]], dtype=np.float32)
    result = np.array(apply_emphasis(mx.array(hidden), mx.array(weights)))
    # A1111's formula, per chunk: z * w, then * (mean before / mean after).
    for z, w, out in zip(hidden, weights, result, strict=True):
        weighted = z * w[:, None]
        np.testing.assert_allclose(out, weighted * (z.mean() / weighted.mean()), rtol=1e-6)
        assert math.isclose(out.mean(), z.mean(), rel_tol=1e-5)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_folder(FIXTURES / "models" / "tiny-sd1" / "tokenizer")


def test_unweighted_prompt_tokenizes_as_before(tokenizer):
    text = "a photo of a cat, " * 30
    rows, weights = tokenizer.encode_weighted_chunks(parse_prompt(text))
    assert rows == tokenizer.encode_chunks(text)
    assert len(rows) > 1 and all(w == 1.0 for row in weights for w in row)


def test_weighted_fragments_keep_their_weights(tokenizer):
    rows, weights = tokenizer.encode_weighted_chunks(parse_prompt("a (red:1.5) cat"))
    a, red, cat = (tokenizer.tokenize(word) for word in ("a", "red", "cat"))
    ids = [*a, *red, *cat]
    assert rows == [tokenizer._wrap(ids)]
    expected = [1.0] * (1 + len(a)) + [1.5] * len(red) + [1.0] * (len(cat) + 76 - len(ids))
    assert weights == [expected]


def test_break_starts_a_new_chunk(tokenizer):
    rows, weights = tokenizer.encode_weighted_chunks(parse_prompt("a cat BREAK (a dog)"))
    assert rows == [
        tokenizer._wrap(tokenizer.tokenize("a cat")),
        tokenizer._wrap(tokenizer.tokenize("a dog")),
    ]
    assert len(weights) == 2 and len(weights[1]) == 77
    # "a BREAK" is one chunk, "BREAK a" two, as in A1111.
    assert len(tokenizer.encode_weighted_chunks(parse_prompt("a BREAK"))[0]) == 1
    assert len(tokenizer.encode_weighted_chunks(parse_prompt("BREAK a"))[0]) == 2


def test_embedding_tokens_stay_in_one_chunk(tokenizer):
    tokenizer = Tokenizer(tokenizer.vocab, list(tokenizer.bpe_ranks), max_length=77)
    tokenizer.add_embedding("emb", [5000, 5001, 5002])
    word = tokenizer.tokenize("a")
    assert len(word) == 1
    rows, weights = tokenizer.encode_weighted_chunks([[("a " * 74 + "emb", 1.0)]])
    # 74 tokens, then the three vectors do not fit in the chunk's one free place.
    assert rows[0][1:76] == word * 74 + [tokenizer.eos_id]
    assert rows[1][:5] == [tokenizer.bos_id, 5000, 5001, 5002, tokenizer.eos_id]
    assert len(weights) == 2
