"""The durable store-and-forward queue's API, :class:`Store`: every record the agent must deliver,
on disk, until acked.

SQLite in WAL mode, one file (``queue.db``) beside a tiny sequence side file (``queue.db.seq``) and
a lock file. All database work runs on one dedicated writer thread (``clock.run_blocking`` on a
single-thread executor, :mod:`agent.store.database`); the event loop never blocks on I/O.

Guarantees
- ``put()`` returns the records' sequence numbers once their transaction is committed. With
  ``durability = "full"`` (SQLite ``synchronous=FULL``) a committed record survives SIGKILL and
  power loss; with ``"normal"`` it survives SIGKILL, and a power cut may lose the last commits.
- Group commit: puts, acks and nacks that arrive while a transaction runs join the next one.
- Sequence numbers increase strictly and are never issued twice for this queue, across crashes,
  restarts and a lost or corrupt database (the cloud deduplicates by ``(device, seq)``): see
  :class:`agent.store.seqfile.SeqFile` and docs/store.md. ``renumber()`` moves queued records to
  fresh numbers (a new epoch above a floor) when the endpoint holds other records under theirs.
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
import logging
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from agent.errors import StoreError, StoreFull
from agent.store.database import Db
from agent.store.renumber import moved_alerts
from agent.store.restamp import restamp
from agent.store.setaside import Kept, SetAside
from agent.store.settings import (
    CODE_KIND,
    DEFAULT_BY_CODE,
    KIND_CODE,
    MAX_PRIORITY,
    RING_RETRY_SECONDS,
    StoreSettings,
)
from agent.wire.records import Kind
from drivers.clock import Clock, RealClock

log = logging.getLogger(__name__)

__all__ = [
    "KindStats",
    "NewRecord",
    "Record",
    "Store",
    "StoreStats",
]


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
    salvaged: int = 0  # rows copied out of corrupt files by this process
    salvage_lost: int = 0  # rows corrupt files held that could not be read (where known)
    set_aside: int = 0  # records the endpoint refused, kept in the set-aside area
    set_aside_bytes: int = 0  # of its cap (agent/store/setaside.py)

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
            "salvaged": self.salvaged,
            "salvage_lost": self.salvage_lost,
            "set_aside": self.set_aside,
            "set_aside_bytes": self.set_aside_bytes,
        }


# --- the asyncio side ----------------------------------------------------------------------------


@dataclass
class _PutOp:
    rows: list[tuple[int, int, float, bytes]]
    alert_only: bool
    future: asyncio.Future[list[int]]
    nbytes: int
    parked: bool = False  # counted in the memory ring (also while a retry is in flight)


#: Set-aside records put back into the queue per transaction (:meth:`Store.requeue`).
REQUEUE_CHUNK = 256


@dataclass
class Requeued:
    """What :meth:`Store.requeue` did: ``moved`` {old seq: new seq}; ``recovered`` files of an
    interrupted requeue whose records were queued already (removed); ``unreadable`` why each
    file that is no set-aside record is not (left in place); ``error`` what stopped it."""

    moved: dict[int, int] = field(default_factory=dict)
    recovered: int = 0
    unreadable: list[str] = field(default_factory=list)
    error: str | None = None


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
        self._db = Db(settings)
        self._aside = SetAside(settings.set_aside_path)
        self._pending: list[_PutOp | _AckOp] = []
        self._ring: collections.deque[_PutOp] = collections.deque()
        self._ring_records = 0
        self._ring_dropped_unwritten = 0
        self._writer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._disk_full = False
        self._rejected = [0, 0, 0, 0]
        self.renumberings = 0  # renumberings that moved records (Store.moved)

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
        store.settings = store._db.s  # the budget as capped by the filesystem's room
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
        code = KIND_CODE.get(rec.kind)  # type: ignore[call-overload]
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
                f"a {CODE_KIND[code]} record of {len(payload)} bytes exceeds the largest record "
                f"this queue takes ({self._db.max_record_bytes} bytes for its budget); split it"
            )
        pri = rec.priority
        if pri is None:
            pri = DEFAULT_BY_CODE[code]
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

    async def set_aside(self, records: Sequence[Record], answer: str) -> None:
        """Move ``records`` (refused by the endpoint on their own) out of the queue: each is
        written durably to the set-aside area first, then deleted from the queue. Raises
        :class:`agent.store.setaside.SetAsideFull` when the area has no room for them (they stay
        queued), StoreError when a file cannot be written (those not written stay queued)."""
        self._check_open()
        if not records:
            return
        await self._clock.run_blocking(
            self._executor, self._aside.write, records, answer, self._clock.time()
        )
        await self.ack([r.seq for r in records])

    async def requeue(self, only: int | None = None) -> Requeued:
        """Put the set-aside records (the one of seq ``only``, or all) back into the queue as new
        records, oldest first, :data:`REQUEUE_CHUNK` at a time: each chunk named in the area's
        mark, put, committed, then its files removed (agent/store/setaside.py). First, what an
        interrupted requeue committed already has its files removed. A failure (a full disk)
        stops there: what was moved is said, the rest stays set aside."""
        self._check_open()

        async def run(fn: Any, *args: Any) -> Any:
            return await self._clock.run_blocking(self._executor, fn, *args)

        done = Requeued()
        try:
            marked: list[Kept] = await run(self._aside.marked)
            if marked:
                items = [(KIND_CODE[k.kind], k.created, k.payload) for k in marked]
                held = await run(self._db.holding, items)
                await run(self._aside.remove, [k for k, h in zip(marked, held, strict=True) if h])
                done.recovered = sum(held)
            kept, done.unreadable = await run(self._aside.read, only)
            for i in range(0, len(kept), REQUEUE_CHUNK):
                part = kept[i : i + REQUEUE_CHUNK]
                await run(self._aside.mark, part)
                seqs = await self.put(
                    [NewRecord(k.kind, k.payload, k.priority, k.created) for k in part]
                )
                # a NORMAL commit is not durable yet: a power cut would lose them from both
                if self.settings.durability == "normal" and not await run(self._db.checkpoint):
                    raise StoreError(f"queue {self.settings.path}: the requeue is not durable")
                await run(self._aside.remove, part)
                done.moved.update(zip((k.seq for k in part), seqs, strict=True))
        except (StoreError, OSError) as err:
            done.error = str(err)
        return done

    async def renumber(self, seqs: Iterable[int], floor: int = 0) -> dict[int, int]:
        """Give the queued records ``seqs`` new sequence numbers above ``floor`` and above every
        number issued so far, atomically; ``floor`` above the last issued number starts a new
        epoch there, and later puts number above it too (``seqs`` may be empty for just that).
        Returns ``{old: new}`` for the records still queued (acked or evicted ones are skipped);
        their leases end, so they are due again. The numbers are reserved in the side file
        before the commit: never issued twice, also after a crash.

        For records the endpoint holds *another* record under (docs/protocol.md, "Delivery
        semantics"): a record that may have reached the endpoint under its own number must not
        be renumbered, or it would be stored twice."""
        self._check_open()
        if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
            raise ValueError(f"floor must be a sequence number, got {floor!r}")
        wanted = sorted({int(s) for s in seqs})
        moved: dict[int, int] = await self._clock.run_blocking(
            self._executor, self._db.renumber, wanted, floor
        )
        if moved:
            self.renumberings += 1
        return moved

    async def moved(self, seqs: Iterable[int]) -> dict[int, int]:
        """``{old: new}`` for the alert records ``seqs`` that were renumbered (also before this
        process: kept in the queue, :func:`agent.store.renumber.moved_alerts`), ``new`` their
        number now. ``renumberings`` counts this process's renumberings: ask again when it
        changed."""
        self._check_open()
        wanted = sorted({int(s) for s in seqs})
        out: dict[int, int] = await self._clock.run_blocking(
            self._executor, moved_alerts, self._db, wanted
        )
        return out

    async def restamp(self, shift: float, floor: float, above: int) -> int:
        """Move the times of the queued records numbered above ``above`` and stamped before
        ``floor`` by ``shift`` seconds, those never handed out (:func:`agent.store.restamp.
        restamp`): for records taken before the wall clock was set. Returns how many."""
        self._check_open()
        n: int = await self._clock.run_blocking(
            self._executor, restamp, self._db, shift, floor, above
        )
        return n

    @property
    def last_seq(self) -> int:
        """The last sequence number issued (0: none yet); the next put numbers above it. A
        snapshot: it only grows."""
        return self._db.hwm

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
            self._lease,
            max_records,
            max_bytes,
            self._clock.monotonic(),
        )

    def _lease(self, max_records: int, max_bytes: int, now: float) -> list[Record]:
        """On the writer thread: the database's leased rows as records."""
        return [Record(*row) for row in self._db.batch(max_records, max_bytes, now)]

    async def stats(self) -> StoreStats:
        self._check_open()
        raw = await self._clock.run_blocking(
            self._executor, self._db.read, self._db.stats, self._clock.time()
        )
        aside = await self._clock.run_blocking(self._executor, self._aside.stats)
        return StoreStats(
            path=str(self.settings.path),
            durability=self.settings.durability,
            budget_bytes=self.settings.budget_bytes,
            kinds={
                kind: KindStats(raw["depth"][c], raw["bytes"][c], raw["evicted"][c])
                for kind, c in KIND_CODE.items()
            },
            leased=raw["leased"],
            oldest_age=raw["oldest_age"],
            last_seq=raw["last_seq"],
            db_bytes=raw["db_bytes"],
            wal_bytes=raw["wal_bytes"],
            free_pages=raw["free_pages"],
            ring_depth=self._ring_records,
            ring_dropped=raw["ring_dropped"] + self._ring_dropped_unwritten,
            rejected_full={kind: self._rejected[c] for kind, c in KIND_CODE.items()},
            disk_full=self._disk_full,
            commits=raw["commits"],
            salvaged=raw["salvaged"],
            salvage_lost=raw["salvage_lost"],
            set_aside=aside.count,
            set_aside_bytes=aside.bytes,
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
