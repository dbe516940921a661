"""How sensors are described: the ``[[sensor]]`` and ``[simulation]`` tables of the config.

Parsed from TOML into frozen dataclasses that the sensing stages (hardware, sampling, the simulated
rig) take; :mod:`agent.service.config` reads the whole file and calls :func:`parse_sensor` and
:func:`parse_simulation` for these tables. Problems raise :class:`~drivers.base.OptionError` with
the key path.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.files import resolve_path
from drivers.base import Options
from drivers.registry import DRIVERS, driver_class
from drivers.sim.sources import FaultEvent, parse_event

#: Sensor and device names: a letter, then letters, digits, '_', '-', '.' (63 at most).
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}\Z")
SIM_BUS = "sim"
#: A serial character frame: data bits, parity (none, even, odd), stop bits.
FRAMING_RE = re.compile(r"^[78][NEO][12]\Z")


@dataclass(frozen=True)
class Scaling:
    """A linear transducer: ``source`` channel values in ``inp`` map onto ``out`` (two points)."""

    source: str
    inp: tuple[float, float]
    out: tuple[float, float]
    unit: str = ""

    @property
    def gain(self) -> float:
        return (self.out[1] - self.out[0]) / (self.inp[1] - self.inp[0])

    def apply(self, value: float) -> float:
        return self.out[0] + (value - self.inp[0]) * self.gain

    def invert(self, value: float) -> float:
        return self.inp[0] + (value - self.out[0]) / self.gain


@dataclass(frozen=True)
class SensorConfig:
    name: str
    driver: str
    interval: float
    channels: tuple[str, ...]
    bus: int | str | None = None  # I2C bus number, or "sim"
    address: int | None = None  # I2C address
    port: str | None = None  # serial URL or device path; "sim:NAME" for a simulated instrument
    baudrate: int = 9600
    framing: str = "8N1"  # data bits, parity (N, E, O), stop bits
    required: bool = True
    options: Any = None  # what the driver's parse_options returned
    scaling: dict[str, Scaling] = field(default_factory=dict)
    signals: dict[str, str] = field(default_factory=dict)  # channel -> simulated signal name
    resolution: dict[str, float] = field(default_factory=dict)  # overrides, channel -> step

    @property
    def simulated(self) -> bool:
        if self.port is not None:
            return self.port.startswith("sim:")
        return self.bus == SIM_BUS

    @property
    def location(self) -> str:
        if self.port is not None:
            return self.port
        return f"i2c-{self.bus}/0x{self.address:02x}"

    def source_of(self, channel: str) -> str:
        """The driver channel behind a reported channel (itself unless scaled)."""
        scaling = self.scaling.get(channel)
        return scaling.source if scaling else channel


@dataclass(frozen=True)
class SimulationConfig:
    source: str = "pump"  # "pump" (synthetic model) or "skab" (CSV replay)
    file: Path | None = None  # the SKAB CSV for source = "skab"
    loop: bool = True
    seed: int = 1
    events: tuple[FaultEvent, ...] = ()  # pump model fault events


class RigConfig(Protocol):
    """What the sensing stages read of the whole config."""

    @property
    def sensors(self) -> tuple[SensorConfig, ...]: ...

    @property
    def simulation(self) -> SimulationConfig | None: ...


def parse_simulation(t: Options, base: Path) -> SimulationConfig:
    source = t.choice("source", "pump", ("pump", "skab"))
    file = None
    if source == "skab" or t.has("file"):
        file = resolve_path(base, t.string("file"))
        if not file.is_file():
            raise t.error("file", f"{file} does not exist")
    loop = t.boolean("loop", True)
    seed = t.integer("seed", 1, minimum=0)
    events = tuple(parse_event(e) for e in t.tables("event"))
    t.finish()
    return SimulationConfig(source=source, file=file, loop=loop, seed=seed, events=events)


def parse_sensor(t: Options) -> SensorConfig:
    name = t.string("name")
    if not NAME_RE.match(name):
        raise t.error("name", f"{name!r} must start with a letter: letters, digits, '_', '-', '.'")
    driver = t.string("driver")
    if driver not in DRIVERS:
        raise t.error("driver", f"unknown driver {driver!r}; known: {', '.join(sorted(DRIVERS))}")
    cls = driver_class(driver)
    interval = t.number("interval", minimum=0.001, maximum=86400.0)
    required = t.boolean("required", True)

    bus: int | str | None = None
    address: int | None = None
    port: str | None = None
    baudrate = 9600
    framing = "8N1"
    if cls.transport == "i2c":
        bus_value = t.required("bus")
        if isinstance(bus_value, bool) or not (
            (isinstance(bus_value, int) and 0 <= bus_value <= 255) or bus_value == SIM_BUS
        ):
            raise t.error("bus", f"{bus_value!r} is neither an I2C bus number nor {SIM_BUS!r}")
        bus = bus_value
        address = _parse_address(t, cls)
        if t.has("port"):
            raise t.error("port", f"{driver} is an I2C part: give bus and address, not port")
    else:
        port = t.string("port")
        if not port.strip():
            raise t.error("port", "is empty")
        baudrate = t.choice("baudrate", 9600, (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200))
        framing = t.string("framing", "8N1")
        if not FRAMING_RE.match(framing):
            raise t.error(
                "framing",
                f"{framing!r} is not data bits (7 or 8), parity (N, E or O) and stop bits "
                '(1 or 2), such as "8N1" or "8E1" (the Modbus RTU default)',
            )
        for key in ("address", "bus"):
            if t.has(key):
                raise t.error(key, f"{driver} is a serial instrument: give port, not {key}")

    options = cls.parse_options(t.table("options"))
    available = cls.channels_for(options)
    scaling = _parse_scaling(t.table("scaling"), available)
    channels = t.strings("channels")
    if not channels:
        raise t.error("channels", "list at least one channel")
    for i, ch in enumerate(channels):
        if ch not in available and ch not in scaling:
            raise t.error(
                f"channels[{i}]",
                f"{ch!r} is not a channel of {driver} ({', '.join(available)}) "
                "nor a scaled channel in [sensor.scaling]",
            )
    if len(set(channels)) != len(channels):
        raise t.error("channels", "lists a channel twice")
    for ch in scaling:
        if ch not in channels:
            raise t.error(f"scaling.{ch}", f"scaled channel {ch!r} is not listed in channels")

    signals_t = t.table("signals")
    signals: dict[str, str] = {}
    for ch in signals_t.raw:
        if ch not in channels:
            raise signals_t.error(ch, f"{ch!r} is not one of this sensor's channels")
        signals[ch] = signals_t.string(ch)
    signals_t.finish()

    res_t = t.table("resolution")
    resolution = {ch: res_t.number(ch, above=0.0) for ch in res_t.raw}
    for ch in resolution:
        if ch not in channels:
            raise res_t.error(ch, f"{ch!r} is not one of this sensor's channels")
    res_t.finish()
    t.finish()
    return SensorConfig(
        name=name,
        driver=driver,
        interval=interval,
        channels=channels,
        bus=bus,
        address=address,
        port=port,
        baudrate=baudrate,
        framing=framing,
        required=required,
        options=options,
        scaling=scaling,
        signals=signals,
        resolution=resolution,
    )


def _parse_address(t: Options, cls: Any) -> int:
    value = t.required("address")
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise t.error("address", f"{value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise t.error("address", f"{value!r} is not a number")
    if not 0x03 <= value <= 0x77:
        raise t.error("address", f"0x{value:02x} is not a 7-bit I2C address")
    if cls.addresses and value not in cls.addresses:
        allowed = ", ".join(f"0x{a:02x}" for a in cls.addresses)
        raise t.error("address", f"a {cls.part} answers only at {allowed}, not 0x{value:02x}")
    return value


def _parse_scaling(t: Options, available: tuple[str, ...]) -> dict[str, Scaling]:
    out: dict[str, Scaling] = {}
    for ch in t.raw:
        s = t.table(ch)
        source = s.string("source")
        if source not in available:
            raise s.error(
                "source", f"{source!r} is not a channel of this part ({', '.join(available)})"
            )
        inp = s.numbers("in", 2)
        outp = s.numbers("out", 2)
        if math.isclose(inp[0], inp[1]):
            raise s.error("in", "the two input points must differ")
        if math.isclose(outp[0], outp[1]):
            raise s.error("out", "the two output points must differ")
        unit = s.string("unit", "")
        s.finish()
        if ch in available:
            raise t.error(
                ch, f"{ch!r} is already a channel of the part; name the scaled channel apart"
            )
        out[ch] = Scaling(source=source, inp=(inp[0], inp[1]), out=(outp[0], outp[1]), unit=unit)
    t.finish()
    return out
