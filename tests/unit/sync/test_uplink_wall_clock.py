"""The uplink on a device that booted with its wall clock at 1970 (no RTC): records wait for NTP
and the restamping (agent/service/wallclock.py) before they leave, at most WALL_HOLD seconds, on
virtual time with the real store, the real watch and the scripted endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.service.wallclock import FLOOR, WallClockWatch
from agent.store.queue import NewRecord, Store
from agent.sync import uplink as uplink_mod
from agent.sync.uplink import Uplink
from agent.wire.records import Kind, TelemetryBody
from drivers.clock import VirtualClock
from tests.unit.sync.test_uplink_refusals import ScriptedEndpoint, make_uplink, open_store

pytestmark = pytest.mark.timeout(60)

BOOT = 30.0  # the wall clock at boot: 1970-01-01T00:00:30Z
NOW = 1_796_600_000.0


def reading(clock: VirtualClock, i: int) -> NewRecord:
    body = TelemetryBody("motor", clock.time(), {"current_a": float(i)})
    return NewRecord(Kind.TELEMETRY, body.to_cbor(), created=clock.time())


async def drive(
    clock: Any,
    store: Store,
    uplink: Uplink,
    watch: WallClockWatch,
    seconds: float,
    before: Callable[[int], None] = lambda i: None,
) -> None:
    """The uplink and the watch running, a :func:`reading` every second for ``seconds``
    (``before(i)`` called ahead of reading i), 30 s more to deliver; then both stopped and the
    store closed."""
    tasks = [asyncio.create_task(uplink.run()), asyncio.create_task(watch.run())]
    for i in range(int(seconds)):
        before(i)
        await store.put([reading(clock, i)])
        uplink.poke()
        await clock.sleep(1.0)
    await clock.sleep(30.0)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await store.close()


def run(tmp_path: Path, ntp_after: float | None, seconds: float) -> list[float]:
    """Readings every second for ``seconds`` while the uplink and the watch run; NTP sets the
    clock after ``ntp_after`` s (None: never). The body times the endpoint stored."""
    clock = VirtualClock(start_wall=BOOT, start_monotonic=1000.0)
    endpoint = ScriptedEndpoint(lambda recs, n: None)

    async def main() -> None:
        store = await open_store(tmp_path, clock)
        watch = WallClockWatch(store, clock)
        uplink = make_uplink(store, endpoint, clock)
        uplink.wall_settled = watch.settled

        def ntp(i: int) -> None:
            if ntp_after is not None and i == int(ntp_after):
                clock.step_wall(NOW - clock.time())

        await drive(clock, store, uplink, watch, seconds, ntp)

    clock.run(main())
    return [TelemetryBody.from_cbor(bytes(r.body)).time for r in endpoint.stored.values()]


def test_readings_taken_before_ntp_leave_with_the_time_they_were_taken(tmp_path: Path) -> None:
    """Before: the uplink sent each reading as it came, stamped 1970 (the restamping only
    reaches records never handed out), and the endpoint stored them so."""
    times = run(tmp_path, ntp_after=40.0, seconds=80.0)
    assert len(times) == 80
    assert all(t >= FLOOR for t in times), sorted(times)[:3]
    assert min(times) == pytest.approx(NOW - 40.0, abs=1.5)  # the first reading, a boot ago


def test_a_clock_never_set_holds_records_at_most_the_bound(tmp_path: Path) -> None:
    """No NTP (a plant network that blocks it): after WALL_HOLD the records go as stamped;
    nothing waits for ever."""
    times = run(tmp_path, ntp_after=None, seconds=uplink_mod.WALL_HOLD + 20.0)
    assert len(times) == int(uplink_mod.WALL_HOLD + 20.0)
    assert max(times) < FLOOR
