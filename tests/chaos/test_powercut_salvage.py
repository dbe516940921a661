"""A damaged queue's salvage on the power-cut filesystem: the power is cut at random moments
while the agent opens a queue found corrupt (moving it aside, making the new one, copying the
rows), again and again, torn and strict. After the last open every row the damaged file held
(its records pages were left intact) is queued, under its own number: nothing the moved-aside
file holds is lost to a cut at any step.

Attack: a queue file corrupted at rest, then power cuts that lose unsynced writes (and undo, or
with ``torn`` keep a random prefix of, the un-synced renames and creates).
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.store.queue import NewRecord, Store
from agent.store.settings import StoreSettings
from agent.wire.records import Kind
from drivers.clock import RealClock
from tools.powercut import PowerCutFS

CUTS = int(os.environ.get("EDGE_CHAOS_CUTS", "10"))
pytestmark = pytest.mark.timeout(120 + 10 * CUTS)
ROOT = Path(__file__).resolve().parents[2]
_OPEN = """
import asyncio, sys
from pathlib import Path
from agent.store.queue import Store
from agent.store.settings import StoreSettings

async def main():
    st = await Store.open(StoreSettings(path=Path(sys.argv[1]), durability=sys.argv[2]))
    print("open", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.parametrize("durability", ["full", "normal"])
@pytest.mark.parametrize("torn", [False, True], ids=["strict", "torn"])
def test_power_cuts_while_a_damaged_queue_is_salvaged_lose_none_of_its_rows(
    powercut: PowerCutFS, torn: bool, durability: str
) -> None:
    rng = random.Random(4242 + torn + 2 * (durability == "normal"))
    path = powercut.mountpoint / "queue.db"
    settings = StoreSettings(path=path, durability=durability)

    async def fill() -> dict[int, bytes]:
        st = await Store.open(settings, clock=RealClock())
        out: dict[int, bytes] = {}
        for _ in range(40):
            batch = [NewRecord(Kind.TELEMETRY, os.urandom(200)) for _ in range(50)]
            out.update(zip(await st.put(batch), (r.payload for r in batch), strict=True))
        await st.close()
        return out

    put = asyncio.run(fill())
    conn = sqlite3.connect(path)
    (page,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'meta'").fetchone()
    conn.close()
    with path.open("r+b") as f:  # damaged at rest; every records page intact
        f.seek((page - 1) * 4096)
        f.write(b"\xa5" * 4096)
        os.fsync(f.fileno())
    for _ in range(CUTS):
        child = subprocess.Popen(
            [sys.executable, "-c", _OPEN, str(path), durability], cwd=ROOT, stdout=subprocess.PIPE
        )
        try:
            import time

            time.sleep(rng.uniform(0.0, 0.4))
            powercut.cut(kill=[child.pid], torn=(rng.randrange(1 << 30), 0.5) if torn else None)
        finally:
            child.kill()
            child.wait()

    async def queued() -> dict[int, bytes]:
        st = await Store.open(settings, clock=RealClock())
        try:
            return {r.seq: r.payload for r in await st.batch(1_000_000, 1 << 40)}
        finally:
            await st.close()

    assert asyncio.run(queued()) == put
