"""The history of each device's reported link: ``link/state``, ``link/rtt_ms`` and ``link/loss``
over time, a bounded number of values per device and key, for the dashboard's link chart.

Reported state keeps only the newest value of a key (docs/protocol.md, "Device state"); this
table keeps the values as they were taken. Both storages append to it in the same transaction
that merges a reported PUT (:func:`append`, written once over :class:`cloud.storebase.Sql`), so
it holds exactly the values the endpoint accepted. The one difference between the two: SQLite
keeps a value in one untyped column ``value``, PostgreSQL in ``value_text`` or ``value_num``
(:func:`value_columns`). Rules:

- Times are the endpoint's clock when the value was taken (the device's versions are only
  ordered, not a clock).
- ``link/state`` is kept on every change; a number is kept when it changed and at least
  :data:`MIN_SPACING` seconds passed since the last one kept for that key (a device may report
  every 2 s; the chart needs no more). The newest value is always in reported state anyway.
- At most :data:`MAX_ROWS` values per device and key: the oldest go first.
- A value that is not a short text (state) or a finite number (RTT, loss) is not kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from cloud.storebase import finite_float

if TYPE_CHECKING:
    from cloud.storebase import Sql

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


def value_columns(dialect: str) -> tuple[str, ...]:
    """The columns that hold a value: one untyped column in SQLite; a text and a number in
    PostgreSQL (cloud/pgschema.py), of which one is set."""
    return ("value",) if dialect == "sqlite" else ("value_text", "value_num")


def pack(dialect: str, value: Any) -> tuple[Any, ...]:
    """``value`` as the :func:`value_columns` of ``dialect`` hold it."""
    if dialect == "sqlite":
        return (value,)
    return (value, None) if isinstance(value, str) else (None, value)


def unpack(columns: Sequence[Any]) -> Any:
    """The value from what :func:`value_columns` held (the one that is not null)."""
    return next((v for v in columns if v is not None), None)


def _keepable(key: str, value: Any) -> Any:
    """The value as stored, or None when it is not kept."""
    if key == "link/state":
        return value if isinstance(value, str) and 0 < len(value) <= MAX_TEXT else None
    return finite_float(value)


def append(db: Sql, device: str, entries: Iterable[tuple[str, int, Any]], now: float) -> int:
    """Keep the link values of a reported PUT, ``(key, version, value)`` as merged; inside the
    caller's transaction. Returns how many were kept."""
    columns = value_columns(db.dialect)
    values = ", ".join(columns)
    kept = 0
    for key, version, raw in entries:
        if key not in KEYS:
            continue
        value = _keepable(key, raw)
        if value is None:
            continue
        last = db.execute(
            f"SELECT time, {values} FROM link_history WHERE device = ? AND key = ? "
            "ORDER BY time DESC LIMIT 1",
            (device, key),
        ).fetchone()
        if last is not None:
            if unpack(last[1:]) == value:
                continue
            if key != "link/state" and now - last[0] < MIN_SPACING:
                continue
        db.execute(
            f"INSERT INTO link_history (device, key, time, version, {values}) "
            f"VALUES (?, ?, ?, ?{', ?' * len(columns)})",
            (device, key, now, version, *pack(db.dialect, value)),
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
    db: Sql, device: str, since: float, until: float
) -> dict[str, tuple[list[float], list[Any]]]:
    """Per key, the kept values in ``[since, until]`` (times ascending), starting with the last
    value before ``since`` placed at ``since`` (so that a step line starts at the left edge)."""
    values = ", ".join(value_columns(db.dialect))
    out: dict[str, tuple[list[float], list[Any]]] = {}
    for key in KEYS:
        times: list[float] = []
        found: list[Any] = []
        before = db.execute(
            f"SELECT {values} FROM link_history WHERE device = ? AND key = ? AND time < ? "
            "ORDER BY time DESC LIMIT 1",
            (device, key, since),
        ).fetchone()
        if before is not None:
            times.append(since)
            found.append(unpack(before))
        rows = db.execute(
            f"SELECT time, {values} FROM link_history WHERE device = ? AND key = ? "
            "AND time >= ? AND time <= ? ORDER BY time LIMIT ?",
            (device, key, since, until, MAX_ROWS),
        )
        for row in rows:
            times.append(float(row[0]))
            found.append(unpack(row[1:]))
        out[key] = (times, found)
    return out
