"""The history of remote commands (docs/protocol.md "Remote commands and logs"), written once for
both databases: the table ``commands``, one row per command sent to a device, keyed by
(device, id) (ids increase per device, :func:`agent.wire.commands.new_id`).

A row is written ``sent`` when an operator sends the command (``edge-agent-cloud commands
send``, which also sets the desired key) and updated when the device reports its outcome
(``command/<name>`` in reported state: :meth:`CommandTables.note_command_results`, called where
reported PUTs are merged). Only rows an operator created are updated: a result for an id the
table does not hold (a device's invention, or a command an operator set as a desired key over
the network) is dropped with a warning and stays in reported state only, so a device cannot
write the history or move the next id (:func:`agent.wire.commands.new_id` is above the ids
operators issued). ``args`` and ``result`` are CBOR.

Log uploads (``logs``) are numbered ``n`` per device, the newest :data:`LOGS_KEPT` kept. Both
numberings read the newest number and write the next one: the device's row is locked first
(PostgreSQL), as releasestore.py numbers the release history, so concurrent writers (processes,
hosts) take turns instead of colliding on the key. The protocol gives an upload no id; a device
encodes its upload once and sends those bytes again after a lost answer, so an upload whose body
is one of the kept ones is that one (nothing is stored twice; two uploads with one body hold the
same lines anyway).

:class:`CommandTables` is a mixin of :class:`cloud.storesql.SharedStorage` (``_read`` and
``_write``); SQLite creates the table with :data:`SQLITE_SCHEMA` at open, PostgreSQL with its
migration :data:`PG_MIGRATION` (cloud/pgschema.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.wire import commands as wire
from agent.wire import records
from agent.wire.statedoc import Entry
from cloud.storebase import Sql, SqlTables, UnknownDevice

T = TypeVar("T")

log = logging.getLogger(__name__)

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    device TEXT NOT NULL,
    id INTEGER NOT NULL,
    name TEXT NOT NULL,
    args BLOB,
    sent REAL,
    status TEXT NOT NULL,
    result BLOB,
    at REAL,
    updated REAL NOT NULL,
    PRIMARY KEY (device, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logs (
    device TEXT NOT NULL,
    n INTEGER NOT NULL,
    received REAL NOT NULL,
    since REAL,
    count INTEGER NOT NULL,
    left_out INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (device, n)
) WITHOUT ROWID;
"""

PG_MIGRATION = (
    """CREATE TABLE commands (
        device TEXT COLLATE "C" NOT NULL,
        id BIGINT NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        args BYTEA,
        sent DOUBLE PRECISION,
        status TEXT COLLATE "C" NOT NULL,
        result BYTEA,
        at DOUBLE PRECISION,
        updated DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device, id)
    )""",
    """CREATE TABLE logs (
        device TEXT COLLATE "C" NOT NULL,
        n BIGINT NOT NULL,
        received DOUBLE PRECISION NOT NULL,
        since DOUBLE PRECISION,
        count BIGINT NOT NULL,
        left_out BIGINT NOT NULL,
        body BYTEA NOT NULL,
        PRIMARY KEY (device, n)
    )""",
)

COLUMNS = ("device", "id", "name", "args", "sent", "status", "result", "at", "updated")
LOG_COLUMNS = ("device", "n", "received", "since", "count", "left_out", "body")
#: Log uploads kept per device (the oldest go).
LOGS_KEPT = 16


@dataclass(frozen=True)
class CommandRow:
    """One command: ``status`` is ``sent`` until the device reports ok, failed or refused."""

    device: str
    id: int
    name: str
    args: dict[str, Any] | None
    sent: float | None
    status: str
    result: Any
    at: float | None
    updated: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "args": self.args,
            "sent": self.sent,
            "status": self.status,
            "result": self.result,
            "at": self.at,
        }


def _decode(data: Any) -> Any:
    if data is None:
        return None
    try:
        return records.loads(bytes(data))
    except records.RecordError:
        return {"undecodable": len(bytes(data))}


class CommandTables(SqlTables):
    """Storage methods of the ``commands`` table (both dialects)."""

    def add_command(self, device: str, name: str, args: Mapping[str, Any], now: float) -> int:
        """Record a command ``sent`` to ``device`` under a fresh id (returned);
        :class:`UnknownDevice` if the device is not registered."""

        def tx(db: Sql) -> int:
            _lock_device(db, device)
            # the operator's own ids only (rows a device made before results were checked
            # have no ``sent``): a device's word cannot move the next id
            row = db.execute(
                "SELECT max(id) FROM commands WHERE device = ? AND sent IS NOT NULL", (device,)
            )
            found = row.fetchone()
            command_id = wire.new_id(found[0] if found else None, now)
            db.execute(
                "INSERT INTO commands (device, id, name, args, sent, status, updated)"
                " VALUES (?, ?, ?, ?, ?, 'sent', ?)",
                (device, command_id, name, records.dumps(dict(args)), now, now),
            )
            return command_id

        return self._write(tx)

    def drop_command(self, device: str, command_id: int) -> None:
        """Forget a command that was never sent (its desired write failed)."""
        self._write(
            lambda db: db.execute(
                "DELETE FROM commands WHERE device = ? AND id = ? AND status = 'sent'",
                (device, command_id),
            )
        )

    def note_command_results(self, device: str, entries: Mapping[str, Entry], now: float) -> int:
        """Record the outcomes among reported ``entries`` (``command/<name>`` keys the merge
        took); returns how many rows changed."""
        found: list[tuple[str, int, str, bytes, float | None]] = []
        for key, entry in entries.items():
            name = key.removeprefix("command/")
            if not key.startswith("command/") or name not in wire.NAMES:
                continue
            parsed = wire.parse_result(entry.value)
            if parsed is None:
                continue
            command_id, status, result, at = parsed
            found.append((name, command_id, status, records.dumps(result), at))
        if not found:
            return 0

        def tx(db: Sql) -> int:
            changed = 0
            for name, command_id, status, result, at in found:
                cur = db.execute(
                    "UPDATE commands SET status = ?, result = ?, at = ?, updated = ?"
                    " WHERE device = ? AND id = ? AND name = ? AND sent IS NOT NULL",
                    (status, result, at, now, device, command_id, name),
                )
                if cur.rowcount == 1:
                    changed += 1
                else:  # only commands the operator sent have results
                    log.warning(
                        "event=command_result_dropped device=%s name=%s id=%d reason=not_sent"
                        " action=none",
                        device,
                        name,
                        command_id,
                    )
            return changed

        return self._write(tx)

    def commands(self, device: str, limit: int = 20) -> list[CommandRow]:
        """The newest ``limit`` commands of ``device``, newest first."""
        sql = f"SELECT {', '.join(COLUMNS)} FROM commands WHERE device = ? ORDER BY id DESC LIMIT ?"
        rows: Sequence[Any] = self._read(lambda db: db.execute(sql, (device, limit)).fetchall())
        return [
            CommandRow(r[0], r[1], r[2], _decode(r[3]), r[4], r[5], _decode(r[6]), r[7], r[8])
            for r in rows
        ]

    def put_log_upload(
        self, device: str, since: float | None, count: int, left_out: int, body: bytes, now: float
    ) -> int:
        """Keep an upload of ``device`` (its number returned); drops the oldest beyond
        :data:`LOGS_KEPT`. The same body again (a resend after a lost answer: the device encodes
        an upload once) is the upload kept already: its number, nothing stored.
        :class:`UnknownDevice` if the device is not registered."""

        def tx(db: Sql) -> int:
            _lock_device(db, device)
            same = db.execute(
                "SELECT n FROM logs WHERE device = ? AND body = ? ORDER BY n DESC LIMIT 1",
                (device, body),
            ).fetchone()
            if same is not None:
                return int(same[0])
            row = db.execute("SELECT max(n) FROM logs WHERE device = ?", (device,)).fetchone()
            n = (row[0] or 0) + 1 if row else 1
            db.execute(
                "INSERT INTO logs (device, n, received, since, count, left_out, body)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (device, n, now, since, count, left_out, body),
            )
            db.execute("DELETE FROM logs WHERE device = ? AND n <= ?", (device, n - LOGS_KEPT))
            return n

        return self._write(tx)

    def log_uploads(self, device: str, limit: int = 1) -> list[dict[str, Any]]:
        """The newest ``limit`` uploads of ``device``, newest first: their fields and ``body``."""
        sql = f"SELECT {', '.join(LOG_COLUMNS)} FROM logs WHERE device = ? ORDER BY n DESC LIMIT ?"
        rows = self._read(lambda db: db.execute(sql, (device, limit)).fetchall())
        return [dict(zip(LOG_COLUMNS, (*r[:6], bytes(r[6])), strict=True)) for r in rows]

    def last_log_upload(self, device: str) -> dict[str, Any] | None:
        """The newest upload's fields, without its body (``devices show``)."""
        found = self.log_uploads(device, 1)
        if not found:
            return None
        upload = found[0]
        return {k: v for k, v in upload.items() if k not in ("body", "device")}


def _lock_device(db: Sql, device: str) -> None:
    """Lock the device's row for the transaction (PostgreSQL; SQLite's write transaction holds
    the whole database), so a number read next (the newest command id, the newest upload) stays
    the newest until the transaction ends: two processes never take the same one.
    :class:`UnknownDevice` if the device is not registered."""
    lock = " FOR UPDATE" if db.dialect == "postgresql" else ""
    if db.execute(f"SELECT 1 FROM devices WHERE id = ?{lock}", (device,)).fetchone() is None:
        raise UnknownDevice.of(device)


def taken_results(entries: Mapping[str, Entry], versions: Mapping[str, int]) -> dict[str, Entry]:
    """The ``command/<name>`` entries of a reported PUT that the merge took (their version is
    the one now stored)."""
    return {
        k: e
        for k, e in entries.items()
        if k.startswith("command/") and versions.get(k) == e.version
    }
