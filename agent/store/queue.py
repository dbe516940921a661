"""The durable store-and-forward queue: every record the agent must deliver, on disk, until acked.

SQLite in WAL mode, one file (``queue.db``) beside a tiny sequence side file (``queue.db.seq``) and
a lock file. All database work runs on one dedicated writer thread (``clock.run_blocking`` on a
single-thread executor); the event loop never blocks on I/O.

Guarantees
- ``put()`` returns the records' sequence numbers once their transaction is committed. With
  ``durability = "full"`` (SQLite ``synchronous=FULL``) a committed record survives SIGKILL and
  power loss; with ``"normal"`` it survives SIGKILL, and a power cut may lose the last commits.
- Group commit: puts, acks and nacks that arrive while a transaction runs join the next one.
- Sequence numbers increase strictly and are never issued twice for this queue, across crashes,
  restarts and a lost or corrupt database (the cloud deduplicates by ``(device, seq)``): see
  :class:`_SeqFile` and docs/store.md.
- ``batch()`` leases records in priority order (lower number = sooner), then by sequence number.
  Leases live in memory only: they expire after ``lease_seconds``, and after a restart every record
  that was leased and not acked is available again. Acked records are deleted in a committed
  transaction and never come back.
- Disk budget (main file + WAL): telemetry is evicted first, then state, then events, oldest first
  within a kind; an alert is evicted only when nothing else is left. Eviction counters per kind are
  exact and persisted in the same transaction as the eviction.
- Disk full (ENOSPC / SQLITE_FULL): no crash. A put that holds anything but alerts fails with
  :class:`~agent.errors.StoreFull`. Alert-only puts first try to make room by evicting the oldest
  telemetry; if that is not possible they wait in a bounded memory ring (``memory_ring`` records,
  oldest dropped and counted when it overflows) and are written when space returns.
- A corrupt database at open (garbage, truncated, not ours, failing ``quick_check`` after an
  unclean shutdown) is moved aside as ``queue.db.corrupt-<UTC time>``, an error is logged with its
  path, and a new queue starts above every sequence number that could have been issued.

Logging policy: debug for routine commits and checkpoints, info for open/close and state changes
(disk full and recovered), warning for evictions of alerts and held acks, error for lost function
(corrupt file moved aside, alerts dropped from the memory ring).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import sqlite3
import struct
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import StoreError, StoreFull
from agent.wire.records import Kind  # what a record is: decides default priority and eviction order
from drivers.base import Options
from drivers.clock import Clock, RealClock

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PRIORITY",
    "Kind",
    "KindStats",
    "NewRecord",
    "Record",
    "Store",
    "StoreSettings",
    "StoreStats",
    "queue_report",
    "read_report",
]

# --- constants (tests may shorten the timing ones) -----------------------------------------------
SCHEMA_VERSION = 1
APPLICATION_ID = 0x45414751  # "EAGQ": marks a file as an edge-agent queue
PAGE_SIZE = 4096
WAL_FRAME_HEADER = 24
SEQ_BLOCK = 100_000  # sequence numbers reserved in the side file per fsync of it
SEQ_EPOCH_SCALE = 1_000_000  # a new sequence epoch starts at the wall clock in microseconds
BUSY_TIMEOUT_SECONDS = 5.0  # how long SQLite waits for a lock held by another connection
RING_RETRY_SECONDS = 1.0  # how often alerts parked in the memory ring retry while the disk is full
KEEP_CORRUPT = 3  # moved-aside corrupt files kept; older ones are deleted
MIN_BUDGET_BYTES = 256 * 1024
DEFAULT_BUDGET_MB = 256.0
DEFAULT_LEASE_SECONDS = 60.0
DEFAULT_MEMORY_RING = 1000
MIN_WAL_BYTES = 64 * 1024
MAX_WAL_BYTES = 4 * 1024 * 1024
RECORD_OVERHEAD = 48  # estimated bytes per row beyond its payload (row header, index entry)
MAX_PRIORITY = 255
_IN_CHUNK = 500  # sequence numbers per "IN (...)" statement

SQLITE_FULL = 13
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26


# Stored as small integers; the eviction rank is the reverse: telemetry goes first.
_KIND_CODE: dict[Kind, int] = {Kind.ALERT: 0, Kind.EVENT: 1, Kind.STATE: 2, Kind.TELEMETRY: 3}
_CODE_KIND: dict[int, Kind] = {v: k for k, v in _KIND_CODE.items()}
_EVICT_ORDER = (3, 2, 1, 0)  # telemetry, state, event, alert
_RANK = {code: i for i, code in enumerate(_EVICT_ORDER)}  # 0 = evicted first

DEFAULT_PRIORITY: Mapping[Kind, int] = {
    Kind.ALERT: 0,
    Kind.EVENT: 10,
    Kind.STATE: 20,
    Kind.TELEMETRY: 30,
}
"""Default priority per kind. Lower numbers are delivered sooner; valid range 0..255."""
_DEFAULT_BY_CODE = {_KIND_CODE[k]: p for k, p in DEFAULT_PRIORITY.items()}


@dataclass(frozen=True)
class NewRecord:
    """A record to enqueue. ``created`` None means ``clock.time()`` at put(); ``priority`` None
    means the kind's default (:data:`DEFAULT_PRIORITY`)."""

    kind: Kind
    payload: bytes
    priority: int | None = None
    created: float | None = None


@dataclass(frozen=True)
class Record:
    """A queued record as ``batch()`` hands it out. ``attempts`` counts earlier deliveries that
    ended in a nack or an expired lease."""

    seq: int
    kind: Kind
    priority: int
    created: float
    payload: bytes
    attempts: int


@dataclass(frozen=True)
class StoreSettings:
    """How the queue is kept. ``from_options`` reads them from the ``[store]`` table."""

    path: Path
    budget_bytes: int = int(DEFAULT_BUDGET_MB * 1024 * 1024)
    durability: str = "full"  # "full" (synchronous=FULL) or "normal" (synchronous=NORMAL)
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    memory_ring: int = DEFAULT_MEMORY_RING  # alert records held in RAM while the disk is full
    # Not in the TOML table: overrides for tests and benches.
    wal_bytes: int | None = None  # WAL size kept (None: budget/8 within 64 KiB..4 MiB)
    hard_limit_bytes: int | None = None  # PRAGMA max_page_count on the main file (None: none)

    def __post_init__(self) -> None:
        if self.durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', not {self.durability!r}")
        if self.budget_bytes < MIN_BUDGET_BYTES:
            raise ValueError(f"budget_bytes must be at least {MIN_BUDGET_BYTES}")
        if self.lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        if self.memory_ring < 0:
            raise ValueError("memory_ring must not be negative")

    @classmethod
    def from_options(cls, opts: Options, data_dir: Path) -> StoreSettings:
        """Validate the ``[store]`` table (errors name the key) and call ``opts.finish()``.

        Keys: ``path`` (default ``queue.db``, relative to ``data_dir``), ``budget_mb`` (256),
        ``durability`` ("full"), ``lease_seconds`` (60), ``memory_ring`` (1000 alerts).
        """
        raw_path = opts.string("path", "queue.db")
        if not raw_path.strip():
            raise opts.error("path", "is empty")
        path = Path(raw_path).expanduser()
        if not path.is_absolute():
            path = Path(data_dir) / path
        budget_mb = opts.number(
            "budget_mb", DEFAULT_BUDGET_MB, minimum=MIN_BUDGET_BYTES / (1024 * 1024)
        )
        durability = opts.choice("durability", "full", ("full", "normal"))
        lease = opts.number("lease_seconds", DEFAULT_LEASE_SECONDS, minimum=1.0, maximum=86400.0)
        ring = opts.integer("memory_ring", DEFAULT_MEMORY_RING, minimum=0, maximum=1_000_000)
        opts.finish()
        return cls(
            path=path,
            budget_bytes=int(budget_mb * 1024 * 1024),
            durability=durability,
            lease_seconds=lease,
            memory_ring=ring,
        )

    @property
    def seq_path(self) -> Path:
        return self.path.with_name(self.path.name + ".seq")

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @property
    def wal_path(self) -> Path:
        return self.path.with_name(self.path.name + "-wal")

    def wal_limit(self) -> int:
        """Bytes of WAL kept between checkpoints (journal_size_limit)."""
        if self.wal_bytes is not None:
            return max(4 * PAGE_SIZE, self.wal_bytes)
        return min(MAX_WAL_BYTES, max(MIN_WAL_BYTES, self.budget_bytes // 8))

    def db_target(self) -> int:
        """Bytes of live pages the main file may hold: the budget minus room for the WAL and one
        transaction beyond it."""
        return max(8 * PAGE_SIZE, self.budget_bytes - 2 * self.wal_limit())


@dataclass(frozen=True)
class KindStats:
    depth: int
    bytes: int  # payload bytes queued
    evicted: int  # records evicted for the budget or the disk, ever (persisted)


@dataclass(frozen=True)
class StoreStats:
    """A snapshot of the queue. Sizes are real file sizes on disk."""

    path: str
    durability: str
    budget_bytes: int
    kinds: Mapping[Kind, KindStats]
    leased: int
    oldest_age: float | None  # seconds since the oldest queued record was created
    last_seq: int  # last committed sequence number (0: none yet)
    db_bytes: int
    wal_bytes: int
    free_pages: int
    ring_depth: int  # alert records waiting in memory for disk space
    ring_dropped: int  # alert records dropped from a full memory ring, ever (persisted)
    rejected_full: Mapping[Kind, int]  # records refused with StoreFull in this process
    disk_full: bool
    commits: int  # write transactions committed by this process (group commit joins puts)

    @property
    def depth(self) -> int:
        return sum(k.depth for k in self.kinds.values())

    @property
    def payload_bytes(self) -> int:
        return sum(k.bytes for k in self.kinds.values())

    @property
    def file_bytes(self) -> int:
        return self.db_bytes + self.wal_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "durability": self.durability,
            "budget_bytes": self.budget_bytes,
            "depth": self.depth,
            "payload_bytes": self.payload_bytes,
            "kinds": {
                str(k): {"depth": v.depth, "bytes": v.bytes, "evicted": v.evicted}
                for k, v in self.kinds.items()
            },
            "leased": self.leased,
            "oldest_age_s": self.oldest_age,
            "last_seq": self.last_seq,
            "db_bytes": self.db_bytes,
            "wal_bytes": self.wal_bytes,
            "file_bytes": self.file_bytes,
            "free_pages": self.free_pages,
            "ring_depth": self.ring_depth,
            "ring_dropped": self.ring_dropped,
            "rejected_full": {str(k): v for k, v in self.rejected_full.items()},
            "disk_full": self.disk_full,
            "commits": self.commits,
        }


# --- the sequence side file ----------------------------------------------------------------------


@dataclass(frozen=True)
class _SeqMark:
    reserved: int  # no sequence number above this has been issued
    mode: str  # durability of the session that wrote it


class _SeqFile:
    """``queue.db.seq``: one line, replaced atomically (write, fsync, rename, fsync dir).

    Every issued sequence number is <= ``reserved``: before a transaction commits a number above
    it, the file is rewritten with ``reserved = hwm + SEQ_BLOCK``. So when the database is lost or
    corrupt, a new one starts above ``reserved`` and never reissues a number. It is also the
    answer to power loss with ``synchronous=NORMAL``: commits may roll back, so a session after a
    NORMAL one starts above ``reserved`` rather than at the database's own high-water mark.
    """

    MAGIC = "edge-agent-seq 1"

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> _SeqMark | None:
        try:
            text = self.path.read_text("ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            log.warning("event=seqfile_unreadable path=%s error=%s", self.path, err)
            return None
        try:
            head, crc = text.rsplit(" crc=", 1)
            if f"{zlib.crc32(head.encode()):08x}" != crc:
                raise ValueError("checksum mismatch")
            magic, rest = head[: len(self.MAGIC)], head[len(self.MAGIC) :].split()
            if magic != self.MAGIC:
                raise ValueError("bad magic")
            fields = dict(item.split("=", 1) for item in rest)
            mark = _SeqMark(reserved=int(fields["reserved"]), mode=fields["mode"])
            if mark.reserved < 0 or mark.mode not in ("full", "normal"):
                raise ValueError("bad values")
            return mark
        except (ValueError, KeyError) as err:
            log.warning("event=seqfile_invalid path=%s error=%s", self.path, err)
            return None

    def write(self, mark: _SeqMark) -> None:
        head = f"{self.MAGIC} reserved={mark.reserved} mode={mark.mode}"
        data = f"{head} crc={zlib.crc32(head.encode()):08x}\n".encode("ascii")
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- helpers -------------------------------------------------------------------------------------


class _Full(Exception):
    """SQLITE_FULL or ENOSPC inside a transaction (already rolled back)."""


class _Corrupt(Exception):
    """The open database turned out corrupt."""


def _is_full(err: BaseException, directory: Path) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    code = getattr(err, "sqlite_errorcode", None)
    if code is None:
        return False
    if code & 0xFF == SQLITE_FULL:
        return True
    if code & 0xFF == SQLITE_IOERR:  # a failed write/truncate/shm map: full if the disk is
        try:
            st = os.statvfs(directory)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < 4 * PAGE_SIZE
    return False


def _is_corrupt(err: BaseException) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)


def _chunks(items: Sequence[int], size: int = _IN_CHUNK) -> Iterable[Sequence[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _examine_header(path: Path) -> str | None:
    """Cheap checks of the main file; returns why it is unusable, or None."""
    size = path.stat().st_size
    if size < 100:
        return f"truncated ({size} bytes)"
    with path.open("rb") as f:
        header = f.read(100)
    if header[:16] != b"SQLite format 3\x00":
        return "not an SQLite database"
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return "bad page size in header"
    if size % page_size:
        return f"truncated ({size} bytes is not a whole number of {page_size}-byte pages)"
    change_counter, pages = struct.unpack(">II", header[24:32])
    valid_for = struct.unpack(">I", header[92:96])[0]
    if change_counter == valid_for and pages * page_size > size:
        return f"truncated ({size} bytes, header says {pages * page_size})"
    return None


_SCHEMA = (
    "CREATE TABLE records ("
    " seq INTEGER PRIMARY KEY,"
    " kind INTEGER NOT NULL,"
    " priority INTEGER NOT NULL,"
    " created REAL NOT NULL,"
    " attempts INTEGER NOT NULL DEFAULT 0,"
    " payload BLOB NOT NULL)",
    "CREATE INDEX records_order ON records(priority, seq)",
    "CREATE TABLE kinds ("
    " kind INTEGER PRIMARY KEY, depth INTEGER NOT NULL, bytes INTEGER NOT NULL,"
    " evicted INTEGER NOT NULL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)


# --- the thread-confined database side -----------------------------------------------------------


@dataclass
class _Delta:
    """What a transaction changes in the in-memory mirror; applied only after COMMIT."""

    depth: list[int]
    bytes: list[int]
    evicted: list[int]
    hwm: int
    removed: set[int] = field(default_factory=set)  # seqs deleted (acked or evicted)
    touched: set[int] = field(default_factory=set)  # kind codes whose rows changed
    ring_dropped: int = 0


@dataclass
class _Outcome:
    """Result of one group transaction, per put op: seqs, an exception, or None (parked)."""

    puts: list[list[int] | BaseException | None]
    acks_held: int = 0
    error: BaseException | None = None  # for acks/nacks when the whole write failed
    full: bool = False


class _Db:
    """The SQLite side. Every method runs on the store's single writer thread."""

    def __init__(self, settings: StoreSettings) -> None:
        self.s = settings
        self.path = settings.path
        self.dir = settings.path.parent
        self.seqfile = _SeqFile(settings.seq_path)
        self.conn: sqlite3.Connection | None = None
        self.lock_fd: int | None = None
        self.hwm = 0
        self.reserved = 0
        self.depth = [0, 0, 0, 0]
        self.bytes = [0, 0, 0, 0]
        self.evicted = [0, 0, 0, 0]
        self.ring_dropped = 0
        self.ring_dirty = False
        self.commits = 0
        self.meta_hwm = 0  # as read at open
        self.clean = False  # the last session closed cleanly (as read at open)
        self.leases: dict[int, float] = {}
        self.pending_acks: set[int] = set()
        self.wal_limit = settings.wal_limit()
        self.target_pages = settings.db_target() // PAGE_SIZE
        self.chunk_bytes = max(PAGE_SIZE, settings.db_target() // 16)
        self.txn_cap_bytes = max(PAGE_SIZE, self.wal_limit // 2)
        # One record never needs more than half a WAL share, so the WAL stays in its share.
        self.max_record_bytes = max(PAGE_SIZE, min(settings.db_target() // 16, self.wal_limit // 2))
        self.keep_free_pages = max(16, self.target_pages // 4)

    # -- open / create / recover -----------------------------------------------------------------

    def open(self, wall_now: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            mark = self.seqfile.read()
            fresh = False
            recovered: int | None = None
            corrupt_reason = self._examine()
            if corrupt_reason is not None:
                recovered = self._move_aside(corrupt_reason, wall_now)
            if not self.path.exists():
                self._create()
                fresh = True
            try:
                self._connect()
                clean = self._load()
                if not clean:
                    self._quick_check()
            except (sqlite3.DatabaseError, _Corrupt) as err:
                if not (isinstance(err, _Corrupt) or _is_corrupt(err)):
                    raise self._open_error(err) from err
                self._close_conn()
                recovered = _max_opt(recovered, self._move_aside(str(err), wall_now))
                self._create()
                fresh = True
                self._connect()
                self._load()
            self._start_sequence(mark, fresh, recovered, wall_now)
        except BaseException:
            self.close_quietly()
            raise

    def _open_error(self, err: BaseException) -> StoreError:
        """An error at open that says nothing about the file's health (I/O, lock, disk full)."""
        if _is_full(err, self.dir):
            return StoreFull(
                f"cannot open the queue {self.path}: the disk is full; free space on {self.dir}"
            )
        return StoreError(f"cannot open the queue {self.path}: {err}")

    def _lock(self) -> None:
        fd = os.open(self.s.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            raise StoreError(
                f"{self.path} is in use by another process (lock {self.s.lock_path}); "
                "stop the other edge-agent or give this one its own [store] path"
            ) from err
        self.lock_fd = fd

    def _examine(self) -> str | None:
        if not self.path.exists():
            return None
        try:
            reason = _examine_header(self.path)
        except OSError as err:
            raise StoreError(f"cannot read {self.path}: {err}") from err
        if reason is None:
            try:
                conn = sqlite3.connect(
                    self.path, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS
                )
                try:
                    app = conn.execute("PRAGMA application_id").fetchone()[0]
                    ver = conn.execute("PRAGMA user_version").fetchone()[0]
                    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
                finally:
                    conn.close()
            except sqlite3.DatabaseError as err:
                if _is_corrupt(err):
                    return f"unreadable: {err}"
                raise self._open_error(err) from err
            if app != APPLICATION_ID or not {"records", "kinds", "meta"} <= tables:
                return "not an edge-agent queue"
            if ver != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has queue schema version {ver}, this agent knows "
                    f"{SCHEMA_VERSION}; run the matching edge-agent or move the file away"
                )
        return reason

    def _recover_hwm(self, path: Path) -> int | None:
        """The highest sequence number readable from a damaged file, if any."""
        best: int | None = None
        try:
            conn = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS
            )
        except sqlite3.Error:
            return None
        try:
            for query in (
                "SELECT value FROM meta WHERE key = 'seq_hwm'",
                "SELECT max(seq) FROM records",
            ):
                try:
                    row = conn.execute(query).fetchone()
                except sqlite3.Error:
                    continue
                if row and isinstance(row[0], int):
                    best = _max_opt(best, row[0])
        finally:
            conn.close()
        return best

    def _move_aside(self, reason: str, wall_now: float) -> int | None:
        recovered = self._recover_hwm(self.path)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(wall_now))
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            os.replace(self.path, target)
            wal = self.s.wal_path
            if wal.exists():
                os.replace(wal, target.with_name(target.name + "-wal"))
            shm = self.path.with_name(self.path.name + "-shm")
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()
            _fsync_dir(self.dir)
        except OSError as err:
            raise StoreError(f"cannot move corrupt queue {self.path} aside: {err}") from err
        log.error(
            "event=queue_corrupt path=%s moved_to=%s reason=%r recovered_seq=%s",
            self.path,
            target,
            reason,
            recovered,
        )
        self._prune_corrupt()
        return recovered

    def _prune_corrupt(self) -> None:
        aside = sorted(
            p for p in self.dir.glob(f"{self.path.name}.corrupt-*") if not p.name.endswith("-wal")
        )
        for old in aside[:-KEEP_CORRUPT] if KEEP_CORRUPT else aside:
            for p in (old, old.with_name(old.name + "-wal")):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    log.warning("event=corrupt_copy_deleted path=%s keep=%d", p, KEEP_CORRUPT)

    def _create(self) -> None:
        """Build a new empty queue beside the target and rename it into place."""
        tmp = self.path.with_name(self.path.name + ".new")
        for p in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        try:
            conn = sqlite3.connect(tmp, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS)
            try:
                conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("BEGIN IMMEDIATE")
                for stmt in _SCHEMA:
                    conn.execute(stmt)
                conn.executemany(
                    "INSERT INTO kinds VALUES (?, 0, 0, 0)", [(c,) for c in _CODE_KIND]
                )
                conn.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("seq_hwm", 0), ("clean", 1), ("ring_dropped", 0)],
                )
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
            os.replace(tmp, self.path)
            _fsync_dir(self.dir)
        except (OSError, sqlite3.Error) as err:
            if _is_full(err, self.dir):
                raise StoreFull(
                    f"cannot create the queue {self.path}: the disk is full; free space on "
                    f"{self.dir}"
                ) from err
            raise StoreError(f"cannot create the queue {self.path}: {err}") from err
        log.info("event=queue_created path=%s", self.path)

    def _connect(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS)
        self.conn = conn
        conn.execute("PRAGMA journal_mode = WAL")
        sync = "FULL" if self.s.durability == "full" else "NORMAL"
        conn.execute(f"PRAGMA synchronous = {sync}")
        conn.execute(f"PRAGMA journal_size_limit = {self.wal_limit}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {self.wal_limit // (PAGE_SIZE + 24)}")
        if self.s.hard_limit_bytes is not None:
            conn.execute(f"PRAGMA max_page_count = {self.s.hard_limit_bytes // PAGE_SIZE}")

    def _load(self) -> bool:
        conn = self._c()
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        for code, depth, nbytes, evicted in conn.execute("SELECT * FROM kinds"):
            if code in _CODE_KIND:
                self.depth[code], self.bytes[code], self.evicted[code] = depth, nbytes, evicted
        self.meta_hwm = int(meta.get("seq_hwm", 0))
        self.hwm = max(self.meta_hwm, self._max_seq())
        self.ring_dropped = int(meta.get("ring_dropped", 0))
        self.clean = bool(meta.get("clean", 0))
        return self.clean

    def _max_seq(self) -> int:
        row = self._c().execute("SELECT max(seq) FROM records").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _quick_check(self) -> None:
        rows = self._c().execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            raise _Corrupt(f"quick_check: {'; '.join(str(r[0]) for r in rows[:3])}")
        # The per-kind mirror is written in the same transactions as the rows, so it agrees with
        # them; if it ever does not, the rows are the truth.
        conn = self._c()
        actual = {
            code: (n, b)
            for code, n, b in conn.execute(
                "SELECT kind, count(*), coalesce(sum(length(payload)), 0) FROM records "
                "GROUP BY kind"
            )
        }
        for code in _CODE_KIND:
            depth, nbytes = actual.get(code, (0, 0))
            if (depth, nbytes) != (self.depth[code], self.bytes[code]):
                log.warning(
                    "event=kind_counts_repaired kind=%s depth=%d was=%d",
                    _CODE_KIND[code],
                    depth,
                    self.depth[code],
                )
                conn.execute(
                    "UPDATE kinds SET depth = ?, bytes = ? WHERE kind = ?", (depth, nbytes, code)
                )
                self.depth[code], self.bytes[code] = depth, nbytes

    def _start_sequence(
        self, mark: _SeqMark | None, fresh: bool, recovered: int | None, wall_now: float
    ) -> None:
        base = self.hwm
        why = "database"
        if mark is None:
            # No side file: nothing proves which numbers were issued (first start, lost data
            # directory, or an old NORMAL session that lost commits): start a time-based epoch.
            floor = int(wall_now * SEQ_EPOCH_SCALE)
            if floor > base:
                base, why = floor, "time epoch"
            if not fresh:
                log.warning("event=seqfile_missing path=%s start_seq=%d", self.seqfile.path, base)
        elif (fresh or mark.mode == "normal") and mark.reserved > base:
            base, why = mark.reserved, "side file"
        if recovered is not None and recovered > base:
            base, why = recovered, "recovered"
        # Write only what changed (fewer fsyncs at every boot): the side file when its
        # reservation is used up or the durability mode changed, the database when the mark or
        # the clean flag did.
        keep = mark is not None and mark.mode == self.s.durability and mark.reserved > base
        reserved = mark.reserved if keep and mark is not None else base + SEQ_BLOCK
        conn = self._c()
        try:
            if not keep:
                self.seqfile.write(_SeqMark(reserved, self.s.durability))
            if base != self.meta_hwm or self.clean:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("UPDATE meta SET value = ? WHERE key = 'seq_hwm'", (base,))
                conn.execute("UPDATE meta SET value = 0 WHERE key = 'clean'")
                conn.execute("COMMIT")
        except (OSError, sqlite3.Error) as err:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if _is_full(err, self.dir):
                raise StoreFull(
                    f"cannot open the queue {self.path}: the disk is full; free space on {self.dir}"
                ) from err
            raise StoreError(f"cannot open the queue {self.path}: {err}") from err
        self.hwm = self.meta_hwm = base
        self.reserved = reserved
        self.clean = False
        log.info(
            "event=queue_open path=%s durability=%s budget=%d depth=%d next_seq=%d from=%s",
            self.path,
            self.s.durability,
            self.s.budget_bytes,
            sum(self.depth),
            base + 1,
            why,
        )

    def _c(self) -> sqlite3.Connection:
        if self.conn is None:
            raise StoreError(f"the queue {self.path} is closed")
        return self.conn

    def _close_conn(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
            self.conn = None

    def close(self) -> None:
        conn = self.conn
        if conn is not None:
            try:
                if self.pending_acks:
                    self._txn([], set(self.pending_acks), set())
                    self.pending_acks.clear()
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                conn.execute("UPDATE meta SET value = 1 WHERE key = 'clean'")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except (sqlite3.Error, _Full, OSError) as err:
                log.warning("event=close_checkpoint_failed path=%s error=%s", self.path, err)
        self.close_quietly()

    def close_quietly(self) -> None:
        self._close_conn()
        if self.lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)
            self.lock_fd = None

    def _recover_runtime(self, err: BaseException, wall_now: float) -> None:
        """The open database went corrupt: move it aside and go on with a new one."""
        self._close_conn()
        self._move_aside(f"runtime: {err}", wall_now)
        self._create()
        self._connect()
        lost = sum(self.depth)
        hwm = max(self.hwm, self.reserved)
        evicted, ring_dropped = list(self.evicted), self.ring_dropped
        self.leases.clear()
        self.pending_acks.clear()
        self._load()
        self.evicted, self.ring_dropped = evicted, ring_dropped
        self._start_sequence(_SeqMark(hwm, self.s.durability), True, None, wall_now)
        self._write_counters()
        log.error("event=queue_recreated path=%s records_lost=%d", self.path, lost)

    def _write_counters(self) -> None:
        conn = self._c()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE kinds SET evicted = ? WHERE kind = ?",
            [(self.evicted[c], c) for c in _CODE_KIND],
        )
        conn.execute("UPDATE meta SET value = ? WHERE key = 'ring_dropped'", (self.ring_dropped,))
        conn.execute("COMMIT")

    # -- writes ----------------------------------------------------------------------------------

    def apply(
        self,
        puts: list[list[tuple[int, int, float, bytes]]],
        alert_only: list[bool],
        acks: set[int],
        nacks: set[int],
        ring_dropped: int,
        wall_now: float,
    ) -> _Outcome:
        """One group commit: acks, nacks and all puts in one transaction when possible."""
        acks = acks | self.pending_acks
        for attempt in range(2):
            try:
                return self._apply(puts, alert_only, acks, nacks, ring_dropped)
            except (sqlite3.DatabaseError, _Corrupt) as err:
                if attempt == 0 and (_is_corrupt(err) or isinstance(err, _Corrupt)):
                    self._recover_runtime(err, wall_now)
                    acks, nacks = set(), set()
                    continue
                wrapped = StoreError(f"queue {self.path}: write failed: {err}")
                wrapped.__cause__ = err
                log.error("event=write_failed path=%s error=%s", self.path, err)
                return _Outcome(puts=[wrapped] * len(puts), error=wrapped)
            except OSError as err:
                wrapped = StoreError(f"queue {self.path}: write failed: {err}")
                wrapped.__cause__ = err
                log.error("event=write_failed path=%s error=%s", self.path, err)
                return _Outcome(puts=[wrapped] * len(puts), error=wrapped)
        raise AssertionError("unreachable")

    def _apply(
        self,
        puts: list[list[tuple[int, int, float, bytes]]],
        alert_only: list[bool],
        acks: set[int],
        nacks: set[int],
        ring_dropped: int,
    ) -> _Outcome:
        try:
            seqs = self._txn(puts, acks, nacks, ring_dropped=ring_dropped)
            self.pending_acks.clear()
            return _Outcome(puts=list(seqs))
        except _Full:
            pass
        # The disk is full. Non-alert puts fail; alert-only puts try to make room by evicting
        # telemetry; acks that cannot be written are held in memory and retried.
        results: list[list[int] | BaseException | None] = [
            None if alert_only[i] else StoreFull(self._full_message(len(p)))
            for i, p in enumerate(puts)
        ]
        alert_idx = [i for i, only in enumerate(alert_only) if only]
        if alert_idx:
            try:
                seqs = self._txn(
                    [puts[i] for i in alert_idx],
                    acks,
                    nacks,
                    emergency=True,
                    ring_dropped=ring_dropped,
                )
                for i, s in zip(alert_idx, seqs, strict=True):
                    results[i] = s
                self.pending_acks.clear()
                return _Outcome(puts=results, full=True)
            except _Full:
                pass
        held = 0
        if acks or nacks or ring_dropped:
            try:
                self._txn([], acks, nacks, ring_dropped=ring_dropped)
                self.pending_acks.clear()
                ring_dropped = 0
            except _Full:
                self.pending_acks = set(acks)
                held = len(acks)
                for seq in nacks:
                    self.leases.pop(seq, None)
        if ring_dropped:
            self.ring_dropped += ring_dropped  # persisted with the next successful transaction
            self.ring_dirty = True
        return _Outcome(puts=results, acks_held=held, full=True)

    def _full_message(self, n: int) -> str:
        return (
            f"queue {self.path}: the disk is full; {n} record(s) not stored. Free space on "
            f"{self.dir} (alerts wait in memory meanwhile)"
        )

    def _txn(
        self,
        puts: list[list[tuple[int, int, float, bytes]]],
        acks: set[int],
        nacks: set[int],
        *,
        emergency: bool = False,
        ring_dropped: int = 0,
    ) -> list[list[int]]:
        conn = self._c()
        d = _Delta(list(self.depth), list(self.bytes), list(self.evicted), self.hwm)
        d.ring_dropped = ring_dropped
        out: list[list[int]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            if acks:
                self._delete(sorted(acks), d)
            if nacks:
                for chunk in _chunks(sorted(nacks)):
                    marks = ",".join("?" * len(chunk))
                    conn.execute(
                        f"UPDATE records SET attempts = attempts + 1 WHERE seq IN ({marks})", chunk
                    )
            for recs in puts:
                out.append(self._insert(recs, d, emergency))
            if puts:
                self._make_room(0, d, max_rank=3)
            if acks or puts:
                self._shrink()
            if d.touched:
                conn.executemany(
                    "UPDATE kinds SET depth = ?, bytes = ?, evicted = ? WHERE kind = ?",
                    [(d.depth[c], d.bytes[c], d.evicted[c], c) for c in sorted(d.touched)],
                )
            if d.hwm != self.hwm:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'seq_hwm'", (d.hwm,))
                if d.hwm > self.reserved:
                    self.seqfile.write(_SeqMark(d.hwm + SEQ_BLOCK, self.s.durability))
                    self.reserved = d.hwm + SEQ_BLOCK
            if d.ring_dropped or self.ring_dirty:
                conn.execute(
                    "UPDATE meta SET value = ? WHERE key = 'ring_dropped'",
                    (self.ring_dropped + d.ring_dropped,),
                )
            conn.execute("COMMIT")
        except BaseException as err:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if isinstance(err, sqlite3.Error | OSError) and _is_full(err, self.dir):
                raise _Full(str(err)) from err
            raise
        self.depth, self.bytes, self.evicted, self.hwm = d.depth, d.bytes, d.evicted, d.hwm
        self.ring_dropped += d.ring_dropped
        self.commits += 1
        for seq in d.removed:
            self.leases.pop(seq, None)
        for seq in nacks:
            self.leases.pop(seq, None)
        self.ring_dirty = False
        return out

    def _delete(self, seqs: Sequence[int], d: _Delta) -> None:
        conn = self._c()
        for chunk in _chunks(seqs):
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"DELETE FROM records WHERE seq IN ({marks}) RETURNING seq, kind, length(payload)",
                chunk,
            ).fetchall()
            for seq, code, size in rows:
                d.depth[code] -= 1
                d.bytes[code] -= size
                d.touched.add(code)
                d.removed.add(seq)
            d.removed.update(chunk)

    def _page_ratio(self, d: _Delta) -> float:
        """Bytes of pages used per payload byte, as observed (1.5 for an empty queue)."""
        payload = sum(d.bytes)
        if payload < 64 * 1024:
            return 1.5
        return self._used_pages() * PAGE_SIZE / payload

    def _used_pages(self) -> int:
        conn = self._c()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages) - int(free)

    def _evict(self, code: int, n: int, d: _Delta) -> int:
        rows = (
            self._c()
            .execute(
                "DELETE FROM records WHERE seq IN "
                "(SELECT seq FROM records WHERE kind = ? ORDER BY seq LIMIT ?) "
                "RETURNING seq, length(payload)",
                (code, n),
            )
            .fetchall()
        )
        for seq, size in rows:
            d.bytes[code] -= size
            d.removed.add(seq)
        d.depth[code] -= len(rows)
        d.evicted[code] += len(rows)
        d.touched.add(code)
        return len(rows)

    def _make_room(self, incoming: int, d: _Delta, *, max_rank: int) -> None:
        """Evict (lowest kind first, oldest first) until live pages + incoming fit the target.
        Only kinds of eviction rank <= ``max_rank`` are candidates."""
        target = self.target_pages * PAGE_SIZE
        for _ in range(10_000):
            used = self._used_pages() * PAGE_SIZE
            over = used + incoming - target
            if over <= 0:
                return
            total = sum(d.depth)
            victim = next(
                (c for c in _EVICT_ORDER if d.depth[c] > 0 and _RANK[c] <= max_rank), None
            )
            if victim is None or total == 0:
                return
            per_record = max(1.0, used / total)
            n = self._evict(victim, max(1, math.ceil(over / per_record)), d)
            if victim == 0:
                log.warning("event=alerts_evicted count=%d reason=budget", n)

    def _insert(
        self, recs: list[tuple[int, int, float, bytes]], d: _Delta, emergency: bool
    ) -> list[int]:
        """Insert in chunks of at most ``chunk_bytes``, making room before each chunk so the
        file does not grow past its target while evicted pages are there to be reused."""
        conn = self._c()
        sizes = [len(r[3]) for r in recs]
        first_seq = d.hwm + 1
        i = 0
        while i < len(recs):
            j, payload = i + 1, sizes[i]
            while j < len(recs) and payload + RECORD_OVERHEAD * (j - i) < self.chunk_bytes:
                payload += sizes[j]
                j += 1
            chunk = recs[i:j] if i or j < len(recs) else recs
            codes = {r[0] for r in chunk}
            need = max(payload + RECORD_OVERHEAD * len(chunk), int(self._page_ratio(d) * payload))
            if emergency:
                # Disk full: make room for alerts by evicting the oldest telemetry.
                if d.depth[3]:
                    per = max(1.0, self._used_pages() * PAGE_SIZE / max(1, sum(d.depth)))
                    self._evict(3, max(1, math.ceil(2 * need / per)), d)
            else:
                self._make_room(need, d, max_rank=min(_RANK[c] for c in codes))
            base = d.hwm
            conn.executemany(
                "INSERT INTO records (seq, kind, priority, created, payload) "
                "VALUES (?, ?, ?, ?, ?)",
                [(base + k, *row) for k, row in enumerate(chunk, 1)],
            )
            d.hwm = base + len(chunk)
            d.touched |= codes
            if len(codes) == 1:
                (code,) = codes
                d.depth[code] += len(chunk)
                d.bytes[code] += payload
            else:
                for row in chunk:
                    d.depth[row[0]] += 1
                    d.bytes[row[0]] += len(row[3])
            i = j
        return list(range(first_seq, d.hwm + 1))

    def _shrink(self) -> None:
        """Truncate free pages: those beyond the target size of the main file, and, after a
        drain, all but a few when many piled up. At most half a WAL's worth per transaction."""
        conn = self._c()
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        if free == 0:
            return
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        n = pages - self.target_pages
        if free > self.keep_free_pages:
            n = max(n, free - self.keep_free_pages // 2)
        n = min(n, free, self.wal_limit // PAGE_SIZE // 2)
        # Python's sqlite3 steps a statement without result columns once, and each step of
        # incremental_vacuum frees one page: run it once per page.
        for _ in range(n):
            conn.execute("PRAGMA incremental_vacuum(1)")

    # -- reads -----------------------------------------------------------------------------------

    def read(self, fn: Any, *args: Any) -> Any:
        """Run a read; a corrupt database is replaced (once), other errors become StoreError."""
        for attempt in range(2):
            try:
                return fn(*args)
            except sqlite3.DatabaseError as err:
                if attempt == 0 and _is_corrupt(err):
                    self._recover_runtime(err, time.time())
                    continue
                raise StoreError(f"queue {self.path}: read failed: {err}") from err
        raise AssertionError("unreachable")

    def batch(self, max_records: int, max_bytes: int, now: float) -> list[Record]:
        expired = [seq for seq, until in self.leases.items() if until <= now]
        if expired:
            try:
                self._txn([], set(), set(expired))
            except (_Full, sqlite3.Error, OSError) as err:
                log.warning("event=lease_expiry_not_counted count=%d error=%s", len(expired), err)
            for seq in expired:
                self.leases.pop(seq, None)
            log.debug("event=leases_expired count=%d", len(expired))
        out: list[Record] = []
        size = 0
        skip = self.leases.keys() | self.pending_acks if self.pending_acks else self.leases
        cur = self._c().execute(
            "SELECT seq, kind, priority, created, attempts, payload FROM records "
            "ORDER BY priority, seq"
        )
        try:
            done = False
            while not done:
                rows = cur.fetchmany(256)
                if not rows:
                    break
                for seq, code, pri, created, attempts, payload in rows:
                    if seq in skip:
                        continue
                    if out and size + len(payload) > max_bytes:
                        done = True
                        break
                    out.append(Record(seq, _CODE_KIND[code], pri, created, payload, attempts))
                    size += len(payload)
                    if len(out) >= max_records:
                        done = True
                        break
        finally:
            cur.close()
        until = now + self.s.lease_seconds
        for rec in out:
            self.leases[rec.seq] = until
        return out

    def stats(self, wall_now: float) -> dict[str, Any]:
        conn = self._c()
        row = conn.execute("SELECT created FROM records ORDER BY seq LIMIT 1").fetchone()
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        return {
            "depth": list(self.depth),
            "bytes": list(self.bytes),
            "evicted": list(self.evicted),
            "leased": len(self.leases),
            "oldest_age": None if row is None else max(0.0, wall_now - row[0]),
            "last_seq": self.hwm,
            "db_bytes": _file_size(self.path),
            "wal_bytes": _file_size(self.s.wal_path),
            "free_pages": free,
            "ring_dropped": self.ring_dropped,
            "commits": self.commits,
        }


def _max_opt(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


# --- the asyncio side ----------------------------------------------------------------------------


@dataclass
class _PutOp:
    rows: list[tuple[int, int, float, bytes]]
    alert_only: bool
    future: asyncio.Future[list[int]]
    nbytes: int
    parked: bool = False  # counted in the memory ring (also while a retry is in flight)


@dataclass
class _AckOp:
    seqs: set[int]
    nack: bool
    future: asyncio.Future[None]


class Store:
    """The durable queue. Build it with :meth:`open`; close it with :meth:`close`."""

    def __init__(self, settings: StoreSettings, clock: Clock) -> None:
        self.settings = settings
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._db = _Db(settings)
        self._pending: list[_PutOp | _AckOp] = []
        self._ring: collections.deque[_PutOp] = collections.deque()
        self._ring_records = 0
        self._ring_dropped_unwritten = 0
        self._writer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._disk_full = False
        self._rejected = [0, 0, 0, 0]

    @classmethod
    async def open(cls, settings: StoreSettings, *, clock: Clock | None = None) -> Store:
        """Open (or create, or recover) the queue at ``settings.path``."""
        clock = clock or RealClock()
        store = cls(settings, clock)
        try:
            await clock.run_blocking(store._executor, store._db.open, clock.time())
        except BaseException:
            store._executor.shutdown(wait=False)
            raise
        return store

    # -- writes ----------------------------------------------------------------------------------

    async def put(self, records: Sequence[NewRecord]) -> list[int]:
        """Enqueue ``records``; returns their sequence numbers once committed.

        Raises StoreFull when the disk is full (alert-only puts wait in the memory ring instead,
        and raise StoreFull only if they are dropped from it), StoreError on other failures.
        """
        self._check_open()
        if not records:
            return []
        now = self._clock.time()
        rows = [self._row(rec, now) for rec in records]
        nbytes = sum(len(row[3]) for row in rows)
        loop = asyncio.get_running_loop()
        op = _PutOp(rows, all(row[0] == 0 for row in rows), loop.create_future(), nbytes)
        self._pending.append(op)
        self._kick()
        return await op.future

    def _row(self, rec: NewRecord, now: float) -> tuple[int, int, float, bytes]:
        """Validate one record (the hot path of put: plain lookups, no enum calls)."""
        if type(rec) is not NewRecord and not isinstance(rec, NewRecord):
            raise TypeError(f"expected NewRecord, got {type(rec).__name__}")
        code = _KIND_CODE.get(rec.kind)  # type: ignore[call-overload]
        if code is None:
            raise ValueError(f"unknown kind {rec.kind!r}; one of {', '.join(Kind)}")
        payload = rec.payload
        if type(payload) is not bytes:
            if isinstance(payload, bytes | bytearray | memoryview):
                payload = bytes(payload)
            else:
                raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        if len(payload) > self._db.max_record_bytes:
            raise StoreFull(
                f"a {_CODE_KIND[code]} record of {len(payload)} bytes exceeds the largest record "
                f"this queue takes ({self._db.max_record_bytes} bytes for its budget); split it"
            )
        pri = rec.priority
        if pri is None:
            pri = _DEFAULT_BY_CODE[code]
        elif type(pri) is not int or not 0 <= pri <= MAX_PRIORITY:
            raise ValueError(f"priority must be an integer 0..{MAX_PRIORITY}, got {pri!r}")
        created = now if rec.created is None else float(rec.created)
        return (code, pri, created, payload)

    async def ack(self, seqs: Iterable[int]) -> None:
        """Delivered: delete them (committed when this returns; they never come back)."""
        await self._ack_op(seqs, nack=False)

    async def nack(self, seqs: Iterable[int]) -> None:
        """Not delivered: release the leases now and count an attempt."""
        await self._ack_op(seqs, nack=True)

    async def _ack_op(self, seqs: Iterable[int], *, nack: bool) -> None:
        self._check_open()
        wanted = {int(s) for s in seqs}
        if not wanted:
            return
        op = _AckOp(wanted, nack, asyncio.get_running_loop().create_future())
        self._pending.append(op)
        self._kick()
        await op.future

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the queue {self.settings.path} is closed")

    def _kick(self) -> None:
        self._wake.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(), name="store-writer"
            )

    async def _write_loop(self) -> None:
        while True:
            if not self._pending:
                if not self._ring or self._closed:
                    return
                # Alerts wait for disk space: retry now and then, or when new work arrives.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RING_RETRY_SECONDS):
                        await self._wake.wait()
            await self._write_once()
            if self._closed and not self._pending:
                return

    async def _write_once(self) -> None:
        ops = self._take_group()
        if not ops:
            return
        puts = [op for op in ops if isinstance(op, _PutOp)]
        acks = [op for op in ops if isinstance(op, _AckOp) and not op.nack]
        nacks = [op for op in ops if isinstance(op, _AckOp) and op.nack]
        ack_seqs: set[int] = set().union(*(op.seqs for op in acks)) if acks else set()
        nack_seqs: set[int] = set().union(*(op.seqs for op in nacks)) if nacks else set()
        nack_seqs -= ack_seqs
        dropped, self._ring_dropped_unwritten = self._ring_dropped_unwritten, 0
        try:
            outcome = await self._clock.run_blocking(
                self._executor,
                self._db.apply,
                [op.rows for op in puts],
                [op.alert_only for op in puts],
                ack_seqs,
                nack_seqs,
                dropped,
                self._clock.time(),
            )
        except BaseException as err:  # the thread itself failed: fail everything in the group
            error = err if isinstance(err, StoreError) else StoreError(f"queue write: {err}")
            for op in ops:
                if isinstance(op, _PutOp):
                    self._unpark(op)
                if not op.future.done():
                    op.future.set_exception(error)
            if not isinstance(err, Exception):
                raise
            return
        if outcome.full != self._disk_full:
            self._disk_full = outcome.full
            if outcome.full:
                log.warning("event=disk_full path=%s", self.settings.path)
            else:
                log.info("event=disk_space_back path=%s", self.settings.path)
        waiting: list[_PutOp] = []
        for op, res in zip(puts, outcome.puts, strict=True):
            if res is None:
                waiting.append(op)
                continue
            self._unpark(op)
            if isinstance(res, BaseException):
                if isinstance(res, StoreFull):
                    for code, *_ in op.rows:
                        self._rejected[code] += 1
                if not op.future.done():
                    op.future.set_exception(res)
            elif not op.future.done():
                op.future.set_result(res)
        if waiting:
            self._park(waiting)
        if outcome.acks_held:
            log.warning(
                "event=acks_held count=%d reason=disk_full "
                "note=they stay out of batches and are written when space returns",
                outcome.acks_held,
            )
        for op in acks + nacks:
            if op.future.done():
                continue
            if outcome.error is not None:
                op.future.set_exception(outcome.error)
            else:
                op.future.set_result(None)

    def _take_group(self) -> list[_PutOp | _AckOp]:
        """Ring first (oldest alerts), then pending work, up to one transaction's worth."""
        group: list[_PutOp | _AckOp] = []
        nbytes = 0
        cap = self._db.txn_cap_bytes
        while self._ring and (not group or nbytes + self._ring[0].nbytes <= cap):
            op = self._ring.popleft()  # stays counted in _ring_records while in flight
            group.append(op)
            nbytes += op.nbytes
        while self._pending:
            op2 = self._pending[0]
            size = op2.nbytes if isinstance(op2, _PutOp) else 0
            if group and nbytes + size > cap:
                break
            group.append(self._pending.pop(0))
            nbytes += size
        return group

    def _unpark(self, op: _PutOp) -> None:
        if op.parked:
            op.parked = False
            self._ring_records -= len(op.rows)

    def _park(self, ops: list[_PutOp]) -> None:
        """Keep alert-only puts that found the disk full, oldest first, ahead of any that are
        still in the ring (the group took its ring ops from the front)."""
        limit = self.settings.memory_ring
        for op in ops:
            if not op.parked:
                op.parked = True
                self._ring_records += len(op.rows)
        self._ring.extendleft(reversed(ops))
        while self._ring_records > limit and self._ring:
            old = self._ring.popleft()
            self._unpark(old)
            self._ring_dropped_unwritten += len(old.rows)
            log.error(
                "event=alerts_dropped count=%d reason=memory_ring_full ring=%d path=%s",
                len(old.rows),
                limit,
                self.settings.path,
            )
            if not old.future.done():
                old.future.set_exception(
                    StoreFull(
                        f"queue {self.settings.path}: the disk is full and the memory ring "
                        f"({limit} alerts) overflowed; {len(old.rows)} alert(s) dropped"
                    )
                )
        if self._ring:
            log.debug("event=alerts_parked ring=%d", self._ring_records)

    # -- reads -----------------------------------------------------------------------------------

    async def batch(self, max_records: int, max_bytes: int) -> list[Record]:
        """Lease up to ``max_records`` records (at least one if any, even when it alone exceeds
        ``max_bytes``) in priority order, then by sequence number."""
        self._check_open()
        if max_records <= 0:
            return []
        return await self._clock.run_blocking(
            self._executor,
            self._db.read,
            self._db.batch,
            max_records,
            max_bytes,
            self._clock.monotonic(),
        )

    async def stats(self) -> StoreStats:
        self._check_open()
        raw = await self._clock.run_blocking(
            self._executor, self._db.read, self._db.stats, self._clock.time()
        )
        return StoreStats(
            path=str(self.settings.path),
            durability=self.settings.durability,
            budget_bytes=self.settings.budget_bytes,
            kinds={
                kind: KindStats(raw["depth"][c], raw["bytes"][c], raw["evicted"][c])
                for kind, c in _KIND_CODE.items()
            },
            leased=raw["leased"],
            oldest_age=raw["oldest_age"],
            last_seq=raw["last_seq"],
            db_bytes=raw["db_bytes"],
            wal_bytes=raw["wal_bytes"],
            free_pages=raw["free_pages"],
            ring_depth=self._ring_records,
            ring_dropped=raw["ring_dropped"] + self._ring_dropped_unwritten,
            rejected_full={kind: self._rejected[c] for kind, c in _KIND_CODE.items()},
            disk_full=self._disk_full,
            commits=raw["commits"],
        )

    async def close(self) -> None:
        """Write pending puts (one last try for alerts in the ring), checkpoint, close."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        writer = self._writer
        if writer is not None:
            await writer
        if self._pending:
            await self._write_once()
        lost = 0
        while self._ring:
            op = self._ring.popleft()
            self._unpark(op)
            lost += len(op.rows)
            if not op.future.done():
                op.future.set_exception(
                    StoreFull(f"queue {self.settings.path} closed while the disk was full")
                )
        if lost:
            log.error(
                "event=alerts_lost count=%d reason=closed_while_disk_full path=%s",
                lost,
                self.settings.path,
            )
        try:
            await self._clock.run_blocking(self._executor, self._db.close)
        finally:
            self._executor.shutdown(wait=False)
        log.info("event=queue_closed path=%s", self.settings.path)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --- `edge-agent queue` --------------------------------------------------------------------------


def _connect_readonly(path: Path, wal: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(
        f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS
    )
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        if wal.exists() and wal.stat().st_size:
            raise
    # No WAL with content, so no writer: read the file as it is without creating -wal/-shm
    # (which a user without write access to the directory cannot).
    return sqlite3.connect(
        f"file:{path}?mode=ro&immutable=1",
        uri=True,
        isolation_level=None,
        timeout=BUSY_TIMEOUT_SECONDS,
    )


def read_report(settings: StoreSettings, wall_now: float | None = None) -> dict[str, Any]:
    """What ``edge-agent queue`` shows, read without taking the queue's lock (the agent may be
    running): depth and payload bytes by kind, eviction counters, the oldest record's age, file
    sizes. Raises StoreError when the file is missing or unreadable."""
    path = settings.path
    wall_now = time.time() if wall_now is None else wall_now
    if not path.exists():
        raise StoreError(f"no queue at {path} (the agent has not run with this config yet)")
    reason = _examine_header(path)
    if reason is not None:
        raise StoreError(
            f"the queue {path} is damaged: {reason}; the agent moves it aside at start"
        )
    try:
        conn = _connect_readonly(path, settings.wal_path)
        try:
            conn.execute("BEGIN")
            kinds = {
                _CODE_KIND[c]: {"depth": n, "bytes": b, "evicted": e}
                for c, n, b, e in conn.execute("SELECT kind, depth, bytes, evicted FROM kinds")
                if c in _CODE_KIND
            }
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            oldest = conn.execute(
                "SELECT seq, created FROM records ORDER BY seq LIMIT 1"
            ).fetchone()
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            conn.execute("COMMIT")
        finally:
            conn.close()
    except sqlite3.Error as err:
        raise StoreError(f"cannot read the queue {path}: {err}") from err
    db_bytes, wal_bytes = _file_size(path), _file_size(settings.wal_path)
    return {
        "path": str(path),
        "budget_bytes": settings.budget_bytes,
        "durability": settings.durability,
        "kinds": {str(k): kinds.get(k, {"depth": 0, "bytes": 0, "evicted": 0}) for k in Kind},
        "depth": sum(v["depth"] for v in kinds.values()),
        "payload_bytes": sum(v["bytes"] for v in kinds.values()),
        "oldest_seq": None if oldest is None else oldest[0],
        "oldest_age_s": None if oldest is None else max(0.0, wall_now - oldest[1]),
        "last_seq": int(meta.get("seq_hwm", 0)),
        "ring_dropped": int(meta.get("ring_dropped", 0)),
        "db_bytes": db_bytes,
        "wal_bytes": wal_bytes,
        "file_bytes": db_bytes + wal_bytes,
        "free_bytes_in_file": free * page_size,
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{seconds:.0f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def format_report(report: Mapping[str, Any]) -> str:
    """The human form of :func:`read_report`."""
    lines = [
        f"queue {report['path']} (durability {report['durability']})",
        f"file {_size(report['file_bytes'])} (db {_size(report['db_bytes'])} + wal "
        f"{_size(report['wal_bytes'])}) of budget {_size(report['budget_bytes'])}, "
        f"{_size(report['free_bytes_in_file'])} free inside",
        f"{'kind':<10} {'depth':>10} {'bytes':>12} {'evicted':>10}",
    ]
    for kind in Kind:
        k = report["kinds"][str(kind)]
        lines.append(f"{kind!s:<10} {k['depth']:>10} {k['bytes']:>12} {k['evicted']:>10}")
    lines.append(f"{'total':<10} {report['depth']:>10} {report['payload_bytes']:>12}")
    if report["oldest_seq"] is None:
        lines.append("oldest record: none (queue empty)")
    else:
        lines.append(
            f"oldest record: seq {report['oldest_seq']}, {_age(report['oldest_age_s'])} old"
        )
    lines.append(f"last seq: {report['last_seq']}")
    if report["ring_dropped"]:
        lines.append(
            f"alerts dropped from the memory ring while the disk was full: {report['ring_dropped']}"
        )
    return "\n".join(lines)


async def queue_report(
    settings: StoreSettings, *, as_json: bool = False, clock: Clock | None = None
) -> str:
    """The text of ``edge-agent queue --config FILE`` (``--json``: one JSON object)."""
    clock = clock or RealClock()
    report = await clock.run_blocking(None, read_report, settings, clock.time())
    return json.dumps(report, sort_keys=True) if as_json else format_report(report)
