"""Storage of the cloud endpoint: the SQLite implementation of the seam
(:class:`cloud.storebase.Storage`, re-exported here with its values and exceptions), the thread
that runs a storage's calls, and :func:`open_storage`, which picks the implementation.

The server never touches the database itself: it calls a :class:`Storage` through a
:class:`StorageThread`, which runs every call on one dedicated thread, off the event loop.
The command line (export, devices, desired) opens a :class:`SQLiteStorage` directly; SQLite's WAL
mode lets it read and write while a server runs on the same file. ``BEGIN IMMEDIATE`` makes every
write transaction exclusive, so ``arrival`` numbers have no gaps here and follow commit order.

Every call that changes something is one transaction. Ingest stores each (device, seq) once:
a record that is already stored is a duplicate and changes nothing (the first copy stays); one
with a time that is not finite is refused alone (not stored, not acknowledged), not its group.
A damaged file is refused at open, before any write (cloud/sqlitecheck.py).
Failures of the database (I/O error, disk full, locked for too long, closed) raise
:class:`StorageUnavailable`; the server answers those with 5.03 and a Max-Age.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agent.errors import AgentError
from agent.wire import statedoc
from agent.wire.batch import WireRecord, record_time, same_record
from agent.wire.credentials import Credential
from agent.wire.statedoc import DesiredDoc, Entry
from cloud import (
    commandstore,
    devicecount,
    featurestore,
    learnstore,
    linkhistory,
    relaystore,
    releasestore,
)
from cloud.retention import SQLiteRetention, floor_of, upgrade_sqlite
from cloud.sqlitecheck import damaged, quick_check
from cloud.storebase import (
    TABLES,
    Batch,
    CredentialChanged,
    DeviceInfo,
    DocumentTooLarge,
    DuplicateKeyId,
    IngestResult,
    ModelVersion,
    PreconditionFailed,
    ReleaseVersion,
    ReportedResult,
    Sql,
    Storage,
    StorageUnavailable,
    StoredRecord,
    UnknownDevice,
    check_block,
    credentials_of,
    describe,
    desired_doc,
    merge_reported,
    records_query,
    time_not_finite,
)
from cloud.storesql import Row, SharedStorage, insert, missing
from drivers.clock import Clock, RealClock

if TYPE_CHECKING:
    from cloud.modelfiles import ModelFiles
    from cloud.releasefiles import ReleaseFiles

__all__ = [
    "DB_NAME",
    "Batch",
    "CredentialChanged",
    "DeviceInfo",
    "DocumentTooLarge",
    "DuplicateKeyId",
    "IngestResult",
    "PreconditionFailed",
    "ReportedResult",
    "SQLiteStorage",
    "Storage",
    "StorageThread",
    "StorageUnavailable",
    "StoredRecord",
    "UnknownDevice",
    "describe",
    "describe_storage",
    "open_storage",
]

log = logging.getLogger(__name__)

DB_NAME = "cloud.sqlite3"
MODELS_DIR = "models"  # the published models, beside the database (cloud/modelfiles.py)
RELEASES_DIR = "releases"  # the published agent releases, beside it (cloud/releasefiles.py)
#: PRAGMA user_version. A table added with CREATE TABLE IF NOT EXISTS (oscore_sequence,
#: window_verdicts) needs no new version: an older endpoint still opens the file and leaves that
#: table alone. Version 2: each device's count of records (cloud/devicecount.py), which an older
#: endpoint would not keep: it refuses the file (a gateway's store stays at 1: devicecount.py).
SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 5000
#: A gateway's table of the highest seq it dropped per device after the cloud stored it
#: (agent/gateway/relay.py prepare_store); the endpoint's own store has none.
PRUNED_TABLE = "relay_pruned"
SYNC_TIMEOUT = 30.0  # seconds StorageThread.call_sync waits for the database thread
WAL_RETRY = 0.01  # seconds between tries of PRAGMA journal_mode=WAL (see _wal)

T = TypeVar("T")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    registered REAL NOT NULL,
    last_seen REAL,
    desired_rev INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS records (
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    created REAL NOT NULL,
    time REAL NOT NULL,
    received REAL NOT NULL,
    arrival INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_by_time ON records (device, time);
CREATE INDEX IF NOT EXISTS records_alerts ON records (device, time) WHERE kind = 'alert';
CREATE TABLE IF NOT EXISTS reported (
    device TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    value BLOB NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (device, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS credentials (
    principal TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    kid BLOB NOT NULL UNIQUE,
    doc TEXT NOT NULL,
    created REAL NOT NULL,
    revoked REAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS desired (
    device TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    value BLOB NOT NULL,
    updated REAL NOT NULL,
    blocked INTEGER,
    PRIMARY KEY (device, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS oscore_sequence (
    principal TEXT PRIMARY KEY,
    reserved INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS window_verdicts (
    n INTEGER PRIMARY KEY,  -- the order they were stored in
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    digest TEXT NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (device, seq, digest)
);
"""


def _held(db: sqlite3.Connection, device: str, seq: int) -> bool:
    sql = "SELECT 1 FROM records WHERE device = ? AND seq = ?"
    return db.execute(sql, (device, seq)).fetchone() is not None


def _wal(db: sqlite3.Connection) -> None:
    """Put the file in WAL mode. Several processes opening a new file at once may race on it:
    SQLite then answers "database is locked" at once, without its busy handler, so the pragma is
    tried again within the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(WAL_RETRY)


class SQLiteStorage(SQLiteRetention, SharedStorage):
    """:class:`Storage` on one SQLite file in WAL mode, ``synchronous=FULL``: an acknowledged
    record survives a power cut, which is what lets the device delete it. Published models are
    files in ``models/`` beside it (cloud/modelfiles.py), as they always were."""

    _DIALECT = "sqlite"
    _META = "counters"

    def __init__(self, path: str | Path, check: bool = True) -> None:
        """``check``: read the file for damage first (cloud/sqlitecheck.py)."""
        self.path = Path(path)
        self._store: str | None = None
        self._files: ModelFiles | None = None
        self._releases: ReleaseFiles | None = None
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None
            )
            _wal(self._db)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageUnavailable(
                    f"{self.path}: schema version {version} is newer than this endpoint "
                    f"({SCHEMA_VERSION}); upgrade edge-agent"
                )
            if check:
                quick_check(self._db, self.path)  # before anything is written to it
            with self._tx() as db:
                schema = (
                    _SCHEMA
                    + linkhistory.SCHEMA
                    + learnstore.SQLITE_SCHEMA
                    + featurestore.SQLITE_SCHEMA
                    + relaystore.SQLITE_SCHEMA
                    + commandstore.SQLITE_SCHEMA
                    + releasestore.SQLITE_SCHEMA
                )
                for statement in schema.split(";"):
                    if statement.strip():
                        db.execute(statement)
                upgrade_sqlite(db)  # retention's columns (cloud/retention.py)
                devicecount.upgrade_sqlite(db)  # each device's count (cloud/devicecount.py)
                devicecount.stamp(db, SCHEMA_VERSION, PRUNED_TABLE)  # PRAGMA user_version
                db.execute(
                    "INSERT OR IGNORE INTO counters (name, value) VALUES ('storage_id', ?)",
                    (secrets.randbits(63),),
                )
            # a gateway's store, which drops records the cloud holds (agent/gateway/relay.py):
            # a record under a seq at or below what it dropped is not taken as new
            self._floors = (
                self._db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (PRUNED_TABLE,)
                ).fetchone()
                is not None
            )
        except BaseException as err:
            self.close()
            if isinstance(err, sqlite3.DatabaseError) and "malformed" in str(err):
                raise damaged(self.path, str(err)) from err
            if isinstance(err, sqlite3.Error | OSError):
                raise StorageUnavailable(f"cannot open {self.path}: {err}") from err
            raise

    def storage_id(self) -> str:
        with self._errors():
            return self._store_id(self.db)

    @classmethod
    def in_dir(cls, data_dir: str | Path, check: bool = True) -> SQLiteStorage:
        return cls(Path(data_dir) / DB_NAME, check)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StorageUnavailable("storage is closed")
        return self._db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as err:
            raise StorageUnavailable(f"{self.path}: {err}") from err
        try:
            yield db
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.Error as err:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise StorageUnavailable(f"{self.path}: commit failed: {err}") from err

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as err:
            raise StorageUnavailable(f"{self.path}: {err}") from err

    # -- devices ---------------------------------------------------------------------------------

    def add_device(self, device: str, now: float) -> bool:
        with self._errors(), self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO devices (id, registered) VALUES (?, ?)", (device, now)
            )
            return cur.rowcount == 1

    def device(self, device: str) -> DeviceInfo | None:
        with self._errors():
            row = self.db.execute(
                "SELECT id, registered, last_seen, desired_rev, records FROM devices WHERE id = ?",
                (device,),
            ).fetchone()
            if row is None:
                return None
            return self._info(row)

    def _info(self, row: tuple[Any, ...]) -> DeviceInfo:
        # the count is the device row's (cloud/devicecount.py); max(seq) one seek of the key
        (last,) = self.db.execute(
            "SELECT max(seq) FROM records WHERE device = ?", (row[0],)
        ).fetchone()
        return DeviceInfo(row[0], row[1], row[2], row[4], last, row[3])

    def devices(self) -> list[DeviceInfo]:
        with self._errors():
            rows = self.db.execute(
                "SELECT id, registered, last_seen, desired_rev, records FROM devices ORDER BY id"
            ).fetchall()
            return [self._info(row) for row in rows]

    def _require(self, db: sqlite3.Connection, device: str) -> None:
        if db.execute("SELECT 1 FROM devices WHERE id = ?", (device,)).fetchone() is None:
            raise UnknownDevice.of(device)

    # -- records ---------------------------------------------------------------------------------

    def ingest_many(self, batches: Sequence[Batch], now: float) -> list[IngestResult | AgentError]:
        if not batches:
            return []
        out: list[IngestResult | AgentError] = []
        with self._errors(), self._tx() as db:
            row = db.execute("SELECT value FROM counters WHERE name = 'arrival'").fetchone()
            arrival = row[0] if row else 0
            sql = Sql(db, "sqlite")
            featured = featurestore.devices_with_features(sql, [b[0] for b in batches])
            for device, records, register in batches:
                if register:
                    db.execute(
                        "INSERT OR IGNORE INTO devices (id, registered) VALUES (?, ?)",
                        (device, now),
                    )
                elif db.execute("SELECT 1 FROM devices WHERE id = ?", (device,)).fetchone() is None:
                    out.append(UnknownDevice.of(device))
                    continue
                plain, feats, outcome = featurestore.prepass(
                    sql, device, records, device in featured
                )
                result, arrival = self._ingest_one(db, device, plain, now, arrival)
                featurestore.store(sql, device, feats, now, outcome)
                if feats:
                    featured.add(device)
                out.append(featurestore.merge(sql, device, result, outcome))
            db.execute(
                "INSERT OR REPLACE INTO counters (name, value) VALUES ('arrival', ?)", (arrival,)
            )
        return out

    def _ingest_one(
        self,
        db: sqlite3.Connection,
        device: str,
        records: Sequence[WireRecord],
        now: float,
        arrival: int,
    ) -> tuple[IngestResult, int]:
        new = duplicate = 0
        conflicts: list[int] = []
        refused: set[int] = set()
        floor = floor_of(db, device, PRUNED_TABLE if self._floors else None)
        for rec in records:
            body = bytes(rec.body)
            if time_not_finite(device, rec):  # SQLite would store NaN as NULL
                refused.add(rec.seq)
                continue
            if rec.seq <= floor and not _held(db, device, rec.seq):
                # records up to ``floor`` were pruned (retention) or dropped by a gateway once
                # the cloud stored them: one under such a seq that is not held may be one
                # stored before or another record (a device that lost its store numbers from 1
                # again), so it is named a conflict and the device sends it under a new number
                conflicts.append(rec.seq)
                log.warning(
                    "event=seq_conflict device=%s seq=%d detail=below_pruned floor=%d",
                    device, rec.seq, floor,
                )  # fmt: skip
                continue
            cur = db.execute(  # not OR IGNORE, which would hide a NOT NULL violation too
                "INSERT INTO records (device, seq, kind, created, time, received, arrival, body) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device, seq) DO NOTHING",
                (
                    device,
                    rec.seq,
                    str(rec.kind),
                    rec.created,
                    record_time(rec),
                    now,
                    arrival + 1,
                    body,
                ),
            )
            if cur.rowcount == 1:
                new += 1
                arrival += 1
                continue
            duplicate += 1
            kind, created, stored = db.execute(
                "SELECT kind, created, body FROM records WHERE device = ? AND seq = ?",
                (device, rec.seq),
            ).fetchone()
            if not same_record(kind, created, stored, rec):
                conflicts.append(rec.seq)
                log.warning(
                    "event=seq_conflict device=%s seq=%d detail=kept_first_copy", device, rec.seq
                )
        db.execute(  # the count: cloud/devicecount.py
            "UPDATE devices SET last_seen = ?, records = records + ? WHERE id = ?",
            (now, new, device),
        )
        (last,) = db.execute(  # the floor counts: the device numbers above what was pruned
            "SELECT nullif(max(coalesce(max(seq), -1), ?), -1) FROM records WHERE device = ?",
            (floor, device),
        ).fetchone()
        seqs = tuple(rec.seq for rec in records if rec.seq not in refused)
        result = IngestResult(seqs, new, duplicate, len(conflicts), tuple(conflicts), last)
        return result, arrival

    def records(
        self,
        device: str,
        since: float | None = None,
        limit: int | None = None,
        by_arrival: bool = False,
    ) -> list[StoredRecord]:
        sql, args = records_query("?", device, since, limit, by_arrival)
        with self._errors():
            return [StoredRecord(*row) for row in self.db.execute(sql, args)]

    def seqs(self, device: str) -> list[int]:
        with self._errors():
            rows = self.db.execute(
                "SELECT seq FROM records WHERE device = ? ORDER BY seq", (device,)
            )
            return [row[0] for row in rows]

    def counts(self, device: str) -> dict[str, int]:
        with self._errors():
            rows = self.db.execute(
                "SELECT kind, COUNT(*) FROM records WHERE device = ? GROUP BY kind", (device,)
            )
            return {kind: n for kind, n in rows}

    # -- state -----------------------------------------------------------------------------------

    def reported(self, device: str) -> dict[str, Entry]:
        with self._errors():
            rows = self.db.execute(
                "SELECT key, version, value FROM reported WHERE device = ? ORDER BY key",
                (device,),
            ).fetchall()
        return {key: Entry(version, statedoc.decode_value(value)) for key, version, value in rows}

    def put_reported(
        self, device: str, entries: Mapping[str, Entry], now: float, max_keys: int | None = None
    ) -> ReportedResult:
        with self._errors(), self._tx() as db:
            self._require(db, device)
            rows = db.execute(
                "SELECT key, version, value FROM reported WHERE device = ?", (device,)
            ).fetchall()
            if max_keys is not None:
                count = len({row[0] for row in rows} | set(entries))
                if count > max_keys:
                    raise DocumentTooLarge(count, max_keys, "the reported state", "keys")
            stored = {
                key: Entry(version, statedoc.decode_value(value))
                for key, version, value in rows
                if key in entries
            }
            merge = merge_reported(device, stored, entries, now)
            for key, entry in merge.writes:
                db.execute(
                    "INSERT OR REPLACE INTO reported (device, key, version, value, updated) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (device, key, entry.version, statedoc.encode_value(entry.value), now),
                )
            taken = [(key, entry.version, entry.value) for key, entry in merge.writes]
            linkhistory.append(Sql(db, "sqlite"), device, taken, now)
            releasestore.note_outcomes(Sql(db, "sqlite"), device, taken, now)
            doc = self._desired(db, device)
            blocked = statedoc.block_failures(doc, merge.failures)
            if blocked is not doc:
                self._write_desired(db, device, blocked, [], now)
        return ReportedResult(merge.versions, blocked, blocked is not doc, merge.refused)

    def _desired(self, db: sqlite3.Connection, device: str) -> DesiredDoc:
        row = db.execute("SELECT desired_rev FROM devices WHERE id = ?", (device,)).fetchone()
        if row is None:
            raise UnknownDevice.of(device)
        rows = db.execute(
            "SELECT key, version, value, blocked FROM desired WHERE device = ? ORDER BY key",
            (device,),
        ).fetchall()
        return desired_doc(device, row[0], rows, self._store_id(db))

    def _store_id(self, db: sqlite3.Connection) -> str:
        if self._store is None:
            row = db.execute("SELECT value FROM counters WHERE name = 'storage_id'").fetchone()
            self._store = f"{int(row[0]):016x}"
        return self._store

    def _write_desired(
        self, db: sqlite3.Connection, device: str, doc: DesiredDoc, changed: list[str], now: float
    ) -> None:
        for key in changed:
            entry = doc.entries[key]
            db.execute(
                "INSERT OR REPLACE INTO desired (device, key, version, value, updated, blocked) "
                "VALUES (?, ?, ?, ?, ?, NULL)",
                (device, key, entry.version, statedoc.encode_value(entry.value), now),
            )
        for key in doc.entries:
            db.execute(
                "UPDATE desired SET blocked = ? WHERE device = ? AND key = ?",
                (doc.blocked.get(key), device, key),
            )
        db.execute("UPDATE devices SET desired_rev = ? WHERE id = ?", (doc.rev, device))

    def desired(self, device: str) -> DesiredDoc:
        with self._errors():
            return self._desired(self.db, device)

    def put_desired(
        self,
        device: str,
        changes: Mapping[str, Any],
        now: float,
        if_match: Sequence[bytes] | None = None,
        max_bytes: int | None = None,
    ) -> tuple[DesiredDoc, list[str]]:
        with self._errors(), self._tx() as db:
            doc = self._desired(db, device)
            if if_match is not None and doc.etag() not in if_match:
                raise PreconditionFailed("the desired document changed (ETag does not match)")
            new, changed = statedoc.apply_desired(doc, changes)
            if changed:
                size = len(new.to_cbor())
                # over the limit is refused when it grows the document, so that a document
                # that is too large (an older limit) can still shrink
                if max_bytes is not None and size > max_bytes and size > len(doc.to_cbor()):
                    raise DocumentTooLarge(size, max_bytes)
                self._write_desired(db, device, new, changed, now)
        return new, changed

    def data_version(self) -> int:
        with self._errors():
            return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def changes(self, token: object | None) -> tuple[object, frozenset[str] | None, bool]:
        """SQLite tells only that another connection committed (``PRAGMA data_version``), not
        what: any commit is (None, True), re-read everything."""
        version = self.data_version()
        if token is None or token == version:
            return version, frozenset(), False
        return version, None, True

    def reserve_sequence(self, principal: str, count: int, at_least: int = 0) -> int:
        check_block(count, at_least)
        with self._errors(), self._tx() as db:
            (start,) = db.execute(
                "INSERT INTO oscore_sequence (principal, reserved) VALUES (?, ? + ?)"
                " ON CONFLICT (principal) DO UPDATE"
                " SET reserved = max(reserved, excluded.reserved - ?) + ?"
                " RETURNING reserved - ?",
                (principal, at_least, count, count, count, count),
            ).fetchone()
        return int(start)

    # -- credentials -----------------------------------------------------------------------------

    def revoke(self, principal: str, now: float) -> bool:
        with self._errors(), self._tx() as db:
            cur = db.execute(
                "UPDATE credentials SET revoked = ? WHERE principal = ?", (now, principal)
            )
            return cur.rowcount == 1

    def credentials(self) -> list[tuple[Credential, bool]]:
        with self._errors():
            rows = self.db.execute(
                "SELECT doc, revoked FROM credentials ORDER BY principal"
            ).fetchall()
        return credentials_of(rows)

    # -- what storesql.SharedStorage writes once for both databases -----------------------------

    def _read(self, fn: Callable[[Sql], T]) -> T:
        with self._errors():
            return fn(Sql(self.db, "sqlite"))

    def _write(self, fn: Callable[[Sql], T]) -> T:
        with self._errors(), self._tx() as db:
            return fn(Sql(db, "sqlite"))

    @contextmanager
    def reader(self) -> Iterator[Sql]:
        with self._errors():
            yield Sql(self.db, "sqlite")

    def _load_records(self, rows: Sequence[Row]) -> int:
        def tx(db: Sql) -> int:
            new = missing(db, TABLES["records"], rows)
            insert(db, "records", ", ".join(TABLES["records"].columns), new)
            devicecount.add(db.conn, (row[0] for row in new))
            top = max(row[6] for row in rows)
            db.execute(
                "INSERT INTO counters (name, value) VALUES ('arrival', ?)"
                " ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
                (top,),
            )
            return len(new)

        return self._write(tx)

    # -- published models: files beside the database ---------------------------------------------

    @property
    def model_files(self) -> ModelFiles:
        if self._files is None:
            from cloud.modelfiles import ModelFiles

            self._files = ModelFiles(self.path.parent / MODELS_DIR)
        return self._files

    def put_model(
        self, name: str, version: str, manifest: bytes, data: bytes, published: float
    ) -> bool:
        return self.model_files.put_model(name, version, manifest, data, published)

    def models(self, name: str | None = None) -> list[ModelVersion]:
        return self.model_files.models(name)

    def model(self, name: str, version: str) -> ModelVersion | None:
        return self.model_files.model(name, version)

    def model_file(self, name: str, version: str) -> bytes | None:
        return self.model_files.model_file(name, version)

    # -- published releases: files beside the database too ---------------------------------------

    @property
    def release_files(self) -> ReleaseFiles:
        if self._releases is None:
            from cloud.releasefiles import ReleaseFiles

            self._releases = ReleaseFiles(self.path.parent / RELEASES_DIR)
        return self._releases

    def put_release(self, version: str, manifest: bytes, file: Path, published: float) -> bool:
        return self.release_files.put_release(version, manifest, file, published)

    def releases(self) -> list[ReleaseVersion]:
        return self.release_files.releases()

    def release(self, version: str) -> ReleaseVersion | None:
        return self.release_files.release(version)

    def release_file(self, version: str, out: Path) -> int | None:
        return self.release_files.release_file(version, out)

    def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()


class StorageThread:
    """Runs every call of a :class:`Storage` on one dedicated thread (SQLite connections belong
    to the thread that made them)."""

    def __init__(self, factory: Callable[[], Storage], clock: Clock | None = None) -> None:
        self._factory = factory
        self._clock = clock or RealClock()
        self._executor: ThreadPoolExecutor | None = None
        self._storage: Storage | None = None
        self._thread: int | None = None  # the ident of the database thread

    def _started(self) -> None:
        self._thread = threading.get_ident()

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="cloud-db", initializer=self._started
        )
        try:
            self._storage = await self._clock.run_blocking(self._executor, self._factory)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def call(self, fn: Callable[[Storage], T]) -> T:
        """Run ``fn(storage)`` on the database thread and return its result."""
        if self._executor is None or self._storage is None:
            raise StorageUnavailable("storage is not running")
        return await self._clock.run_blocking(self._executor, fn, self._storage)

    def call_sync(self, fn: Callable[[Storage], T], timeout: float | None = SYNC_TIMEOUT) -> T:
        """Run ``fn(storage)`` on the database thread and wait for it, blocking the caller (for
        a synchronous callback on the event loop; rare and short). On the database thread
        itself it runs at once. :class:`StorageUnavailable` if no answer within ``timeout``."""
        executor, storage = self._executor, self._storage
        if executor is None or storage is None:
            raise StorageUnavailable("storage is not running")
        if threading.get_ident() == self._thread:
            return fn(storage)
        try:
            return executor.submit(fn, storage).result(timeout)
        except FutureTimeout as err:
            raise StorageUnavailable(f"the storage did not answer within {timeout} s") from err

    async def stop(self) -> None:
        executor, storage = self._executor, self._storage
        self._executor = self._storage = None
        if executor is None:
            return
        if storage is not None:
            try:
                await self._clock.run_blocking(executor, storage.close)
            except Exception as err:  # closing must not keep the server from stopping
                log.warning("event=storage_close_failed error=%s", err)
        await asyncio.get_running_loop().run_in_executor(None, executor.shutdown)


# -- choosing a storage --------------------------------------------------------------------------


#: :func:`describe` under the name the command line uses.
describe_storage = describe


#: The URL schemes of a PostgreSQL storage (libpq's)
STORAGE_SCHEMES = ("postgresql://", "postgres://")


def open_storage(spec: str | Path, pool_size: int | None = None, check: bool = True) -> Storage:
    """The storage ``spec`` names: ``postgresql://...`` or ``postgres://...`` (a libpq URL) is a
    :class:`cloud.pgstorage.PostgresStorage` (``pool_size`` connections at most); ``sqlite:DIR``
    or a plain directory is the :class:`SQLiteStorage` in that directory (``check``: for damage)."""
    text = str(spec)
    if text.startswith(STORAGE_SCHEMES):
        try:
            from cloud.pgstorage import DEFAULT_POOL_SIZE, PostgresStorage
        except ImportError as err:
            raise StorageUnavailable(
                f"{describe(text)}: PostgreSQL storage needs psycopg ({err}): "
                "pip install 'edge-agent[fleet]'"
            ) from err
        return PostgresStorage(text, pool_size or DEFAULT_POOL_SIZE)
    if "://" in text:
        raise StorageUnavailable(
            f"{describe(text)}: not a storage (postgresql://... or sqlite:DIR)"
        )
    if text.startswith("sqlite:"):
        text = text[len("sqlite:") :]
    if not text:
        raise StorageUnavailable("no storage given (a directory, sqlite:DIR or postgresql://...)")
    return SQLiteStorage.in_dir(text, check)
