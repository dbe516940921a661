"""Retention on PostgreSQL: :meth:`cloud.storebase.Storage.prune` of
:class:`cloud.pgstorage.PostgresStorage` (the rule: cloud/retention.py).

``records`` is partitioned by day of ``received`` (cloud/pgschema.py), so its old bodies go by
dropping whole partitions: no row is deleted, and the space goes back to the operating system at
once. A prune runs on a connection of its own (autocommit), under a session advisory lock
(:data:`PRUNE_LOCK`, taken with ``pg_try_advisory_lock``): of the processes and hosts of a fleet
that start a prune at once, one prunes and the others get :class:`PruneBusy`. In order:

1. It counts the old partitions' rows, and the features records and verdicts received before the
   cutoff, and each device's highest seq among them (a dry run stops here).
2. It raises those devices' pruned floors in one transaction that locks their rows in id order,
   as ingest does (cloud/pgstorage.py): an ingest that read a floor before has committed, one
   after sees the new floor and stores nothing at or below it.
3. Per old partition: the keys of its rows are deleted from ``record_keys`` (:data:`BATCH` at a
   time, by the partition's (device, seq) index), then the partition is detached with
   ``DETACH PARTITION ... CONCURRENTLY`` (PostgreSQL 14 or later: it does not block ingest, which
   inserts into today's partition) and dropped. A detach that an earlier prune left pending is
   finished (``FINALIZE``); a partition detached but not dropped is dropped.
4. The old features records and verdicts, :data:`BATCH` rows per statement.

A lock it waits for longer than :data:`LOCK_TIMEOUT` (a long export reading the partition) ends
it with :class:`PruneBusy`: what it did so far is consistent, the next prune finishes the rest.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from cloud import pgschema
from cloud.retention import BATCH, DAY, PruneBusy, PruneResult, day_start

#: Advisory lock key of a prune: "edgeprun" as a 64-bit number (pgschema's keys: the same way).
PRUNE_LOCK = int.from_bytes(b"edgeprun", "big") - 2**63
LOCK_TIMEOUT_MS = 5000  # the longest a prune waits for a lock (ingest never waits longer on it)
MIN_SERVER = 140000  # DETACH PARTITION CONCURRENTLY


def _day(name: str) -> float | None:
    """The start of the day a partition's name (``records_YYYYMMDD``) stands for."""
    try:
        day = datetime.strptime(name[len(pgschema.RECORDS) + 1 :], "%Y%m%d")
    except ValueError:
        return None
    return day.replace(tzinfo=UTC).timestamp()


def old_partitions(conn: Any, before: float) -> list[tuple[str, bool, bool]]:
    """(name, attached, detach pending) of each day table of ``records`` whose whole day is
    before ``before``, oldest first (one whose detach is pending before all); detached ones (an
    interrupted prune) too."""
    rows = conn.execute(
        "SELECT c.relname, i.inhrelid IS NOT NULL, coalesce(i.inhdetachpending, false)"
        " FROM pg_class c LEFT JOIN pg_inherits i ON i.inhrelid = c.oid"
        " AND i.inhparent = to_regclass(%s)"
        " WHERE c.relkind = 'r' AND c.relnamespace = current_schema()::regnamespace"
        " AND c.relname ~ %s ORDER BY c.relname",
        (pgschema.RECORDS, f"^{pgschema.RECORDS}_[0-9]{{8}}$"),
    ).fetchall()
    out = []
    for name, attached, pending in rows:
        day = _day(name)
        if day is not None and day + DAY <= before:
            out.append((str(name), bool(attached), bool(pending)))
    out.sort(key=lambda part: not part[2])  # a pending detach first: it is finished before more
    return out


class PostgresRetention:
    """Mixed into :class:`cloud.pgextra.PostgresExtras` (module docstring); uses the storage's
    ``_dsn``, ``_kwargs``, ``_days`` and ``_errors``."""

    _dsn: str
    _kwargs: dict[str, Any]
    _days: set[str]
    where: str
    _errors: Callable[[], AbstractContextManager[None]]

    def prune(
        self,
        before: float,
        *,
        dry_run: bool = False,
        stop: threading.Event | None = None,
        batch: int = BATCH,
    ) -> PruneResult:
        before = day_start(before)
        try:
            with self._errors():
                conn = psycopg.connect(self._dsn, autocommit=True, **self._kwargs)
            with conn, self._errors():
                got = conn.execute("SELECT pg_try_advisory_lock(%s)", (PRUNE_LOCK,)).fetchone()
                if not got or not got[0]:
                    raise PruneBusy(f"{self.where}: another prune is running; try again later")
                conn.execute(f"SET lock_timeout = {int(LOCK_TIMEOUT_MS)}")
                return self._prune(conn, before, dry_run, stop, batch)
        except PruneBusy:
            raise
        except Exception as err:
            if isinstance(err.__cause__, pgerrors.LockNotAvailable):
                raise PruneBusy(
                    f"{self.where}: a lock the prune needs was held longer than "
                    f"{LOCK_TIMEOUT_MS // 1000} s (a long query?); nothing is lost, run it again"
                ) from err
            raise

    def _prune(
        self, conn: Any, before: float, dry_run: bool, stop: threading.Event | None, batch: int
    ) -> PruneResult:
        parts = old_partitions(conn, before)
        if parts and not dry_run and conn.info.server_version < MIN_SERVER:
            raise psycopg.NotSupportedError(
                "dropping partitions needs PostgreSQL 14 or later (DETACH PARTITION CONCURRENTLY)"
            )
        tops: dict[str, int] = {}
        rows_of: dict[str, int] = {}  # partition -> its rows
        for name, _, _ in parts:
            query = sql.SQL("SELECT device, max(seq), count(*) FROM {} GROUP BY device")
            for device, top, count in conn.execute(query.format(sql.Identifier(name))):
                tops[device] = max(tops.get(device, -1), int(top))
                rows_of[name] = rows_of.get(name, 0) + int(count)
        features = 0
        for device, top, count in conn.execute(
            "SELECT device, max(last_seq), count(*) FROM features WHERE received < %s"
            " GROUP BY device",
            (before,),
        ):
            tops[device] = max(tops.get(device, -1), int(top))
            features += int(count)
        (verdicts,) = conn.execute(
            "SELECT count(*) FROM window_verdicts WHERE received < %s", (before,)
        ).fetchone()
        floors = _floors(conn, sorted(tops))  # a device removed meanwhile has none: left out
        raised = sorted((d, top) for d, top in tops.items() if d in floors and top > floors[d])
        if dry_run:
            records = sum(rows_of.values())
            names = tuple(name for name, _, _ in parts)
            return PruneResult(before, True, records, features, int(verdicts), names, len(raised))
        if raised:  # first, and committed: from now on ingest stores nothing at or below them
            with conn.transaction():
                devices = [d for d, _ in raised]
                conn.execute(
                    "SELECT 1 FROM devices WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (devices,)
                )
                conn.execute(
                    "UPDATE devices SET pruned = greatest(pruned, u.top)"
                    " FROM unnest(%s::text[], %s::bigint[]) AS u(d, top) WHERE id = u.d",
                    (devices, [t for _, t in raised]),
                )
        done: list[str] = []
        stopped = False
        for name, attached, pending in parts:
            if stop is not None and stop.is_set():
                stopped = True
                break
            self._drop_partition(conn, name, attached, pending, before, batch)
            done.append(name)
        counts = [0, 0]
        for i, table in enumerate(("features", "window_verdicts")):
            if not stopped:
                counts[i], stopped = _delete(conn, table, before, batch, stop)
        records = sum(rows_of.get(name, 0) for name in done)
        return PruneResult(before, False, records, *counts, tuple(done), len(raised), None, stopped)

    def _drop_partition(
        self, conn: Any, name: str, attached: bool, pending: bool, before: float, batch: int
    ) -> None:
        """The keys of partition ``name``'s rows, then the partition (module docstring, 3)."""
        table = sql.Identifier(name)
        after: tuple[str, int] = ("", -1)
        while True:
            rows = conn.execute(
                sql.SQL(
                    "SELECT device, seq FROM {} WHERE (device, seq) > (%s, %s)"
                    " ORDER BY device, seq LIMIT %s"
                ).format(table),
                (*after, batch),
            ).fetchall()
            if not rows:
                break
            conn.execute(
                "DELETE FROM record_keys k USING unnest(%s::text[], %s::bigint[]) AS u(d, s)"
                " WHERE k.device = u.d AND k.seq = u.s AND k.received < %s",
                ([r[0] for r in rows], [r[1] for r in rows], before),
            )
            after = (rows[-1][0], int(rows[-1][1]))
        parent = sql.Identifier(pgschema.RECORDS)
        if pending:
            conn.execute(
                sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(parent, table)
            )
        elif attached:
            conn.execute(
                sql.SQL("ALTER TABLE {} DETACH PARTITION {} CONCURRENTLY").format(parent, table)
            )
        conn.execute(sql.SQL("DROP TABLE {}").format(table))
        self._days.discard(name)


def _floors(conn: Any, devices: list[str]) -> dict[str, int]:
    rows = conn.execute(
        "SELECT id, coalesce(pruned, -1) FROM devices WHERE id = ANY(%s)", (devices,)
    ).fetchall()
    return {d: int(f) for d, f in rows}


def _delete(
    conn: Any, table: str, before: float, batch: int, stop: threading.Event | None
) -> tuple[int, bool]:
    """Delete ``table``'s rows received before ``before``, ``batch`` per statement: how many,
    and whether ``stop`` ended it first."""
    removed = 0
    while True:
        if stop is not None and stop.is_set():
            return removed, True
        cur = conn.execute(
            f"DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table}"
            " WHERE received < %s LIMIT %s))",
            (before, batch),
        )
        removed += cur.rowcount
        if cur.rowcount < batch:
            return removed, False
