"""Agent releases in the storage, groups of devices, and each device's release history
(docs/ota.md), written once for both databases over :class:`cloud.storebase.Sql`.

Tables (SQLite: :data:`SQLITE_SCHEMA` at open; PostgreSQL: :data:`PG_MIGRATION`, migration 7 of
cloud/pgschema.py):

``releases``, ``release_blocks`` (PostgreSQL only)
    A published release: its signed manifest, and its file cut into blocks of
    :data:`BLOCK_BYTES` (``bytea``), so that neither publishing nor reading ever holds more than
    one block in memory. Written in one transaction: a reader sees a version whole or not at
    all; a version is immutable (the first copy stays). A SQLite endpoint keeps its releases as
    the files under ``DATA/releases`` it always had (cloud/releasefiles.py), as it does models.
``release_groups``, ``group_members``
    A group is a name (:func:`agent.modelstore.signing.check_name`) with members (registered
    devices) and the release assigned to it last (``version``, ``sha256``: NULL until one is),
    which a device added later gets.
``release_history``
    Per device, numbered ``n`` in the order stored: each distinct update outcome the device
    reported under ``agent/update`` (:meth:`ReleaseTables.note_release_outcomes`, called in the
    transaction that merges reported state; distinct by (version, result, at)) and each
    assignment an operator made (result ``assigned``). The newest :data:`HISTORY_KEPT` stay.

:class:`ReleaseTables` is a mixin of :class:`cloud.storesql.SharedStorage`;
:class:`ReleaseBlobs` one of :class:`cloud.pgextra.PostgresExtras`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ModelError
from agent.modelstore.signing import check_name
from cloud.storebase import ReleaseVersion, Sql, SqlTables, UnknownDevice, finite_float

log = logging.getLogger("cloud.storage")

#: Bytes of one row of ``release_blocks``.
BLOCK_BYTES = 1 << 20
#: The largest release file a storage takes (a full bundle with numpy and LiteRT is about 50 MB).
MAX_RELEASE_BYTES = 256 << 20
#: History rows kept per device (the oldest go).
HISTORY_KEPT = 50
#: The outcomes a device reports under ``agent/update`` (agent/ota/controller.py).
RESULTS = frozenset(
    {"waiting", "staged", "pending", "updated", "rolled_back", "refused", "aborted"}
)
ASSIGNED = "assigned"
REASON_CHARS = 300

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS release_groups (
    name TEXT PRIMARY KEY,
    version TEXT,
    sha256 TEXT,
    updated REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_members (
    grp TEXT NOT NULL,
    device TEXT NOT NULL,
    added REAL NOT NULL,
    PRIMARY KEY (grp, device)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS group_members_by_device ON group_members (device);
CREATE TABLE IF NOT EXISTS release_history (
    device TEXT NOT NULL,
    n INTEGER NOT NULL,
    version TEXT NOT NULL,
    result TEXT NOT NULL,
    at REAL,
    reason TEXT,
    received REAL NOT NULL,
    PRIMARY KEY (device, n)
) WITHOUT ROWID;
"""

PG_MIGRATION = (
    """CREATE TABLE releases (
        version TEXT COLLATE "C" PRIMARY KEY,
        manifest BYTEA NOT NULL,
        size BIGINT NOT NULL,
        published DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE release_blocks (
        version TEXT COLLATE "C" NOT NULL REFERENCES releases (version),
        n INTEGER NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (version, n)
    )""",
    """CREATE TABLE release_groups (
        name TEXT COLLATE "C" PRIMARY KEY,
        version TEXT COLLATE "C",
        sha256 TEXT COLLATE "C",
        updated DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE group_members (
        grp TEXT COLLATE "C" NOT NULL,
        device TEXT COLLATE "C" NOT NULL,
        added DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (grp, device)
    )""",
    "CREATE INDEX group_members_by_device ON group_members (device)",
    """CREATE TABLE release_history (
        device TEXT COLLATE "C" NOT NULL,
        n BIGINT NOT NULL,
        version TEXT COLLATE "C" NOT NULL,
        result TEXT COLLATE "C" NOT NULL,
        at DOUBLE PRECISION,
        reason TEXT,
        received DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device, n)
    )""",
)

HISTORY_COLUMNS = ("version", "result", "at", "reason", "received")


class UnknownGroup(ModelError):
    """No group of that name."""


@dataclass(frozen=True)
class Group:
    """A group: its members and the release assigned to it (None: none yet)."""

    name: str
    members: tuple[str, ...]
    version: str | None
    sha256: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "members": list(self.members),
            "release": None if self.version is None else self.assignment(),
        }

    def assignment(self) -> dict[str, str]:
        """The desired ``agent/version`` value of the group's release."""
        assert self.version is not None and self.sha256 is not None
        return {"version": self.version, "sha256": self.sha256}


@dataclass(frozen=True)
class HistoryRow:
    """One entry of a device's release history (``at``: the device's time of an outcome, the
    endpoint's of an assignment; None when the outcome carries none, e.g. ``pending``)."""

    version: str
    result: str
    at: float | None
    reason: str | None
    received: float

    def to_json(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in HISTORY_COLUMNS}


@dataclass(frozen=True)
class Standing:
    """A device's latest history row of one version (``releases status``, cloud/rollout.py)."""

    device: str
    result: str
    at: float | None
    reason: str | None


def outcome_row(value: Any) -> tuple[str, str, float | None, str | None] | None:
    """(version, result, at, reason) of a reported ``agent/update`` value; None for a value that
    is not an outcome (null, or what a hostile device sent instead)."""
    if not isinstance(value, dict):
        return None
    version, result, at, reason = (value.get(k) for k in ("version", "result", "at", "reason"))
    try:
        check_name("version", version)
    except (ModelError, TypeError):
        return None
    if result not in RESULTS:
        return None
    at = finite_float(at)
    text = None if reason is None else str(reason)[:REASON_CHARS]
    return str(version), str(result), at, text


def _members(db: Sql, name: str) -> tuple[str, ...]:
    rows = db.execute("SELECT device FROM group_members WHERE grp = ? ORDER BY device", (name,))
    return tuple(r[0] for r in rows.fetchall())


def _group(db: Sql, name: str) -> Group | None:
    row = db.execute("SELECT version, sha256 FROM release_groups WHERE name = ?", (name,))
    found = row.fetchone()
    if found is None:
        return None
    return Group(name, _members(db, name), found[0], found[1])


def _append(db: Sql, device: str, rows: Iterable[tuple[Any, ...]], now: float) -> int:
    """Append history rows (version, result, at, reason) of ``device`` that are not there yet
    (by version, result, at); drop the oldest beyond :data:`HISTORY_KEPT`. How many were new."""
    if db.dialect == "postgresql":  # numbered one writer at a time, as reported state is merged
        db.execute("SELECT 1 FROM devices WHERE id = ? FOR UPDATE", (device,))
    new = 0
    top = db.execute("SELECT max(n) FROM release_history WHERE device = ?", (device,)).fetchone()
    n = (top[0] or 0) if top else 0
    for version, result, at, reason in rows:
        seen = db.execute(
            "SELECT 1 FROM release_history WHERE device = ? AND version = ? AND result = ?"
            " AND coalesce(at, -1.0) = ?",
            (device, version, result, -1.0 if at is None else at),
        ).fetchone()
        if seen is not None:
            continue
        n += 1
        new += 1
        db.execute(
            "INSERT INTO release_history (device, n, version, result, at, reason, received)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (device, n, version, result, at, reason, now),
        )
    if new:
        db.execute(
            "DELETE FROM release_history WHERE device = ? AND n <= ?", (device, n - HISTORY_KEPT)
        )
    return new


def note_outcomes(db: Sql, device: str, taken: Sequence[tuple[str, int, Any]], now: float) -> int:
    """In the transaction that merged reported state: the ``agent/update`` outcomes among the
    ``taken`` entries (key, version, value) go to the device's history."""
    rows = [outcome_row(value) for key, _, value in taken if key == "agent/update"]
    found = [r for r in rows if r is not None]
    return _append(db, device, found, now) if found else 0


class ReleaseTables(SqlTables):
    """Storage methods of groups and the release history (both dialects)."""

    def group_add(self, name: str, devices: Sequence[str], now: float) -> tuple[Group, list[str]]:
        """Add registered ``devices`` to the group ``name`` (made when new), in one transaction.
        Returns the group and the devices that were not members before.
        :class:`UnknownDevice` (and nothing changed) for a device that is not registered."""

        def tx(db: Sql) -> tuple[Group, list[str]]:
            for device in devices:
                if db.execute("SELECT 1 FROM devices WHERE id = ?", (device,)).fetchone() is None:
                    raise UnknownDevice.of(device)
            db.execute(
                "INSERT INTO release_groups (name, updated) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (name, now),
            )
            added = []
            for device in dict.fromkeys(devices):
                cur = db.execute(
                    "INSERT INTO group_members (grp, device, added) VALUES (?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (name, device, now),
                )
                if cur.rowcount == 1:
                    added.append(device)
            group = _group(db, name)
            assert group is not None
            return group, added

        return self._write(tx)

    def group_remove(self, name: str, devices: Sequence[str]) -> list[str]:
        """Take ``devices`` out of the group (their desired release stays as it is); the ones
        that were members. :class:`UnknownGroup` when there is no such group."""

        def tx(db: Sql) -> list[str]:
            if _group(db, name) is None:
                raise UnknownGroup(f"no group {name!r}")
            removed = []
            for device in dict.fromkeys(devices):
                cur = db.execute(
                    "DELETE FROM group_members WHERE grp = ? AND device = ?", (name, device)
                )
                if cur.rowcount == 1:
                    removed.append(device)
            return removed

        return self._write(tx)

    def groups(self, name: str | None = None) -> list[Group]:
        """Every group (or the one named), by name."""

        def read(db: Sql) -> list[Group]:
            if name is not None:
                found = _group(db, name)
                return [] if found is None else [found]
            names = [r[0] for r in db.execute("SELECT name FROM release_groups ORDER BY name")]
            return [g for g in (_group(db, n) for n in names) if g is not None]

        return self._read(read)

    def device_groups(self, device: str) -> list[str]:
        """The groups ``device`` is a member of, by name."""
        sql = "SELECT grp FROM group_members WHERE device = ? ORDER BY grp"
        return [r[0] for r in self._read(lambda db: db.execute(sql, (device,)).fetchall())]

    def set_group_release(self, name: str, version: str, sha256: str, now: float) -> Group:
        """Assign a release to the group (devices added later get it); the group, with its
        members. :class:`UnknownGroup` when there is no such group."""

        def tx(db: Sql) -> Group:
            cur = db.execute(
                "UPDATE release_groups SET version = ?, sha256 = ?, updated = ? WHERE name = ?",
                (version, sha256, now, name),
            )
            if cur.rowcount != 1:
                raise UnknownGroup(f"no group {name!r}")
            group = _group(db, name)
            assert group is not None
            return group

        return self._write(tx)

    def note_assignment(self, device: str, version: str, reason: str, now: float) -> None:
        """Put an operator's assignment of ``version`` in the device's history."""
        row = (version, ASSIGNED, now, reason[:REASON_CHARS])
        self._write(lambda db: _append(db, device, [row], now))

    def release_outcomes(self, version: str) -> list[Standing]:
        """Each device's latest history row of ``version`` (an outcome it reported, or an
        assignment: one is noted only when it changed the device's desired value, so the
        device tries the release again), by device: one query however many devices."""
        sql = (
            "SELECT h.device, h.result, h.at, h.reason FROM release_history h"
            " WHERE h.version = ? AND h.n = (SELECT max(n) FROM release_history"
            " WHERE device = h.device AND version = ?) ORDER BY h.device"
        )
        rows = self._read(lambda db: db.execute(sql, (version, version)).fetchall())
        return [Standing(*r) for r in rows]

    def release_history(self, device: str, limit: int = HISTORY_KEPT) -> list[HistoryRow]:
        """The device's release history, newest first."""
        sql = (
            f"SELECT {', '.join(HISTORY_COLUMNS)} FROM release_history WHERE device = ?"
            " ORDER BY n DESC LIMIT ?"
        )
        rows = self._read(lambda db: db.execute(sql, (device, limit)).fetchall())
        return [HistoryRow(*r) for r in rows]


class ReleaseBlobs(SqlTables):
    """Published releases in the tables ``releases`` and ``release_blocks`` (PostgreSQL)."""

    def put_release(self, version: str, manifest: bytes, file: Path, published: float) -> bool:
        """Publish a release (its signed manifest and its file, read block by block); False,
        and nothing changed, when that version is published already."""
        size = os.stat(file).st_size

        def tx(db: Sql) -> bool:
            cur = db.execute(
                "INSERT INTO releases (version, manifest, size, published) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (version, manifest, size, published),
            )
            if cur.rowcount != 1:
                return False
            with open(file, "rb") as f:
                for n, block in enumerate(iter(lambda: f.read(BLOCK_BYTES), b"")):
                    db.execute(
                        "INSERT INTO release_blocks (version, n, data) VALUES (?, ?, ?)",
                        (version, n, block),
                    )
            return True

        return self._write(tx)

    def releases(self) -> list[ReleaseVersion]:
        """The published releases, by version; without their files."""
        sql = "SELECT version, manifest, published FROM releases ORDER BY version"
        rows = self._read(lambda db: db.execute(sql).fetchall())
        return [ReleaseVersion(v, bytes(m), float(p)) for v, m, p in rows]

    def release(self, version: str) -> ReleaseVersion | None:
        sql = "SELECT manifest, published FROM releases WHERE version = ?"
        row = self._read(lambda db: db.execute(sql, (version,)).fetchone())
        return None if row is None else ReleaseVersion(version, bytes(row[0]), float(row[1]))

    def release_file(self, version: str, out: Path) -> int | None:
        """Write the stored file of ``version`` to ``out`` (made or replaced, fsynced), block by
        block; its size, or None when the version is not published."""

        def read(db: Sql) -> int | None:
            row = db.execute("SELECT size FROM releases WHERE version = ?", (version,)).fetchone()
            if row is None:
                return None
            count = db.execute(
                "SELECT count(*) FROM release_blocks WHERE version = ?", (version,)
            ).fetchone()[0]
            written = 0
            with open(out, "wb") as f:
                for n in range(int(count)):
                    block = db.execute(
                        "SELECT data FROM release_blocks WHERE version = ? AND n = ?", (version, n)
                    ).fetchone()
                    if block is None:  # a hole: the caller's size check refuses it
                        break
                    written += f.write(bytes(block[0]))
                f.flush()
                os.fsync(f.fileno())
            return written

        return self._read(read)
