"""Restamping (agent/store/restamp.py) on real SQLite files: records stamped before the wall
clock was set get the time they were taken, and only those that cannot have reached the
endpoint yet (docs/store.md, "Times before the clock is set")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from pathlib import Path

import pytest

from agent.sense.ingest import TelemetryWriter
from agent.service.wallclock import CHECK, WallClockWatch
from agent.store.queue import NewRecord, Store
from agent.store.settings import StoreSettings
from agent.wire.records import AlertBody, EventBody, Kind, TelemetryBody, decode_body
from drivers.base import Reading
from drivers.clock import VirtualClock

FLOOR = 1_735_689_600.0
SHIFT = 1_796_600_000.0


def _reading(t: float) -> NewRecord:
    return NewRecord(Kind.TELEMETRY, TelemetryBody("m", t, {"a": 1.5}).to_cbor(), 5, t)


def test_records_taken_before_the_clock_was_set_are_restamped_unless_handed_out(
    qdir: Path, vclock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    settings = StoreSettings(path=qdir / "queue.db")

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        old = NewRecord(Kind.TELEMETRY, TelemetryBody("m", 5.0, {}).to_cbor(), 9, 5.0)
        earlier = await st.put([old])  # an earlier run's: its offset is unknown
        above = st.last_seq
        alert = {"time": 12.0, "change_time": 11.0, "score": 3.0, "kind": "raise"}
        seqs = await st.put(
            [
                _reading(10.0),  # handed out below, may have reached the endpoint: kept
                _reading(11.0),
                NewRecord(Kind.ALERT, AlertBody(12.0, alert).to_cbor(), 5, 12.0),
                NewRecord(Kind.EVENT, EventBody(13.0, {"x": 1}).to_cbor(), 5, 13.0),
                NewRecord(Kind.EVENT, b"\xff not cbor", 5, 14.0),  # left as it is
                _reading(FLOOR + 1.0),  # stamped after the clock was set
            ]
        )
        leased = await st.batch(1, 1 << 20)  # priority 5 before 9, then by seq
        assert [r.seq for r in leased] == seqs[:1]
        assert await st.restamp(SHIFT, FLOOR, above) == 3
        assert await st.restamp(SHIFT, FLOOR, above) == 0  # once
        await st.nack([r.seq for r in leased])
        assert await st.restamp(SHIFT, FLOOR, above) == 0  # nacked: it may have got there
        queued = {r.seq: r for r in await st.batch(100, 1 << 30)}
        assert queued[earlier[0]].created == 5.0 and queued[seqs[0]].created == 10.0
        moved = queued[seqs[1]]
        assert moved.created == 11.0 + SHIFT
        assert decode_body("telemetry", moved.payload).time == 11.0 + SHIFT
        body = decode_body("alert", queued[seqs[2]].payload)
        assert body.time == 12.0 + SHIFT and queued[seqs[2]].created == 12.0 + SHIFT
        assert body.data["time"] == 12.0 + SHIFT  # type: ignore[union-attr]
        assert body.data["change_time"] == 11.0 + SHIFT  # type: ignore[union-attr]
        assert decode_body("event", queued[seqs[3]].payload).time == 13.0 + SHIFT
        assert queued[seqs[4]].created == 14.0 and queued[seqs[4]].payload == b"\xff not cbor"
        assert queued[seqs[5]].created == FLOOR + 1.0
        before = await st.stats()
        await st.close()
        caplog.set_level(logging.WARNING, logger="agent.store")
        again = await Store.open(settings, clock=vclock)  # the kinds' byte counts stayed exact
        assert (await again.stats()).kinds == before.kinds
        await again.close()

    vclock.run(main())
    assert not [r for r in caplog.records if "kind_counts_repaired" in r.getMessage()]


def test_a_record_the_shift_leaves_before_the_floor_is_not_moved_again_at_each_look(
    qdir: Path,
) -> None:
    """The wall clock steps twice: at boot it reads 1970, then a stale fake-hwclock time (still
    before the floor), then NTP sets it. The readings of the 1970 spell were stamped with an
    offset the watch no longer knows when NTP sets the clock: the shift leaves them before the
    floor. Before: each look restamped them again (they still matched ``created < floor``),
    moving them by the shift every CHECK seconds until they crossed the floor, at a time that
    is no one's. Now a record the shift does not lift to the floor is left as it is."""
    clock = VirtualClock(start_wall=30.0, start_monotonic=1000.0)
    stale = 1_717_200_000.0  # 2024-06-01: a fake-hwclock time, before the floor

    async def main() -> None:
        st = await Store.open(StoreSettings(path=qdir / "queue.db"), clock=clock)
        watch = WallClockWatch(st, clock)
        early = await st.put([_reading(clock.time())])
        await clock.sleep(CHECK)
        await watch.look()
        clock.step_wall(stale - clock.time())
        await clock.sleep(CHECK)
        await watch.look()
        later = await st.put([_reading(clock.time())])
        clock.step_wall(SHIFT - clock.time())  # NTP
        created = []
        for _ in range(5):
            await clock.sleep(CHECK)
            await watch.look()
            with sqlite3.connect(qdir / "queue.db") as db:
                created.append(dict(db.execute("SELECT seq, created FROM records").fetchall()))
        await st.close()
        assert all(c == created[0] for c in created), created  # each record moved once at most
        assert created[0][early[0]] < FLOOR  # its offset is unknown: as it was stamped
        assert created[0][later[0]] == pytest.approx(SHIFT)  # the time it was taken

    clock.run(main())


def test_readings_still_in_the_commit_window_when_ntp_sets_the_clock_are_restamped(
    qdir: Path,
) -> None:
    """Offline, the clock at 1970, a reading a second through the telemetry writer with a 30 s
    commit window (``[store] commit_window`` may be up to 60 s); NTP sets the clock. The look
    after the step restamps what was committed; the readings waiting in the window are
    committed up to 30 s after the step. Before: the next look (10 s later) found none left and
    the watch stopped, so those readings kept their 1970 stamps."""
    clock = VirtualClock(start_wall=30.0, start_monotonic=1000.0)

    async def main() -> None:
        st = await Store.open(StoreSettings(path=qdir / "queue.db"), clock=clock)
        watch = WallClockWatch(st, clock, settle=30.0)
        writer = TelemetryWriter(st, clock, window=30.0)
        tasks = [asyncio.create_task(writer.run()), asyncio.create_task(watch.run())]
        for i in range(150):
            if i == 75:
                clock.step_wall(SHIFT - clock.time())  # NTP
            writer.submit(Reading("m", {"a": 1.5}, i, clock.monotonic(), clock.time()))
            await clock.sleep(1.0)
        await clock.sleep(60.0)
        writer.stop()
        await tasks[0]
        tasks[1].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[1]
        await st.close()

    clock.run(main())
    with sqlite3.connect(qdir / "queue.db") as db:
        created = [c for (c,) in db.execute("SELECT created FROM records ORDER BY seq")]
    assert len(created) == 150
    assert all(c >= FLOOR for c in created), [c for c in created if c < FLOOR]
