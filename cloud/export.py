"""Export of what arrived at the endpoint: one row per telemetry channel, one per other record.

Columns: ``seq, kind, time, sensor, channel, value``. A telemetry record gives a row per channel,
by channel name (``value`` is the number); an alert, event or state record gives one row with
empty sensor and channel and the record's map as ``value`` (JSON text in CSV, an object in JSON).
A body that does not decode gives ``{"raw": "<hex>"}``. ``time`` is the time inside the body
(Unix seconds).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from agent.wire.records import Kind, RecordError, TelemetryBody, decode_body
from agent.wire.statedoc import to_json
from cloud.storage import StoredRecord

FIELDS = ("seq", "kind", "time", "sensor", "channel", "value")
FORMATS = ("csv", "json")


def rows(records: Iterable[StoredRecord]) -> Iterator[dict[str, Any]]:
    """The export rows of ``records`` (in the order given)."""
    for rec in records:
        try:
            body = decode_body(rec.kind, rec.body)
        except RecordError:
            yield _row(rec, rec.time, "", "", {"raw": rec.body.hex()})
            continue
        if rec.kind == Kind.TELEMETRY:
            assert isinstance(body, TelemetryBody)
            for channel, value in sorted(body.values.items()):
                yield _row(rec, body.time, body.sensor, channel, value)
        else:
            yield _row(rec, body.time, "", "", to_json(body.data))  # type: ignore[union-attr]


def _row(rec: StoredRecord, time: float, sensor: str, channel: str, value: Any) -> dict[str, Any]:
    return {
        "seq": rec.seq,
        "kind": str(rec.kind),
        "time": time,
        "sensor": sensor,
        "channel": channel,
        "value": value,
    }


def _number(value: float) -> Any:
    return value if math.isfinite(value) else str(value)


def write_csv(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FIELDS)
    count = 0
    for row in rows:
        value = row["value"]
        if isinstance(value, dict | list):
            value = json.dumps(value, sort_keys=True, separators=(",", ":"))
        elif isinstance(value, float):
            value = repr(value)
        writer.writerow(
            [row["seq"], row["kind"], repr(row["time"]), row["sensor"], row["channel"], value]
        )
        count += 1
    return count


def write_json(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    """A JSON array of row objects, written as it goes. Non-finite numbers become strings."""
    out.write("[")
    count = 0
    for row in rows:
        row = dict(row, time=_number(row["time"]))
        if isinstance(row["value"], float):
            row["value"] = _number(row["value"])
        out.write(("\n" if count == 0 else ",\n") + json.dumps(row, sort_keys=False))
        count += 1
    out.write("\n]\n" if count else "]\n")
    return count


def write(records: Iterable[StoredRecord], out: TextIO, fmt: str = "csv") -> int:
    """Write ``records`` as ``fmt`` (csv or json) to ``out``; the number of rows."""
    if fmt == "csv":
        return write_csv(rows(records), out)
    if fmt == "json":
        return write_json(rows(records), out)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}")
