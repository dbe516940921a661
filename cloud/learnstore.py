"""The tables of federated learning (cloud/learning.py), written once for both databases.

- ``learn_jobs``: one row per job; ``doc`` is the job's CBOR document (its parameters and its
  progress: round, selected devices, deadline, masters, history), ``rev`` counts its writes so a
  writer replaces it only if nobody wrote it since it read it (compare-and-set: several
  coordinators, or a coordinator and an operator's ``learn stop``, never lose each other's
  change).
- ``learn_blobs``: content-addressed documents (a round's masters), by SHA-256.
- ``learn_updates``: the devices' uploads, one per (job, round, device): a retried upload is
  stored once. Retention removes those no longer read (cloud/learnuploads.py ``prune_uploads``) with
  :meth:`LearnTables.delete_learn_updates`, a bounded number per transaction.
  On SQLite, the index ``learn_updates_rounds`` counts a round's uploads without reading
  them: the table keeps its rows (about 5 KB of body each) in its primary key's b-tree, so a
  count through that key reads a page per upload (the dashboard counts the open round of each
  job every poll, cloud/dashlearn.py). PostgreSQL keeps such bodies out of line (TOAST): its
  primary key serves.

:class:`LearnTables` is a mixin of :class:`cloud.storesql.SharedStorage` (it uses ``_read`` and
``_write``); SQLite creates the tables with :data:`SQLITE_SCHEMA` at open, PostgreSQL with its
migration :data:`PG_MIGRATION` (cloud/pgschema.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from cloud.storebase import Sql, SqlTables

T = TypeVar("T")

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS learn_jobs (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    doc BLOB NOT NULL,
    rev INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS learn_blobs (
    sha TEXT PRIMARY KEY,
    data BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS learn_updates (
    job INTEGER NOT NULL,
    round INTEGER NOT NULL,
    device TEXT NOT NULL,
    body BLOB NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (job, round, device)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS learn_updates_rounds ON learn_updates (job, round);
"""

PG_MIGRATION = (
    """CREATE TABLE learn_jobs (
        id BIGINT PRIMARY KEY,
        model TEXT COLLATE "C" NOT NULL,
        doc BYTEA NOT NULL,
        rev BIGINT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE learn_blobs (
        sha TEXT COLLATE "C" PRIMARY KEY,
        data BYTEA NOT NULL
    )""",
    """CREATE TABLE learn_updates (
        job BIGINT NOT NULL,
        round BIGINT NOT NULL,
        device TEXT COLLATE "C" NOT NULL,
        body BYTEA NOT NULL,
        received DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (job, round, device)
    )""",
)


@dataclass(frozen=True)
class JobRow:
    id: int
    model: str
    doc: bytes
    rev: int
    created: float
    updated: float


def _bytes(value: Any) -> bytes:
    return bytes(value) if isinstance(value, memoryview) else value


def _job(row: Any) -> JobRow:
    return JobRow(int(row[0]), row[1], _bytes(row[2]), int(row[3]), float(row[4]), float(row[5]))


_JOB_COLUMNS = "id, model, doc, rev, created, updated"
#: The uploads retention may remove of a job: (job, below_round, received_before).
_OLD_UPDATES = "job = ? AND round < ? AND received < ?"


class LearnTables(SqlTables):
    """Storage methods of the learning tables (both dialects)."""

    def create_learn_job(self, model: str, doc: Callable[[int], bytes], now: float) -> int:
        """A new job numbered one above every job so far; ``doc(id)`` its document."""

        def tx(db: Sql) -> int:
            row = db.execute("SELECT coalesce(max(id), 0) FROM learn_jobs").fetchone()
            job = int(row[0]) + 1
            db.execute(
                f"INSERT INTO learn_jobs ({_JOB_COLUMNS}) VALUES (?, ?, ?, 1, ?, ?)",
                (job, model, doc(job), now, now),
            )
            return job

        return self._write(tx)

    def learn_job(self, job: int) -> JobRow | None:
        sql = f"SELECT {_JOB_COLUMNS} FROM learn_jobs WHERE id = ?"
        row = self._read(lambda db: db.execute(sql, (job,)).fetchone())
        return None if row is None else _job(row)

    def learn_jobs(self) -> list[JobRow]:
        sql = f"SELECT {_JOB_COLUMNS} FROM learn_jobs ORDER BY id"
        return [_job(r) for r in self._read(lambda db: db.execute(sql).fetchall())]

    def update_learn_job(self, job: int, rev: int, doc: bytes, now: float) -> bool:
        """Replace the job's document if its ``rev`` is still ``rev``; False if it changed."""

        def tx(db: Sql) -> bool:
            cur = db.execute(
                "UPDATE learn_jobs SET doc = ?, rev = rev + 1, updated = ?"
                " WHERE id = ? AND rev = ?",
                (doc, now, job, rev),
            )
            return bool(cur.rowcount == 1)

        return self._write(tx)

    def put_learn_blob(self, sha: str, data: bytes) -> None:
        self._write(
            lambda db: db.execute(
                "INSERT INTO learn_blobs (sha, data) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (sha, data),
            )
        )

    def learn_blob(self, sha: str) -> bytes | None:
        sql = "SELECT data FROM learn_blobs WHERE sha = ?"
        row = self._read(lambda db: db.execute(sql, (sha,)).fetchone())
        return None if row is None else _bytes(row[0])

    def put_learn_update(self, job: int, rnd: int, device: str, body: bytes, now: float) -> bool:
        """Store a device's upload for a round; False if one was stored already (kept)."""

        def tx(db: Sql) -> bool:
            cur = db.execute(
                "INSERT INTO learn_updates (job, round, device, body, received)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (job, rnd, device, body, now),
            )
            return bool(cur.rowcount == 1)

        return self._write(tx)

    def learn_updates(self, job: int, rnd: int) -> list[tuple[str, bytes]]:
        """The uploads of a round, by device."""
        sql = "SELECT device, body FROM learn_updates WHERE job = ? AND round = ? ORDER BY device"
        rows = self._read(lambda db: db.execute(sql, (job, rnd)).fetchall())
        return [(r[0], _bytes(r[1])) for r in rows]

    def learn_update_devices(self, job: int, rnd: int) -> list[str]:
        sql = "SELECT device FROM learn_updates WHERE job = ? AND round = ? ORDER BY device"
        return [r[0] for r in self._read(lambda db: db.execute(sql, (job, rnd)).fetchall())]

    def count_learn_updates(self, job: int, below_round: int, received_before: float) -> int:
        """How many uploads of ``job``'s rounds below ``below_round`` were received before
        ``received_before`` (what :meth:`delete_learn_updates` would delete)."""
        sql = f"SELECT count(*) FROM learn_updates WHERE {_OLD_UPDATES}"
        row = self._read(lambda db: db.execute(sql, (job, below_round, received_before)).fetchone())
        return int(row[0])

    def delete_learn_updates(
        self, job: int, below_round: int, received_before: float, limit: int
    ) -> int:
        """Delete at most ``limit`` uploads of ``job``'s rounds below ``below_round`` received
        before ``received_before``, in one transaction (the lowest rounds first); how many. None
        deleted: none is left (fewer than ``limit`` may mean another deleter took some of the
        rows selected, on PostgreSQL)."""
        args = (job, below_round, received_before)
        sql = (
            f"DELETE FROM learn_updates WHERE job = ? AND (round, device) IN (SELECT round, device"
            f" FROM learn_updates WHERE {_OLD_UPDATES} ORDER BY round, device LIMIT ?)"
        )
        return self._write(lambda db: int(db.execute(sql, (job, *args, limit)).rowcount))
