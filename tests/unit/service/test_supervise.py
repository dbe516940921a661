"""The stage supervisor on a virtual clock: a failing stage is restarted with backoff and never
takes another stage down; it logs once per failure episode; a stage that stays down stops the
watchdog (Health reports it), and one that runs long enough again is healthy."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from agent.errors import StoreError
from agent.service import supervise
from agent.service.notify import Health
from agent.service.supervise import Supervisor
from drivers.clock import VirtualClock

pytestmark = pytest.mark.timeout(30)


def test_a_failing_stage_is_restarted_and_the_others_keep_running(
    vclock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    health = Health(vclock)
    sup = Supervisor(vclock, health, random.Random(1))
    runs = 0
    ticks = 0

    async def failing() -> None:
        nonlocal runs
        runs += 1
        await vclock.sleep(0.1)
        raise StoreError("queue write: disk I/O error")

    async def writer() -> None:
        nonlocal ticks
        while True:
            await vclock.sleep(1.0)
            ticks += 1

    async def main() -> None:
        with caplog.at_level(logging.DEBUG, logger="agent.service.supervise"):
            bad = sup.start("uplink", failing)
            good = sup.start("store-writer", writer)
            await vclock.sleep(600.0)
            assert not good.done()  # the writer was never cancelled by the uplink's failures
            bad.cancel()
            good.cancel()
            await asyncio.wait([bad, good])

    vclock.run(main())
    assert ticks >= 599
    assert runs > 10  # restarted again and again ...
    assert runs < 600 / supervise.RESTART_BASE  # ... with backoff, not in a tight loop
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1  # one line for the episode, not one per restart
    assert "stage=uplink" in errors[0].getMessage()
    assert errors[0].exc_info is None  # one line, no traceback


def test_a_stage_down_too_long_stops_the_watchdog_and_recovery_resumes_it(
    vclock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    health = Health(vclock)
    sup = Supervisor(vclock, health, random.Random(2))
    broken = True

    async def stage() -> None:
        while True:
            await vclock.sleep(1.0)
            if broken:
                raise OSError("link down")

    async def main() -> None:
        nonlocal broken
        task = sup.start("link", stage)
        await vclock.sleep(supervise.DOWN_AFTER / 2)
        assert health.stuck() == [] and sup.down() == ["link"]
        await vclock.sleep(supervise.DOWN_AFTER)
        assert health.stuck() == ["link-down"]  # systemd will restart the agent
        broken = False
        with caplog.at_level(logging.INFO, logger="agent.service.supervise"):
            await vclock.sleep(supervise.RESTART_CAP + supervise.HEALTHY_AFTER + 1)
        assert health.stuck() == [] and sup.down() == []
        assert any("event=stage_recovered" in r.getMessage() for r in caplog.records)
        assert sup.status()["link"]["restarts"] > 1
        task.cancel()
        await asyncio.wait([task])

    vclock.run(main())


def test_a_stage_that_returns_is_finished_not_restarted(vclock: VirtualClock) -> None:
    sup = Supervisor(vclock, Health(vclock))
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    async def main() -> None:
        task = sup.start("ready", once)
        await vclock.sleep(100.0)
        assert task.done() and task.exception() is None

    vclock.run(main())
    assert runs == 1
