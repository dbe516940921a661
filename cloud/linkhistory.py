"""The history of each device's reported link: ``link/state``, ``link/rtt_ms`` and ``link/loss``
over time, a bounded number of values per device and key, for the dashboard's link chart.

Reported state keeps only the newest value of a key (docs/protocol.md, "Device state"); this
table keeps the values as they were taken. :class:`cloud.storage.SQLiteStorage` appends to it in
the same transaction that merges a reported PUT (:func:`append`), so it holds exactly the values
the endpoint accepted. Rules:

- Times are the endpoint's clock when the value was taken (the device's versions are only
  ordered, not a clock).
- ``link/state`` is kept on every change; a number is kept when it changed and at least
  :data:`MIN_SPACING` seconds passed since the last one kept for that key (a device may report
  every 2 s; the chart needs no more). The newest value is always in reported state anyway.
- At most :data:`MAX_ROWS` values per device and key: the oldest go first.
- A value that is not a short text (state) or a finite number (RTT, loss) is not kept.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable
from typing import Any

KEYS = ("link/state", "link/rtt_ms", "link/loss")
MAX_ROWS = 4096  # values per device and key
MIN_SPACING = 10.0  # seconds between two kept numbers of one key
MAX_TEXT = 32  # characters of a kept state

SCHEMA = """
CREATE TABLE IF NOT EXISTS link_history (
    device TEXT NOT NULL,
    key TEXT NOT NULL,
    time REAL NOT NULL,
    version INTEGER NOT NULL,
    value  -- no type: text (state) or real, stored as given
);
CREATE INDEX IF NOT EXISTS link_history_by_key ON link_history (device, key, time);
"""


def _keepable(key: str, value: Any) -> Any:
    """The value as stored, or None when it is not kept."""
    if key == "link/state":
        return value if isinstance(value, str) and 0 < len(value) <= MAX_TEXT else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def append(
    db: sqlite3.Connection, device: str, entries: Iterable[tuple[str, int, Any]], now: float
) -> int:
    """Keep the link values of a reported PUT, ``(key, version, value)`` as merged; inside the
    caller's transaction. Returns how many were kept."""
    kept = 0
    for key, version, raw in entries:
        if key not in KEYS:
            continue
        value = _keepable(key, raw)
        if value is None:
            continue
        last = db.execute(
            "SELECT time, value FROM link_history WHERE device = ? AND key = ? "
            "ORDER BY time DESC LIMIT 1",
            (device, key),
        ).fetchone()
        if last is not None:
            if last[1] == value:
                continue
            if key != "link/state" and now - last[0] < MIN_SPACING:
                continue
        db.execute(
            "INSERT INTO link_history (device, key, time, version, value) VALUES (?, ?, ?, ?, ?)",
            (device, key, now, version, value),
        )
        db.execute(
            "DELETE FROM link_history WHERE device = ? AND key = ? AND time < ("
            "SELECT time FROM link_history WHERE device = ? AND key = ? "
            "ORDER BY time DESC LIMIT 1 OFFSET ?)",
            (device, key, device, key, MAX_ROWS - 1),
        )
        kept += 1
    return kept


def history(
    db: sqlite3.Connection, device: str, since: float, until: float
) -> dict[str, tuple[list[float], list[Any]]]:
    """Per key, the kept values in ``[since, until]`` (times ascending), starting with the last
    value before ``since`` placed at ``since`` (so that a step line starts at the left edge)."""
    out: dict[str, tuple[list[float], list[Any]]] = {}
    for key in KEYS:
        times: list[float] = []
        values: list[Any] = []
        before = db.execute(
            "SELECT value FROM link_history WHERE device = ? AND key = ? AND time < ? "
            "ORDER BY time DESC LIMIT 1",
            (device, key, since),
        ).fetchone()
        if before is not None:
            times.append(since)
            values.append(before[0])
        rows = db.execute(
            "SELECT time, value FROM link_history WHERE device = ? AND key = ? "
            "AND time >= ? AND time <= ? ORDER BY time LIMIT ?",
            (device, key, since, until, MAX_ROWS),
        )
        for time, value in rows:
            times.append(float(time))
            values.append(value)
        out[key] = (times, values)
    return out
