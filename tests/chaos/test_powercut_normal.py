"""Power cuts on a queue with ``durability = "normal"``: what the endpoint was told must stay
true. A NORMAL queue may lose its last puts and acks to a power cut (docs/store.md), but not a
renumbering or a restamping: the record goes to the endpoint under its new number (or with its
new times) at once, so a cut that brought back the old number (or bytes) makes the endpoint hold
the record twice: the old number conflicts again and is renumbered a second time.

The same for ``requeue()``: a set-aside record's file is removed once its record is back in the
queue; in a NORMAL queue that put must be durable first, or a cut loses the record from both.
And for a salvage: once the moved-aside file is no longer noted for it, the new queue's mark of
it must be durable, or a cut loses every row of the damaged file.

Attack: a power cut that loses unsynced writes, right after ``renumber()`` / ``restamp()`` /
``requeue()`` returned, or after a damaged NORMAL queue was opened (salvaged).
"""

from __future__ import annotations

import select
import subprocess
import sys
from pathlib import Path

import pytest

from agent.store.queue import Store
from agent.store.settings import StoreSettings
from drivers.clock import RealClock
from tools.powercut import PowerCutFS

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]

_WORKER = """
import asyncio, os, sqlite3, sys, time
from pathlib import Path
from agent.store.queue import NewRecord, Store
from agent.store.settings import StoreSettings
from agent.wire.records import EventBody, Kind

async def main(path, what):
    settings = StoreSettings(path=Path(path), durability="normal")
    st = await Store.open(settings)
    body = EventBody(1000.0, {"type": "x"}).to_cbor()
    (seq,) = await st.put([NewRecord(Kind.EVENT, body, created=1000.0)])
    await st.close()  # the put is durable (a checkpoint), as any put is in time
    st = await Store.open(settings)
    if what == "renumber":
        moved = await st.renumber([seq], floor=seq + 1000)
        print("done", seq, moved[seq], flush=True)
    elif what == "salvage":
        await st.put([NewRecord(Kind.EVENT, body, created=1000.0) for _ in range(99)])
        await st.close()
        conn = sqlite3.connect(path)
        (page,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'meta'").fetchone()
        conn.close()
        with open(path, "r+b") as f:  # damaged at rest: every records page is intact
            f.seek((page - 1) * 4096)
            f.write(b"\\xa5" * 4096)
            os.fsync(f.fileno())
        st = await Store.open(settings)  # moved aside, salvaged into a new queue
        print("done", seq, (await st.stats()).depth, flush=True)
    elif what == "requeue":
        await st.set_aside(await st.batch(1, 1 << 20), "4.00 refused")
        await st.close()  # set aside for good: the file, and the record gone from the queue
        st = await Store.open(settings)
        done = await st.requeue()
        print("done", seq, done.moved[seq], flush=True)
    else:
        n = await st.restamp(1.8e9, 1.7e9, 0)
        print("done", seq, n, flush=True)
    time.sleep(3600)  # the power goes now

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.parametrize("what", ["renumber", "restamp", "requeue", "salvage"])
def test_a_power_cut_after_a_renumbering_restamping_requeue_or_salvage_in_a_normal_queue(
    powercut: PowerCutFS, what: str
) -> None:
    path = powercut.mountpoint / "queue.db"
    child = subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(path), what], cwd=ROOT, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert select.select([child.stdout], [], [], 60)[0]
        tag, seq, result = child.stdout.readline().decode().split()
        assert tag == "done"
        powercut.cut(kill=[child.pid])
    finally:
        child.kill()
        child.wait()

    async def queued() -> dict[int, float]:
        st = await Store.open(StoreSettings(path=path, durability="normal"), clock=RealClock())
        try:
            return {r.seq: r.created for r in await st.batch(100, 1 << 20)}
        finally:
            await st.close()

    import asyncio

    got = asyncio.run(queued())
    if what == "renumber":
        assert got == {int(result): 1000.0}  # under its new number, as it went out
    elif what == "salvage":
        assert int(result) == 100
        assert len(got) == 100
    elif what == "requeue":  # back in the queue, or still set aside: never in neither
        aside = list((powercut.mountpoint / "rejected").glob("seq-*.cbor"))
        assert got == {int(result): 1000.0} or (got == {} and len(aside) == 1), (got, aside)
    else:
        assert int(result) == 1
        assert got == {int(seq): 1000.0 + 1.8e9}  # with its new times, as it went out
