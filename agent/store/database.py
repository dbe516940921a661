"""The SQLite side of the queue: one connection on the store's writer thread that opens (or
recovers) the file, starts the sequence, runs group-commit transactions with eviction to the disk
budget, and serves leases and statistics.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.errors import StoreError, StoreFull
from agent.store.dbfile import (
    create,
    durably,
    examine,
    file_size,
    in_chunks,
    is_corrupt,
    is_full,
    max_opt,
    move_aside,
    open_error,
)
from agent.store.renumber import exhausted, renumber, within_space
from agent.store.salvage import Damaged, adopt, copy
from agent.store.seqfile import SeqFile, SeqMark
from agent.store.setaside import holding
from agent.store.settings import (
    BUSY_TIMEOUT_SECONDS,
    CODE_KIND,
    EVICT_ORDER,
    PAGE_SIZE,
    RANK,
    RECORD_OVERHEAD,
    SEQ_BLOCK,
    SEQ_EPOCH_SCALE,
    StoreSettings,
)
from agent.store.space import OPEN_ROOM, Reserve, cap_budget, free_bytes, reserve_path
from agent.wire.batch import MAX_SEQ
from agent.wire.records import Kind

log = logging.getLogger(__name__)

ACK_STEP = 8  # acks per transaction on a full disk with no reserve left


Leased = tuple[int, Kind, int, float, bytes, int]
"""A leased row: (seq, kind, priority, created, payload, attempts), the fields of a Record."""


class _Full(Exception):
    """SQLITE_FULL or ENOSPC inside a transaction (already rolled back)."""


class _Corrupt(Exception):
    """The open database turned out corrupt."""


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


class Db:
    """The SQLite side. Every method runs on the store's single writer thread."""

    def __init__(self, settings: StoreSettings) -> None:
        self.s = settings
        self.path = settings.path
        self.dir = settings.path.parent
        self.seqfile = SeqFile(settings.seq_path)
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
        self.salvaged = 0  # rows copied out of corrupt files by this process
        self.lost = 0  # rows a corrupt file held that could not be read
        self.leases: dict[int, float] = {}
        self.pending_acks: set[int] = set()
        self._derive()

    def _derive(self) -> None:
        """Sizes that follow from the budget (again after open capped it to the filesystem)."""
        settings = self.s
        self.wal_limit = settings.wal_limit()
        self.target_pages = settings.db_target() // PAGE_SIZE
        self.chunk_bytes = max(PAGE_SIZE, settings.db_target() // 16)
        self.txn_cap_bytes = max(PAGE_SIZE, self.wal_limit // 2)
        # One record never needs more than half a WAL share, so the WAL stays in its share.
        self.max_record_bytes = max(PAGE_SIZE, min(settings.db_target() // 16, self.wal_limit // 2))
        self.keep_free_pages = max(16, self.target_pages // 4)
        self.reserve = Reserve(reserve_path(settings), self.wal_limit, OPEN_ROOM)

    # -- open / create / recover -----------------------------------------------------------------

    def open(self, wall_now: float) -> None:
        """Open the queue, or recover it: a file found corrupt at any step (header, schema,
        load, check, sequence start) is moved aside, a new one is created, and every readable
        row of the old one is salvaged into it with its sequence number."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self.s = cap_budget(self.s)
            self._derive()
            free = free_bytes(self.dir)
            if free is not None and free < self.reserve.size:  # a full disk: open with its room
                self.reserve.open_room()
            mark = self.seqfile.read()
            corrupt_reason = examine(self.path)
            if corrupt_reason is not None:  # noted: the queue made next salvages it (adopt)
                move_aside(self.path, self.s.wal_path, corrupt_reason, wall_now)
            for attempt in range(4):
                fresh = not self.path.exists()
                try:
                    if fresh:
                        create(self.path)
                    self._connect()
                    if not self._load():
                        self._quick_check()
                    salvaging = self._adopt()  # a salvage cut short goes on too
                    recovered = self._salvage(salvaging, None)
                    self._start_sequence(mark, fresh or bool(salvaging), recovered, wall_now)
                    self.reserve.ensure(time.monotonic())
                    return
                except StoreFull:
                    # a full disk at start: the reserve gives the room to open (once)
                    self._close_conn()
                    if attempt == 3 or not self.reserve.open_room():
                        raise
                except (sqlite3.DatabaseError, _Corrupt) as err:
                    if attempt == 3 or not (isinstance(err, _Corrupt) or is_corrupt(err)):
                        if is_full(err, self.dir) and attempt < 3 and self.reserve.open_room():
                            self._close_conn()
                            continue
                        raise open_error(self.path, err) from err
                    self._close_conn()
                    move_aside(self.path, self.s.wal_path, str(err), wall_now)
        except BaseException:
            self.close_quietly()
            raise

    def _salvage(self, damaged: list[Damaged], known: int | None) -> int | None:
        """Copy every readable row of the moved-aside files into the open queue; the highest seq
        seen in them. ``known``: records queued (at run time), when the files cannot say."""
        hwm: int | None = None
        for d in damaged:
            got = copy(d, self._c())
            lost = got.lost if got.lost is not None or known is None else known - got.salvaged
            hwm = max_opt(max_opt(hwm, d.hwm), got.hwm)
            self.salvaged += got.salvaged
            self.lost += max(0, lost or 0)
            log.error(
                "event=queue_salvaged from=%s salvaged=%d lost=%s unreadable_spans=%d",
                d.path,
                got.salvaged,
                "unknown" if lost is None else max(0, lost),
                got.unreadable_spans,
            )
        if damaged:
            self._load()
        return hwm

    def _adopt(self) -> list[Damaged]:
        return adopt(self._c(), self.path, durably(self._c(), self.s.durability))

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
            if code in CODE_KIND:
                self.depth[code], self.bytes[code], self.evicted[code] = depth, nbytes, evicted
        self.meta_hwm = int(meta.get("seq_hwm", 0))
        top = conn.execute("SELECT max(seq) FROM records").fetchone()[0]
        self.hwm = max(self.meta_hwm, top or 0)
        self.ring_dropped = int(meta.get("ring_dropped", 0))
        self.clean = bool(meta.get("clean", 0))
        return self.clean

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
        for code in CODE_KIND:
            depth, nbytes = actual.get(code, (0, 0))
            if (depth, nbytes) != (self.depth[code], self.bytes[code]):
                log.warning(
                    "event=kind_counts_repaired kind=%s depth=%d was=%d",
                    CODE_KIND[code],
                    depth,
                    self.depth[code],
                )
                conn.execute(
                    "UPDATE kinds SET depth = ?, bytes = ? WHERE kind = ?", (depth, nbytes, code)
                )
                self.depth[code], self.bytes[code] = depth, nbytes

    def _start_sequence(
        self, mark: SeqMark | None, fresh: bool, recovered: int | None, wall_now: float
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
                self.seqfile.write(SeqMark(reserved, self.s.durability))
            if base != self.meta_hwm or self.clean:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("UPDATE meta SET value = ? WHERE key = 'seq_hwm'", (base,))
                conn.execute("UPDATE meta SET value = 0 WHERE key = 'clean'")
                conn.execute("COMMIT")
        except (OSError, sqlite3.Error) as err:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if is_corrupt(err):
                raise  # the caller moves the file aside and salvages it
            if is_full(err, self.dir):
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
        if self.conn is None and self.lock_fd is not None:  # a recovery a full disk stopped
            self._renew(time.time())
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
        self.reserve.spare_back()  # the room the WAL and shared memory had, for the next open
        if self.lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)
            self.lock_fd = None

    def _recover_runtime(self, err: BaseException, wall_now: float) -> None:
        """The open database went corrupt: move it aside, salvage it into a new one, go on."""
        self._close_conn()
        move_aside(self.path, self.s.wal_path, f"runtime: {err}", wall_now)
        self._renew(wall_now)

    def _renew(self, wall_now: float) -> None:
        """A new queue for the one moved aside. Stopped part-way (a full disk): no connection, the
        mirror as it was (never numbering from the new file's counter), tried again at the next
        use; StoreError meanwhile, not StoreFull (callers try again, alerts are not dropped)."""
        mirror = self.hwm, list(self.depth), list(self.bytes), list(self.evicted), self.ring_dropped
        try:
            if not self.path.exists():
                create(self.path)
            self._connect()
            self.leases.clear()
            self._load()
            salvaged_hwm = self._salvage(self._adopt(), sum(mirror[1]))
            self.evicted, self.ring_dropped = list(mirror[3]), mirror[4]
            mark = SeqMark(max(mirror[0], self.reserved, salvaged_hwm or 0), self.s.durability)
            self._start_sequence(mark, True, None, wall_now)
            self._write_counters()
        except (sqlite3.Error, OSError, StoreError) as err:
            self._close_conn()
            self.hwm, self.depth, self.bytes, self.evicted, self.ring_dropped = mirror
            raise StoreError(f"the queue {self.path} is not back yet: {err}") from err
        log.error("event=queue_recreated path=%s", self.path)

    def _acks_in_steps(self, acks: set[int]) -> set[int]:
        """On a full disk with no reserve left: acks in small transactions, each followed by a
        checkpoint that restarts the WAL, so every one reuses the blocks the WAL already has.
        Returns the acks still not written."""
        left = sorted(acks)
        for i in range(0, len(left), ACK_STEP):
            try:
                self._txn([], set(left[i : i + ACK_STEP]), set(), shrink=False)
            except _Full:
                return set(left[i:])
            with contextlib.suppress(sqlite3.Error):
                self._c().execute("PRAGMA wal_checkpoint(RESTART)")
        return set()

    def checkpoint(self) -> bool:
        """Copy the WAL into the main file and truncate it; synced, so NORMAL commits are durable
        after it. False when it could not."""
        try:
            return bool(self._c().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0)
        except sqlite3.Error as err:
            log.warning("event=checkpoint_failed path=%s error=%s", self.path, err)
            return False

    def _write_counters(self) -> None:
        conn = self._c()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE kinds SET evicted = ? WHERE kind = ?",
            [(self.evicted[c], c) for c in CODE_KIND],
        )
        conn.execute("UPDATE meta SET value = ? WHERE key = 'ring_dropped'", (self.ring_dropped,))
        conn.execute("COMMIT")

    def holding(self, items: list[tuple[int, float, bytes]]) -> list[bool]:
        return holding(self._c(), items)  # agent/store/setaside.py

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
        fit = within_space(puts, self.hwm, str(self.path))
        if len(fit) < len(puts):  # refused alone; the acks and the puts that fit go on
            done = self.apply(
                [puts[i] for i in fit],
                [alert_only[i] for i in fit],
                acks,
                nacks,
                ring_dropped,
                wall_now,
            )
            results: list[list[int] | BaseException | None] = [
                StoreError(exhausted(str(self.path), self.hwm, len(p))) for p in puts
            ]
            for i, res in zip(fit, done.puts, strict=True):
                results[i] = res
            done.puts = results
            return done
        for attempt in range(2):
            try:
                return self._apply(puts, alert_only, acks, nacks, ring_dropped)
            except (sqlite3.DatabaseError, _Corrupt, OSError) as err:
                if attempt == 0 and (is_corrupt(err) or isinstance(err, _Corrupt)):
                    self._recover_runtime(err, wall_now)
                    nacks = set()  # leases ended; acks apply to the salvaged rows
                    continue
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
            if not self.reserve.present:
                self.reserve.ensure(time.monotonic())
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
            for attempt in range(2):
                try:
                    self._txn([], acks, nacks, ring_dropped=ring_dropped)
                    self.pending_acks.clear()
                    ring_dropped = 0
                    if attempt:  # written with the reserve's room: give the WAL's space back
                        self.checkpoint()
                    break
                except _Full:
                    if attempt == 0 and acks and self.reserve.release():
                        continue
                    self.pending_acks = self._acks_in_steps(acks)
                    held = len(self.pending_acks)
                    for seq in nacks:
                        self.leases.pop(seq, None)
                    break
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
        shrink: bool = True,
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
                for chunk in in_chunks(sorted(nacks)):
                    marks = ",".join("?" * len(chunk))
                    conn.execute(
                        f"UPDATE records SET attempts = attempts + 1 WHERE seq IN ({marks})", chunk
                    )
            for recs in puts:
                out.append(self._insert(recs, d, emergency))
            if puts:
                self._make_room(0, d, max_rank=3)
            if shrink and (acks or puts):
                self._shrink()
            if d.touched:
                conn.executemany(
                    "UPDATE kinds SET depth = ?, bytes = ?, evicted = ? WHERE kind = ?",
                    [(d.depth[c], d.bytes[c], d.evicted[c], c) for c in sorted(d.touched)],
                )
            if d.hwm != self.hwm:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'seq_hwm'", (d.hwm,))
                if d.hwm > self.reserved:
                    self.seqfile.write(SeqMark(d.hwm + SEQ_BLOCK, self.s.durability))
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
            if isinstance(err, sqlite3.Error | OSError) and is_full(err, self.dir):
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

    def renumber(self, seqs: Sequence[int], floor: int) -> dict[int, int]:
        """See :func:`agent.store.renumber.renumber`."""
        return renumber(self, seqs, floor)

    def _delete(self, seqs: Sequence[int], d: _Delta) -> None:
        conn = self._c()
        for chunk in in_chunks(seqs):
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
            victim = next((c for c in EVICT_ORDER if d.depth[c] > 0 and RANK[c] <= max_rank), None)
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
        if d.hwm + len(recs) > MAX_SEQ:  # apply() refuses such puts first; never overflow
            raise StoreError(exhausted(str(self.path), d.hwm, len(recs)))
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
                self._make_room(need, d, max_rank=min(RANK[c] for c in codes))
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
                if attempt == 0 and is_corrupt(err):
                    self._recover_runtime(err, time.time())
                    continue
                raise StoreError(f"queue {self.path}: read failed: {err}") from err
        raise AssertionError("unreachable")

    def batch(self, max_records: int, max_bytes: int, now: float) -> list[Leased]:
        expired = [seq for seq, until in self.leases.items() if until <= now]
        if expired:
            try:
                self._txn([], set(), set(expired))
            except (_Full, sqlite3.Error, OSError) as err:
                log.warning("event=lease_expiry_not_counted count=%d error=%s", len(expired), err)
            for seq in expired:
                self.leases.pop(seq, None)
            log.debug("event=leases_expired count=%d", len(expired))
        out: list[Leased] = []
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
                    out.append((seq, CODE_KIND[code], pri, created, payload, attempts))
                    size += len(payload)
                    if len(out) >= max_records:
                        done = True
                        break
        finally:
            cur.close()
        until = now + self.s.lease_seconds
        for row in out:
            self.leases[row[0]] = until
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
            "db_bytes": file_size(self.path),
            "wal_bytes": file_size(self.s.wal_path),
            "free_pages": free,
            "ring_dropped": self.ring_dropped,
            "commits": self.commits,
            "salvaged": self.salvaged,
            "salvage_lost": self.lost,
        }
