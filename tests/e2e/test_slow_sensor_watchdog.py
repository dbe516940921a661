"""A sensor whose every read is long by its configuration (an ADXL345 window of 1024 samples at
12.5 Hz: 82 s) is not a stuck stage: the agent keeps feeding the systemd watchdog, so systemd does
not kill and restart it (five restarts in ten minutes stop the service for good). The whole agent
runs on a virtual clock with the simulated rig."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from agent.sense.simrig import SimRig
from agent.service import config as configmod
from agent.service.config import example_config
from agent.service.runtime import Agent
from drivers.clock import VirtualClock

pytestmark = pytest.mark.timeout(120)


def test_a_read_long_by_its_configuration_does_not_count_as_a_stuck_sampler(
    tmp_path: Path,
) -> None:
    cfg = configmod.simulated(
        configmod.load(example_config()), configmod.SimulationConfig(source="pump", seed=5)
    )
    cfg = replace(configmod.replace_data_dir(cfg, tmp_path), uplink=None)
    slow = {"data_rate_hz": 12.5, "window": 1024}  # 81.92 s of samples per reading
    sensors = tuple(
        replace(s, options=replace(s.options, **slow)) if s.name == "vib_motor" else s
        for s in cfg.sensors
    )
    cfg = replace(cfg, sensors=sensors)
    clock = VirtualClock()
    stuck: list[tuple[float, list[str]]] = []

    async def main() -> None:
        agent = Agent(cfg, clock=clock, rig=SimRig(cfg, clock), status_socket=False)

        async def script() -> None:
            start = clock.monotonic()
            for _ in range(100):  # 200 s: two whole windows and more
                await clock.sleep(2.0)
                stuck.append((clock.monotonic() - start, agent.health.stuck()))
            agent.request_stop()
            health = agent.sampler.health["vib_motor"]
            assert health.reads >= 2, health

        await asyncio.gather(agent.run(install_signals=False), script())

    clock.run(main())
    assert not [(t, names) for t, names in stuck if names], stuck
