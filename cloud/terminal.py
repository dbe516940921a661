"""What the operator's commands print of a device's data, made safe to print and to parse.

A device's log lines, update reasons and the like are the device's words: a hostile or broken
device could put escape sequences in them (ANSI CSI/OSC: move the cursor, rewrite or hide what
was printed before, set the window title, write the clipboard) or bidirectional overrides that
make a line read otherwise than it is. :func:`safe` shows every such character as a visible
escape instead, so what the operator reads is what was sent; JSON output (``--json``) needs
nothing of this (``json.dumps`` escapes them already).

A device's numbers and structures can break the printing itself: a time no date can show
(``at = 1e300``), an integer of more digits than Python prints (``2**15000``), a value that
contains itself. :func:`when` formats any device-supplied time, :func:`jsonable` and
:func:`dumps` any device-supplied value; neither raises on what a device sent.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import cbor2

from agent.logsetup import UNSAFE as UNSAFE  # what safe() shows escaped
from agent.logsetup import escape
from agent.wire.statedoc import RawValue

#: Integers of this magnitude or more are printed as text: beyond what a JSON reader's 64-bit
#: integers hold (and Python refuses to print one of more than 4300 digits).
MAX_INT = 2**64
#: Integers of more bits than this are shown by their size only.
MAX_INT_BITS = 1024
#: Structures nested deeper than this are cut (:func:`jsonable`).
MAX_DEPTH = 32


def safe(text: str, *, newlines: bool = False) -> str:
    """``text`` with each control character and bidirectional mark shown as ``\\xNN`` /
    ``\\uNNNN`` (agent/logsetup.py :func:`~agent.logsetup.escape`; ``newlines=True``: line
    feeds are kept)."""
    return escape(text, newlines=newlines)


def big_int(n: int) -> str:
    """An integer as text, whatever its size: its digits up to :data:`MAX_INT_BITS` bits, its
    size beyond."""
    if n.bit_length() <= MAX_INT_BITS:
        return str(n)
    return f"{'-' if n < 0 else ''}<integer of {n.bit_length()} bits>"


def number(n: float) -> str:
    """A number as text (``repr`` of a float, the digits of an integer), never an error."""
    if isinstance(n, int) and not isinstance(n, bool):
        return big_int(n)
    return repr(n)


def when(t: Any) -> str:
    """A Unix time (seconds) as ISO 8601 UTC to the second; ``-`` for None. A time no date can
    show (a device's clock far off, not finite) is shown as the number; what is not a number at
    all as ``?``."""
    if t is None:
        return "-"
    if isinstance(t, bool) or not isinstance(t, int | float):
        return "?"
    try:
        return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return number(t)


def jsonable(value: Any) -> Any:
    """A value a device sent (decoded CBOR) as what ``json.dumps`` prints without fail: bytes as
    hex, non-finite floats and integers of :data:`MAX_INT` or more in magnitude as text, CBOR
    tags as ``{"tag", "value"}``, map keys as text; a value that contains itself, or is nested
    deeper than :data:`MAX_DEPTH`, is cut there with a note."""
    return _jsonable(value, 0, set())


def _jsonable(value: Any, depth: int, open_: set[int]) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if -MAX_INT < value < MAX_INT else big_int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, RawValue):
        return {"undecodable_cbor": value.data[:64].hex(), "bytes": len(value.data)}
    if not isinstance(value, dict | list | tuple | set | frozenset | cbor2.CBORTag):
        try:
            return str(value)
        except Exception:  # a decoded type whose text fails (a Fraction of huge integers)
            return f"<{type(value).__name__}>"
    if id(value) in open_:
        return "<cycle>"
    if depth >= MAX_DEPTH:
        return "<nested too deep>"
    open_.add(id(value))
    try:
        if isinstance(value, dict):
            return {_key(k): _jsonable(v, depth + 1, open_) for k, v in value.items()}
        if isinstance(value, cbor2.CBORTag):
            return {"tag": value.tag, "value": _jsonable(value.value, depth + 1, open_)}
        return [_jsonable(v, depth + 1, open_) for v in value]
    finally:
        open_.discard(id(value))


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    shown = _jsonable(key, MAX_DEPTH - 1, set())
    return shown if isinstance(shown, str) else json.dumps(shown)


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`jsonable` (``kwargs`` as json.dumps takes them)."""
    return json.dumps(jsonable(value), **kwargs)
