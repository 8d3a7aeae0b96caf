"""`printable`: text from files (model names, LoRA names, prompts, keys) printed without
the sequences that would drive the terminal."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stable_diffusion.loading.hub import ModelNotFoundError, resolve_model, weight_files
from stable_diffusion.text import printable

# What a terminal acts on: C0 controls (tab and newline are layout), DEL, C1 controls.
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\x1b[31mred\x1b[0m text", "red text"),  # CSI: colours
        ("a\x1b[2J\x1b[Hb", "ab"),  # CSI: clear the screen, move the cursor
        ("\x1b]0;owned\x07title", "title"),  # OSC ended by BEL: window title
        ("\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", "link"),  # OSC ended by ST: hyperlink
        ("\x1bPdevice control\x1b\\after", "after"),  # DCS
        ("\x1bcreset", "reset"),  # a two-byte escape (RIS: reset the terminal)
        ("\x9b31mc1 csi", "31mc1 csi"),  # C1 CSI: the introducer goes, the rest is text
        ("over\rwrite\x08\x7f", "overwrite"),  # carriage return, backspace, DEL
        ("lines\nand\ttabs", "lines\nand\ttabs"),
        ("ünïcödé 猫 🐈", "ünïcödé 猫 🐈"),
        ("unterminated \x1b]0;title", "unterminated "),
    ],
)
def test_control_sequences_are_removed(text, expected):
    assert printable(text) == expected


@given(st.text(alphabet=st.characters(max_codepoint=0x2FF)))
def test_nothing_a_terminal_acts_on_survives(text):
    shown = printable(text)
    assert "\x1b" not in shown
    assert not CONTROLS.search(shown)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc",))))
def test_text_without_controls_is_unchanged(text):
    assert printable(text) == text


def test_model_names_in_hub_messages_are_printable(tmp_path):
    name = "/no/such/\x1b]0;owned\x07model\x1b[8m"
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model(name)
    assert "/no/such/model does not exist" in str(error.value)
    (tmp_path / "model\x1b[2J.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"found: model\.bin") as error:
        weight_files(tmp_path, prefer_float16=False)
    assert "\x1b" not in str(error.value)
