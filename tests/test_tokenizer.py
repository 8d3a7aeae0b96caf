"""The CLIP tokenizer against ids recorded from transformers (tests/reference/tokenizer_ids.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stable_diffusion.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    Tokenizer,
    clip_vocabulary,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer"
REFERENCE = json.loads((FIXTURES / "ids.json").read_text(encoding="utf-8"))
PROMPTS: list[str] = REFERENCE["prompts"]
CASES = sorted(REFERENCE["cases"])
MAX_LENGTH = REFERENCE["max_length"]


@cache
def tokenizer_for(case: str) -> Tokenizer:
    vocab_name, pad_token = case.split("/", 1)
    max_merges = None if vocab_name == "full" else REFERENCE["small_merges"]
    vocab, merges = clip_vocabulary(max_merges)
    return Tokenizer(vocab, merges, pad_token=pad_token)


@cache
def full_tokenizer() -> Tokenizer:
    return Tokenizer.clip_default()


def padded(ids: list[int], pad_id: int) -> list[int]:
    return ids + [pad_id] * (MAX_LENGTH - len(ids))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_ids_match_transformers(case: str, index: int) -> None:
    expected = REFERENCE["cases"][case]
    tokenizer = tokenizer_for(case)
    prompt = PROMPTS[index]
    assert tokenizer.tokenize(prompt) == expected["tokens"][index]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (row,) = tokenizer.encode([prompt])
    assert row == padded(expected["input_ids"][index], expected["pad_id"])


@pytest.mark.parametrize("name", ["full", "small"])
def test_vocabulary_matches_openai_derivation(name: str) -> None:
    vocab, merges = clip_vocabulary(None if name == "full" else REFERENCE["small_merges"])
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    payload = json.dumps([tokens, [list(m) for m in merges]], ensure_ascii=False)
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()
    assert digest == REFERENCE["vocabulary_sha256"][name]


def test_full_vocabulary_layout() -> None:
    tokenizer = full_tokenizer()
    assert tokenizer.vocab_size == 49408
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (49406, 49407, 49407)
    assert Tokenizer.clip_default(pad_token="!").pad_id == 0
    assert tokenizer.tokenize("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_small_vocabulary_is_consistent() -> None:
    vocab, merges = clip_vocabulary(10)
    assert len(vocab) == 512 + 10 + 2
    assert len(merges) == 10
    assert (vocab[BOS_TOKEN], vocab[EOS_TOKEN]) == (522, 523)
    assert all("".join(merge) in vocab for merge in merges)
    with pytest.raises(ValueError):
        clip_vocabulary(-1)


@pytest.mark.parametrize(("folder", "pad_id"), [("tokenizer", 2513), ("tokenizer_2", 0)])
def test_from_folder(folder: str, pad_id: int) -> None:
    tokenizer = Tokenizer.from_folder(FIXTURES / folder)
    vocab, merges = clip_vocabulary(REFERENCE["small_merges"])
    assert tokenizer.vocab == vocab
    assert list(tokenizer.bpe_ranks) == merges
    assert (tokenizer.pad_id, tokenizer.max_length) == (pad_id, MAX_LENGTH)


def test_from_folder_reads_pad_token_dicts_and_defaults(tmp_path: Path) -> None:
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(FIXTURES / "tokenizer" / name, tmp_path / name)
    defaults = Tokenizer.from_folder(tmp_path)
    assert (defaults.pad_token, defaults.max_length) == (EOS_TOKEN, MAX_LENGTH)

    # special_tokens_map.json wins over tokenizer_config.json, as in transformers; an unset
    # model_max_length is saved as a huge sentinel.
    config = {"pad_token": EOS_TOKEN, "model_max_length": int(1e30)}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    special = {"pad_token": {"content": "!", "lstrip": False, "normalized": False}}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    tokenizer = Tokenizer.from_folder(tmp_path)
    assert (tokenizer.pad_token, tokenizer.pad_id, tokenizer.max_length) == ("!", 0, MAX_LENGTH)


def test_pad_token_must_be_in_vocabulary() -> None:
    vocab, merges = clip_vocabulary(0)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer(vocab, merges, pad_token="<pad>")


def test_truncation_keeps_bos_first_ids_and_eos_and_warns() -> None:
    tokenizer = full_tokenizer()
    ids = tokenizer.tokenize("cat " * 80)
    assert len(ids) == 80
    with pytest.warns(UserWarning, match="last 5 tokens were dropped"):
        (row,) = tokenizer.encode(["cat " * 80])
    assert row == [tokenizer.bos_id, *ids[:75], tokenizer.eos_id]


def test_prompt_that_fits_does_not_warn() -> None:
    tokenizer = full_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = tokenizer.encode(["cat " * 75, ""])
    assert [len(row) for row in rows] == [MAX_LENGTH, MAX_LENGTH]
    assert rows[1] == padded([tokenizer.bos_id, tokenizer.eos_id], tokenizer.pad_id)


def test_encode_accepts_a_single_string() -> None:
    tokenizer = full_tokenizer()
    assert tokenizer.encode("a cat") == tokenizer.encode(["a cat"])


@pytest.mark.parametrize(("words", "chunks"), [(0, 1), (1, 1), (75, 1), (76, 2), (160, 3)])
def test_encode_chunks(words: int, chunks: int) -> None:
    tokenizer = Tokenizer.clip_default(pad_token="!")
    text = "cat " * words
    rows = tokenizer.encode_chunks(text)
    assert len(rows) == chunks
    assert all(len(row) == MAX_LENGTH and row[0] == tokenizer.bos_id for row in rows)
    inner = []
    for row in rows:
        eos = row.index(tokenizer.eos_id)
        assert all(i == tokenizer.pad_id for i in row[eos + 1 :])
        inner.extend(row[1:eos])
    assert inner == tokenizer.tokenize(text)


def test_encode_chunks_matches_encode_for_short_prompts() -> None:
    tokenizer = full_tokenizer()
    assert tokenizer.encode_chunks("a photo of a cat") == tokenizer.encode(["a photo of a cat"])


def test_unusual_characters_map_to_byte_tokens() -> None:
    tokenizer = full_tokenizer()
    # A lone surrogate cannot be UTF-8 encoded strictly; U+10FFFF and the controls are in no
    # merge, so they come out as one token per byte.
    assert tokenizer.tokenize("\ud800") == [169, 254, 478]  # í ł Ģ</w>: bytes ED A0 80
    assert tokenizer.tokenize("\x00\x01\x7f") == [188, 189, 477]  # Ā ā ġ</w>
    assert len(tokenizer.tokenize("\U0010ffff")) == 4


def test_symbols_missing_from_vocabulary_become_the_unknown_token() -> None:
    vocab, merges = clip_vocabulary(0)
    del vocab["z</w>"]
    tokenizer = Tokenizer(vocab, merges)
    assert tokenizer.tokenize("z") == [tokenizer.eos_id]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_gives_well_formed_rows(text: str) -> None:
    tokenizer = full_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (row,) = tokenizer.encode([text])
    ids = tokenizer.tokenize(text)
    assert len(row) == MAX_LENGTH
    assert all(0 <= i < tokenizer.vocab_size for i in row)
    kept = ids[: MAX_LENGTH - 2]
    assert row[: len(kept) + 2] == [tokenizer.bos_id, *kept, tokenizer.eos_id]
    assert all(i == tokenizer.pad_id for i in row[len(kept) + 2 :])
    if text and not text.isspace():
        assert ids
