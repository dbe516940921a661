"""Power cuts on a queue with ``durability = "normal"``: what the endpoint was told must stay
true. A NORMAL queue may lose its last puts and acks to a power cut (docs/store.md), but not a
renumbering or a restamping: the record goes to the endpoint under its new number (or with its
new times) at once, so a cut that brought back the old number (or bytes) makes the endpoint hold
the record twice: the old number conflicts again and is renumbered a second time.

Attack: a power cut that loses unsynced writes, right after ``renumber()`` / ``restamp()``
returned.
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
import asyncio, sys, time
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
    else:
        n = await st.restamp(1.8e9, 1.7e9, 0)
        print("done", seq, n, flush=True)
    time.sleep(3600)  # the power goes now

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.parametrize("what", ["renumber", "restamp"])
def test_a_power_cut_after_a_renumbering_or_restamping_of_a_normal_queue_keeps_it(
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
    else:
        assert int(result) == 1
        assert got == {int(seq): 1000.0 + 1.8e9}  # with its new times, as it went out
