"""A USB serial adapter unplugged and plugged back in, under the sampler, on a real pty.

The adapter is a pty behind a udev-style symlink (``/dev/serial/by-id/...``): unplugging closes
the pty (the driver's open file descriptor hangs up, and pyserial's tty ioctls then raise
termios.error, which is neither an OSError nor a SerialException) and udev removes the link;
plugging in makes a new pty and the link points to it again. An I2C sensor on the simulated bus
samples all along.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.errors import DeviceIOError
from agent.sense import hardware as hardware_mod
from agent.sense.hardware import Hardware
from agent.sense.sampling import Sampler, SensorState
from agent.sense.settings import SIM_BUS, SensorConfig, SimulationConfig
from drivers.base import Options, Reading
from drivers.bme280 import Bme280
from drivers.clock import VirtualClock
from drivers.modbus import ModbusInstrument
from drivers.sim.bme280 import Bme280Sim
from drivers.sim.modbus import ModbusSlaveSim
from drivers.sim.serialport import PtyPort
from drivers.sim.smbus import FakeSMBus

MODBUS = {
    "slave": 7,
    "timeout": 1.0,
    "retries": 0,
    "register": [{"name": "level", "table": "input", "address": 0, "type": "u16"}],
}


@dataclass(frozen=True)
class Rig:
    sensors: tuple[SensorConfig, ...]
    simulation: SimulationConfig | None = None


def held_open(path: str) -> list[str]:
    """This process's file descriptors open on ``path`` (Linux)."""
    fds = Path("/proc/self/fd")
    found = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith(path):
                found.append(fd.name)
    return found


@pytest.mark.timeout(60)
def test_unplugged_adapter_degrades_its_sensor_only_and_recovers_at_the_same_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.sense.sampling")
    clock = VirtualClock()
    link = tmp_path / "usb-FTDI_FT232R-if00-port0"
    modbus_options = ModbusInstrument.parse_options(Options(MODBUS))
    instrument = ModbusSlaveSim(clock, modbus_options)
    air = SensorConfig(
        name="air",
        driver="bme280",
        interval=1.0,
        channels=("temperature_c",),
        bus=SIM_BUS,
        address=0x76,
        options=Bme280.parse_options(Options({})),
    )
    flow = SensorConfig(
        name="flow",
        driver="modbus",
        interval=1.0,
        channels=("level",),
        port=str(link),
        options=modbus_options,
    )
    bus = FakeSMBus("sim")
    bus.attach(0x76, Bme280Sim(clock))
    readings: list[Reading] = []
    states: list[str] = []

    async def sink(reading: Reading) -> None:
        readings.append(reading)

    def count(sensor: str) -> int:
        return sum(r.sensor == sensor for r in readings)

    async def main() -> None:
        hardware = Hardware(Rig((air, flow)), clock, SimpleNamespace(bus=bus))
        sampler = Sampler(hardware.build(), clock, sink, backoff_base=1.0, backoff_max=2.0)
        pty = PtyPort(instrument, clock)
        ports = [pty]
        link.symlink_to(pty.path)

        run = asyncio.create_task(sampler.run())
        try:
            await clock.sleep(3.5)
            assert count("flow") >= 3
            pty.close()  # unplugged: the tty hangs up ...
            link.unlink()  # ... and udev removes its by-id link
            air_before = count("air")
            for _ in range(20):
                await clock.sleep(1.0)
                states.append(sampler.health["flow"].state.value)
                if states[-1] != SensorState.OK:  # the hang-up was seen: the dead tty is let go
                    assert not held_open(pty.path)
            assert count("air") - air_before >= 19  # the I2C sensor never stopped
            flow_before = count("flow")
            ports.append(PtyPort(instrument, clock))  # plugged in again: a new tty ...
            link.symlink_to(ports[-1].path)  # ... at the same by-id path
            await clock.sleep(5.0)
            states.append(sampler.health["flow"].state.value)
            assert count("flow") - flow_before >= 2
        finally:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run  # re-raises what stopped the sampler, if anything did
            await sampler.close()
            hardware.close()
            for port in ports:
                port.close()

    clock.run(main())
    assert SensorState.DEGRADED in states and SensorState.DOWN in states
    assert states[-1] == SensorState.OK
    hung_up = [r for r in caplog.records if "port hung up" in r.getMessage()]
    assert len(hung_up) == 1, [r.getMessage() for r in caplog.records]
    assert "sensor=flow event=degraded" in hung_up[0].getMessage()
    assert str(link) in hung_up[0].getMessage()
    assert not [r for r in caplog.records if "driver_bug" in r.getMessage()]
    assert any("sensor=flow event=recovered" in r.getMessage() for r in caplog.records)


class UsbAdapter(FakeSMBus):
    """A USB I2C adapter as an open /dev/i2c-N sees it: once unplugged (``gone``) every
    transfer on that descriptor fails with ENODEV (the USB core's answer for a device that is
    gone), for as long as it is held open; plugged back in, it is a new adapter."""

    gone = False

    def _device(self, address: int):  # type: ignore[no-untyped-def]
        if self.gone:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        return super()._device(address)


def test_an_i2c_adapter_unplugged_and_plugged_back_is_opened_anew(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A USB I2C adapter unplugged: transfers on the open /dev/i2c-N fail with ENODEV. The bus
    was never let go, so its parts kept failing after the adapter came back (and the kernel
    cannot finish removing an adapter whose device file is held open). Now the bus is closed
    on such an error and opened again at the next transfer."""
    clock = VirtualClock()
    adapters: list[UsbAdapter] = []

    def plug() -> None:
        adapters.append(UsbAdapter("i2c-3"))
        adapters[-1].attach(0x76, Bme280Sim(clock))

    monkeypatch.setattr(hardware_mod, "open_i2c_bus", lambda number: adapters[-1])
    air = SensorConfig(
        name="air",
        driver="bme280",
        interval=1.0,
        channels=("temperature_c",),
        bus=3,
        address=0x76,
        options=Bme280.parse_options(Options({})),
    )

    async def main() -> None:
        hardware = Hardware(Rig((air,)), clock)
        driver = hardware.driver(air)
        try:
            plug()
            await driver.open()
            await driver.read()
            adapters[-1].gone = True  # unplugged
            with pytest.raises(DeviceIOError, match="ENODEV"):
                await driver.read()
            plug()  # plugged back in
            await driver.open()  # what the sampler does before its next read
            assert "temperature_c" in await driver.read()
        finally:
            hardware.close()

    clock.run(main())
