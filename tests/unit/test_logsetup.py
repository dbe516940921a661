"""agent/logsetup.py: every record is one ``key=value`` line, whatever text its message holds."""

from __future__ import annotations

import io
import logging
import sys

from agent import logsetup


def record(msg: str, *args: object, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("cloud.server", logging.WARNING, __file__, 1, msg, args, exc_info)  # type: ignore[arg-type]


def test_a_message_cannot_end_its_line_or_carry_an_escape_sequence() -> None:
    """Attack: a peer's text logged with %s holds a newline and a forged record, CR, OSC 52,
    a C1 CSI, DEL, NUL and a right-to-left override: each is shown as ``\\xNN``/``\\uNNNN``;
    the tab and the rest of the line are kept as they are."""
    forged = (
        "a\n2026-12-06 15:30:00,000 level=INFO logger=x event=ok\r\x1b]52;c;ZQ==\x07\x9b\x7f\x00"
    )
    line = logsetup.Formatter().format(record("event=bad path=/%s n=%d\tend \u202eevil", forged, 3))
    assert "\n" not in line and line.startswith(line[:24] + "level=WARNING logger=cloud.server")
    assert line.endswith(
        "level=WARNING logger=cloud.server event=bad path=/a\\x0a2026-12-06 15:30:00,000 "
        "level=INFO logger=x event=ok\\x0d\\x1b]52;c;ZQ==\\x07\\x9b\\x7f\\x00 n=3\tend "
        "\\u202eevil"
    )


def test_a_traceback_keeps_its_lines_and_loses_its_escapes() -> None:
    """A traceback (exc_info) stays several lines, one frame a line, as readers expect; the
    exception's text cannot carry an escape sequence into them."""
    try:
        raise ValueError("bad \x1b[2J value")
    except ValueError:
        info = sys.exc_info()
    text = logsetup.Formatter().format(
        record("event=internal_error path=%r", "/x\n", exc_info=info)
    )
    first, *rest = text.split("\n")
    assert first.endswith("event=internal_error path='/x\\n'") and rest[0].startswith("Traceback")
    assert "\x1b" not in text and rest[-1] == "ValueError: bad \\x1b[2J value"


def test_setup_installs_the_formatter() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logsetup.setup("info", out)
        logging.getLogger("tests.logsetup").warning("event=x value=%s", "a\nb")
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    assert out.getvalue().endswith("logger=tests.logsetup event=x value=a\\x0ab\n")
