"""The sampler's guard rails: a reading must be finite numbers, and one driver's bug (anything it
raises that is not a DriverError) degrades that sensor only, never the others."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import pytest

from agent.errors import DeviceDataError
from agent.sense.sampling import DOWN_AFTER, Sampler, SensorState, scale_values
from agent.sense.settings import Scaling, SensorConfig
from agent.service.logring import LogRing
from drivers.base import Identity, Options, Reading
from drivers.bme280 import Bme280
from drivers.bus import AsyncI2C, AsyncSerial, open_serial
from drivers.clock import RealClock, VirtualClock
from drivers.line import LineSensor
from drivers.sim.bme280 import Bme280Sim
from drivers.sim.line import LineSensorSim
from drivers.sim.serialport import PtyPort
from drivers.sim.smbus import FakeSMBus

PRESSURE = SensorConfig(
    name="p",
    driver="line",
    interval=1.0,
    channels=("pressure_bar",),
    port="/dev/ttyUSB0",
    scaling={"pressure_bar": Scaling("P", (4.0, 20.0), (0.0, 1000.0))},
)


def test_scaling_that_overflows_to_infinity_is_a_data_error_naming_the_channel() -> None:
    assert scale_values(PRESSURE, {"P": 12.0}) == {"pressure_bar": 500.0}
    with pytest.raises(DeviceDataError, match=r"p: channel 'pressure_bar' is inf \(P=1e\+308"):
        scale_values(PRESSURE, {"P": 1e308})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_driver_value_is_a_data_error(value: float) -> None:
    cfg = SensorConfig(name="t", driver="line", interval=1.0, channels=("T",), port="x")
    with pytest.raises(DeviceDataError, match=rf"t: channel 'T' is {value!r}; a reading must"):
        scale_values(cfg, {"T": value})


class BuggyDriver:
    """A driver with a bug: its read raises what no driver should (an IndexError from a parser
    that met an answer it did not expect), ``fails`` times, then reads again."""

    def __init__(self, fails: int) -> None:
        self.fails = fails
        self.opens = 0

    async def open(self) -> Identity:
        self.opens += 1
        return Identity("buggy", f"open #{self.opens}")

    async def read(self) -> dict[str, float]:
        if self.fails > 0:
            self.fails -= 1
            raise IndexError("list index out of range")
        return {"T": 21.5}

    async def close(self) -> None:
        pass


def test_a_driver_bug_degrades_its_sensor_only_and_it_is_reopened(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.sense.sampling")
    clock = VirtualClock()
    fake = FakeSMBus()
    fake.attach(0x76, Bme280Sim(clock))
    bus = AsyncI2C(fake, clock, name="sim")
    air = SensorConfig(
        name="air", driver="bme280", interval=1.0, channels=("temperature_c",), bus="sim"
    )
    buggy = SensorConfig(name="buggy", driver="line", interval=1.0, channels=("T",), port="x")
    driver = BuggyDriver(fails=DOWN_AFTER + 1)
    readings: list[Reading] = []
    states: list[SensorState] = []

    async def sink(reading: Reading) -> None:
        readings.append(reading)

    async def main() -> None:
        sampler = Sampler(
            [(air, Bme280(bus.device(0x76), Bme280.parse_options(Options({})))), (buggy, driver)],
            clock,
            sink,
            backoff_base=1.0,
            backoff_max=1.0,
        )
        run = asyncio.create_task(sampler.run())
        try:
            for _ in range(12):
                await clock.sleep(1.0)
                states.append(sampler.health["buggy"].state)
        finally:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run  # re-raises what stopped the sampler, if anything did
        health = sampler.health["buggy"]
        assert health.last_error == "IndexError: list index out of range"

    try:
        clock.run(main())
    finally:
        bus.close()
    assert SensorState.DEGRADED in states and SensorState.DOWN in states
    assert states[-1] is SensorState.OK
    assert driver.opens == DOWN_AFTER + 2  # opened again before each retry
    assert sum(r.sensor == "air" for r in readings) >= 12  # the other sensor never stopped
    assert sum(r.sensor == "buggy" for r in readings) >= 2
    bugs = [r for r in caplog.records if "event=driver_bug" in r.getMessage()]
    # one line per change of state (degraded, down), nothing else about it: a bug at every
    # sample would otherwise write a line per sample
    assert [b.getMessage().split(" state=")[1].split()[0] for b in bugs] == ["degraded", "down"]
    line = bugs[0].getMessage()
    assert line.startswith("sensor=buggy driver=line event=driver_bug state=degraded errors=1")
    assert "IndexError: list index out of range" in line and "\n" not in line
    assert bugs[0].levelno == logging.ERROR
    assert not [r for r in caplog.records if "event=degraded" in r.getMessage()]


@pytest.mark.parametrize("escape", [KeyboardInterrupt, SystemExit, asyncio.CancelledError])
def test_interrupts_and_cancellation_still_go_through(escape: type[BaseException]) -> None:
    class Interrupted(BuggyDriver):
        async def read(self) -> dict[str, float]:
            raise escape()

    clock = VirtualClock()
    cfg = SensorConfig(name="t", driver="line", interval=1.0, channels=("T",), port="x")
    sampler = Sampler([(cfg, Interrupted(0))], clock, lambda r: asyncio.sleep(0))

    async def main() -> None:
        with pytest.raises(escape):
            await sampler.sample_once(sampler.tasks["t"])

    clock.run(main())
    assert sampler.health["t"].errors == 0


@pytest.mark.parametrize("withheld", [True, False], ids=["local", "raw"])
async def test_a_sensors_error_text_quoting_a_local_value_stays_out_of_the_log_ring(
    withheld: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack: a line sensor whose humidity is ``local`` ([data]) sends a line with a bad
    checksum; the driver's error quotes the line, values included. The log ring (what the
    ``logs`` command uploads) must not carry them; stderr (journald, on the device) keeps it."""
    caplog.set_level(logging.INFO, logger="agent.sense.sampling")
    clock = RealClock()
    options = LineSensor.parse_options(Options({"keys": ["T", "humidity_pct"], "checksum": "xor"}))
    sim = LineSensorSim(clock, options)
    sim.set_channel("humidity_pct", 42.37)
    sim.faults.bad_crc = 1.0
    pty = PtyPort(sim, clock)
    port = AsyncSerial(open_serial(pty.path, baudrate=9600, timeout=1.0), clock)
    cfg = SensorConfig(
        name="air", driver="line", interval=0.05, channels=("T", "humidity_pct"), port=pty.path
    )
    ring = LogRing()
    logging.getLogger("agent.sense.sampling").addHandler(ring)
    sampler = Sampler(
        [(cfg, LineSensor(port, options))],
        clock,
        lambda r: asyncio.sleep(0),
        withheld=frozenset({"air"} if withheld else ()),
    )
    run = asyncio.create_task(sampler.run())
    try:
        async with asyncio.timeout(10):
            while sampler.health["air"].errors == 0:  # noqa: ASYNC110 (the sampler's task)
                await asyncio.sleep(0.02)
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        logging.getLogger("agent.sense.sampling").removeHandler(ring)
        port.close()
        pty.close()
    (line,) = [text for _, text in ring.since(None) if "event=degraded" in text]
    assert line.startswith("20") and "sensor=air event=degraded errors=1" in line
    assert ("42.37" in line) is not withheld
    if withheld:
        assert "error='withheld" in line
    (kept,) = [r.getMessage() for r in caplog.records if "event=degraded" in r.getMessage()]
    assert "checksum mismatch" in kept and "42.37" in kept  # the journal on the device keeps it


class SlowDriver(BuggyDriver):
    """Every read takes half a second (a long conversion, a slow instrument); ``fail`` makes
    the reads raise once they are done."""

    def __init__(self, fail: bool) -> None:
        super().__init__(0)
        self.fail = fail

    async def read(self) -> dict[str, float]:
        await asyncio.sleep(0.5)
        if self.fail:
            raise DeviceDataError("garbled")
        return {"T": 21.5}


@pytest.mark.parametrize(
    ("fail", "at"),
    [(False, 1.2), (True, 1.7)],  # reads at 0 and 1 s; failing: at 0 and 1.5 s (backoff 1 s)
    ids=["read-ends-well", "read-fails"],
)
def test_a_sensor_disabled_while_it_is_read_stays_disabled_and_emits_nothing(
    fail: bool, at: float
) -> None:
    """Desired state disables a sensor while its read is running: the read's end must not
    report it ok (or degraded), nor hand on a reading taken after it was disabled."""
    clock = VirtualClock()
    cfg = SensorConfig(name="t", driver="line", interval=1.0, channels=("T",), port="x")
    readings: list[Reading] = []
    states: list[SensorState] = []

    async def sink(reading: Reading) -> None:
        readings.append(reading)

    async def main() -> None:
        sampler = Sampler([(cfg, SlowDriver(fail))], clock, sink, backoff_base=1.0)
        run = asyncio.create_task(sampler.run())
        try:
            await clock.sleep(at)  # the second read is under way
            sampler.set_enabled("t", False)
            before = len(readings)
            for _ in range(5):
                await clock.sleep(1.0)
                states.append(sampler.health["t"].state)
            assert len(readings) == before
        finally:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run

    clock.run(main())
    assert states == [SensorState.DISABLED] * 5


def test_a_disabled_sensor_s_part_is_closed_and_opened_again_when_enabled() -> None:
    """Disabling a sensor (desired state) closes its part: asleep where it has a low-power mode
    (an ADXL345 stopped measuring, an INA219 powered down), where before it went on converting
    for as long as the sensor stayed disabled, and was never closed, at shutdown either.
    Enabled again, it is opened (configured) before its next read."""
    clock = VirtualClock()
    cfg = SensorConfig(name="t", driver="line", interval=1.0, channels=("T",), port="x")
    readings: list[Reading] = []
    driver = BuggyDriver(0)
    closes: list[float] = []

    async def close() -> None:
        closes.append(clock.monotonic())

    driver.close = close  # type: ignore[method-assign]

    async def sink(reading: Reading) -> None:
        readings.append(reading)

    async def main() -> None:
        sampler = Sampler([(cfg, driver)], clock, sink)
        run = asyncio.create_task(sampler.run())
        try:
            await clock.sleep(2.5)
            sampler.set_enabled("t", False)
            await clock.sleep(3.0)
            assert (len(closes), driver.opens, len(readings)) == (1, 1, 3)
            sampler.set_enabled("t", True)
            await clock.sleep(0.5)
            assert (driver.opens, len(readings)) == (2, 4)
        finally:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
            await sampler.close()
        assert len(closes) == 2  # at shutdown, the enabled part

    clock.run(main())
