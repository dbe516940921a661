"""The queue's database file as a file, outside any open connection: the schema and a new empty
file, the cheap header check, what an SQLite error means (disk full, corrupt), and moving a
damaged file aside.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from agent.errors import StoreError, StoreFull, no_room
from agent.files import fsync_dir
from agent.store.salvage import Damaged, note_aside, pending, readable_hwm
from agent.store.settings import (
    APPLICATION_ID,
    BUSY_TIMEOUT_SECONDS,
    CODE_KIND,
    KEEP_CORRUPT,
    PAGE_SIZE,
    SCHEMA_VERSION,
)

log = logging.getLogger(__name__)

SQLITE_FULL = 13
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26


def is_full(err: BaseException, directory: Path) -> bool:
    if isinstance(err, OSError):
        return no_room(err)
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


def txn_failed(
    conn: sqlite3.Connection, err: BaseException, directory: Path, path: Path, what: str
) -> StoreError:
    """After ``err`` in a transaction of ``conn``: rolled back (if SQLite has not already), and
    the error to raise, StoreFull when the disk of ``directory`` is full."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
    if is_full(err, directory):
        return StoreFull(f"queue {path}: {what}: the disk is full")
    return StoreError(f"queue {path}: {what} failed: {err}")


@contextlib.contextmanager
def durably(conn: sqlite3.Connection, durability: str) -> Iterator[None]:
    """Commit what runs inside with ``synchronous = FULL`` whatever the queue's durability: for
    a change the endpoint hears of at once (a renumbering, a restamping), which a power cut must
    not take back in a NORMAL queue, or the record would reach the endpoint twice. The WAL's
    fsync at that commit makes the earlier commits durable too."""
    if durability == "full":
        yield
        return
    conn.execute("PRAGMA synchronous = FULL")
    try:
        yield
    finally:
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:  # failed: the level cannot change inside a transaction
                conn.execute("ROLLBACK")
            conn.execute("PRAGMA synchronous = NORMAL")


def is_corrupt(err: BaseException) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def examine_header(path: Path) -> str | None:
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


def _wal_has_frames(path: Path) -> bool:
    return file_size(path.with_name(path.name + "-wal")) > 32  # more than the WAL header


def open_error(path: Path, err: BaseException) -> StoreError:
    """An error at open that says nothing about the file's health (I/O, lock, disk full)."""
    if is_full(err, path.parent):
        return StoreFull(
            f"cannot open the queue {path}: the disk is full; free space on {path.parent}"
        )
    return StoreError(f"cannot open the queue {path}: {err}")


def examine(path: Path) -> str | None:
    """Why the queue file at ``path`` cannot be used as it is (corrupt, not ours), or None (it
    looks sound, or there is none). A newer schema is refused with StoreError, not moved aside."""
    if not path.exists():
        return None
    try:
        reason = examine_header(path)
    except OSError as err:
        raise StoreError(f"cannot read {path}: {err}") from err
    if reason is not None and not (reason.startswith("truncated") and _wal_has_frames(path)):
        return reason
    # A main file shorter than its header says, with a WAL beside it, is what a checkpoint cut
    # short by a full disk or a crash leaves: the WAL still holds those pages and SQLite reads
    # them from it. Not corrupt; the checks below and quick_check (after an unclean stop) judge.
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS)
        try:
            app = conn.execute("PRAGMA application_id").fetchone()[0]
            ver = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        if is_corrupt(err):
            return f"unreadable: {err}"
        raise open_error(path, err) from err
    if app != APPLICATION_ID or not {"records", "kinds", "meta"} <= tables:
        return "not an edge-agent queue"
    if ver != SCHEMA_VERSION:
        raise StoreError(
            f"{path} has queue schema version {ver}, this agent knows "
            f"{SCHEMA_VERSION}; run the matching edge-agent or move the file away"
        )
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


def move_aside(path: Path, wal: Path, reason: str, wall_now: float) -> Damaged:
    """Move a damaged queue file (and its WAL) aside as ``<name>.corrupt-<UTC time>``; returns
    where it went and the highest sequence number still readable from it (for
    :mod:`agent.store.salvage`)."""
    recovered = readable_hwm(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(wall_now))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    try:
        note_aside(path, target)  # until the new queue holds its mark (salvage.adopt)
        os.replace(path, target)
        if wal.exists():
            os.replace(wal, target.with_name(target.name + "-wal"))
        shm = path.with_name(path.name + "-shm")
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()
        fsync_dir(path.parent)
    except OSError as err:
        raise StoreError(f"cannot move corrupt queue {path} aside: {err}") from err
    log.error(
        "event=queue_corrupt path=%s moved_to=%s reason=%r recovered_seq=%s",
        path,
        target,
        reason,
        recovered,
    )
    _prune_corrupt(path)
    return Damaged(target, recovered)


def _prune_corrupt(path: Path) -> None:
    """The oldest copies by name beyond KEEP_CORRUPT deleted; never one whose salvage is not
    done (the one just moved aside may be named by an earlier clock: a boot before it is set)."""
    copies = [
        p
        for p in path.parent.glob(f"{path.name}.corrupt-*")
        if not p.name.endswith(("-wal", "-shm"))
    ]
    keep = pending(path)
    done = sorted(p for p in copies if p.name not in keep)
    for old in done[: max(0, len(copies) - KEEP_CORRUPT)]:
        for p in (old, old.with_name(old.name + "-wal"), old.with_name(old.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                log.warning("event=corrupt_copy_deleted path=%s keep=%d", p, KEEP_CORRUPT)


def create(path: Path) -> None:
    """Build a new empty queue beside ``path`` and rename it into place."""
    tmp = path.with_name(path.name + ".new")
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
            conn.executemany("INSERT INTO kinds VALUES (?, 0, 0, 0)", [(c,) for c in CODE_KIND])
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
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, sqlite3.Error) as err:
        if is_full(err, path.parent):
            raise StoreFull(
                f"cannot create the queue {path}: the disk is full; free space on {path.parent}"
            ) from err
        raise StoreError(f"cannot create the queue {path}: {err}") from err
    log.info("event=queue_created path=%s", path)


IN_CHUNK = 500  # sequence numbers per "IN (...)" statement


def in_chunks(items: Sequence[int], size: int = IN_CHUNK) -> Iterator[Sequence[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def max_opt(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)
