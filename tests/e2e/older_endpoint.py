"""Rows as an older endpoint stored them, before its decoder refused CBOR bignums and the like:
written straight into the endpoint's SQLite file (a connection of its own, as another process
would), so that the tests of the operator's views do not depend on what ingest takes today."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import cbor2

from cloud.storage import DB_NAME


def _connect(data: Path) -> sqlite3.Connection:
    db = sqlite3.connect(data / DB_NAME, timeout=10, isolation_level=None)
    db.execute("PRAGMA busy_timeout=10000")
    return db


def put_reported(data: Path, device: str, values: dict[str, Any], now: float) -> None:
    """Reported ``key => value`` (encoded by cbor2 as it comes: 2**1100 as a bignum)."""
    db = _connect(data)
    try:
        for key, value in values.items():
            db.execute(
                "INSERT OR REPLACE INTO reported (device, key, version, value, updated)"
                " VALUES (?, ?, ?, ?, ?)",
                (device, key, 1, cbor2.dumps(value), now),
            )
    finally:
        db.close()


def put_record(data: Path, device: str, seq: int, kind: str, time: float, body: Any) -> None:
    """A record whose body is ``body`` (encoded by cbor2 unless it is bytes already)."""
    raw = body if isinstance(body, bytes) else cbor2.dumps(body)
    db = _connect(data)
    try:
        row = db.execute("SELECT value FROM counters WHERE name = 'arrival'").fetchone()
        arrival = (row[0] if row else 0) + 1
        db.execute(
            "INSERT INTO records (device, seq, kind, created, time, received, arrival, body)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (device, seq, kind, time, time, time, arrival, raw),
        )
        db.execute(
            "INSERT OR REPLACE INTO counters (name, value) VALUES ('arrival', ?)", (arrival,)
        )
        # counted as the upgrade that opened the file counted it (cloud/devicecount.py)
        db.execute("UPDATE devices SET records = records + 1 WHERE id = ?", (device,))
    finally:
        db.close()


def put_command(
    data: Path, device: str, command_id: int, name: str, result: Any, at: float, now: float
) -> None:
    """A command the operator sent and its outcome as reported (``at`` as the device gave it)."""
    db = _connect(data)
    try:
        db.execute(
            "INSERT OR REPLACE INTO commands (device, id, name, args, sent, status, result, at,"
            " updated) VALUES (?, ?, ?, NULL, ?, 'ok', ?, ?, ?)",
            (device, command_id, name, now, cbor2.dumps(result), at, now),
        )
    finally:
        db.close()


def put_log_upload(data: Path, device: str, since: float, body: bytes, now: float) -> None:
    """A log upload kept with the ``since`` its device sent."""
    db = _connect(data)
    try:
        db.execute(
            "INSERT INTO logs (device, n, received, since, count, left_out, body)"
            " VALUES (?, 1, ?, ?, 2, 0, ?)",
            (device, now, since, body),
        )
    finally:
        db.close()
