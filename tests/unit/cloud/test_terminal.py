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


def test_when_formats_any_time_a_device_sent_without_failing() -> None:
    """A device's clock far off (1e300, 2**1100, past the year 9999, not finite) or a time that
    is not a number: shown as the number or ``?``, never an OverflowError."""
    from cloud.terminal import when

    assert when(0) == "1970-01-01T00:00:00+00:00" and when(None) == "-"
    assert (
        when(1e300) == "1e+300" and when(-1e300) == "-1e+300" and when(1e15) == "1000000000000000.0"
    )
    assert when(float("nan")) == "nan" and when(float("inf")) == "inf"
    assert when(2**70) == str(2**70) and when(2**15000) == "<integer of 15001 bits>"
    assert when("yesterday") == "?" and when(True) == "?"


def test_jsonable_prints_integers_beyond_64_bits_as_text_and_cuts_cycles() -> None:
    """Attack: values a device stored that ``json.dumps`` cannot print (an integer of 4516
    digits: ValueError) or would mislead a JSON reader (beyond 64 bits), a map that holds
    itself, non-finite floats, bytes and CBOR tags: each printed, the rest as it is."""
    import json

    import cbor2

    from cloud.terminal import dumps, jsonable

    loop: dict[str, object] = {"kind": "x"}
    loop["self"] = loop
    value = {
        "small": 2**64 - 1,
        "neg": -(2**64) + 1,
        "big": 2**64,
        "huge": -(2**15000),
        2**15000: "key",
        "nan": float("nan"),
        "raw": b"\x01\xff",
        "tag": cbor2.CBORTag(40000, [1, 2**70]),
        "loop": loop,
    }
    shown = jsonable(value)
    assert shown == {
        "small": 2**64 - 1,
        "neg": -(2**64) + 1,
        "big": "18446744073709551616",
        "huge": "-<integer of 15001 bits>",
        "<integer of 15001 bits>": "key",
        "nan": "nan",
        "raw": "01ff",
        "tag": {"tag": 40000, "value": [1, "1180591620717411303424"]},
        "loop": {"kind": "x", "self": "<cycle>"},
    }
    assert json.loads(dumps(value, sort_keys=True)) == shown
    deep: list[object] = []
    for _ in range(100):
        deep = [deep]
    assert "<nested too deep>" in dumps(deep)
