"""Group commit of ingest: every batch that arrives while a transaction is being committed goes
into the next transaction, together.

An ingest is acknowledged only after the transaction that stored it committed (the device
deletes what the ack lists), so each request waits for one commit. One commit per request caps
a server at the storage's commit rate (an fsync each: a few hundred per second on a disk, and
PostgreSQL's own WAL flush); committing every batch that queued up during the previous commit in
one transaction (:meth:`cloud.storage.Storage.ingest_many`) makes the commit rate a limit on
transactions, not on requests. Nothing waits on purpose: a lone request is committed at once,
and batching grows only with the load (the same idea as PostgreSQL's own commit_delay, without
the delay).

A batch for a device that is not registered fails alone (its waiter gets
:class:`cloud.storage.UnknownDevice`); a failure of the database fails every batch of that
transaction, and none of them was stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from agent.wire.batch import WireRecord
from cloud.storage import IngestResult, Storage, StorageThread
from drivers.clock import Clock

log = logging.getLogger(__name__)

#: Batches per transaction at most (bounds one transaction's size and the wait behind it).
MAX_GROUP = 256


@dataclass
class _Waiting:
    device: str
    records: Sequence[WireRecord]
    register: bool
    done: asyncio.Future[IngestResult]


class GroupCommit:
    """Stores batches through ``storage`` (a :class:`StorageThread`), many per transaction."""

    def __init__(self, storage: StorageThread, clock: Clock, max_group: int = MAX_GROUP) -> None:
        self._storage = storage
        self._clock = clock
        self._max = max_group
        self._queue: list[_Waiting] = []
        self._task: asyncio.Task[None] | None = None
        self.transactions = 0  # committed (or failed) transactions
        self.batches = 0  # batches they held

    async def ingest(
        self, device: str, records: Sequence[WireRecord], register: bool = False
    ) -> IngestResult:
        """Store one batch; returns once the transaction that holds it has committed."""
        done: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(device, records, register, done))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="cloud-group-commit")
        return await done

    async def _drain(self) -> None:
        while self._queue:
            group, self._queue = self._queue[: self._max], self._queue[self._max :]
            group = [w for w in group if not w.done.done()]  # a waiter that gave up
            if not group:
                continue
            items = [(w.device, w.records, w.register) for w in group]
            now = self._clock.time()
            self.transactions += 1
            self.batches += len(group)
            try:
                results = await self._storage.call(lambda s, i=items, t=now: _store(s, i, t))
            except Exception as err:  # StorageUnavailable, or a bug: every waiter hears it
                for w in group:
                    if not w.done.done():
                        w.done.set_exception(err)
                continue
            for w, result in zip(group, results, strict=True):
                if w.done.done():
                    continue
                if isinstance(result, Exception):
                    w.done.set_exception(result)
                else:
                    w.done.set_result(result)

    async def stop(self) -> None:
        """Let the transaction in flight finish (its waiters get their answers)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


def _store(
    storage: Storage, items: list[tuple[str, Sequence[WireRecord], bool]], now: float
) -> list[IngestResult | Exception]:
    return list(storage.ingest_many(items, now))
