"""Text a device sent, made safe to print on an operator's terminal.

A device's log lines, update reasons and the like are the device's words: a hostile or broken
device could put escape sequences in them (ANSI CSI/OSC: move the cursor, rewrite or hide what
was printed before, set the window title, write the clipboard) or bidirectional overrides that
make a line read otherwise than it is. :func:`safe` shows every such character as a visible
escape instead, so what the operator reads is what was sent; JSON output (``--json``) needs
nothing of this (``json.dumps`` escapes them already).
"""

from __future__ import annotations

import re

#: C0 controls but tab, DEL, C1 controls, the bidirectional marks (Arabic letter mark, LRM/RLM,
#: embeddings, overrides, isolates) and the line/paragraph separators.
UNSAFE = re.compile(
    "[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str) -> str:
    """``text`` with each character of :data:`UNSAFE` shown as ``\\xNN`` / ``\\uNNNN``."""
    return UNSAFE.sub(_escape, text)
