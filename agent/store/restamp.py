"""Restamping: records stamped before the wall clock was set (a device without a real-time clock
boots at 1970) moved to the times they were taken, in one transaction (docs/store.md, "Times
before the clock is set"; the stage that calls it: agent/service/wallclock.py)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from agent.store.dbfile import durably, txn_failed
from agent.store.settings import CODE_KIND
from agent.wire.records import RecordError, restamped

if TYPE_CHECKING:
    from agent.store.database import Db


def restamp(db: Db, shift: float, floor: float, above: int) -> int:
    """Add ``shift`` seconds to the time (``created`` and the body's) of every queued record
    numbered above ``above`` and created before ``floor`` that was never handed out (no
    attempt, no lease): one that may have reached the endpoint keeps the bytes it went with, or
    a copy sent again would conflict with it. A body that does not decode is left as it is, and
    so is a record the shift leaves before ``floor`` (stamped with another offset, before a
    step of a clock not set yet): each look would move it again. Returns the records
    restamped."""
    conn = db._c()
    grown = [0] * len(db.bytes)
    n = 0
    try:
        with durably(conn, db.s.durability):
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(
                "SELECT seq, kind, created, payload FROM records "
                "WHERE seq > ? AND created < ? AND created >= ? AND attempts = 0",
                (above, floor, floor - shift),
            ).fetchall()
            for seq, code, created, payload in rows:
                if seq in db.leases:
                    continue
                try:
                    body = restamped(CODE_KIND[code], payload, shift)
                except RecordError:
                    continue
                conn.execute(
                    "UPDATE records SET created = ?, payload = ? WHERE seq = ?",
                    (created + shift, body, seq),
                )
                grown[code] += len(body) - len(payload)
                n += 1
            for code, delta in enumerate(grown):
                if delta:
                    conn.execute("UPDATE kinds SET bytes = bytes + ? WHERE kind = ?", (delta, code))
            conn.execute("COMMIT")
    except (sqlite3.Error, OSError) as err:
        raise txn_failed(conn, err, db.dir, db.path, "restamping") from err
    for code, delta in enumerate(grown):
        db.bytes[code] += delta
    db.commits += 1
    return n
