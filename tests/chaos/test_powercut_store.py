"""The agent's durable queue on the power-cut filesystem: a worker process puts and acks at once
(tests/chaos/store_worker.py), and the power is cut at random moments, again and again. After
every cut the database passes integrity_check, the store opens without finding it corrupt, every
record whose put() returned is there unless its ack was at least started, no record whose ack()
returned comes back, payloads are intact, and sequence numbers are never issued twice.

Attack: a power cut that loses unsynced writes (and undoes un-synced renames and creates).

``EDGE_CHAOS_CUTS=100`` runs 100 cuts (default 10, to keep the suite quick).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import sqlite3
from pathlib import Path

import pytest

from agent.store.queue import Store
from drivers.clock import RealClock
from tests.chaos import store_worker
from tests.chaos.child import Child
from tools.powercut import PowerCutFS

CUTS = int(os.environ.get("EDGE_CHAOS_CUTS", "10"))


def integrity_ok(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


async def queued(directory: Path) -> dict[int, bytes]:
    """Open the store as the agent would after the power came back; every queued record."""
    st = await Store.open(store_worker.settings(directory), clock=RealClock())
    try:
        return {r.seq: r.payload for r in await st.batch(1_000_000, 1 << 40)}
    finally:
        await st.close()


@pytest.mark.parametrize("torn", [False, True], ids=["strict", "torn"])
@pytest.mark.timeout(60 + 3 * CUTS)
def test_power_cuts_lose_no_committed_put_and_bring_back_no_committed_ack(
    powercut: PowerCutFS, torn: bool
) -> None:
    """``torn``: the cuts also write a random part of the unsynced overwrites and keep a random
    prefix of the un-synced namespace operations (a kinder disk is a different disk, not a
    safer one: some code only works when all of it is lost)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([store_worker.__name__])
    qdir = powercut.mountpoint
    rng = random.Random(1789 + torn)
    put: set[int] = set()  # put() returned
    acking: set[int] = set()  # ack() was called (it may or may not have committed)
    acked: set[int] = set()  # ack() returned
    highest = 0
    for i in range(CUTS):
        w = Child(ctx, store_worker.run, str(qdir), rng.randrange(1 << 30))
        try:
            if rng.random() < 0.2:
                w.read_for(rng.uniform(0.0, 0.1))  # may cut in open(): create, recover, check
            else:
                w.read_for(30.0, until="ready")
                assert w.saw("ready")
                w.read_for(rng.uniform(0.05, 0.5))
            stats = powercut.cut(kill=[w.pid], torn=(rng.randrange(1 << 30), 0.5) if torn else None)
            w.reap()
        finally:
            w.kill()
        new = [int(s) for values in w.tagged("put") for s in values]
        assert len(new) == len(set(new))
        assert not put & set(new), f"cut {i}: a sequence number was issued twice"
        if new:
            assert min(new) > highest, f"cut {i}: a new sequence number is not above older ones"
        put.update(new)
        acking.update(int(s) for values in w.tagged("acking") for s in values)
        acked.update(int(s) for values in w.tagged("acked") for s in values)

        db = qdir / "queue.db"
        if not db.exists():
            assert not put, f"cut {i}: the queue vanished after records were committed"
            continue
        integrity_ok(db)
        records = asyncio.run(queued(qdir))
        aside = sorted(p.name for p in qdir.iterdir() if ".corrupt-" in p.name)
        assert not aside, f"cut {i}: the store found its file corrupt: {aside}"
        missing = put - acking - records.keys()
        assert not missing, f"cut {i}: committed records lost: {sorted(missing)[:5]} ({stats})"
        back = acked & records.keys()
        assert not back, f"cut {i}: acknowledged records came back: {sorted(back)[:5]}"
        torn = [seq for seq, data in records.items() if not store_worker.intact(data)]
        assert not torn, f"cut {i}: torn payloads: {torn[:5]}"
        highest = max([highest, *records.keys(), *new])
    assert len(put) > 20 * CUTS and acked  # the workers did real work between the cuts
