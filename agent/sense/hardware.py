"""Opens the buses and ports of the configured sensors and builds their drivers.

A bus or port that cannot be opened does not stop start-up: the sensor's driver gets a transport
that raises the opening error on each use and tries to open again, so the sampler marks that
sensor degraded, retries it with backoff, and it recovers when the adapter appears.
"""

from __future__ import annotations

import logging
import termios
from collections.abc import Sequence
from typing import Any

from agent.errors import DeviceIOError, DriverError
from agent.sense.settings import SIM_BUS, RigConfig, SensorConfig
from drivers.bus import (
    AsyncI2C,
    AsyncSerial,
    I2CBus,
    describe_os_error,
    open_i2c_bus,
    open_serial,
    port_errors,
)
from drivers.clock import Clock
from drivers.registry import driver_class

log = logging.getLogger(__name__)


class _ReopeningBus:
    """An I2C bus that is opened on first use, and again after it failed to open, hung or
    went away (:meth:`reopen`)."""

    def __init__(self, number: int) -> None:
        self.number = number
        self._bus: I2CBus | None = None

    def _get(self) -> I2CBus:
        if self._bus is None:
            self._bus = open_i2c_bus(self.number)  # raises DeviceNotFound with the reason
        return self._bus

    def __getattr__(self, name: str) -> Any:
        if name == "close":
            return self.close
        return getattr(self._get(), name)

    def close(self) -> None:
        if self._bus is not None:
            self._bus.close()
            self._bus = None

    def reopen(self) -> None:
        """Let go of the adapter (a transfer hung on it); the next transfer opens it again."""
        self.close()


class _ReopeningPort:
    """A serial port opened on first use, and closed to be opened again after an I/O error.

    A USB serial adapter that is unplugged and plugged back in gets a new file descriptor; the
    driver keeps this one object and the next transaction after the error opens the port anew.
    Implements the pyserial methods the serial drivers use.
    """

    def __init__(self, url: str, baudrate: int, timeout: float, framing: str = "8N1") -> None:
        self.url = url
        self.port = url
        self.name = url
        self.baudrate = baudrate
        self.framing = framing  # data bits, parity, stop bits: "8E1"
        self._timeout = timeout
        self._serial: Any = None

    def _get(self) -> Any:
        if self._serial is None:
            bits, parity, stop = self.framing
            self._serial = open_serial(
                self.url,
                baudrate=self.baudrate,
                timeout=self._timeout,
                bytesize=int(bits),
                parity=parity,
                stopbits=int(stop),
            )
        return self._serial

    def _call(self, fn: Any) -> Any:
        port = self._get()
        try:
            return fn(port)
        except termios.error as err:  # tty ioctls of a hung-up port: no OSError, no SerialException
            self.close()
            raise DeviceIOError(
                f"{self.url}: port hung up ({describe_os_error(err)}): the adapter was unplugged "
                "or lost power; it is opened again when it is back"
            ) from err
        except port_errors():
            self.close()
            raise

    @property
    def timeout(self) -> float:
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._timeout = value
        if self._serial is not None:
            self._call(lambda p: setattr(p, "timeout", value))

    @property
    def in_waiting(self) -> int:
        return self._call(lambda p: p.in_waiting)

    def reset_input_buffer(self) -> None:
        self._call(lambda p: p.reset_input_buffer())

    def write(self, data: bytes) -> int:
        return self._call(lambda p: p.write(data))

    def flush(self) -> None:
        self._call(lambda p: p.flush())

    def read(self, size: int = 1) -> bytes:
        return self._call(lambda p: p.read(size))

    def read_until(self, expected: bytes = b"\n", size: int | None = None) -> bytes:
        return self._call(lambda p: p.read_until(expected, size))

    def close(self) -> None:
        if self._serial is not None:
            try:
                self._serial.close()
            finally:
                self._serial = None

    def reopen(self) -> None:
        """Let go of the port (a transfer hung on it); the next transfer opens it again."""
        self.close()


class Hardware:
    """Owns the buses and ports; builds one driver per configured sensor."""

    def __init__(self, config: RigConfig, clock: Clock, rig: Any = None) -> None:
        self.config = config
        self.clock = clock
        self.rig = rig
        self._i2c: dict[int | str, AsyncI2C] = {}
        self._serial: list[AsyncSerial] = []

    def i2c(self, bus: int | str) -> AsyncI2C:
        if bus not in self._i2c:
            if bus == SIM_BUS:
                if self.rig is None:
                    raise DriverError("a simulated sensor needs the simulated rig")
                raw: Any = self.rig.bus
                name = "sim"
            else:
                raw = _ReopeningBus(int(bus))
                name = f"i2c-{bus}"
            self._i2c[bus] = AsyncI2C(raw, self.clock, name=name)
        return self._i2c[bus]

    def serial(self, cfg: SensorConfig, timeout: float = 0.5) -> AsyncSerial:
        assert cfg.port is not None
        url = self.rig.serial_path(cfg.port) if cfg.simulated else cfg.port
        port = _ReopeningPort(url, cfg.baudrate, timeout, cfg.framing)
        wrapped = AsyncSerial(port, self.clock, name=cfg.port)
        self._serial.append(wrapped)
        return wrapped

    def driver(self, cfg: SensorConfig) -> Any:
        cls = driver_class(cfg.driver)
        if cls.transport == "i2c":
            assert cfg.bus is not None and cfg.address is not None
            return cls(self.i2c(cfg.bus).device(cfg.address), cfg.options)
        return cls(self.serial(cfg), cfg.options)

    def build(
        self, sensors: Sequence[SensorConfig] | None = None
    ) -> list[tuple[SensorConfig, Any]]:
        return [(cfg, self.driver(cfg)) for cfg in (sensors or self.config.sensors)]

    def close(self) -> None:
        for bus in self._i2c.values():
            bus.close()
        for port in self._serial:
            port.close()
        self._i2c.clear()
        self._serial.clear()
