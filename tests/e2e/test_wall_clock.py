"""The agent on a device without a real-time clock (docs/store.md, "Times before the clock is
set"): it boots with the wall clock at 1970, takes readings for a minute, then NTP sets the clock.
The whole agent runs on a virtual clock with the simulated rig."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from agent.sense.simrig import SimRig
from agent.service import config as configmod
from agent.service.config import example_config
from agent.service.runtime import Agent
from agent.service.wallclock import FLOOR
from agent.store.settings import CODE_KIND
from agent.wire.records import decode_body
from drivers.clock import VirtualClock

pytestmark = pytest.mark.timeout(120)

BOOT = 30.0  # the wall clock at boot: 1970-01-01T00:00:30Z
NOW = 1_796_600_000.0  # what NTP sets it to, a minute later


@pytest.mark.parametrize(
    ("window", "unset"), [(1.0, 60.0), (30.0, 75.0)], ids=["default-window", "30s-window"]
)
def test_readings_taken_before_ntp_sets_the_clock_get_the_time_they_were_taken(
    tmp_path: Path, window: float, unset: float
) -> None:
    """Before: the readings of the first minute were queued, and sent, stamped 1970: the
    endpoint stores them as they come, and its views select records by the time in the body.
    With a commit window longer than the watch's look (``[store] commit_window = 30``, NTP
    some seconds into a window), the readings waiting in it when NTP set the clock were
    committed after a look that found none left, and kept their 1970 stamps."""
    cfg = configmod.simulated(
        configmod.load(example_config()), configmod.SimulationConfig(source="pump", seed=5)
    )
    cfg = replace(configmod.replace_data_dir(cfg, tmp_path), uplink=None)  # all stays queued
    cfg = replace(cfg, store=replace(cfg.store, commit_window=window))
    clock = VirtualClock(start_wall=BOOT, start_monotonic=1000.0)

    async def main() -> None:
        agent = Agent(cfg, clock=clock, rig=SimRig(cfg, clock), status_socket=False)

        async def script() -> None:
            await clock.sleep(unset)
            clock.step_wall(NOW - clock.time())  # NTP
            await clock.sleep(60.0)
            agent.request_stop()

        await asyncio.gather(agent.run(install_signals=False), script())

    clock.run(main())
    with sqlite3.connect(cfg.store.path) as db:
        rows = db.execute("SELECT seq, kind, created, payload FROM records ORDER BY seq").fetchall()
    stamped = [(created, decode_body(CODE_KIND[k], p).time) for _, k, created, p in rows]
    assert len(stamped) > 100
    assert all(created == t for created, t in stamped)  # the column and the body agree
    times = [t for _, t in stamped]
    assert min(times) >= NOW - unset - 1.0, "a reading still stamped before the clock was set"
    assert min(times) < NOW - unset + 10.0  # the first minute's readings, that much early
    assert max(times) <= NOW + 60.0 + 1.0
    assert all(t >= FLOOR for t in times)
