"""Prompts files, as AUTOMATIC1111's "Prompts from file or textbox" script reads them.

One job per non-empty line: either the prompt itself, or options in A1111's syntax,
``--prompt "a cat" --negative_prompt "blurry" --steps 20 --seed 5``. A prompt (or
negative prompt) runs until the next option, so it needs no quotes; other options take
one value. Options a line leaves out come from the command line."""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# A prompts file is a list of jobs, not a data set: far more than anyone queues.
MAX_FILE_BYTES = 4 << 20
MAX_LINES = 10_000


@dataclass(frozen=True)
class PromptLine:
    """One line's job; None: the command line's value."""

    number: int  # 1-based, for messages and output names
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    width: int | None = None
    height: int | None = None
    sampler: str | None = None
    n_images: int | None = None


def _integer(value: str) -> int:
    return int(value)


def _number(value: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value} is not a finite number")
    return number


# A1111's option name -> (PromptLine field, parser).
_OPTIONS: dict[str, tuple[str, Callable[[str], object]]] = {
    "negative_prompt": ("negative_prompt", str),
    "seed": ("seed", _integer),
    "steps": ("steps", _integer),
    "cfg_scale": ("cfg", _number),
    "width": ("width", _integer),
    "height": ("height", _integer),
    "sampler_name": ("sampler", str),
    "batch_size": ("n_images", _integer),
}


def parse_line(text: str, number: int) -> PromptLine:
    """One line of a prompts file (see the module docstring); ValueError names the line."""
    if "--" not in text:
        return PromptLine(number, text.strip())
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"line {number}: {e}") from None
    values: dict[str, object] = {}
    position = 0
    while position < len(words):
        option = words[position]
        if not option.startswith("--"):
            raise ValueError(f"line {number}: expected an option such as --prompt, got {option!r}")
        name = option[2:]
        if position + 1 >= len(words):
            raise ValueError(f"line {number}: {option} needs a value")
        if name in ("prompt", "negative_prompt"):
            end = position + 1
            while end < len(words) and not words[end].startswith("--"):
                end += 1
            values[name] = " ".join(words[position + 1 : end])
            position = end
            continue
        if name not in _OPTIONS:
            known = ", ".join(f"--{o}" for o in ("prompt", *_OPTIONS))
            raise ValueError(f"line {number}: unknown option {option} (known: {known})")
        field, parse = _OPTIONS[name]
        try:
            values[field] = parse(words[position + 1])
        except ValueError:
            raise ValueError(
                f"line {number}: {option} {words[position + 1]!r} is not a valid value"
            ) from None
        position += 2
    if "prompt" not in values:
        raise ValueError(f"line {number}: no --prompt")
    return PromptLine(number, **values)  # type: ignore[arg-type]


def read_prompts_file(path: str | Path) -> list[PromptLine]:
    """The jobs of a prompts file, checked before any model loads."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(
                f"{path} is {size / 2**20:.1f} MiB; a prompts file may have at most "
                f"{MAX_FILE_BYTES >> 20} MiB"
            )
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ValueError(f"cannot read the prompts file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    lines = [
        parse_line(line, number) for number, line in enumerate(text.splitlines(), 1) if line.strip()
    ]
    if not lines:
        raise ValueError(f"{path} has no prompts")
    if len(lines) > MAX_LINES:
        raise ValueError(f"{path} has {len(lines)} prompts; at most {MAX_LINES} per run")
    return lines
