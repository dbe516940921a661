"""Storage of the cloud endpoint: the seam (:class:`Storage`) and its SQLite implementation.

The server never touches the database itself: it calls a :class:`Storage` through a
:class:`StorageThread`, which runs every call on one dedicated thread, off the event loop.
The command line (export, devices, desired) opens a :class:`SQLiteStorage` directly; SQLite's WAL
mode lets it read and write while a server runs on the same file.

Every call that changes something is one transaction. Ingest stores each (device, seq) once:
a record that is already stored is a duplicate and changes nothing (the first copy stays).
Failures of the database (I/O error, disk full, locked for too long, closed) raise
:class:`StorageUnavailable`; the server answers those with 5.03 and a Max-Age.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from agent.errors import AgentError
from agent.wire import statedoc
from agent.wire.batch import WireRecord, same_record
from agent.wire.credentials import Credential, CredentialError
from agent.wire.records import body_time
from agent.wire.statedoc import DesiredDoc, Entry
from cloud import linkhistory
from drivers.clock import Clock, RealClock

log = logging.getLogger(__name__)

DB_NAME = "cloud.sqlite3"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 5000

T = TypeVar("T")


class StorageUnavailable(AgentError):
    """The database cannot do the work now (I/O error, full disk, locked, closed)."""


class DuplicateKeyId(AgentError):
    """A new credential's OSCORE key id belongs to another principal (make another)."""


class UnknownDevice(AgentError):
    """The device is not registered."""


class PreconditionFailed(AgentError):
    """An If-Match ETag does not match the current desired document."""


class DocumentTooLarge(AgentError):
    """A state document would grow beyond its limit (bytes of desired state, keys of reported)."""

    def __init__(
        self, size: int, limit: int, what: str = "the desired document", unit: str = "bytes"
    ) -> None:
        super().__init__(f"{what} would have {size} {unit}, over the limit of {limit}")
        self.size = size
        self.limit = limit


@dataclass(frozen=True)
class StoredRecord:
    """A record as the endpoint holds it. ``time`` is the time inside the body (``created`` when
    the body has none); ``received`` is when the endpoint stored it; ``arrival`` numbers the
    records of all devices in the order they were stored (within a batch: batch order)."""

    device: str
    seq: int
    kind: str
    created: float
    time: float
    received: float
    arrival: int
    body: bytes


@dataclass(frozen=True)
class IngestResult:
    """What a batch did: every seq of the batch (all are stored now) and the counts."""

    seqs: tuple[int, ...]
    new: int
    duplicate: int
    conflict: int  # duplicates whose stored copy differs from the one just received
    conflicts: tuple[int, ...] = ()  # their seqs: not acknowledged (another record holds them)
    last: int | None = None  # the highest seq stored for the device, after this batch


@dataclass(frozen=True)
class DeviceInfo:
    id: str
    registered: float
    last_seen: float | None
    records: int
    last_seq: int | None
    desired_rev: int


@dataclass(frozen=True)
class ReportedResult:
    """The version now stored for each key of a reported PUT, and whether desired state changed
    (a model failure blocked a desired version)."""

    versions: dict[str, int]
    desired: DesiredDoc
    desired_changed: bool
    refused: dict[str, int] = field(default_factory=dict)  # key => version beyond the limit


@runtime_checkable
class Storage(Protocol):
    """What the endpoint needs from a database. Calls are blocking; one thread makes them."""

    def add_device(self, device: str, now: float) -> bool:
        """Register ``device``; False if it was registered already."""

    def device(self, device: str) -> DeviceInfo | None: ...

    def devices(self) -> list[DeviceInfo]: ...

    def ingest(
        self, device: str, records: Sequence[WireRecord], now: float, register: bool = False
    ) -> IngestResult:
        """Store each record once. Unknown device: :class:`UnknownDevice`, or register it."""

    def records(
        self,
        device: str,
        since: float | None = None,
        limit: int | None = None,
        by_arrival: bool = False,
    ) -> list[StoredRecord]:
        """The device's records in seq order (or arrival order); ``since``: only those with
        ``time >= since``."""

    def seqs(self, device: str) -> list[int]:
        """Every stored seq of the device, ascending."""

    def counts(self, device: str) -> dict[str, int]:
        """How many records of each kind the device has stored."""

    def reported(self, device: str) -> dict[str, Entry]: ...

    def put_reported(
        self, device: str, entries: Mapping[str, Entry], now: float, max_keys: int | None = None
    ) -> ReportedResult:
        """Merge reported entries by their keys' rules (:mod:`agent.wire.statedoc`);
        :class:`DocumentTooLarge` if the device would have more than ``max_keys`` keys. An entry
        whose version is above :func:`agent.wire.statedoc.version_limit` is refused (left out
        of ``versions``, named in ``refused``); the others are merged."""

    def desired(self, device: str) -> DesiredDoc: ...

    def put_desired(
        self,
        device: str,
        changes: Mapping[str, Any],
        now: float,
        if_match: Sequence[bytes] | None = None,
        max_bytes: int | None = None,
    ) -> tuple[DesiredDoc, list[str]]:
        """Apply operator changes; (new document, changed keys)."""

    def data_version(self) -> int:
        """A number that changes when another connection commits (to notice CLI writes)."""

    def put_credential(self, credential: Credential, now: float) -> None:
        """Register or replace (re-key) a principal's credential; :class:`DuplicateKeyId` when
        its key id belongs to another principal."""

    def revoke(self, principal: str, now: float) -> bool:
        """Refuse the principal from now on; False if it has no credential."""

    def credentials(self) -> list[tuple[Credential, bool]]:
        """Every credential, with whether it is revoked."""

    def storage_id(self) -> str:
        """This storage's identity: endpoints that share it are one deployment (a device may
        fall back between them); another storage is another deployment."""

    def close(self) -> None: ...


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
"""


class SQLiteStorage:
    """:class:`Storage` on one SQLite file in WAL mode, ``synchronous=FULL``: an acknowledged
    record survives a power cut, which is what lets the device delete it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._store: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageUnavailable(
                    f"{self.path}: schema version {version} is newer than this endpoint "
                    f"({SCHEMA_VERSION}); upgrade edge-agent"
                )
            with self._tx() as db:
                for statement in (_SCHEMA + linkhistory.SCHEMA).split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.execute(
                    "INSERT OR IGNORE INTO counters (name, value) VALUES ('storage_id', ?)",
                    (secrets.randbits(63),),
                )
        except (sqlite3.Error, OSError) as err:
            raise StorageUnavailable(f"cannot open {self.path}: {err}") from err

    def storage_id(self) -> str:
        with self._errors():
            return self._store_id(self.db)

    @classmethod
    def in_dir(cls, data_dir: str | Path) -> SQLiteStorage:
        return cls(Path(data_dir) / DB_NAME)

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
                "SELECT id, registered, last_seen, desired_rev FROM devices WHERE id = ?",
                (device,),
            ).fetchone()
            if row is None:
                return None
            return self._info(row)

    def _info(self, row: tuple[Any, ...]) -> DeviceInfo:
        count, last = self.db.execute(
            "SELECT count(*), max(seq) FROM records WHERE device = ?", (row[0],)
        ).fetchone()
        return DeviceInfo(row[0], row[1], row[2], count, last, row[3])

    def devices(self) -> list[DeviceInfo]:
        with self._errors():
            rows = self.db.execute(
                "SELECT id, registered, last_seen, desired_rev FROM devices ORDER BY id"
            ).fetchall()
            return [self._info(row) for row in rows]

    def _require(self, db: sqlite3.Connection, device: str) -> None:
        if db.execute("SELECT 1 FROM devices WHERE id = ?", (device,)).fetchone() is None:
            raise UnknownDevice(f"device {device!r} is not registered")

    # -- records ---------------------------------------------------------------------------------

    def ingest(
        self, device: str, records: Sequence[WireRecord], now: float, register: bool = False
    ) -> IngestResult:
        new = duplicate = 0
        conflicts: list[int] = []
        with self._errors(), self._tx() as db:
            if register:
                db.execute(
                    "INSERT OR IGNORE INTO devices (id, registered) VALUES (?, ?)", (device, now)
                )
            else:
                self._require(db, device)
            row = db.execute("SELECT value FROM counters WHERE name = 'arrival'").fetchone()
            arrival = row[0] if row else 0
            for rec in records:
                body = bytes(rec.body)
                time = body_time(rec.kind, body, rec.created)
                cur = db.execute(
                    "INSERT OR IGNORE INTO records (device, seq, kind, created, time, received, "
                    "arrival, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (device, rec.seq, str(rec.kind), rec.created, time, now, arrival + 1, body),
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
                        "event=seq_conflict device=%s seq=%d detail=kept_first_copy",
                        device,
                        rec.seq,
                    )
            db.execute("UPDATE devices SET last_seen = ? WHERE id = ?", (now, device))
            db.execute(
                "INSERT OR REPLACE INTO counters (name, value) VALUES ('arrival', ?)", (arrival,)
            )
            (last,) = db.execute(
                "SELECT max(seq) FROM records WHERE device = ?", (device,)
            ).fetchone()
        seqs = tuple(rec.seq for rec in records)
        return IngestResult(seqs, new, duplicate, len(conflicts), tuple(conflicts), last)

    def records(
        self,
        device: str,
        since: float | None = None,
        limit: int | None = None,
        by_arrival: bool = False,
    ) -> list[StoredRecord]:
        sql = (
            "SELECT device, seq, kind, created, time, received, arrival, body FROM records "
            "WHERE device = ?"
        )
        args: list[Any] = [device]
        if since is not None:
            sql += " AND time >= ?"
            args.append(since)
        sql += " ORDER BY arrival" if by_arrival else " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
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
        versions: dict[str, int] = {}
        failures: dict[str, int] = {}
        refused: dict[str, int] = {}
        taken: list[tuple[str, int, Any]] = []  # merged entries, for the link history
        with self._errors(), self._tx() as db:
            self._require(db, device)
            if max_keys is not None:
                known = {
                    k for (k,) in db.execute("SELECT key FROM reported WHERE device = ?", (device,))
                }
                count = len(known | set(entries))
                if count > max_keys:
                    raise DocumentTooLarge(count, max_keys, "the reported state", "keys")
            for key, incoming in entries.items():
                row = db.execute(
                    "SELECT version, value FROM reported WHERE device = ? AND key = ?",
                    (device, key),
                ).fetchone()
                stored = Entry(row[0], statedoc.decode_value(row[1])) if row else None
                limit = statedoc.version_limit(now, stored)
                if incoming.version > limit:
                    refused[key] = incoming.version
                    log.warning(
                        "event=reported_version_refused device=%s key=%s version=%d limit=%d",
                        device,
                        key,
                        incoming.version,
                        limit,
                    )
                    continue
                merged = statedoc.merge_reported(stored, incoming, statedoc.rule_for(key))
                if merged is not None:
                    db.execute(
                        "INSERT OR REPLACE INTO reported (device, key, version, value, updated) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (device, key, merged.version, statedoc.encode_value(merged.value), now),
                    )
                    taken.append((key, merged.version, merged.value))
                    failed = statedoc.model_failure(key, merged)
                    if failed is not None:
                        failures[key] = failed
                    stored = merged
                assert stored is not None
                versions[key] = stored.version
            linkhistory.append(db, device, taken, now)
            doc = self._desired(db, device)
            blocked = statedoc.block_failures(doc, failures)
            if blocked is not doc:
                self._write_desired(db, device, blocked, [], now)
        return ReportedResult(versions, blocked, blocked is not doc, refused)

    def _desired(self, db: sqlite3.Connection, device: str) -> DesiredDoc:
        row = db.execute("SELECT desired_rev FROM devices WHERE id = ?", (device,)).fetchone()
        if row is None:
            raise UnknownDevice(f"device {device!r} is not registered")
        entries: dict[str, Entry] = {}
        blocked: dict[str, int] = {}
        rows = db.execute(
            "SELECT key, version, value, blocked FROM desired WHERE device = ? ORDER BY key",
            (device,),
        )
        for key, version, value, block in rows:
            # a value written around the endpoint's checks (too deep to decode: served as its
            # bytes, and the device refuses that key) never makes the document unreadable
            try:
                entries[key] = Entry(version, statedoc.decode_stored(value))
            except statedoc.StateError as err:  # not CBOR at all: corrupted at rest
                log.warning(
                    "event=desired_value_unreadable device=%s key=%r version=%s error=%r "
                    "action=left_out",
                    device,
                    key,
                    version,
                    str(err)[:200],
                )
                continue
            if block is not None:
                blocked[key] = block
        return DesiredDoc(row[0], entries, blocked, self._store_id(db))

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

    # -- credentials -----------------------------------------------------------------------------

    def put_credential(self, credential: Credential, now: float) -> None:
        doc = json.dumps(credential.to_json(), sort_keys=True)
        with self._errors(), self._tx() as db:
            row = db.execute(
                "SELECT principal FROM credentials WHERE kid = ?", (credential.sender_id,)
            ).fetchone()
            if row is not None and row[0] != credential.principal:
                raise DuplicateKeyId(f"key id {credential.sender_id.hex()} is taken")
            db.execute(
                "INSERT INTO credentials (principal, role, kid, doc, created)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (principal) DO UPDATE SET"
                " role = excluded.role, kid = excluded.kid, doc = excluded.doc,"
                " created = excluded.created, revoked = NULL",
                (credential.principal, credential.role, credential.sender_id, doc, now),
            )

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
        out = []
        for doc, revoked in rows:
            try:
                out.append((Credential.from_json(json.loads(doc)), revoked is not None))
            except (ValueError, CredentialError) as err:
                log.error("event=credential_unreadable error=%s", err)
        return out

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

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloud-db")
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
