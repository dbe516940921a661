"""Export of what arrived at the endpoint: one row per telemetry channel, one per other record.

Columns: ``seq, kind, time, sensor, channel, value``. A telemetry record gives a row per channel,
by channel name (``value`` is the number); an alert, event or state record gives one row with
empty sensor and channel and the record's map as ``value`` (JSON text in CSV, an object in JSON).
A body that does not decode gives ``{"raw": "<hex>"}``. ``time`` is the time inside the body
(Unix seconds).

A features record (cloud/featurestore.py) gives a row per channel, kind ``features``, at its
first seq and the time of its last reading; ``value`` is an object with ``first_seq``,
``last_seq``, ``count``, ``t0``, ``t1``, the statistics (``mean``, ``min``, ``max``, ``rms``,
``std``, ``kurtosis``, ``crest``) and ``bands`` (JSON text in CSV). Rows come in seq order.
"""

from __future__ import annotations

import csv
import heapq
import math
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from agent.wire.batch import FEATURES, CodecError
from agent.wire.features import STATS
from agent.wire.records import Kind, RecordError, TelemetryBody, decode_body
from cloud import terminal
from cloud.featurestore import StoredFeatures
from cloud.storage import StoredRecord

FIELDS = ("seq", "kind", "time", "sensor", "channel", "value")
FORMATS = ("csv", "json")


def rows(
    records: Iterable[StoredRecord], features: Iterable[StoredFeatures] = ()
) -> Iterator[dict[str, Any]]:
    """The export rows of ``records`` and ``features`` (each in seq order), merged by seq."""
    merged = heapq.merge(((r.seq, 0, r) for r in records), ((f.first_seq, 1, f) for f in features))
    for _, _, item in merged:
        if isinstance(item, StoredFeatures):
            yield from _feature_rows(item)
        else:
            yield from _record_rows(item)


def _feature_rows(f: StoredFeatures) -> Iterator[dict[str, Any]]:
    try:
        body = f.decoded()
    except CodecError:
        yield {**_head(f.first_seq, FEATURES, f.t1, f.sensor, ""), "value": {"raw": f.body.hex()}}
        return
    for channel, feats in sorted(body.channels.items()):
        value = {
            "first_seq": body.first,
            "last_seq": body.last,
            "count": body.count,
            "t0": body.t0,
            "t1": body.t1,
            **{name: getattr(feats, name) for name in STATS},
            "bands": list(feats.bands),
        }
        yield {**_head(body.first, FEATURES, body.t1, body.sensor, channel), "value": value}


def _head(seq: int, kind: str, time: float, sensor: str, channel: str) -> dict[str, Any]:
    return {"seq": seq, "kind": kind, "time": time, "sensor": sensor, "channel": channel}


def _record_rows(rec: StoredRecord) -> Iterator[dict[str, Any]]:
    try:
        body = decode_body(rec.kind, rec.body)
    except (RecordError, OverflowError, ValueError):  # also a bignum stored before it was refused
        yield _row(rec, rec.time, "", "", {"raw": rec.body.hex()})
        return
    if rec.kind == Kind.TELEMETRY:
        assert isinstance(body, TelemetryBody)
        for channel, value in sorted(body.values.items()):
            yield _row(rec, body.time, body.sensor, channel, value)
    else:
        yield _row(rec, body.time, "", "", terminal.jsonable(body.data))  # type: ignore[union-attr]


def _row(rec: StoredRecord, time: float, sensor: str, channel: str, value: Any) -> dict[str, Any]:
    return {**_head(rec.seq, str(rec.kind), time, sensor, channel), "value": value}


def _number(value: float) -> Any:
    return value if math.isfinite(value) else str(value)


#: First characters that make a spreadsheet read a cell as a formula (OWASP "CSV injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def _text(cell: str) -> str:
    """A text cell as CSV carries it: one a spreadsheet would evaluate gets a leading ``'``; a
    carriage return becomes a line feed (the writer quotes a cell with a line feed, the line
    ending, but not one with a bare CR, which readers take as the end of the row); every other
    control character and bidirectional mark is shown as ``\\xNN`` / ``\\uNNNN``
    (cloud/terminal.py), so that a cell printed or opened shows what the device sent."""
    cell = terminal.safe(cell.replace("\r", "\n"), newlines=True)
    return "'" + cell if cell.startswith(FORMULA_START) else cell


def write_csv(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    """Rows as CSV; device-chosen text (sensor, channel, text values) is escaped against formula
    injection (:func:`_text`), numbers are written as numbers (-1.5 stays -1.5)."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FIELDS)
    count = 0
    for row in rows:
        value = row["value"]
        if isinstance(value, dict | list):
            value = _text(terminal.dumps(value, sort_keys=True, separators=(",", ":")))
        elif isinstance(value, int) and not isinstance(value, bool):
            value = terminal.number(value)
        elif isinstance(value, float):
            value = repr(value)
        elif isinstance(value, str):
            value = _text(value)
        sensor, channel = _text(row["sensor"]), _text(row["channel"])
        writer.writerow(
            [row["seq"], _text(str(row["kind"])), repr(row["time"]), sensor, channel, value]
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
        out.write(("\n" if count == 0 else ",\n") + terminal.dumps(row, sort_keys=False))
        count += 1
    out.write("\n]\n" if count else "]\n")
    return count


def write(
    records: Iterable[StoredRecord],
    out: TextIO,
    fmt: str = "csv",
    features: Iterable[StoredFeatures] = (),
) -> int:
    """Write ``records`` and ``features`` as ``fmt`` (csv or json) to ``out``; the number of
    rows."""
    if fmt == "csv":
        return write_csv(rows(records, features), out)
    if fmt == "json":
        return write_json(rows(records, features), out)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}")
