"""Readings into the durable store: the telemetry writer stage.

The sampler hands each Reading to :meth:`TelemetryWriter.submit`, which never blocks. The writer
task takes everything that queued up while its previous put was committing and puts it in one
call, so a busy agent writes big batches. An idle one lets readings gather for the commit window
(``[store] commit_window``, 1 s) after the first one arrives, then commits them together: every
commit rewrites whole 4 KiB pages of the WAL and syncs it, so on the reference rig (eight sensors
at 1 Hz) a commit per reading wrote about 15 GB a day to the device's flash, and one per second
about a fifth of that (docs/store.md, ``./tools/dev bench wear``). A reading is committed (and
survives a power cut) at most the window later; a stop commits what waits at once. When the
store is full (StoreFull) the readings of that batch are counted as dropped and the writer
carries on; alerts do not go this way, the detector puts them itself and at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from agent.errors import StoreError, StoreFull
from agent.store.queue import NewRecord, Store
from agent.wire.batch import format_ranges
from agent.wire.records import Kind, TelemetryBody
from drivers.base import Reading
from drivers.clock import Clock, wait_event

log = logging.getLogger(__name__)


#: Readings held in memory while a put is in flight; beyond it the oldest are dropped (counted).
QUEUE_LIMIT = 50_000
#: Largest put, in records.
MAX_BATCH = 2_000


class TelemetryWriter:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        limit: int = QUEUE_LIMIT,
        window: float = 0.0,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.window = window  # seconds readings gather after the first, when the writer is idle
        self.on_commit = on_commit
        self.clock = clock
        self.limit = limit
        self._pending: deque[Reading] = deque()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.submitted = 0
        self.committed = 0
        self.dropped_overflow = 0
        self.dropped_full = 0
        self.busy_since: float | None = None  # clock time a put started; None when idle
        self._full = False
        self._closing = False

    def submit(self, reading: Reading) -> None:
        if len(self._pending) >= self.limit:
            self._pending.popleft()
            self.dropped_overflow += 1
        self._pending.append(reading)
        self.submitted += 1
        self._wake.set()

    @property
    def backlog(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        """Write until :meth:`stop` is called and everything pending is committed.

        The writer is never cancelled mid-put (a cancelled put may or may not have committed);
        shutdown calls :meth:`stop` and waits for this to return instead.
        """
        idle = True  # the first reading after an idle spell opens the commit window
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                idle = True
            if idle:
                await self._gather()
                idle = False
            await self.flush_once()

    async def _gather(self) -> None:
        """Wait out the commit window, or less if :meth:`stop` is called meanwhile."""
        if self.window > 0:
            await wait_event(self.clock, self._stopping, self.window)

    def stop(self) -> None:
        """Finish: commit what is pending, then let :meth:`run` return."""
        self._closing = True
        self._stopping.set()
        self._wake.set()

    async def flush_once(self) -> None:
        batch = [self._pending.popleft() for _ in range(min(len(self._pending), MAX_BATCH))]
        if not batch:
            return
        records = [
            NewRecord(
                Kind.TELEMETRY,
                TelemetryBody(r.sensor, r.t_wall, dict(r.values)).to_cbor(),
                created=r.t_wall,
            )
            for r in batch
        ]
        self.busy_since = self.clock.monotonic()
        try:
            seqs = await self.store.put(records)
            self.committed += len(batch)
            log.debug("event=committed kind=telemetry seqs=%s", format_ranges(seqs))
            if self.on_commit is not None:
                self.on_commit()
            if self._full:
                log.info("event=store_writable")
                self._full = False
        except StoreFull as err:
            self.dropped_full += len(batch)
            if not self._full:
                log.error("event=store_full dropped_telemetry=%d error=%r", len(batch), str(err))
                self._full = True
        except StoreError as err:
            # the store is recovering or failing: keep the batch for the next attempt, unless
            # we are stopping (the store will not come back before the process exits)
            log.error("event=store_put_failed records=%d error=%r", len(batch), str(err))
            if self._closing:
                self.dropped_full += len(batch)
                raise
            self._pending.extendleft(reversed(batch))
            await self.clock.sleep(1.0)
        finally:
            self.busy_since = None
