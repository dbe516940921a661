"""The whole simulated rig through the real drivers and the sampler.

- SKAB replay: valve1/0.csv drives the eight channels; what the agent reads back equals the CSV
  within each part's resolution, on all eight channels, row by row.
- The sampler under a virtual clock: an hour of readings in seconds; a failing sensor is marked
  degraded, retried with backoff, recovers, and never stops the others.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest

from agent.sense.hardware import Hardware
from agent.sense.sampling import BACKOFF_MAX, SensorState, backoff_delay
from agent.sense.simrig import SimRig
from agent.service import config as configmod
from agent.service.config import example_config
from agent.service.runtime import Agent
from drivers.base import Reading
from drivers.clock import VirtualClock
from drivers.sim.sources import SKAB_CHANNELS, SkabReplay, read_skab_csv


def rig_config(simulation: configmod.SimulationConfig, data_dir: Path) -> configmod.Config:
    """The example config on the simulated rig, its state in ``data_dir`` (never the example's
    /var/lib/edge-agent: another run, or a real agent on this machine, holds that queue)."""
    cfg = configmod.simulated(configmod.load(example_config()), simulation)
    return configmod.replace_data_dir(cfg, data_dir)


def channel_tolerance(cfg: configmod.SensorConfig, driver, channel: str) -> float:
    """The part's resolution for ``channel``, carried through the configured scaling."""
    source = cfg.source_of(channel)
    gain = abs(cfg.scaling[channel].gain) if channel in cfg.scaling else 1.0
    return driver.resolution(source) * gain


@pytest.mark.timeout(300)
def test_skab_replay_reads_back_every_channel_within_resolution(skab_dir: Path, tmp_path: Path):
    csv_path = skab_dir / "valve1" / "0.csv"
    data = read_skab_csv(csv_path)
    sim = configmod.SimulationConfig(source="skab", file=csv_path, loop=False)
    cfg = rig_config(sim, tmp_path)
    clock = VirtualClock()
    readings: list[Reading] = []
    rows = len(data.rows)

    async def main() -> dict[str, object]:
        rig = SimRig(cfg, clock, SkabReplay(data, period=1.0, loop=False))
        agent = Agent(cfg, clock=clock, rig=rig, on_reading=readings.append)
        # stop just before the last row ends
        asyncio.get_running_loop().call_later(rows - 0.5, agent.request_stop)
        drivers: dict[str, object] = {}
        original_build = agent.hardware.build

        def build(sensors=None):
            pairs = original_build(sensors)
            drivers.update({c.name: d for c, d in pairs})
            return pairs

        agent.hardware.build = build  # keep the driver objects to ask their resolution
        try:
            await agent.run(install_signals=False)
        finally:
            rig.close()
        return {"drivers": drivers, "t0": rig.t0}

    out = clock.run(main())
    drivers, t0 = out["drivers"], out["t0"]

    signal_of = {}  # (sensor, channel) -> SKAB column
    for s in cfg.sensors:
        for ch, sig in s.signals.items():
            signal_of[(s.name, ch)] = sig
    checked = defaultdict(int)
    worst = defaultdict(float)
    for r in readings:
        row = math.floor(r.t_mono - t0)
        assert 0 <= row < rows
        expected = dict(zip(SKAB_CHANNELS, data.rows[row], strict=True))
        expected.update(SkabReplay.AMBIENT)
        scfg = cfg.sensor(r.sensor)
        for ch, value in r.values.items():
            signal = signal_of[(r.sensor, ch)]
            tol = channel_tolerance(scfg, drivers[r.sensor], ch)
            err = abs(value - expected[signal])
            worst[signal] = max(worst[signal], err / tol)
            assert err <= tol * (1 + 1e-9) + 1e-12, (
                f"row {row} {r.sensor}.{ch} ({signal}): read {value!r}, csv {expected[signal]!r}, "
                f"|diff| {err:.3g} > resolution {tol:.3g}"
            )
            checked[signal] += 1
    # every one of the eight SKAB channels was compared on (nearly) every row
    for column in SKAB_CHANNELS:
        assert checked[column] >= rows - 2, (column, checked[column], rows)
    assert max(worst.values()) <= 1.0


def test_sampler_runs_an_hour_of_pump_data_in_virtual_time(tmp_path: Path):
    """All eight sensors every 10 s for an hour of virtual time: 2,880 readings in seconds."""
    cfg = rig_config(configmod.SimulationConfig(source="pump", seed=3), tmp_path)
    cfg = replace(cfg, sensors=tuple(replace(s, interval=10.0) for s in cfg.sensors))
    clock = VirtualClock()
    readings: list[Reading] = []

    async def main() -> None:
        rig = SimRig(cfg, clock)
        agent = Agent(cfg, clock=clock, rig=rig, on_reading=readings.append)
        asyncio.get_running_loop().call_later(3600.0, agent.request_stop)
        try:
            await agent.run(install_signals=False)
        finally:
            rig.close()

    clock.run(main())
    per_sensor = defaultdict(list)
    for r in readings:
        per_sensor[r.sensor].append(r)
    for s in cfg.sensors:
        got = per_sensor[s.name]
        expected = 3600.0 / s.interval
        assert expected - 2 <= len(got) <= expected + 1, (s.name, len(got))
        assert set(got[0].values) == set(s.channels)
    seqs = [r.seq for r in readings]
    assert seqs == list(range(1, len(readings) + 1))
    monos = [r.t_mono for r in readings]
    assert monos == sorted(monos)
    assert all(
        abs((r.t_wall - r.t_mono) - (readings[0].t_wall - readings[0].t_mono)) < 1e-6
        for r in readings
    )


def test_failing_sensor_degrades_backs_off_recovers_and_never_stops_the_others(tmp_path: Path):
    cfg = rig_config(configmod.SimulationConfig(source="pump", seed=4), tmp_path)
    clock = VirtualClock()
    readings: list[Reading] = []
    timeline: list[tuple[float, str]] = []

    async def main() -> None:
        rig = SimRig(cfg, clock)
        agent = Agent(cfg, clock=clock, rig=rig, on_reading=readings.append)
        part = rig.part("loop")

        async def script() -> None:
            await clock.sleep(10.5)
            part.faults.disconnect = True
            for _ in range(120):
                await clock.sleep(1.0)
                timeline.append((clock.monotonic(), agent.sampler.health["loop"].state.value))
            part.faults.disconnect = False
            await clock.sleep(80.0)
            timeline.append((clock.monotonic(), agent.sampler.health["loop"].state.value))
            agent.request_stop()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(agent.run(install_signals=False))
            tg.create_task(script())
        rig.close()

    clock.run(main())
    states = [s for _, s in timeline]
    assert "degraded" in states and "down" in states
    assert states[-1] == "ok"
    loop_times = [r.t_mono for r in readings if r.sensor == "loop"]
    gaps = [b - a for a, b in itertools.pairwise(loop_times)]
    assert max(gaps) > 60  # it stopped reading while the part was gone ...
    assert loop_times[-1] - loop_times[0] > 190  # ... and came back
    # the other sensors kept their one-second rhythm throughout
    flow_times = [r.t_mono for r in readings if r.sensor == "flow"]
    flow_gaps = [b - a for a, b in itertools.pairwise(flow_times)]
    assert max(flow_gaps) < 1.5
    assert len(flow_times) >= 205


def test_backoff_doubles_up_to_the_cap():
    delays = [backoff_delay(n, interval=1.0) for n in range(1, 10)]
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0]
    assert delays[-1] == BACKOFF_MAX
    assert backoff_delay(1, interval=0.1) == pytest.approx(0.1)


def test_hardware_reports_missing_bus_per_sensor_without_failing_start(tmp_path: Path):
    cfg = configmod.load(example_config())
    clock = VirtualClock()

    async def main() -> list[str]:
        hw = Hardware(cfg, clock)
        pairs = [(c, hw.driver(c)) for c in cfg.sensors if c.port is None]
        errors = []
        for _, d in pairs:
            try:
                await d.open()
            except Exception as err:
                errors.append(type(err).__name__ + ": " + str(err))
        hw.close()
        return errors

    errors = clock.run(main())
    assert errors and all(e.startswith("DeviceNotFound") for e in errors)
    assert all("/dev/i2c-1" in e for e in errors)


def test_sensor_state_enum_values():
    assert {s.value for s in SensorState} >= {"ok", "degraded", "down"}
