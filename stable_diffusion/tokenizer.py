"""CLIP byte-level BPE tokenizer in pure Python.

Produces the same ids as `transformers.CLIPTokenizer` (transformers 5, backed by the Rust
`tokenizers` library; the same pipeline as `CLIPTokenizerFast` in transformers 4) on the same
vocab.json/merges.txt. That pipeline is, per prompt:

1. split out special tokens (`<|startoftext|>`, `<|endoftext|>` and the pad token) from the raw
   text; they map straight to their ids,
2. normalise every other piece: NFC, runs of whitespace to one space, per-character lowercase,
3. split it with CLIP's word pattern, then with the GPT-2 byte-level pattern,
4. map each word's UTF-8 bytes to printable characters and apply the BPE merges, with `</w>`
   appended to the word's last symbol.

The legacy pure-Python `CLIPTokenizer` of transformers 4 (used when ftfy is missing) differs from
this on rare inputs: it puts spaces around CJK ideographs, deletes control/format characters
such as U+200B instead of tokenizing them, and uses context-aware lowercasing (final sigma).

Known gaps with transformers 5: characters newer than the Unicode tables of the Rust regex engine
(which the `regex` module already classifies as letters), and capitalised spellings of special
tokens such as "<|ENDOFTEXT|>", which some tokenizer configs (special tokens marked
`normalized`) map to the special id while here they are ordinary text.
"""

from __future__ import annotations

import gzip
import heapq
import os
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import regex

from . import limits

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_MAX_LENGTH = 77

_CLIP_BPE_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
# OpenAI's vocabulary size minus the 256 byte tokens and 2 special tokens (see CLIP's
# simple_tokenizer.py); the 256 `</w>` byte variants complete the 49408 ids.
_CLIP_NUM_MERGES = 49152 - 256 - 2

# transformers writes this for "no limit" (VERY_LARGE_INTEGER) when a config lacks one.
_UNSET_MODEL_MAX_LENGTH = int(1e30)
_BPE_CACHE_SIZE = 10_000
# Longer words are not cached: the cache holds real words, whose length it then bounds.
_BPE_CACHED_WORD = 100

# `regex`'s \s is exactly Unicode White_Space, the set the Oniguruma \s of `tokenizers` uses;
# Python's `re` would also treat U+001C..U+001F as whitespace and drop them.
_WHITESPACE = regex.compile(r"\s+")
_CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# The ByteLevel pre-tokenizer re-splits each CLIP piece with GPT-2's pattern. That only changes
# the special-token strings the pattern above keeps whole (e.g. "<|endoftext|>" that was not
# matched as a special token because it was written in capitals): they become "<|", "endoftext",
# "|>".
_BYTE_LEVEL_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable character map (GPT-2/CLIP byte-level BPE).

    Printable latin-1 bytes map to themselves; the rest are shifted past U+00FF, so BPE never
    sees whitespace or control characters. Its order defines the first 256 vocabulary ids."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


@lru_cache(maxsize=1)
def _clip_merges() -> tuple[tuple[str, str], ...]:
    lines = gzip.decompress(_CLIP_BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    # The first line is a "#version" header.
    return tuple(_parse_merge(line) for line in lines[1 : _CLIP_NUM_MERGES + 1])


def _parse_merge(line: str) -> tuple[str, str]:
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(f"malformed BPE merge line: {line!r}")
    return parts[0], parts[1]


def clip_vocabulary(max_merges: int | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The OpenAI CLIP vocabulary and merges, derived from the shipped BPE file.

    Ids are laid out as in OpenAI CLIP / open_clip and the vocab.json of every SD checkpoint:
    256 byte tokens, their 256 `</w>` variants, one token per merge, then `<|startoftext|>` and
    `<|endoftext|>` (49408 ids in all). `max_merges` keeps only the first merges, which still
    gives a consistent vocabulary (512 + max_merges + 2 ids) for small test models."""
    all_merges = _clip_merges()
    if max_merges is not None and not 0 <= max_merges <= len(all_merges):
        raise ValueError(f"max_merges must be in [0, {len(all_merges)}], got {max_merges}")
    merges = list(all_merges[:max_merges])
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = [
        *byte_tokens,
        *(token + END_OF_WORD for token in byte_tokens),
        *("".join(merge) for merge in merges),
        BOS_TOKEN,
        EOS_TOKEN,
    ]
    return {token: i for i, token in enumerate(tokens)}, merges


class Tokenizer:
    """CLIP tokenizer for one text encoder.

    `encode` returns plain lists of ids (rows of `max_length` ints); turn them into an array
    with `mx.array(tokenizer.encode(prompts))`."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        pad_token: str = EOS_TOKEN,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        for token in (BOS_TOKEN, EOS_TOKEN, pad_token):
            if token not in vocab:
                raise ValueError(f"special token {token!r} is not in the vocabulary")
        if not 2 <= max_length <= limits.MAX_SEQUENCE_LENGTH:
            raise ValueError(
                f"max_length must leave room for bos and eos and be at most "
                f"{limits.MAX_SEQUENCE_LENGTH}, got {max_length}"
            )
        self.vocab = vocab
        self.bpe_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.pad_token = pad_token
        self.max_length = max_length
        self.bos_id = vocab[BOS_TOKEN]
        self.eos_id = vocab[EOS_TOKEN]
        self.pad_id = vocab[pad_token]
        # transformers matches special tokens anywhere in the raw text, case-sensitively and
        # leftmost-longest; that includes a pad token such as "!" (SDXL's second tokenizer), so
        # "wow!!" there is "wow", "!", "!" rather than the merged "!!".
        specials = sorted({BOS_TOKEN, EOS_TOKEN, pad_token}, key=len, reverse=True)
        self._special_split = regex.compile("(" + "|".join(map(regex.escape, specials)) + ")")
        self._byte_encoder = _bytes_to_unicode()
        self._cache: dict[str, list[int]] = {}
        # First token id of an embedding's name -> [(name's ids, the embedding's ids)].
        self._embeddings: dict[int, list[tuple[tuple[int, ...], list[int]]]] = {}

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a diffusers `tokenizer/` or `tokenizer_2/` folder.

        Needs vocab.json and merges.txt; the pad token and `model_max_length` come from
        tokenizer_config.json and special_tokens_map.json (the latter wins, as in transformers)
        when present."""
        folder = Path(path)
        vocab = _read_json_object(folder / "vocab.json")
        if not all(type(i) is int and 0 <= i < len(vocab) for i in vocab.values()):
            raise ValueError(f"{folder / 'vocab.json'}: ids must be integers 0 ... size - 1")
        merges_path = folder / "merges.txt"
        if merges_path.stat().st_size > limits.MAX_MERGES_BYTES:
            raise ValueError(
                f"{merges_path} is over {limits.MAX_MERGES_BYTES:,} bytes (CLIP's is ~0.5 MB); "
                "re-download the model"
            )
        lines = merges_path.read_text(encoding="utf-8").split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [_parse_merge(line) for line in lines if line.strip()]

        settings: dict = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                settings.update(_read_json_object(folder / name))
        pad_token = settings.get("pad_token") or EOS_TOKEN
        if isinstance(pad_token, dict):
            pad_token = pad_token.get("content")
        if not isinstance(pad_token, str):
            raise ValueError(f"{folder}: the pad token is {pad_token!r}, not a string")
        max_length = settings.get("model_max_length") or DEFAULT_MAX_LENGTH
        if isinstance(max_length, (int, float)) and max_length >= _UNSET_MODEL_MAX_LENGTH:
            max_length = DEFAULT_MAX_LENGTH
        if isinstance(max_length, bool) or max_length not in range(
            2, limits.MAX_SEQUENCE_LENGTH + 1
        ):
            raise ValueError(
                f"{folder}: model_max_length is {max_length!r}, expected an integer from 2 to "
                f"{limits.MAX_SEQUENCE_LENGTH} (77 for every Stable Diffusion text encoder)"
            )
        return cls(vocab, merges, pad_token=pad_token, max_length=int(max_length))

    @classmethod
    def clip_default(
        cls, pad_token: str = EOS_TOKEN, max_length: int = DEFAULT_MAX_LENGTH
    ) -> Tokenizer:
        """The full OpenAI CLIP vocabulary shipped with the package, for checkpoints that come
        without tokenizer files (single-file .safetensors/.ckpt)."""
        vocab, merges = clip_vocabulary()
        return cls(vocab, merges, pad_token=pad_token, max_length=max_length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos, padding or truncation.

        Raises ValueError for text over `limits.MAX_PROMPT_CHARACTERS`."""
        if len(text) > limits.MAX_PROMPT_CHARACTERS:
            raise ValueError(
                f"the prompt has {len(text):,} characters, more than the "
                f"{limits.MAX_PROMPT_CHARACTERS:,} allowed; shorten it"
            )
        ids: list[int] = []
        # With a capturing group, split() alternates plain text and special tokens.
        for i, part in enumerate(self._special_split.split(text)):
            if i % 2:
                ids.append(self.vocab[part])
            elif part:
                ids.extend(self._tokenize_plain(part))
        return ids

    def encode(self, texts: str | Sequence[str]) -> list[list[int]]:
        """One row per prompt: bos, ids, eos, then pad ids up to `max_length`.

        Prompts longer than `max_length - 2` tokens keep their first tokens (the same
        truncation as transformers) and a warning says how many were dropped; see
        `encode_chunks` to keep all of them."""
        if isinstance(texts, str):
            texts = [texts]
        room = self.max_length - 2
        rows = []
        for text in texts:
            ids = self.tokenize(text)
            if len(ids) > room:
                warnings.warn(
                    f"prompt has {len(ids)} tokens but the text encoder takes {room}: "
                    f"the last {len(ids) - room} tokens were dropped ({text[:40]!r}...)",
                    stacklevel=2,
                )
                ids = ids[:room]
            rows.append(self._wrap(ids))
        return rows

    def encode_chunks(self, text: str) -> list[list[int]]:
        """Rows of up to `max_length - 2` consecutive ids of `text`, each wrapped in bos...eos
        and padded to `max_length`, for long prompts whose chunks are encoded separately and
        concatenated (the A1111/compel convention). An empty prompt gives one row.

        Raises ValueError when that takes more than `limits.MAX_PROMPT_CHUNKS` rows."""
        return self.encode_weighted_chunks([[(text, 1.0)]])[0]

    def encode_weighted_chunks(
        self, segments: Sequence[Sequence[tuple[str, float]]]
    ) -> tuple[list[list[int]], list[list[float]]]:
        """(rows, weights) for a prompt parsed into segments of (text, weight) fragments
        (`prompts.parse_prompt`): each segment starts a new chunk (A1111's BREAK) and is cut
        into chunks as `encode_chunks` cuts a prompt; each token keeps its fragment's weight,
        bos, eos and padding weigh 1.0. Each fragment is tokenized on its own, as in A1111.
        A textual-inversion embedding's tokens are never split across chunks. An empty last
        segment after others adds no chunk (A1111's "a BREAK").

        Raises ValueError for fragments of more than `limits.MAX_PROMPT_CHARACTERS` in all,
        or more than `limits.MAX_PROMPT_CHUNKS` rows."""
        characters = sum(len(text) for segment in segments for text, _ in segment)
        if characters > limits.MAX_PROMPT_CHARACTERS:
            raise ValueError(
                f"the prompt has {characters:,} characters, more than the "
                f"{limits.MAX_PROMPT_CHARACTERS:,} allowed; shorten it"
            )
        room = self.max_length - 2
        rows: list[list[int]] = []
        weights: list[list[float]] = []
        for index, segment in enumerate(segments):
            chunks: list[tuple[list[int], list[float]]] = [([], [])]
            for text, weight in segment:
                for group in self._token_groups(self.tokenize(text)):
                    if len(chunks[-1][0]) + len(group) > room:
                        if len(rows) + len(chunks) >= limits.MAX_PROMPT_CHUNKS:
                            raise _too_many_chunks(room)
                        chunks.append(([], []))
                    chunk_ids, chunk_weights = chunks[-1]
                    chunk_ids.extend(group)
                    chunk_weights.extend([weight] * len(group))
            if index and index == len(segments) - 1 and chunks == [([], [])]:
                break
            for chunk_ids, chunk_weights in chunks:
                rows.append(self._wrap(chunk_ids))
                weights.append([1.0, *chunk_weights] + [1.0] * (room + 1 - len(chunk_weights)))
            if len(rows) > limits.MAX_PROMPT_CHUNKS:  # many BREAKs
                raise _too_many_chunks(room)
        return rows, weights

    def add_embedding(self, name: str, ids: Sequence[int]) -> None:
        """Make the tokens of `name` in a prompt stand for `ids` (a textual-inversion
        embedding's vectors, which the text encoder holds under those ids). The name is
        found as a sequence of token ids, as A1111 does, so it matches whatever its case
        and wherever it is a word of its own; a name given again replaces the earlier one."""
        self.check_embedding(name, len(ids))
        name_ids = tuple(self.tokenize(name))
        entries = [e for e in self._embeddings.get(name_ids[0], []) if e[0] != name_ids]
        entries.append((name_ids, list(ids)))
        # Longest names first, so that "style-long" wins over "style" where both match.
        self._embeddings[name_ids[0]] = sorted(entries, key=lambda e: len(e[0]), reverse=True)

    def check_embedding(self, name: str, count: int) -> None:
        """Raise ValueError unless an embedding of `count` vectors can be named `name`."""
        if not self.tokenize(name):
            raise ValueError(f"the embedding name {name!r} has no tokens; give another name")
        if not 0 < count <= self.max_length - 2:
            raise ValueError(
                f"embedding {name!r} has {count} vectors; a chunk takes 1 to {self.max_length - 2}"
            )

    def _token_groups(self, ids: list[int]) -> Iterator[list[int]]:
        """The ids one by one, except an embedding's name: its ids as one group."""
        position = 0
        while position < len(ids):
            for name_ids, embedding_ids in self._embeddings.get(ids[position], ()):
                if tuple(ids[position : position + len(name_ids)]) == name_ids:
                    yield embedding_ids
                    position += len(name_ids)
                    break
            else:
                yield [ids[position]]
                position += 1

    def _wrap(self, ids: list[int]) -> list[int]:
        row = [self.bos_id, *ids, self.eos_id]
        return row + [self.pad_id] * (self.max_length - len(row))

    def _tokenize_plain(self, text: str) -> list[int]:
        text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
        # Per character, like the Rust normaliser: str.lower() on the whole text would turn a
        # word-final capital sigma into "ς" instead of "σ".
        text = "".join(map(str.lower, text))
        ids: list[int] = []
        for piece in _CLIP_PATTERN.findall(text):
            for word in _BYTE_LEVEL_PATTERN.findall(piece):
                ids.extend(self._bpe(word))
        return ids

    def _bpe(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        # A Python str may hold lone surrogates, which strict UTF-8 refuses; passing them through
        # as bytes keeps every string tokenizable.
        symbols = [self._byte_encoder[b] for b in word.encode("utf-8", "surrogatepass")]
        symbols[-1] += END_OF_WORD
        # CLIP's unknown token is <|endoftext|>; only reachable with a vocabulary that lacks
        # some byte tokens, since every byte has one in real CLIP vocabularies.
        ids = [self.vocab.get(symbol, self.eos_id) for symbol in self._merge(symbols)]
        if len(word) <= _BPE_CACHED_WORD:
            if len(self._cache) >= _BPE_CACHE_SIZE:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _merge(self, symbols: list[str]) -> list[str]:
        """Apply the merges lowest rank first, leftmost first among equal ranks, as the
        `tokenizers` library does: a heap of candidate pairs over a linked list of symbols,
        so a word of n bytes costs O(n log n) instead of a rescan per merge."""
        ranks = self.bpe_ranks
        n = len(symbols)
        following = list(range(1, n + 1))  # index of the next live symbol; n: none
        preceding = list(range(-1, n - 1))
        heap = [
            (rank, i, symbols[i], symbols[i + 1])
            for i in range(n - 1)
            if (rank := ranks.get((symbols[i], symbols[i + 1]))) is not None
        ]
        heapq.heapify(heap)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = following[i]
            # Skip pairs that an earlier merge changed (a dead symbol reads as None).
            if j >= n or symbols[i] != left or symbols[j] != right:
                continue
            symbols[i] = left + right
            symbols[j] = None  # type: ignore[call-overload]  # a dead symbol
            following[i] = following[j]
            if following[i] < n:
                preceding[following[i]] = i
            for a, b in ((preceding[i], i), (i, following[i])):
                if a >= 0 and b < n:
                    rank = ranks.get((symbols[a], symbols[b]))
                    if rank is not None:
                        heapq.heappush(heap, (rank, a, symbols[a], symbols[b]))
        return [symbol for symbol in symbols if symbol is not None]


def _too_many_chunks(room: int) -> ValueError:
    return ValueError(
        f"the prompt needs more than {limits.MAX_PROMPT_CHUNKS} chunks of {room} tokens "
        f"({limits.MAX_PROMPT_CHUNKS * room:,} tokens at most); shorten it"
    )


def _read_json_object(path: Path) -> dict:
    values = limits.read_json(path, "tokenizer")
    if not isinstance(values, dict):
        raise ValueError(f"{path} is not a JSON object; re-download the model")
    return values
