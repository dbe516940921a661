"""Logging policy, stated once.

- debug: what happens under perfect conditions (each reading, each exchange);
- info: state changes (sensor recovered, link state, model swap, start and stop);
- warning: a peer or a part that misbehaves (a sensor read failed, a bad message);
- error: what loses function (a sensor down, a store that cannot write).

One line per event, ``key=value`` fields, so journald and grep both work. No secrets in logs.

A peer's text in a log line is logged with ``%r``. As a second layer, :class:`Formatter` shows
every control character (C0 but tab, DEL, C1), bidirectional mark and line separator in a
record's line as ``\\xNN`` / ``\\uNNNN``, so that no text a peer chose can end the line and
forge the next one, or reach the terminal of whoever reads the log as an escape sequence. A
traceback (``exc_info``, ``stack_info``) keeps its line breaks, one frame a line, with the rest
of its control characters escaped the same way.

A line that may quote a reading of a sensor with a ``local`` or ``drop`` channel ([data]: a
driver's error text quotes a line, an answer, registers) gives, as ``extra={SHIPPED: text}``,
the line that may leave the device: the log ring (agent/service/logring.py), which the ``logs``
command uploads, keeps that one; stderr (journald, on the device) keeps the whole line.
"""

from __future__ import annotations

import logging
import re
import sys

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
#: The LogRecord attribute of a line's version that may leave the device (module docstring).
SHIPPED = "shipped"

#: What :class:`Formatter` escapes: C0 controls but tab, DEL, C1 controls, the bidirectional
#: marks (ALM, LRM/RLM, embeddings, overrides, isolates) and the line/paragraph separators.
UNSAFE = re.compile(
    "[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
#: :data:`UNSAFE` but the line feed (a traceback's lines; a CSV cell, which the writer quotes).
UNSAFE_BUT_NEWLINE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str, *, newlines: bool = False) -> str:
    """``text`` with each character of :data:`UNSAFE` shown as ``\\xNN`` / ``\\uNNNN``
    (``newlines=True``: line feeds are kept). The one definition: cloud/terminal.py shows a
    device's text to an operator with it too."""
    return (UNSAFE_BUT_NEWLINE if newlines else UNSAFE).sub(_escape, text)


class Formatter(logging.Formatter):
    """:data:`FORMAT`, one line per record whatever its message holds (:func:`escape`)."""

    def __init__(self, fmt: str = FORMAT) -> None:
        super().__init__(fmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))

    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def]
        return escape(super().formatException(ei), newlines=True)

    def formatStack(self, stack_info: str) -> str:
        return escape(super().formatStack(stack_info), newlines=True)


def setup(level: str = "info", stream=None) -> None:  # type: ignore[no-untyped-def]
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(Formatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("coap").setLevel(max(root.level, logging.WARNING))
