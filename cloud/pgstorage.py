"""The cloud endpoint's storage on PostgreSQL (psycopg 3): :class:`PostgresStorage`, the same
contract as :class:`cloud.storage.SQLiteStorage` (:mod:`cloud.storebase`) for a fleet of endpoint
processes and hosts sharing one database. SQLite stays the default; ``edge-agent[fleet]``
installs psycopg, which the agent on a device never needs.

- Schema: :mod:`cloud.pgschema` (versioned migrations under an advisory lock; records partitioned
  by day of ``received`` with ``record_keys (device, seq)`` as the guard of exactly-once; the
  ``record_arrival`` SEQUENCE). Read its docstring for why.
- Connections: a :class:`psycopg_pool.ConnectionPool` of at most ``pool_size`` (default
  :data:`DEFAULT_POOL_SIZE`: the server calls from one thread, the CLI makes one call) plus, once
  :meth:`PostgresStorage.changes` or :meth:`PostgresStorage.data_version` is first called, ONE
  listening connection outside the pool (autocommit). A pooled connection lost with the server
  fails its call (:class:`StorageUnavailable`, the device retries after the 5.03's Max-Age) and
  the pool replaces it.
- Every call is one transaction, READ COMMITTED. Every write that reads what a device holds
  before it writes locks the device's row first (``FOR UPDATE``; ingest: the rows of the
  group's devices, in id order, with the update of their last contact), which orders concurrent
  writers of one device like SQLite's single writer does: what they read after the lock is what
  committed before. Ingest then looks up the devices' features records (cloud/featurestore.py),
  inserts the keys of a whole group with one ``INSERT ... SELECT FROM unnest(...) ON CONFLICT
  DO NOTHING RETURNING`` (keys sorted), the bodies with one more, and allocates arrival numbers
  for the new records in one query. A transaction that meets a deadlock, a serialization
  failure or a missing partition runs again once.
- Change notices: :meth:`PostgresStorage.put_desired`, :meth:`PostgresStorage.put_reported`
  when it blocks a desired version, :meth:`PostgresStorage.put_credential` and
  :meth:`PostgresStorage.revoke` send ``pg_notify`` inside their transaction (delivered only if
  it commits): channel :data:`CHANNEL_DESIRED` with the device as payload, and
  :data:`CHANNEL_CREDENTIALS`. :meth:`PostgresStorage.changes` drains them without blocking into a
  bounded buffer; when the listening connection was lost (notices missed meanwhile) or a token is
  older than the buffer, the answer is "unknown": re-read everything.
- Durability: a commit returns when PostgreSQL has it on disk, unless the server runs with
  ``synchronous_commit=off``: then these sessions set it back to ``on`` (with a warning), since
  the endpoint acknowledges records only once they are durable.
- Errors of the database become :class:`StorageUnavailable` with one line (no password: the DSN
  is shown by :func:`cloud.storebase.describe`); a value the database refuses (psycopg's
  ``DataError`` and its kinds, SQLSTATE class 22: text with a NUL character, a number beyond its
  column) is the request's fault and becomes :class:`DataRefused` (a kind of it, for the
  server to answer 4.00: sending it again cannot help), logged here with the storage named.
  Ingest runs a group whose transaction met one again batch by batch, so only the batch that
  holds the value is refused (:meth:`PostgresStorage.ingest_many`).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg_pool import ConnectionPool

from agent.errors import AgentError
from agent.wire import statedoc
from agent.wire.batch import FEATURES, WireRecord, record_time, same_record
from agent.wire.credentials import Credential
from agent.wire.statedoc import DesiredDoc, Entry
from cloud import featurestore, linkhistory, pgschema, releasestore
from cloud.pgextra import PostgresExtras
from cloud.storebase import (
    Batch,
    DataRefused,
    DeviceInfo,
    DocumentTooLarge,
    DuplicateKeyId,
    IngestResult,
    PreconditionFailed,
    ReportedResult,
    Sql,
    StorageUnavailable,
    StoredRecord,
    UnknownDevice,
    check_block,
    credentials_of,
    describe,
    desired_doc,
    merge_reported,
    one_line,
    records_query,
    time_not_finite,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Conn = psycopg.Connection[Any]

DEFAULT_POOL_SIZE = 2
CONNECT_TIMEOUT = 5  # seconds: libpq connect_timeout of every connection
POOL_TIMEOUT = 5.0  # seconds a call waits for a connection of the pool (the database is down)
RETRIES = 1  # runs again of a transaction that met a deadlock or a missing partition
MAX_EVENTS = 10_000  # change notices kept for changes(); an older token is "unknown"
CHANNEL_DESIRED = "edge_desired"
CHANNEL_CREDENTIALS = "edge_credentials"
APPLICATION_NAME = "edge-agent-cloud"
_RETRIED = (pgerrors.DeadlockDetected, pgerrors.SerializationFailure)


@dataclass(frozen=True)
class _Mark:
    """A token of :meth:`PostgresStorage.changes`: which storage object, which listening
    connection, and how many notices it had received."""

    owner: str
    generation: int
    position: int


def _info(row: tuple[Any, ...]) -> DeviceInfo:
    device, registered, last_seen, rev, count, last = row
    return DeviceInfo(device, registered, last_seen, int(count), last, int(rev))


def _no_partition(err: BaseException) -> bool:
    return isinstance(err, pgerrors.CheckViolation) and "no partition" in str(err)


class PostgresStorage(PostgresExtras):
    """:class:`cloud.storebase.Storage` on PostgreSQL (module docstring). ``dsn`` is a libpq
    connection string or ``postgresql://`` URL. Verdicts, models, the dashboard's reader and
    the bulk copy: :class:`cloud.pgextra.PostgresExtras`."""

    def __init__(self, dsn: str, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self._dsn = dsn
        self.where = describe(dsn)
        self._kwargs: dict[str, Any] = {
            "connect_timeout": CONNECT_TIMEOUT,
            "application_name": APPLICATION_NAME,
        }
        self._store: str | None = None
        self._days: set[str] = set()  # partitions known to exist
        self._force_sync = False
        self._owner = secrets.token_hex(8)
        self._listen: Conn | None = None
        self._listen_lock = threading.Lock()
        self._events: deque[tuple[str, str]] = deque()  # (channel, payload) of notices
        self._first = 0  # the number of the oldest notice in _events
        self._generation = 0  # listening connections made so far
        self._version = 0  # data_version(): notices and reconnections seen
        self._pool: ConnectionPool[Conn] | None = None
        try:
            with psycopg.connect(dsn, **self._kwargs) as conn:
                before, now = pgschema.migrate(conn, secrets.randbits(63))
                if before != now:
                    log.info(
                        "event=schema_migrated storage=%s from=%d to=%d", self.where, before, now
                    )
                row = conn.execute("SELECT current_setting('synchronous_commit')").fetchone()
                conn.commit()
                if row is not None and row[0] == "off":
                    self._force_sync = True
                    log.warning(
                        "event=synchronous_commit_off storage=%s action=set_on_for_endpoint",
                        self.where,
                    )
                wall = time.time()
                for when in (wall, wall + 86_400):
                    self._days.add(pgschema.ensure_partition(conn, when))
        except pgschema.SchemaTooNew as err:
            raise StorageUnavailable(f"{self.where}: {err}") from err
        except psycopg.Error as err:
            raise StorageUnavailable(f"{self.where}: cannot open: {one_line(err)}") from err
        pool: ConnectionPool[Conn] = ConnectionPool(
            dsn,
            min_size=1,
            max_size=max(1, pool_size),
            kwargs=self._kwargs,
            configure=self._configure,
            timeout=POOL_TIMEOUT,
            name="edge-storage",
            open=False,
        )
        try:
            pool.open(wait=True, timeout=POOL_TIMEOUT)
        except psycopg.Error as err:
            pool.close()
            raise StorageUnavailable(f"{self.where}: cannot open: {one_line(err)}") from err
        self._pool = pool

    def _configure(self, conn: Conn) -> None:
        if self._force_sync:
            conn.execute("SET synchronous_commit TO on")
            conn.commit()

    # -- running transactions --------------------------------------------------------------------

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as err:
            raise self._failure(err) from err

    def _failure(self, err: psycopg.Error) -> StorageUnavailable:
        """What a call raises for ``err``: :class:`DataRefused` for a value the database refuses
        (logged here with the storage named: its text goes to the peer), else
        :class:`StorageUnavailable`."""
        if not isinstance(err, psycopg.DataError):
            return StorageUnavailable(f"{self.where}: {one_line(err)}")
        diag = getattr(err, "diag", None)
        primary = diag.message_primary if diag is not None else None
        reason = " ".join((primary or str(err)).split())[:160] or type(err).__name__
        log.warning("event=data_refused storage=%s error=%s", self.where, one_line(err))
        return DataRefused(f"the storage refuses a value of the request: {reason}")

    def _run(self, fn: Callable[[Conn], T], before: Callable[[Conn], None] | None = None) -> T:
        """``fn(conn)`` in one transaction on a pooled connection, run again once after a
        deadlock, serialization failure or missing partition; ``before(conn)`` first, outside
        the transaction, on every run."""
        pool = self._pool
        if pool is None:
            raise StorageUnavailable(f"{self.where}: storage is closed")
        for attempt in range(RETRIES + 1):
            try:
                with pool.connection() as conn:
                    if before is not None:
                        before(conn)
                    with conn.transaction():
                        return fn(conn)
            except psycopg.Error as err:
                again = isinstance(err, _RETRIED) or _no_partition(err)
                if not again or attempt == RETRIES:
                    raise self._failure(err) from err
                if _no_partition(err):
                    self._days.clear()  # a partition went away: check again
                log.info("event=transaction_retry storage=%s error=%s", self.where, one_line(err))
        raise AssertionError("unreachable")

    def _ensure_day(self, when: float) -> Callable[[Conn], None]:
        def before(conn: Conn) -> None:
            name = pgschema.partition_name(pgschema.day_of(when))
            if name not in self._days:
                self._days.add(pgschema.ensure_partition(conn, when))

        return before

    # -- devices ---------------------------------------------------------------------------------

    def add_device(self, device: str, now: float) -> bool:
        def tx(conn: Conn) -> bool:
            cur = conn.execute(
                "INSERT INTO devices (id, registered) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (device, now),
            )
            return cur.rowcount == 1

        return self._run(tx)

    _DEVICE_SQL = (
        "SELECT d.id, d.registered, d.last_seen, d.desired_rev, d.records,"  # cloud/devicecount.py
        " (SELECT max(seq) FROM record_keys k WHERE k.device = d.id)"
        " FROM devices d"
    )

    def device(self, device: str) -> DeviceInfo | None:
        def tx(conn: Conn) -> DeviceInfo | None:
            row = conn.execute(self._DEVICE_SQL + " WHERE d.id = %s", (device,)).fetchone()
            return None if row is None else _info(row)

        return self._run(tx)

    def devices(self) -> list[DeviceInfo]:
        def tx(conn: Conn) -> list[DeviceInfo]:
            rows = conn.execute(self._DEVICE_SQL + " ORDER BY d.id").fetchall()
            return [_info(row) for row in rows]

        return self._run(tx)

    @staticmethod
    def _lock_device(conn: Conn, device: str) -> int:
        """Lock the device's row for this transaction; its desired_rev. UnknownDevice if none."""
        row = conn.execute(
            "SELECT desired_rev FROM devices WHERE id = %s FOR UPDATE", (device,)
        ).fetchone()
        if row is None:
            raise UnknownDevice.of(device)
        return int(row[0])

    # -- records ---------------------------------------------------------------------------------

    def ingest_many(self, batches: Sequence[Batch], now: float) -> list[IngestResult | AgentError]:
        """One transaction for all ``batches``; when the database refuses a value in it
        (:class:`DataRefused`), each batch again in a transaction of its own, so the others
        are stored and only the batch that holds the value gets the refusal as its result."""
        if not batches:
            return []
        prepared = [  # a record whose time is not finite is left out: not stored, not acked
            (device, [(r, bytes(r.body)) for r in records if not time_not_finite(device, r)], reg)
            for device, records, reg in batches
        ]
        before = self._ensure_day(now)
        try:
            return self._run(lambda conn: self._ingest_features(conn, prepared, now), before)
        except DataRefused:
            if len(prepared) == 1:
                raise
        out: list[IngestResult | AgentError] = []
        for one in prepared:
            try:
                out += self._run(lambda conn, b=one: self._ingest_features(conn, [b], now), before)
            except StorageUnavailable as err:  # DataRefused, or the database went away meanwhile
                out.append(err)
        return out

    @staticmethod
    def _lock_devices(
        conn: Conn, batches: list[tuple[str, list[tuple[WireRecord, bytes]], bool]], now: float
    ) -> dict[str, int]:
        """Register the devices to register, then lock the rows of the batches' devices (in id
        order: two transactions never wait on each other in a cycle) and set their last contact;
        the devices that are registered, with their pruned floors (-1: none). Every ingest
        locks them before it reads what the devices hold, so what it reads is what committed
        before (READ COMMITTED: a statement after the lock sees the transactions that held it;
        a prune raises a floor under the same lock: cloud/pgretention.py)."""
        register = sorted({device for device, _, reg in batches if reg})
        if register:
            conn.execute(
                "INSERT INTO devices (id, registered) SELECT d, %s FROM unnest(%s::text[]) AS d"
                " ON CONFLICT DO NOTHING",
                (now, register),
            )
        names = sorted({device for device, _, _ in batches})
        rows = conn.execute(
            "UPDATE devices SET last_seen = %s WHERE id IN"
            " (SELECT id FROM devices WHERE id = ANY(%s) ORDER BY id FOR UPDATE)"
            " RETURNING id, coalesce(pruned, -1)",
            (now, names),
        ).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def _ingest_features(
        self,
        conn: Conn,
        batches: list[tuple[str, list[tuple[WireRecord, bytes]], bool]],
        now: float,
    ) -> list[IngestResult | AgentError]:
        """:meth:`_ingest` of the batches' records, features records by the rules of
        cloud/featurestore.py around it (in the same transaction). The device rows are locked
        first (:meth:`_lock_devices`): a features record stored by a transaction that committed
        meanwhile is seen by the look-up below, so a reading it holds is never stored again as
        a record, nor a features record over a reading stored meanwhile."""
        known = self._lock_devices(conn, batches, now)
        db = Sql(conn, "postgresql")
        featured = featurestore.devices_with_features(db, sorted(known))
        if not featured and not any(r.kind == FEATURES for _, recs, _ in batches for r, _ in recs):
            return self._ingest(conn, batches, now, known)  # the common case: nothing to do
        passes = []
        plain_batches = []
        for device, recs, register in batches:
            plain, feats, outcome = featurestore.prepass(
                db, device, [r for r, _ in recs], device in featured
            )
            passes.append((feats, outcome))
            plain_batches.append((device, [(r, bytes(r.body)) for r in plain], register))
        results = self._ingest(conn, plain_batches, now, known)
        out: list[IngestResult | AgentError] = []
        for (device, _, _), (feats, outcome), result in zip(batches, passes, results, strict=True):
            if isinstance(result, IngestResult):
                featurestore.store(db, device, feats, now, outcome)
                result = featurestore.merge(db, device, result, outcome)
            out.append(result)
        return out

    def _ingest(
        self,
        conn: Conn,
        batches: list[tuple[str, list[tuple[WireRecord, bytes]], bool]],
        now: float,
        known: dict[str, int],
    ) -> list[IngestResult | AgentError]:
        """The records of ``batches`` whose device is ``known`` (registered, its row locked;
        its pruned floor). No key at or below a device's floor is inserted: such a seq is a
        duplicate when its key is held, else a conflict (cloud/retention.py)."""
        devices = sorted(known)
        # the highest seq of each device before this group, or its pruned floor (its result's
        # ``last`` grows from it)
        last: dict[str, int | None] = dict(
            conn.execute(
                "SELECT d, nullif(greatest((SELECT max(seq) FROM record_keys WHERE device = d),"
                " f), -1) FROM unnest(%s::text[], %s::bigint[]) AS u(d, f)",
                (devices, [known[d] for d in devices]),
            ).fetchall()
        )
        # the first copy of each (device, seq) in the group is the one that may be new
        first: dict[tuple[str, int], tuple[int, int]] = {}
        for i, (device, recs, _) in enumerate(batches):
            if device in known:
                for j, (rec, _body) in enumerate(recs):
                    first.setdefault((device, rec.seq), (i, j))
        below = {k for k in first if k[1] <= known[k[0]]}
        held_below = self._held_keys(conn, sorted(below)) if below else set()
        keys = sorted(k for k in first if k not in below)
        inserted: set[tuple[str, int]] = set()
        if keys:
            rows = conn.execute(
                "INSERT INTO record_keys (device, seq, received)"
                " SELECT d, s, %s FROM unnest(%b::text[], %b::bigint[]) AS u(d, s)"
                " ON CONFLICT DO NOTHING RETURNING device, seq",
                (now, [k[0] for k in keys], [k[1] for k in keys]),
            ).fetchall()
            inserted = {(d, int(s)) for d, s in rows}
        stored = self._stored_copies(conn, [k for k in sorted(first) if k not in inserted])
        new = sorted(inserted, key=first.__getitem__)  # in group order
        if new:
            arrivals = sorted(
                int(r[0])
                for r in conn.execute(
                    "SELECT nextval('record_arrival') FROM generate_series(1, %s)", (len(new),)
                ).fetchall()
            )
            cols: list[list[Any]] = [[], [], [], [], [], [], []]
            for key, arrival in zip(new, arrivals, strict=True):
                i, j = first[key]
                rec, body = batches[i][1][j]
                row = (
                    key[0],
                    key[1],
                    str(rec.kind),
                    rec.created,
                    record_time(rec),
                    arrival,
                    body,
                )
                for col, value in zip(cols, row, strict=True):
                    col.append(value)
            conn.execute(
                "INSERT INTO records (device, seq, kind, created, time, received, arrival, body)"
                " SELECT d, s, k, c, t, %s, a, b FROM unnest(%b::text[], %b::bigint[],"
                " %b::text[], %b::float8[], %b::float8[], %b::bigint[], %b::bytea[])"
                " AS u(d, s, k, c, t, a, b)",
                (now, *cols),
            )
        out: list[IngestResult | AgentError] = []
        for i, (device, recs, _) in enumerate(batches):
            if device not in known:
                out.append(UnknownDevice.of(device))
                continue
            n_new = duplicate = 0
            conflicts: list[int] = []
            for j, (rec, _body) in enumerate(recs):
                key = (device, rec.seq)
                if key in inserted and first[key] == (i, j):
                    n_new += 1
                    continue
                if key in below and key not in held_below:  # pruned, or never held: a conflict
                    conflicts.append(rec.seq)
                    log.warning(
                        "event=seq_conflict device=%s seq=%d detail=below_pruned floor=%d",
                        device, rec.seq, known[device],
                    )  # fmt: skip
                    continue
                duplicate += 1
                if key in inserted:  # first stored by this group
                    fi, fj = first[key]
                    frec, fbody = batches[fi][1][fj]
                    copy: tuple[str, float, bytes] | None = (str(frec.kind), frec.created, fbody)
                else:
                    copy = stored.get(key)  # None: its body's partition was dropped
                if copy is not None and not same_record(*copy, rec):
                    conflicts.append(rec.seq)
                    log.warning(
                        "event=seq_conflict device=%s seq=%d detail=kept_first_copy",
                        device,
                        rec.seq,
                    )
            seqs = tuple(rec.seq for rec, _ in recs)
            top = max(seqs, default=None)
            prior = last.get(device)
            last[device] = top if prior is None else prior if top is None else max(prior, top)
            out.append(
                IngestResult(seqs, n_new, duplicate, len(conflicts), tuple(conflicts), last[device])
            )
        return out

    @staticmethod
    def _held_keys(conn: Conn, keys: list[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which of ``keys`` (device, seq) are held (in ``record_keys``)."""
        rows = conn.execute(
            "SELECT k.device, k.seq FROM unnest(%s::text[], %s::bigint[]) AS u(d, s)"
            " JOIN record_keys k ON k.device = u.d AND k.seq = u.s",
            ([k[0] for k in keys], [k[1] for k in keys]),
        ).fetchall()
        return {(d, int(s)) for d, s in rows}

    @staticmethod
    def _stored_copies(
        conn: Conn, keys: list[tuple[str, int]]
    ) -> dict[tuple[str, int], tuple[str, float, bytes]]:
        """(kind, created, body) of records stored before, by (device, seq)."""
        if not keys:
            return {}
        rows = conn.execute(
            "SELECT r.device, r.seq, r.kind, r.created, r.body"
            " FROM unnest(%s::text[], %s::bigint[]) AS u(d, s)"
            " JOIN record_keys k ON k.device = u.d AND k.seq = u.s"
            " JOIN records r ON r.device = k.device AND r.seq = k.seq"
            " AND r.received = k.received",
            ([k[0] for k in keys], [k[1] for k in keys]),
        ).fetchall()
        return {(d, int(s)): (kind, created, bytes(body)) for d, s, kind, created, body in rows}

    def records(
        self,
        device: str,
        since: float | None = None,
        limit: int | None = None,
        by_arrival: bool = False,
    ) -> list[StoredRecord]:
        query, args = records_query("%s", device, since, limit, by_arrival)

        def tx(conn: Conn) -> list[StoredRecord]:
            rows = conn.execute(query, args).fetchall()
            return [StoredRecord(*row[:7], bytes(row[7])) for row in rows]

        return self._run(tx)

    def seqs(self, device: str) -> list[int]:
        def tx(conn: Conn) -> list[int]:
            rows = conn.execute(
                "SELECT seq FROM record_keys WHERE device = %s ORDER BY seq", (device,)
            ).fetchall()
            return [int(r[0]) for r in rows]

        return self._run(tx)

    def counts(self, device: str) -> dict[str, int]:
        def tx(conn: Conn) -> dict[str, int]:
            rows = conn.execute(
                "SELECT kind, count(*) FROM records WHERE device = %s GROUP BY kind", (device,)
            ).fetchall()
            return {kind: int(n) for kind, n in rows}

        return self._run(tx)

    # -- state -----------------------------------------------------------------------------------

    def reported(self, device: str) -> dict[str, Entry]:
        def tx(conn: Conn) -> list[tuple[Any, ...]]:
            return conn.execute(
                "SELECT key, version, value FROM reported WHERE device = %s ORDER BY key",
                (device,),
            ).fetchall()

        rows = self._run(tx)
        return {k: Entry(int(v), statedoc.decode_value(bytes(val))) for k, v, val in rows}

    def put_reported(
        self, device: str, entries: Mapping[str, Entry], now: float, max_keys: int | None = None
    ) -> ReportedResult:
        def tx(conn: Conn) -> ReportedResult:
            self._lock_device(conn, device)
            rows = conn.execute(
                "SELECT key, version, value FROM reported WHERE device = %s", (device,)
            ).fetchall()
            if max_keys is not None:
                count = len({r[0] for r in rows} | set(entries))
                if count > max_keys:
                    raise DocumentTooLarge(count, max_keys, "the reported state", "keys")
            stored = {
                k: Entry(int(v), statedoc.decode_value(bytes(val)))
                for k, v, val in rows
                if k in entries
            }
            merge = merge_reported(device, stored, entries, now)
            if merge.writes:
                conn.execute(
                    "INSERT INTO reported (device, key, version, value, updated)"
                    " SELECT %s, k, v, b, %s FROM unnest(%s::text[], %s::bigint[], %s::bytea[])"
                    " AS u(k, v, b) ON CONFLICT (device, key) DO UPDATE SET"
                    " version = excluded.version, value = excluded.value,"
                    " updated = excluded.updated",
                    (
                        device,
                        now,
                        [key for key, _ in merge.writes],
                        [entry.version for _, entry in merge.writes],
                        [statedoc.encode_value(entry.value) for _, entry in merge.writes],
                    ),
                )
            taken = [(key, entry.version, entry.value) for key, entry in merge.writes]
            linkhistory.append(Sql(conn, "postgresql"), device, taken, now)
            releasestore.note_outcomes(Sql(conn, "postgresql"), device, taken, now)
            doc = self._desired(conn, device)
            blocked = statedoc.block_failures(doc, merge.failures)
            if blocked is not doc:
                self._write_desired(conn, device, blocked, [], now)
            return ReportedResult(merge.versions, blocked, blocked is not doc, merge.refused)

        return self._run(tx)

    def _desired(self, conn: Conn, device: str, lock: bool = False) -> DesiredDoc:
        if lock:
            rev = self._lock_device(conn, device)
        else:
            row = conn.execute(
                "SELECT desired_rev FROM devices WHERE id = %s", (device,)
            ).fetchone()
            if row is None:
                raise UnknownDevice.of(device)
            rev = int(row[0])
        rows = conn.execute(
            "SELECT key, version, value, blocked FROM desired WHERE device = %s ORDER BY key",
            (device,),
        ).fetchall()
        return desired_doc(device, rev, rows, self._store_id(conn))

    def _store_id(self, conn: Conn) -> str:
        if self._store is None:
            row = conn.execute("SELECT value FROM meta WHERE name = 'storage_id'").fetchone()
            if row is None:
                raise StorageUnavailable(f"{self.where}: the storage has no id (not migrated?)")
            self._store = f"{int(row[0]):016x}"
        return self._store

    @staticmethod
    def _write_desired(
        conn: Conn, device: str, doc: DesiredDoc, changed: list[str], now: float
    ) -> None:
        if changed:
            conn.execute(
                "INSERT INTO desired (device, key, version, value, updated, blocked)"
                " SELECT %s, k, v, b, %s, NULL FROM unnest(%s::text[], %s::bigint[], %s::bytea[])"
                " AS u(k, v, b) ON CONFLICT (device, key) DO UPDATE SET"
                " version = excluded.version, value = excluded.value,"
                " updated = excluded.updated, blocked = NULL",
                (
                    device,
                    now,
                    changed,
                    [doc.entries[k].version for k in changed],
                    [statedoc.encode_value(doc.entries[k].value) for k in changed],
                ),
            )
        keys = list(doc.entries)
        if keys:
            conn.execute(
                "UPDATE desired SET blocked = u.b FROM unnest(%s::text[], %s::bigint[]) AS u(k, b)"
                " WHERE desired.device = %s AND desired.key = u.k",
                (keys, [doc.blocked.get(k) for k in keys], device),
            )
        conn.execute("UPDATE devices SET desired_rev = %s WHERE id = %s", (doc.rev, device))
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL_DESIRED, device))

    def desired(self, device: str) -> DesiredDoc:
        return self._run(lambda conn: self._desired(conn, device))

    def put_desired(
        self,
        device: str,
        changes: Mapping[str, Any],
        now: float,
        if_match: Sequence[bytes] | None = None,
        max_bytes: int | None = None,
    ) -> tuple[DesiredDoc, list[str]]:
        def tx(conn: Conn) -> tuple[DesiredDoc, list[str]]:
            doc = self._desired(conn, device, lock=True)
            if if_match is not None and doc.etag() not in if_match:
                raise PreconditionFailed("the desired document changed (ETag does not match)")
            new, changed = statedoc.apply_desired(doc, changes)
            if changed:
                size = len(new.to_cbor())
                # as SQLiteStorage: over the limit is refused only when it grows the document
                if max_bytes is not None and size > max_bytes and size > len(doc.to_cbor()):
                    raise DocumentTooLarge(size, max_bytes)
                self._write_desired(conn, device, new, changed, now)
            return new, changed

        return self._run(tx)

    # -- change notices --------------------------------------------------------------------------

    def _drain(self) -> None:
        """Move the notices that arrived into the buffer; (re)connect the listening connection
        when there is none or it was lost (its generation changes: tokens before are unknown)."""
        with self._listen_lock:
            if self._pool is None:
                raise StorageUnavailable(f"{self.where}: storage is closed")
            conn = self._listen
            if conn is not None:
                try:
                    conn.execute("SELECT 1")  # notices of the round trip go to the backlog
                    for notice in conn.notifies(timeout=0):
                        self._events.append((notice.channel, notice.payload))
                        self._version += 1
                    while len(self._events) > MAX_EVENTS:
                        self._events.popleft()
                        self._first += 1
                    return
                except psycopg.Error as err:
                    log.warning("event=listen_lost storage=%s error=%s", self.where, one_line(err))
                    self._listen = None
                    conn.close()
            with self._errors():
                conn = psycopg.connect(self._dsn, autocommit=True, **self._kwargs)
                try:
                    conn.execute(f"LISTEN {CHANNEL_DESIRED}; LISTEN {CHANNEL_CREDENTIALS}")
                except BaseException:
                    conn.close()
                    raise
            self._listen = conn
            self._generation += 1
            self._version += 1
            self._first += len(self._events)
            self._events.clear()

    def changes(self, token: object | None) -> tuple[object, frozenset[str] | None, bool]:
        self._drain()
        with self._listen_lock:
            mark = _Mark(self._owner, self._generation, self._first + len(self._events))
            if token is None:
                return mark, frozenset(), False
            if (
                not isinstance(token, _Mark)
                or (token.owner, token.generation) != (mark.owner, mark.generation)
                or not self._first <= token.position <= mark.position
            ):
                return mark, None, True
            events = list(itertools.islice(self._events, token.position - self._first, None))
        devices = frozenset(p for channel, p in events if channel == CHANNEL_DESIRED)
        return mark, devices, any(channel == CHANNEL_CREDENTIALS for channel, _ in events)

    def data_version(self) -> int:
        """Changes when a notice arrives or the listening connection was made again."""
        self._drain()
        return self._version

    # -- OSCORE sequence numbers -----------------------------------------------------------------

    def reserve_sequence(self, principal: str, count: int, at_least: int = 0) -> int:
        check_block(count, at_least)

        def tx(conn: Conn) -> int:
            row = conn.execute(
                "INSERT INTO oscore_sequence AS o (principal, reserved) VALUES (%s, %s)"
                " ON CONFLICT (principal) DO UPDATE"
                " SET reserved = greatest(o.reserved, %s) + %s RETURNING o.reserved - %s",
                (principal, at_least + count, at_least, count, count),
            ).fetchone()
            assert row is not None
            return int(row[0])

        return self._run(tx)

    # -- credentials -----------------------------------------------------------------------------

    def put_credential(self, credential: Credential, now: float, **condition: Any) -> None:
        """The shared write (cloud/storesql.py); ``condition``: its ``replaces``/``unrevoke``."""
        try:
            super().put_credential(credential, now, **condition)
        except StorageUnavailable as err:  # the key id taken meanwhile by another process
            if isinstance(err.__cause__, pgerrors.UniqueViolation):
                raise DuplicateKeyId(f"key id {credential.sender_id.hex()} is taken") from err
            raise

    def revoke(self, principal: str, now: float) -> bool:
        def tx(conn: Conn) -> bool:
            cur = conn.execute(
                "UPDATE credentials SET revoked = %s WHERE principal = %s", (now, principal)
            )
            if cur.rowcount == 1:
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL_CREDENTIALS, principal))
            return cur.rowcount == 1

        return self._run(tx)

    def _principals_changed(self, db: Sql, principal: str) -> None:
        """A gateway's attachments changed: other processes reload their principals."""
        db.execute("SELECT pg_notify(?, ?)", (CHANNEL_CREDENTIALS, principal))

    def credentials(self) -> list[tuple[Credential, bool]]:
        def tx(conn: Conn) -> list[tuple[Any, ...]]:
            return conn.execute(
                "SELECT doc, revoked FROM credentials ORDER BY principal"
            ).fetchall()

        return credentials_of(self._run(tx))

    def storage_id(self) -> str:
        return self._store or self._run(self._store_id)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        with self._listen_lock:
            listen, self._listen = self._listen, None
        if listen is not None:
            listen.close()
        if pool is not None:
            pool.close()
