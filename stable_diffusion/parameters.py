"""Generation parameters and their AUTOMATIC1111 ("A1111") text form.

The text is what A1111 stores in a PNG's ``parameters`` chunk and what A1111, ComfyUI
viewers, civitai and InvokeAI's import read::

    a cat, "in a hat"
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 42, Size: 512x512, Model: m

Choices made here, so that ``from_text(p.to_text()) == p`` for every valid ``p``:

* Prompts are written verbatim, as A1111 does.  A1111's reader strips each line and
  treats a line starting with ``Negative prompt:`` as the start of the negative prompt,
  so a prompt that this would change (leading/trailing whitespace, such a line, ...) is
  *also* written JSON-quoted as a ``Prompt:`` / ``Negative prompt:`` field on the
  parameters line.  A1111 lets these fields override the lines above, as does
  `from_text`, so both recover the exact prompt.
* Field values are JSON-quoted when they contain ``,``, ``:``, ``"`` or a newline,
  have surrounding whitespace, or are empty (A1111 quotes the first three cases).
* Samplers use A1111's display names (samplers.SAMPLER_TABLE); ``dpm++2m_karras`` is
  written the older single-field way, ``DPM++ 2M Karras``, which every reader knows, and
  a pair that older A1111 never named (``euler_karras``) the 1.9+ way,
  ``Sampler: Euler, Schedule type: Karras``.  Both ways are read, and ComfyUI's names.
* LoRAs go in a ``Lora`` field in A1111's prompt syntax, e.g.
  ``Lora: "<lora:name:0.8>, <lora:other:1.0>"``, rather than into the prompt, so the
  prompt comes back exactly as the user typed it.
* ``Clip skip`` is written, as A1111 does, only when above 1.
* The hires fix is A1111's ``Hires upscale`` (or ``Hires resize: 1024x0``), ``Hires
  steps`` (only when not 0), ``Hires upscaler`` and ``Denoising strength``.
* Fields that this module does not model (``Hires sampler``, ...) are
  kept, in order, in `GenerationParameters.extras` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

from . import limits
from .samplers import a1111_names, join_name

# A1111's own field pattern (modules/infotext_utils.py): a key, then a JSON-quoted value or
# anything up to the next comma.  Using it keeps us reading what A1111 reads; only the key's
# length is bounded (field names are short), which makes it linear: with `+` every start
# position scanned to the end of a run of letters (a 20,000-character line took 5 s).
_FIELD = re.compile(r'\s*(\w[\w \-/]{1,63}):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]{1,63}")
_SIZE = re.compile(r"(\d+)x(\d+)")
_LORA = re.compile(r"<lora:([^<>]*):([^:<>]*)>")
_Number = TypeVar("_Number", int, float)
_NEGATIVE_PREFIX = "Negative prompt:"

# Fields GenerationParameters models; `extras` may not reuse them.
_RESERVED_KEYS = frozenset(
    {
        "Prompt",
        "Negative prompt",
        "Steps",
        "Sampler",
        "CFG scale",
        "Seed",
        "Size",
        "Model",
        "Denoising strength",
        "Lora",
        "Clip skip",
        "Hires upscale",
        "Hires resize",
        "Hires steps",
        "Hires upscaler",
    }
)
_SCHEDULE_TYPE = "Schedule type"
_REQUIRED_KEYS = ("Steps", "Sampler", "CFG scale", "Seed", "Size")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationParameters:
    """Everything needed to reproduce an image.

    `sampler` is an internal name (``"euler_a"``); A1111 display names given here are
    converted to it, and unknown samplers (from other tools' images) are kept as given.
    `strength` is img2img's denoising strength, or the hires fix's, None for txt2img
    without it.  The hires fix is on when `hires_scale` or `hires_resize` is set
    (settings.HiresFix).  `extras` holds other
    ``(field, value)`` pairs; a mapping is accepted and stored as a tuple.
    """

    prompt: str
    negative_prompt: str = ""
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model: str | None = None
    loras: tuple[tuple[str, float], ...] = ()
    strength: float | None = None
    clip_skip: int = 1
    hires_scale: float | None = None
    hires_resize: tuple[int, int] | None = None
    hires_steps: int = 0
    hires_upscaler: str | None = None
    extras: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # Normalise first so that equal parameters compare equal after a round trip.
        extras = tuple(
            (str(k), str(v))
            for k, v in (self.extras.items() if isinstance(self.extras, Mapping) else self.extras)
        )
        sampler, extras = _our_sampler(str(self.sampler), extras)
        set_ = object.__setattr__  # the dataclass is frozen
        set_(self, "extras", extras)
        set_(self, "sampler", sampler)
        set_(self, "cfg_scale", float(self.cfg_scale))
        set_(self, "loras", tuple((str(name), float(s)) for name, s in self.loras))
        if self.strength is not None:
            set_(self, "strength", float(self.strength))
        if self.hires_scale is not None:
            set_(self, "hires_scale", float(self.hires_scale))
        if self.hires_resize is not None:
            set_(self, "hires_resize", tuple(operator.index(v) for v in self.hires_resize))
        for name in ("steps", "seed", "width", "height", "clip_skip", "hires_steps"):
            value = getattr(self, name)
            try:
                set_(self, name, operator.index(value))  # accepts NumPy integers, not floats
            except TypeError:
                raise ValueError(f"{name} must be an integer, got {value!r}") from None
        self._validate()

    def _validate(self) -> None:
        if self.clip_skip < 1:
            raise ValueError(f"clip skip must be at least 1 (the last layer), got {self.clip_skip}")
        if self.steps < 0 or self.width <= 0 or self.height <= 0:
            raise ValueError(
                f"steps must be >= 0 and the size positive, got steps={self.steps}, "
                f"size={self.width}x{self.height}"
            )
        if not self.sampler:
            raise ValueError("the sampler name is empty")
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name)) > limits.MAX_PROMPT_CHARACTERS:
                raise ValueError(
                    f"the {name.replace('_', ' ')} has {len(getattr(self, name)):,} characters, "
                    f"more than the {limits.MAX_PROMPT_CHARACTERS:,} allowed"
                )
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be finite, got {self.cfg_scale}")
        if self.strength is not None and not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {self.strength}")
        self._validate_hires()
        for name, strength in self.loras:
            if not name or any(c in name for c in "<>\n") or not math.isfinite(strength):
                raise ValueError(
                    f"invalid LoRA {name!r}: {strength} (names cannot be empty or contain "
                    "'<', '>' or newlines; strengths must be finite)"
                )
        keys = [k for k, _ in self.extras]
        if _SCHEDULE_TYPE in keys and _a1111_sampler(self.sampler)[1] is not None:
            raise ValueError(
                f"sampler {self.sampler!r} has its schedule; the extra field "
                f"{_SCHEDULE_TYPE!r} would contradict it"
            )
        for key in keys:
            if not _KEY.fullmatch(key) or key in _RESERVED_KEYS:
                raise ValueError(
                    f"invalid extra field name {key!r}: names start with a letter or digit, "
                    "contain only letters, digits, spaces, '-' and '/', and cannot be one "
                    f"of {sorted(_RESERVED_KEYS)}"
                )
        if len(set(keys)) != len(keys):
            raise ValueError(f"extra field names must be unique, got {keys}")

    def only_masked_padding(self) -> int | None:
        """The "Masked area padding" of an image A1111 inpainted with "Inpaint area: Only
        masked" (its UI's default, 32, where the padding is not recorded); None for other
        images. Raises ValueError when the padding is not a whole number of 0 or more."""
        fields = dict(self.extras)
        if fields.get("Inpaint area") != "Only masked":
            return None
        padding = _to_number(int, "Masked area padding", fields.get("Masked area padding", "32"))
        if padding < 0:
            raise ValueError(f"generation parameters: Masked area padding is negative: {padding}")
        return padding

    def _validate_hires(self) -> None:
        if self.hires_scale is not None and not (
            math.isfinite(self.hires_scale) and self.hires_scale > 0
        ):
            raise ValueError(f"the hires scale must be a positive number, got {self.hires_scale}")
        if self.hires_resize is not None and (
            len(self.hires_resize) != 2 or min(self.hires_resize) < 0
        ):
            raise ValueError(f"the hires resize must be two sizes >= 0, got {self.hires_resize}")
        if self.hires_steps < 0:
            raise ValueError(f"hires steps must be >= 0, got {self.hires_steps}")
        hires = self.hires_scale is not None or self.hires_resize is not None
        if not hires and (self.hires_steps or self.hires_upscaler is not None):
            raise ValueError("hires steps and upscaler need a hires scale or resize")
        if self.hires_upscaler is not None and (
            not self.hires_upscaler or "\n" in self.hires_upscaler
        ):
            raise ValueError(f"invalid hires upscaler {self.hires_upscaler!r}")

    def to_text(self) -> str:
        """The A1111 ``parameters`` text (see the module docstring)."""
        sampler, schedule_type = _a1111_sampler(self.sampler)
        fields = [
            ("Steps", str(self.steps)),
            ("Sampler", sampler),
            *([(_SCHEDULE_TYPE, schedule_type)] if schedule_type else []),
            ("CFG scale", repr(self.cfg_scale)),
            ("Seed", str(self.seed)),
            ("Size", f"{self.width}x{self.height}"),
        ]
        if self.model is not None:
            fields.append(("Model", self.model))
        if self.strength is not None:
            fields.append(("Denoising strength", repr(self.strength)))
        if self.clip_skip > 1:  # A1111 writes it only then
            fields.append(("Clip skip", str(self.clip_skip)))
        if self.hires_resize is not None:
            fields.append(("Hires resize", "{}x{}".format(*self.hires_resize)))
        elif self.hires_scale is not None:
            scale = self.hires_scale
            fields.append(("Hires upscale", str(int(scale)) if scale.is_integer() else repr(scale)))
        if self.hires_steps:  # A1111 writes it only then
            fields.append(("Hires steps", str(self.hires_steps)))
        if self.hires_upscaler is not None:
            fields.append(("Hires upscaler", self.hires_upscaler))
        if self.loras:
            lora_tags = (f"<lora:{name}:{strength!r}>" for name, strength in self.loras)
            fields.append(("Lora", ", ".join(lora_tags)))
        fields.extend(self.extras)

        head = self.prompt
        if self.negative_prompt:
            head += f"\n{_NEGATIVE_PREFIX} {self.negative_prompt}"
        line = _format_fields(fields)
        # Fall back to quoted fields for whatever the plain lines would not reproduce.
        prompt, negative = _read_prompt_lines(_split_text(f"{head}\n{line}")[0])
        exact = []
        if prompt != self.prompt:
            exact.append(("Prompt", self.prompt))
        if negative != self.negative_prompt:
            exact.append(("Negative prompt", self.negative_prompt))
        if exact:
            line += ", " + _format_fields(exact)
        return f"{head}\n{line}".strip()

    @classmethod
    def from_text(cls, text: str) -> GenerationParameters:
        """Parse A1111 ``parameters`` text, ours or any tool's.

        Unknown fields end up in `extras`.  Raises ValueError when the text has no
        parameters line, lacks one of Steps, Sampler, CFG scale, Seed and Size, or is longer
        than `limits.MAX_PARAMETERS_TEXT`.
        """
        if len(text) > limits.MAX_PARAMETERS_TEXT:
            raise ValueError(
                f"the generation parameters have {len(text):,} characters, more than the "
                f"{limits.MAX_PARAMETERS_TEXT:,} that two prompts of at most "
                f"{limits.MAX_PROMPT_CHARACTERS:,} characters need"
            )
        head_lines, line = _split_text(text)
        if not line:
            raise ValueError(
                "no generation parameters found (expected a last line like "
                "'Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 42, Size: 512x512')"
            )
        prompt, negative = _read_prompt_lines(head_lines)
        fields: dict[str, str] = {}
        for key, value in _FIELD.findall(line):
            fields[key] = _unquote(value)
        prompt = fields.pop("Prompt", prompt)
        negative = fields.pop("Negative prompt", negative)
        missing = [k for k in _REQUIRED_KEYS if k not in fields]
        if missing:
            raise ValueError(f"generation parameters lack the field(s) {', '.join(missing)}")

        size = _SIZE.fullmatch(fields.pop("Size"))
        if size is None:
            raise ValueError("generation parameters: Size must look like 512x768")
        strength = fields.pop("Denoising strength", None)
        hires_scale = fields.pop("Hires upscale", None)
        hires_resize = fields.pop("Hires resize", None)
        resize = None
        if hires_resize is not None:
            match = _SIZE.fullmatch(hires_resize)
            if match is None:
                raise ValueError("generation parameters: Hires resize must look like 1024x0")
            resize = int(match[1]), int(match[2])
        return cls(
            prompt=prompt,
            negative_prompt=negative,
            steps=_to_number(int, "Steps", fields.pop("Steps")),
            sampler=fields.pop("Sampler"),
            cfg_scale=_to_number(float, "CFG scale", fields.pop("CFG scale")),
            seed=_to_number(int, "Seed", fields.pop("Seed")),
            width=int(size[1]),
            height=int(size[2]),
            model=fields.pop("Model", None),
            loras=_parse_loras(fields.pop("Lora", "")),
            clip_skip=_to_number(int, "Clip skip", fields.pop("Clip skip", "1")),
            strength=None
            if strength is None
            else _to_number(float, "Denoising strength", strength),
            hires_scale=None
            if hires_scale is None
            else _to_number(float, "Hires upscale", hires_scale),
            hires_resize=resize,
            hires_steps=_to_number(int, "Hires steps", fields.pop("Hires steps", "0")),
            hires_upscaler=fields.pop("Hires upscaler", None),
            extras=tuple(fields.items()),
        )


def _our_sampler(
    sampler: str, extras: tuple[tuple[str, str], ...]
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Our name for `sampler` and a "Schedule type" among `extras`, and the extras left;
    a sampler or schedule we do not know is kept as given."""
    schedule_type = dict(extras).get(_SCHEDULE_TYPE)
    if schedule_type is not None:
        try:
            name = join_name(sampler, schedule_type)
        except ValueError:
            pass
        else:
            return name, tuple(kv for kv in extras if kv[0] != _SCHEDULE_TYPE)
    try:
        return join_name(sampler, None), extras
    except ValueError:
        return sampler, extras


def _a1111_sampler(sampler: str) -> tuple[str, str | None]:
    try:
        return a1111_names(sampler)
    except ValueError:  # another tool's sampler, kept as given
        return sampler, None


def _split_text(text: str) -> tuple[list[str], str]:
    """(prompt lines, parameters line) as A1111 splits them: the last line holds the
    parameters only if it has at least three fields."""
    *lines, last = text.strip().split("\n")
    if len(_FIELD.findall(last)) < 3:
        return [*lines, last], ""
    return lines, last


def _read_prompt_lines(lines: Iterable[str]) -> tuple[str, str]:
    """A1111's reading of the lines above the parameters: (prompt, negative prompt)."""
    # Mirrors A1111 quirk for quirk (e.g. empty lines before any text are dropped), so
    # that `to_text` notices every prompt that A1111 would misread.
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX) :].strip()
        part = negative if in_negative else prompt
        if part or line:
            part.append(line)
    return "\n".join(prompt), "\n".join(negative)


def _format_fields(fields: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f"{key}: {_quote(value)}" for key, value in fields)


def _quote(value: str) -> str:
    if value and value == value.strip() and not any(c in value for c in ',:"\n'):
        return value
    return json.dumps(value, ensure_ascii=False)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass  # not JSON after all: A1111 keeps such values as written, and so do we
    return value.strip()


def _to_number(kind: type[_Number], key: str, value: str) -> _Number:
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"generation parameters: {key} is not a number: {value!r}") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"generation parameters: {key} must be finite, got {value!r}")
    return number


def _parse_loras(value: str) -> tuple[tuple[str, float], ...]:
    return tuple(
        (name, float(_to_number(float, f"Lora {name}", strength)))
        for name, strength in _LORA.findall(value)
    )
