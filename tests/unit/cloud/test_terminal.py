"""cloud/terminal.py: a device's text printed on an operator's terminal carries no escape
sequence, control character or bidirectional override; the rest is printed as it was sent."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cloud.terminal import UNSAFE, safe


def test_escape_sequences_and_overrides_are_shown_not_sent() -> None:
    osc = "\x1b]52;c;ZXZpbA==\x07"  # write the clipboard
    assert safe(f"ok {osc} done") == "ok \\x1b]52;c;ZXZpbA==\\x07 done"
    assert safe("\x1b[2J\x1b[Hclean") == "\\x1b[2J\\x1b[Hclean"  # clear the screen
    assert safe("a\rb\nc\x00\x7f\x9b") == "a\\x0db\\x0ac\\x00\\x7f\\x9b"
    assert safe("user\u202egnp.exe") == "user\\u202egnp.exe"
    assert safe("tab\tkept, ünïcode and 温度 kept") == "tab\tkept, ünïcode and 温度 kept"


@given(st.text())
def test_nothing_unsafe_survives_and_safe_text_is_unchanged(text: str) -> None:
    shown = safe(text)
    assert UNSAFE.search(shown) is None
    if UNSAFE.search(text) is None:
        assert shown == text
