"""Retention: the endpoint removes what devices sent once it is older than a period
(``edge-agent-cloud prune``, ``serve --retain-days``: cloud/prunecli.py; docs/ops.md "Retention").

The rule, the same on both storages (:meth:`cloud.storebase.Storage.prune`):

- A prune is given a time and removes everything *received* before the midnight (UTC) that
  starts that time's day (:func:`day_start`; :func:`cutoff` for "N days before now"): records
  (bodies and keys), features records and validation verdicts. Whole days, because PostgreSQL
  keeps records in one partition per day of ``received`` and drops whole partitions: so a
  record is kept at least N days and removed within N + 1. State, the registry, credentials,
  models, releases, commands and logs are not touched (they are bounded per device already).
- Federated learning (cloud/learnstore.py): the devices' uploads (``learn_updates``) received
  before the same midnight that nothing reads any more: every upload of a job that ended (done,
  failed, stopped), and of a running job those of the rounds before its current one, unless the
  job has the check (its round after the last is opened among the devices that uploaded in its
  training rounds: those stay until it ends). The current round's stay whatever their age: its
  close reads them, also when it is run again after a crash. The rule is decided from the job's
  document, so it lives in cloud/learning.py (``prune_uploads``, which cloud/prunecli.py calls
  after :meth:`~cloud.storebase.Storage.prune`; the storage only deletes, a bounded number per
  transaction); a job whose document does not decode keeps its uploads. Jobs and the masters
  (``learn_blobs``) stay: a job's history is what ``learn status`` prints, and a masters blob is
  content-addressed and shared (every job from one base version starts from the same one, so it
  may be the first masters of a job being started at that moment).
- Keys go with the bodies: the store's growth is bounded by the period. What keeps
  exactly-once instead is each device's *pruned floor* (``devices.pruned``): the highest seq
  a prune removed for it (of records, and the last seq of features records). Ingest stores no
  record at or below it: a seq there that the storage holds is a duplicate as always; one it
  does not hold is a *conflict* (not stored, not acknowledged; logged ``detail=below_pruned``),
  so a record sent again after its copy was pruned is never stored twice under its number, and
  a record never seen before (one left in a device's queue longer than the period) is
  renumbered by the device above the ack's ``"last"`` and stored then, not lost. ``"last"``
  counts the floor, so a device that lost its store numbers above what was pruned too. This is
  the rule a gateway's store keeps for the records it dropped (:func:`floor_of`).
- The floor is raised in the transaction that removes (SQLite) or committed before anything is
  removed (PostgreSQL, where ingest reads it after locking the device's row): never a moment
  when a removed key is not covered by it.

SQLite (:class:`SQLiteRetention`): the tables are read in key order, :data:`BATCH` keys at a
time, outside any write transaction (WAL: readers do not block the writer); the old rows of
each chunk are deleted, and the floors raised, in one short write transaction, with a pause of
:data:`PAUSE` between two, so an endpoint serving the same file waits milliseconds for its
commits (its busy handler), not the whole prune. A DELETE leaves the file's size as it is: the
pages it frees are reused by later records (``free_bytes`` of the result says how much is free
inside the file); VACUUM is not run (it rewrites the whole file under an exclusive lock).
PostgreSQL: cloud/pgretention.py.

A prune can be stopped between two transactions (``stop``): what it removed so far is
consistent, and the next prune goes on from there.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from cloud import devicecount

log = logging.getLogger("cloud.storage")

DAY = 86_400
BATCH = 10_000  # rows per read and per write transaction (SQLite), keys per delete (PostgreSQL)
PAUSE = 0.02  # seconds between two SQLite write transactions of a prune: other writers go first
#: Tries of a SQLite write transaction of a prune that finds the file locked for longer than the
#: busy timeout (a writer that never pauses): then :class:`PruneBusy`, run it again later.
BUSY_TRIES = 6
#: The columns retention adds to a SQLite file made before it (none is required by older code).
SQLITE_COLUMNS = (("devices", "pruned", "INTEGER"), ("window_verdicts", "received", "REAL"))
#: PostgreSQL schema version 8 (cloud/pgschema.py): the same two columns. A verdict stored before
#: counts as received at the migration (a DEFAULT evaluated once for the rows there).
PG_MIGRATION = (
    "ALTER TABLE devices ADD COLUMN pruned BIGINT",
    "ALTER TABLE window_verdicts ADD COLUMN received DOUBLE PRECISION NOT NULL"
    " DEFAULT extract(epoch FROM now())::double precision",
)
_SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"


class PruneBusy(AgentError):
    """Another prune holds the storage's prune lock, or a lock the prune needs was held too long
    (PostgreSQL): nothing was lost, run it again later."""


@dataclass(frozen=True)
class PruneResult:
    """What a prune removed (``dry_run``: would remove): rows of each table, the PostgreSQL
    partitions dropped, how many devices' pruned floors rose, (SQLite, after a prune) the bytes
    free inside the file, which later records reuse, and the learning uploads removed (set by
    cloud/prunecli.py, which runs cloud/learnuploads.py ``prune_uploads`` after the storage's
    prune)."""

    before: float
    dry_run: bool
    records: int = 0
    features: int = 0
    verdicts: int = 0
    partitions: tuple[str, ...] = ()
    devices: int = 0
    free_bytes: int | None = None
    stopped: bool = False  # ``stop`` was set: it ended early (run it again to finish)
    learn_uploads: int = 0  # federated-learning uploads (cloud/learnuploads.py prune_uploads)

    def to_json(self) -> dict[str, Any]:
        return {
            "before": iso(self.before),
            "before_unix": self.before,
            "dry_run": self.dry_run,
            "records": self.records,
            "features": self.features,
            "verdicts": self.verdicts,
            "partitions": list(self.partitions),
            "devices": self.devices,
            "learn_uploads": self.learn_uploads,
            "free_bytes": self.free_bytes,
            "stopped": self.stopped,
        }


def day_start(when: float) -> float:
    """Midnight UTC of the day ``when`` (seconds since the epoch) falls in."""
    return float(when - when % DAY)


def cutoff(now: float, days: int) -> float:
    """What a retention of ``days`` days removes at ``now``: what was received before this."""
    return day_start(now - days * DAY)


def iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def upgrade_sqlite(db: sqlite3.Connection) -> None:
    """In the transaction that opens a SQLite file: the columns of :data:`SQLITE_COLUMNS` where
    they are missing, and a receiving time for verdicts that have none (stored before, or by an
    older endpoint since): now."""
    for table, column, kind in SQLITE_COLUMNS:
        if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    db.execute(f"UPDATE window_verdicts SET received = {_SQLITE_NOW} WHERE received IS NULL")


def floor_of(db: sqlite3.Connection, device: str, relay: str | None = None) -> int:
    """The highest seq of ``device`` pruned here, or dropped by a gateway's store (its table
    ``relay``: agent/gateway/relay.py) once the cloud held it; -1: none."""
    dropped = f"(SELECT through FROM {relay} WHERE device = ?1)" if relay else "-1"
    sql = f"SELECT max(coalesce(pruned, -1), coalesce({dropped}, -1)) FROM devices WHERE id = ?1"
    found = db.execute(sql, (device,)).fetchone()
    return int(found[0]) if found else -1


@dataclass(frozen=True)
class _Sweep:
    """A table a SQLite prune walks: its key columns and the column of the seq it covers."""

    table: str
    key: tuple[str, ...]
    seq: str | None = None  # the floor comes from it (None: the rows hold no seqs)


_SWEEPS = (
    _Sweep("records", ("device", "seq"), "seq"),
    _Sweep("features", ("device", "first_seq"), "last_seq"),
    _Sweep("window_verdicts", ("n",)),
)


class SQLiteRetention:
    """:meth:`cloud.storebase.Storage.prune` of :class:`cloud.storage.SQLiteStorage`, whose
    ``db``, ``_tx`` and ``_errors`` it uses (module docstring)."""

    db: sqlite3.Connection
    _tx: Callable[[], AbstractContextManager[sqlite3.Connection]]
    _errors: Callable[[], AbstractContextManager[None]]

    def prune(
        self,
        before: float,
        *,
        dry_run: bool = False,
        stop: threading.Event | None = None,
        batch: int = BATCH,
        pause: float = PAUSE,
    ) -> PruneResult:
        before = day_start(before)
        with self._errors():
            rows = self.db.execute("SELECT id, coalesce(pruned, -1) FROM devices").fetchall()
        floors = {device: int(floor) for device, floor in rows}
        tops: dict[str, int] = {}
        counts = []
        stopped = False
        for sweep in _SWEEPS:
            removed = 0
            for old in self._old_rows(sweep, before, batch):
                if stop is not None and stop.is_set():
                    stopped = True
                    break
                removed += len(old) if dry_run else self._remove(sweep, old, before)
                if sweep.seq is not None:
                    for row in old:
                        tops[row[0]] = max(tops.get(row[0], -1), int(row[-1]))
                if not dry_run and pause > 0:
                    time.sleep(pause)  # a writer waiting in its busy handler takes the lock now
            counts.append(removed)
            if stopped:
                break
        counts += [0] * (len(_SWEEPS) - len(counts))
        raised = sum(1 for d, top in tops.items() if d in floors and top > floors[d])
        free = None
        if not dry_run:
            with self._errors():
                pages = self.db.execute("PRAGMA freelist_count").fetchone()[0]
                free = int(pages) * int(self.db.execute("PRAGMA page_size").fetchone()[0])
        return PruneResult(before, dry_run, *counts, (), raised, free, stopped)

    def _old_rows(self, sweep: _Sweep, before: float, batch: int) -> Iterator[list[Any]]:
        """The rows received before ``before``, as (key..., received[, seq]) lists of at most
        ``batch``, read in key order a chunk at a time (each read its own snapshot)."""
        cols = ", ".join(sweep.key)
        marks = ", ".join("?" * len(sweep.key))
        extra = f", {sweep.seq}" if sweep.seq else ""
        after: Sequence[Any] = ()
        while True:
            where = f" WHERE ({cols}) > ({marks})" if after else ""
            sql = (
                f"SELECT {cols}, received{extra} FROM {sweep.table}{where} ORDER BY {cols} LIMIT ?"
            )
            with self._errors():
                rows = self.db.execute(sql, (*after, batch)).fetchall()
            if not rows:
                return
            after = rows[-1][: len(sweep.key)]
            n = len(sweep.key)
            old = [row for row in rows if row[n] is not None and row[n] < before]
            if old:
                yield old

    def _remove(self, sweep: _Sweep, old: list[Any], before: float) -> int:
        """Delete ``old`` and raise the floors of their devices, in one write transaction."""
        n = len(sweep.key)
        where = " AND ".join(f"{c} = ?" for c in sweep.key)
        tops: dict[str, int] = {}
        for row in old if sweep.seq is not None else ():
            tops[row[0]] = max(tops.get(row[0], -1), int(row[-1]))

        def write() -> int:
            with self._errors(), self._tx() as db:
                delete = f"DELETE FROM {sweep.table} WHERE {where} AND received < ?"
                if sweep.table == "records":  # each device's count (cloud/devicecount.py)
                    gone = [r[0] for r in old if db.execute(delete, (*r[:n], before)).rowcount]
                    devicecount.add(db, gone, -1)
                    removed = len(gone)
                else:
                    removed = db.executemany(delete, [(*r[:n], before) for r in old]).rowcount
                db.executemany(
                    "UPDATE devices SET pruned = max(coalesce(pruned, -1), ?) WHERE id = ?",
                    [(top, device) for device, top in tops.items()],
                )
                return int(removed)

        return busy_retry(write, sweep.table)


def busy_retry(write: Callable[[], int], table: str) -> int:
    """``write()`` (one write transaction of a prune, on ``table``), tried again while the
    SQLite file stays locked longer than its busy timeout (a writer that never pauses),
    :data:`BUSY_TRIES` times in all; then :class:`PruneBusy`: run the prune again later."""
    for attempt in range(1, BUSY_TRIES + 1):
        try:
            return write()
        except AgentError as err:
            cause = err.__cause__
            if not (isinstance(cause, sqlite3.OperationalError) and "locked" in str(cause)):
                raise
            if attempt == BUSY_TRIES:
                raise PruneBusy(
                    f"the database stayed locked by other writers ({cause}); what was "
                    "removed so far is consistent: run the prune again"
                ) from err
            log.info("event=prune_waiting table=%s attempt=%d", table, attempt)
    raise AssertionError("unreachable")


def describe_result(result: PruneResult, where: str | Path) -> str:
    """The one log line of a prune (``event=retention_pruned``'s fields)."""
    return (
        f"storage={where} before={iso(result.before)} records={result.records}"
        f" features={result.features} verdicts={result.verdicts}"
        f" partitions={len(result.partitions)} devices={result.devices}"
        f" learn_uploads={result.learn_uploads}"
        + (f" free_bytes={result.free_bytes}" if result.free_bytes is not None else "")
        + (" stopped=true" if result.stopped else "")
    )
