"""The prompt syntax people bring from AUTOMATIC1111's web UI ("A1111"), as pure functions.

* Attention weights: ``(word)`` x1.1, ``((word))`` x1.21, ``[word]`` /1.1, ``(word:1.5)``,
  ``(several words:0.8)``, nested; ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal
  characters. `parse_prompt` gives A1111's weights (its ``prompt_parser.parse_prompt_attention``),
  including its forgiving reading of unbalanced brackets.
* ``BREAK`` (in capitals, as a word) ends the current 75-token chunk. Unlike A1111, a BREAK
  inside brackets still breaks (A1111 multiplies its marker's weight and then encodes the
  word "BREAK").
* ``<lora:name:weight>`` names a LoRA to merge; `extract_loras` removes the tags.

The text encoders apply the weights (`apply_emphasis`); nothing here depends on a model.
"""

from __future__ import annotations

import math
import re

import mlx.core as mx

# A1111's token pattern: escapes, brackets, a ":weight)" closing, runs of plain text, a colon.
_ATTENTION = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\]|\\\\|\\|
    \(|\[|
    :([+-]?[.\d]+)\)|
    \)|]|
    [^\\()\[\]:]+|
    :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ROUND = 1.1
_SQUARE = 1 / 1.1

# A1111's extra-networks tag for LoRAs: <lora:name> or <lora:name:weight>.
_LORA_TAG = re.compile(r"<lora:([^<>]*)>")

Fragment = tuple[str, float]


def parse_prompt(text: str) -> list[list[Fragment]]:
    """The prompt's (text, weight) fragments, one list per BREAK-separated segment.

    Within a segment, neighbouring fragments of equal weight are merged, as A1111 does, and
    empty ones dropped, so a prompt without any syntax is one fragment, itself, of weight
    1.0. Raises ValueError for a weight that is not a finite number (A1111 would fail on
    ``(a:1.2.3)`` too)."""
    # Each entry: [text, weight], or None for a BREAK.
    parsed: list[list | None] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for entry in parsed[start:]:
            if entry is not None:
                entry[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            parsed.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(parsed))
        elif token == "[":
            square_open.append(len(parsed))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), _weight(weight, token))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), _ROUND)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), _SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    parsed.append(None)
                parsed.append([part, 1.0])
    # Unclosed brackets weigh everything after them.
    for start in round_open:
        multiply_from(start, _ROUND)
    for start in square_open:
        multiply_from(start, _SQUARE)

    segments: list[list[Fragment]] = [[]]
    for entry in parsed:
        if entry is None:
            segments.append([])
            continue
        fragment_text, weight = entry
        if not math.isfinite(weight):
            raise ValueError(f"prompt weights multiply to {weight} at {fragment_text!r}")
        segment = segments[-1]
        if segment and segment[-1][1] == weight:
            segment[-1] = (segment[-1][0] + fragment_text, weight)
        else:
            segment.append((fragment_text, weight))
    # Empty fragments ("a BREAK", a lone backslash) tokenize to nothing; they are dropped
    # after merging, so that the fragments around them stay apart as in A1111.
    return [[f for f in segment if f[0]] or [("", 1.0)] for segment in segments]


def _weight(number: str, token: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise ValueError(
            f"prompt weight {number!r} in {token!r} is not a number; write it like (word:1.2), "
            "or escape the brackets as \\( \\) to keep them as text"
        ) from None


def extract_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(prompt without its ``<lora:name:weight>`` tags, [(name, weight), ...] in order).

    The weight defaults to 1.0, as in A1111. Raises ValueError for a tag that is not
    ``<lora:name>`` or ``<lora:name:weight>`` with a finite number (A1111's separate UNet
    weight, ``<lora:name:0.8:0.5>``, is not supported)."""
    loras = []
    for match in _LORA_TAG.finditer(prompt):
        name, *weight = match.group(1).split(":")
        strength = _lora_weight(weight[0]) if len(weight) == 1 else 1.0
        if not name.strip() or len(weight) > 1 or strength is None:
            raise ValueError(
                f"{match.group(0)}: write a LoRA as <lora:name> or <lora:name:weight>, "
                "the weight a number such as 0.8"
            )
        loras.append((name.strip(), strength))
    return _LORA_TAG.sub("", prompt), loras


def _lora_weight(text: str) -> float | None:
    try:
        weight = float(text)
    except ValueError:
        return None
    return weight if math.isfinite(weight) else None


def apply_emphasis(hidden: mx.array, weights: mx.array) -> mx.array:
    """A1111's default ("Original") emphasis: multiply each token's hidden state by its weight,
    then rescale each chunk (a row of `hidden`, (chunks, tokens, dims)) so that its mean over
    tokens and dims is what it was. `weights` is (chunks, tokens). Computed in float32."""
    hidden = hidden.astype(mx.float32)
    original_mean = hidden.mean(axis=(1, 2), keepdims=True)
    weighted = hidden * weights[..., None].astype(mx.float32)
    return weighted * (original_mean / weighted.mean(axis=(1, 2), keepdims=True))
