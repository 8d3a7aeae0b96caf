"""Budgets for reading untrusted input: weight files, model folders, PNG metadata, prompts.

Every reader checks these before doing the work they bound, so that a small hostile file
fails fast with a clear message instead of costing gigabytes or minutes. Each budget is far
above what real files need and small enough that hitting it stays cheap; the tests that
cross each one (tests/test_hostile_inputs.py) measure the peak memory and time it costs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# --- pickled checkpoints (weights/files.py) ---------------------------------------------------
# data.pkl holds only the names, shapes and storage keys; the weights are separate records.
# torch.save of 15,000 tensors (an SDXL-size model's weights plus its Adam state, more than a
# training checkpoint holds) writes 1.7 MB of it: 475,000 opcodes, 115,000 memo entries.
MAX_PICKLE_BYTES = 16 * 2**20
# Objects the unpickler may build (opcodes that push one), items it may put into containers,
# and memo entries. Each costs at most a few hundred bytes, so together they bound the
# unpickle to a few hundred MB whatever the file holds.
MAX_PICKLE_OBJECTS = 1_000_000
MAX_PICKLE_CONTAINER_ITEMS = 1_000_000
MAX_PICKLE_MEMO = 1_000_000
# Open MARKs (containers being built inside each other) and tuples nested in tuples: torch
# writes a handful; Python hashes nested tuples recursively.
MAX_PICKLE_NESTING = 100
# Python re-hashes every item of a tuple each time the tuple is hashed, so tuples sharing
# memoized parts can make one dict key take forever to hash: bound a tuple's size counted
# with repeats.
MAX_TUPLE_NODES = 100_000
# Dict levels above a tensor and its dotted name's length (real names are under 150
# characters: "model.diffusion_model.output_blocks.2.1.transformer_blocks.9...").
MAX_TENSOR_NESTING = 16
MAX_TENSOR_NAME = 512

# --- both weight formats ----------------------------------------------------------------------
# The distinct tensors of a file may describe at most this multiple of the file's size
# (pickled views may share a storage, so a small file could otherwise expand without limit).
# safetensors regions may not overlap at all, as in the reference implementation.
MAX_DESCRIBED_BYTES_FACTOR = 4
# A safetensors JSON header. The reference implementation allows 100 MB; real headers of
# checkpoints and LoRAs (kohya's training metadata included) are a few hundred KB.
MAX_SAFETENSORS_HEADER = 16 * 2**20

# --- JSON configs and metadata ----------------------------------------------------------------
# config.json, scheduler_config.json, tokenizer JSONs (CLIP's vocab.json is ~1 MB), and the
# JSON that LoRAs keep in their safetensors metadata.
# Nesting is bounded by Python's recursion limit, which json.loads enforces (RecursionError);
# nothing here walks parsed JSON recursively.
MAX_JSON_BYTES = 16 * 2**20
# Integers in configs: enough digits for transformers' "no limit" (1e30) and no more.
MAX_JSON_INT_DIGITS = 40
# merges.txt of CLIP is ~0.5 MB.
MAX_MERGES_BYTES = 16 * 2**20

# A tokenizer's and text encoder's sequence length (model_max_length, max_position_embeddings):
# 77 in every Stable Diffusion model; each prompt row is padded to it.
MAX_SEQUENCE_LENGTH = 1024

# --- prompts and PNG metadata -----------------------------------------------------------------
# A prompt is split into chunks of 75 tokens, each one text-encoder pass; 32 chunks are
# 2,400 tokens, about 10,000 characters of English, far more than a model attends to usefully.
MAX_PROMPT_CHARACTERS = 10_000
MAX_PROMPT_CHUNKS = 32
# The "parameters" text of a PNG: two prompts, each maybe written twice (the second time
# JSON-escaped, up to 6 characters per character), and the settings.
MAX_PARAMETERS_TEXT = 2 * 7 * MAX_PROMPT_CHARACTERS + 10_000
# PNG chunks walked to find that text without decoding the image: a 1 GB PNG written in
# 8 KB IDAT chunks has 125,000.
MAX_PNG_CHUNKS = 1_000_000
# Images given to img2img: 4096x4096 is encoded in tiles, but the UNet's activations over it
# take at least 10 GiB with CFG (`pipeline.unet_activation_bytes`); a larger image is no
# real img2img input, and costs its decoding (3 bytes a pixel and more) before any check.
MAX_INPUT_PIXELS = 4096 * 4096


class InputLimitError(ValueError):
    """Input that exceeds a budget above, or JSON that is malformed; says which file, which
    limit, and what to do."""


def read_json(path: str | Path, what: str = "") -> Any:
    """Parse a JSON file within the JSON budgets above.

    Raises InputLimitError naming the file for oversize or deeply nested files, numbers
    that do not fit a float or have absurdly many digits, NaN/Infinity and invalid JSON."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise InputLimitError(
            f"{path} is {size:,} bytes, more than the {MAX_JSON_BYTES:,} a {what or 'JSON'} "
            "file may have; it is not a real one, re-download it"
        )
    return parse_json(path.read_bytes(), str(path))


def parse_json(text: str | bytes, source: str) -> Any:
    """`json.loads` within the JSON budgets; `source` names the text in errors."""
    if len(text) > MAX_JSON_BYTES:
        raise InputLimitError(f"{source}: {len(text):,} bytes of JSON, over {MAX_JSON_BYTES:,}")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputLimitError(f"{source} is not UTF-8 JSON ({e}); re-download it") from None
    try:
        return json.loads(
            text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_no_constant
        )
    except RecursionError:
        raise InputLimitError(f"{source}: JSON nested too deeply; re-download it") from None
    except ValueError as e:  # JSONDecodeError, and the hooks' refusals
        raise InputLimitError(f"{source} is not valid JSON ({e}); re-download it") from None


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits)} digits")
    return int(digits)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} does not fit a float")
    return value


def _no_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not valid JSON")
