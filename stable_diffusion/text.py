"""Text from files made safe to print on a terminal."""

from __future__ import annotations

import re

# ANSI escape sequences (ECMA-48): CSI "ESC [ ... final byte", OSC/DCS/APC/PM/SOS strings
# up to their terminator (BEL or ESC \), then any other two-byte escape. Their C1 forms
# (U+009B for CSI, U+009D for OSC, ...) go with the remaining control characters.
_ESCAPE_SEQUENCES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b[\]PX^_].*?(?:\x07|\x1b\\|$)"
    r"|\x1b[ -~]?",
    re.DOTALL,
)
# C0 controls but tab and newline, DEL, and the C1 controls.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """`text` as a string without terminal control sequences: a model name, LoRA name,
    prompt or key read from a file or a model folder could otherwise move the cursor,
    retitle the window, hide text or write hyperlinks when printed. Tabs and newlines
    stay; everything else that controls the terminal goes."""
    return _CONTROLS.sub("", _ESCAPE_SEQUENCES.sub("", str(text)))
