"""The writer process of the store crash tests (not a test module itself).

:func:`run` works on a real queue and reports on a pipe what the store confirmed, one line per
event, so the test can SIGKILL it at any moment and check the file afterwards:

- ``put``: four concurrent putters; after each put() returns: ``put <seq> <seq> ...``
- ``lease``: puts 40 records (``put ...``), then leases batches forever: ``leased ...`` after
  batch(), ``acking ...`` before ack(), ``acked ...`` after ack() returned
- ``drain``: leases everything once, prints ``got <seq>:<attempts> ...`` and exits

Every line goes out in one os.write shorter than PIPE_BUF, so a kill never leaves half a line.
Payloads carry a CRC32 of their body so the test can check them. The tests start it from a
multiprocessing forkserver with this module preloaded (a fork is much cheaper than a new
interpreter), and it also runs as a script: ``python tests/unit/store/store_writer.py DIR DURABILITY
MODE SEED`` reports on stdout.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import zlib
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import agent.store.database as database
from agent.store.queue import NewRecord, Store
from agent.store.settings import StoreSettings
from agent.wire.records import Kind
from drivers.clock import RealClock

KINDS = (Kind.TELEMETRY, Kind.TELEMETRY, Kind.TELEMETRY, Kind.STATE, Kind.EVENT, Kind.ALERT)


def payload(rng: random.Random) -> bytes:
    body = rng.randbytes(rng.randint(8, 300))
    return zlib.crc32(body).to_bytes(4, "big") + body


class Reporter:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def say(self, tag: str, values: list[str]) -> None:
        for i in range(0, max(1, len(values)), 200):  # 200 numbers: far below PIPE_BUF
            os.write(self.fd, (" ".join([tag, *values[i : i + 200]]) + "\n").encode())


async def putter(st: Store, rng: random.Random, out: Reporter) -> None:
    while True:
        n = rng.choice((1, 1, 2, 5, 20, 60))
        seqs = await st.put([NewRecord(rng.choice(KINDS), payload(rng)) for _ in range(n)])
        out.say("put", [str(s) for s in seqs])


async def leaser(st: Store, rng: random.Random, out: Reporter) -> None:
    while True:
        batch = await st.batch(rng.randint(1, 30), 1 << 20)
        if not batch:
            await asyncio.sleep(0.005)
            continue
        out.say("leased", [str(r.seq) for r in batch])
        acked = [r.seq for r in batch if rng.random() < 0.5]
        if acked:
            out.say("acking", [str(s) for s in acked])
            await st.ack(acked)
            out.say("acked", [str(s) for s in acked])


async def work(out: Reporter, directory: Path, durability: str, mode: str, seed: int) -> None:
    rng = random.Random(seed)
    database.SEQ_BLOCK = 50  # cross side-file reservations often, so kills land there too
    settings = StoreSettings(
        path=directory / "queue.db",
        budget_bytes=64 * 1024 * 1024,
        durability=durability,
        wal_bytes=64 * 1024,  # checkpoint often, so kills land in checkpoints too
        lease_seconds=3600.0,
    )
    st = await Store.open(settings, clock=RealClock())
    out.say("ready", [])
    if mode == "put":
        async with asyncio.TaskGroup() as tg:
            for _ in range(4):
                tg.create_task(putter(st, random.Random(rng.random()), out))
    elif mode == "lease":
        seqs = await st.put([NewRecord(rng.choice(KINDS), payload(rng)) for _ in range(40)])
        out.say("put", [str(s) for s in seqs])
        await leaser(st, rng, out)
    elif mode == "drain":
        got = await st.batch(1_000_000, 1 << 40)
        out.say("got", [f"{r.seq}:{r.attempts}" for r in got])
        await st.close()
    else:
        raise ValueError(f"unknown mode {mode!r}")


def run(conn: object, directory: str, durability: str, mode: str, seed: int) -> None:
    """Process target: ``conn`` is the write end of a multiprocessing Pipe."""
    fd = conn.fileno()  # type: ignore[attr-defined]
    asyncio.run(work(Reporter(fd), Path(directory), durability, mode, seed))


if __name__ == "__main__":
    d, dur, m, s = sys.argv[1:5]
    asyncio.run(work(Reporter(1), Path(d), dur, m, int(s)))
