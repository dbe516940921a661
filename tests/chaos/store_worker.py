"""The worker process of the store power-cut test (not a test module itself).

:func:`run` opens the agent's queue (:class:`agent.store.queue.Store`, durability "full") and,
through its public API only, puts and acks at once, reporting on a pipe what the store confirmed:

- ``ready`` once the store is open;
- ``put <seq> ...`` after put() returned (two putters);
- ``acking <seq> ...`` before ack(), ``acked <seq> ...`` after ack() returned (one acker, which
  leases batches and acks about half of each).

Every line goes out in one os.write shorter than PIPE_BUF, so a kill never leaves half a line.
Payloads carry a CRC32 of their body. The test starts it from a multiprocessing forkserver with
this module preloaded.
"""

from __future__ import annotations

import asyncio
import os
import random
import zlib
from pathlib import Path

from agent.store.queue import NewRecord, Store
from agent.store.settings import StoreSettings
from agent.wire.records import Kind
from drivers.clock import RealClock

KINDS = (Kind.TELEMETRY, Kind.TELEMETRY, Kind.STATE, Kind.EVENT, Kind.ALERT)


def settings(directory: Path) -> StoreSettings:
    return StoreSettings(
        path=directory / "queue.db",
        budget_bytes=64 * 1024 * 1024,
        durability="full",
        wal_bytes=64 * 1024,  # checkpoint often, so cuts land in checkpoints too
        lease_seconds=3600.0,
    )


def payload(rng: random.Random) -> bytes:
    body = rng.randbytes(rng.choice((8, 60, 300, 2000)))
    return zlib.crc32(body).to_bytes(4, "big") + body


def intact(data: bytes) -> bool:
    return zlib.crc32(data[4:]).to_bytes(4, "big") == data[:4]


class Reporter:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def say(self, tag: str, values: list[int]) -> None:
        for i in range(0, max(1, len(values)), 200):  # 200 numbers: far below PIPE_BUF
            os.write(self.fd, (" ".join([tag, *map(str, values[i : i + 200])]) + "\n").encode())


async def putter(st: Store, rng: random.Random, out: Reporter) -> None:
    while True:
        n = rng.choice((1, 1, 2, 5, 20))
        out.say("put", await st.put([NewRecord(rng.choice(KINDS), payload(rng)) for _ in range(n)]))


async def acker(st: Store, rng: random.Random, out: Reporter) -> None:
    while True:
        batch = await st.batch(rng.randint(1, 30), 1 << 20)
        if not batch:
            await asyncio.sleep(0.005)
            continue
        acked = [r.seq for r in batch if rng.random() < 0.5]
        if acked:
            out.say("acking", acked)
            await st.ack(acked)
            out.say("acked", acked)


async def work(out: Reporter, directory: Path, seed: int) -> None:
    rng = random.Random(seed)
    st = await Store.open(settings(directory), clock=RealClock())
    out.say("ready", [])
    async with asyncio.TaskGroup() as tg:
        for _ in range(2):
            tg.create_task(putter(st, random.Random(rng.random()), out))
        tg.create_task(acker(st, random.Random(rng.random()), out))


def run(conn: object, directory: str, seed: int) -> None:
    """Process target: ``conn`` is the write end of a multiprocessing Pipe."""
    asyncio.run(work(Reporter(conn.fileno()), Path(directory), seed))  # type: ignore[attr-defined]
