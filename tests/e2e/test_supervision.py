"""A failing stage inside the running agent: restarted, logged once, and the other stages (the
telemetry writer above all) go on; every reading taken is committed by the time the agent stops."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from agent.errors import StoreError
from agent.sense.simrig import SimRig
from agent.service.notify import Notifier
from agent.service.runtime import Agent
from drivers.clock import RealClock
from tests.e2e.test_runtime import sim_config

pytestmark = pytest.mark.timeout(60)


def test_a_stage_raising_store_error_is_restarted_and_the_writer_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = sim_config(tmp_path)
    failures = 0

    async def main() -> Agent:
        clock = RealClock()
        agent = Agent(cfg, clock=clock, rig=SimRig(cfg, clock), notifier=Notifier())
        real = agent.refresh_stats

        async def failing_stats() -> None:
            nonlocal failures
            if failures < 5:
                failures += 1
                raise StoreError("queue /x: read failed: disk I/O error")
            await real()

        agent.refresh_stats = failing_stats  # type: ignore[method-assign]

        async def script() -> None:
            await asyncio.sleep(4.0)
            agent.request_stop()

        await asyncio.gather(agent.run(install_signals=False), script())
        return agent

    with caplog.at_level(logging.INFO):
        agent = asyncio.run(main())
    assert failures == 5
    # the stats and metrics stages both read the queue statistics: one line each at most
    failed = [r.getMessage() for r in caplog.records if "event=stage_failed " in r.getMessage()]
    stages = [m.split("stage=")[1].split()[0] for m in failed]
    assert sorted(set(stages)) == sorted(stages) and set(stages) <= {"stats", "metrics"}
    status = agent.supervisor.status()
    assert status["stats"]["restarts"] + status["metrics"]["restarts"] == 5
    w = agent.writer
    assert w is not None and agent.readings > 0
    assert w.committed == agent.readings and w.backlog == 0
