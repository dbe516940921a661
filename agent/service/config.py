"""The agent's configuration: a TOML file read with tomllib into frozen dataclasses.

Every problem is reported as one :class:`~agent.errors.ConfigError` line naming the file and the
key path, for example ``agent.toml: sensor[2].address: 0x99 is not a 7-bit I2C address``.
Relative paths in the file are taken relative to the file's own directory.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.analyzer import AnalyzerSettings
from agent.errors import ConfigError
from agent.link import LinkSettings
from agent.metrics import MetricsSettings
from agent.modelcache import ModelsSettings
from agent.routing import RoutingSettings
from agent.state import StateSettings
from agent.store import StoreSettings
from agent.uplink import UplinkSettings
from drivers.base import OptionError, Options
from drivers.registry import DRIVERS, driver_class
from drivers.sim.sources import FaultEvent, parse_event

EX_CONFIG = 78  # sysexits.h: configuration error

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")
SIM_BUS = "sim"


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


@dataclass(frozen=True)
class AgentSection:
    device_id: str
    data_dir: Path
    log_level: str = "info"


@dataclass(frozen=True)
class Config:
    path: Path
    agent: AgentSection
    sensors: tuple[SensorConfig, ...]
    store: StoreSettings
    metrics: MetricsSettings
    uplink: UplinkSettings | None = None
    simulation: SimulationConfig | None = None
    state: StateSettings = field(default_factory=StateSettings)  # used with [uplink]
    detect: AnalyzerSettings | None = None
    link: LinkSettings = field(default_factory=LinkSettings)  # used with [uplink]
    models: ModelsSettings = field(default_factory=ModelsSettings)  # load() puts it in data_dir
    routing: RoutingSettings = field(default_factory=RoutingSettings)  # state in data_dir

    def sensor(self, name: str) -> SensorConfig:
        for s in self.sensors:
            if s.name == name:
                return s
        raise KeyError(name)


def load(path: str | Path) -> Config:
    """Read and validate a config file. Raises ConfigError (one line) on any problem."""
    path = Path(path)
    label = path.name
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "", "no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(str(path), "", f"cannot read: {err}") from None
    return loads(text, path=path, label=label)


def loads(text: str, *, path: Path = Path("agent.toml"), label: str | None = None) -> Config:
    label = label or path.name
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(label, "", f"not valid TOML: {err}") from None
    try:
        return _parse(raw, path.resolve().parent, path)
    except OptionError as err:
        raise ConfigError(label, err.key, err.message) from None


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _parse(raw: dict[str, Any], base: Path, path: Path) -> Config:
    top = Options(raw)
    agent = _parse_agent(top.table("agent", required=True), base)
    store = StoreSettings.from_options(top.table("store"), agent.data_dir)
    metrics = MetricsSettings.from_options(top.table("metrics"), agent.data_dir)
    uplink = UplinkSettings.from_options(top.table("uplink")) if top.has("uplink") else None
    state = StateSettings.from_options(top.table("state"), agent.data_dir)
    models = ModelsSettings.from_options(top.table("models"), agent.data_dir, base)
    routing = RoutingSettings.from_options(top.table("routing"), agent.data_dir)
    link = LinkSettings.from_options(top.table("link"))
    simulation = _parse_simulation(top.table("simulation"), base) if top.has("simulation") else None
    sensors = tuple(_parse_sensor(t) for t in top.tables("sensor"))
    if not sensors:
        raise OptionError("sensor", "at least one [[sensor]] is required")
    seen: dict[str, int] = {}
    places: dict[tuple[Any, Any], int] = {}
    for i, s in enumerate(sensors):
        if s.name in seen:
            raise OptionError(
                f"sensor[{i}].name", f"{s.name!r} is already used by sensor[{seen[s.name]}]"
            )
        seen[s.name] = i
        key = (s.port, None) if s.port is not None else (s.bus, s.address)
        if key in places:
            raise OptionError(
                f"sensor[{i}].{'port' if s.port else 'address'}",
                f"{s.location} is already used by sensor[{places[key]}]",
            )
        places[key] = i
        if s.simulated and simulation is None:
            raise OptionError(f"sensor[{i}].bus", "a simulated sensor needs a [simulation] table")
    detect = (
        AnalyzerSettings.from_options(top.table("detect"), base, sensors)
        if top.has("detect")
        else None
    )
    top.finish()
    return Config(
        path=path,
        agent=agent,
        sensors=sensors,
        store=store,
        metrics=metrics,
        uplink=uplink,
        simulation=simulation,
        state=state,
        detect=detect,
        link=link,
        models=models,
        routing=routing,
    )


def _parse_agent(t: Options, base: Path) -> AgentSection:
    device_id = t.string("device_id")
    if not _NAME.match(device_id):
        raise t.error("device_id", f"{device_id!r} must be 1-63 letters, digits, '_', '-', '.'")
    data_dir = _resolve(base, t.string("data_dir", "/var/lib/edge-agent"))
    level = t.choice("log_level", "info", ("debug", "info", "warning", "error"))
    t.finish()
    return AgentSection(device_id=device_id, data_dir=data_dir, log_level=level)


def _parse_simulation(t: Options, base: Path) -> SimulationConfig:
    source = t.choice("source", "pump", ("pump", "skab"))
    file = None
    if source == "skab" or t.has("file"):
        file = _resolve(base, t.string("file"))
        if not file.is_file():
            raise t.error("file", f"{file} does not exist")
    loop = t.boolean("loop", True)
    seed = t.integer("seed", 1, minimum=0)
    events = tuple(parse_event(e) for e in t.tables("event"))
    t.finish()
    return SimulationConfig(source=source, file=file, loop=loop, seed=seed, events=events)


def _parse_sensor(t: Options) -> SensorConfig:
    name = t.string("name")
    if not _NAME.match(name):
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


def simulated(config: Config, simulation: SimulationConfig) -> Config:
    """The same config with every sensor moved onto the simulated rig.

    I2C sensors go to the simulated bus at their configured address; serial instruments to
    ``sim:<sensor name>``. This is how the demo and the tests run the real rig config with no
    hardware attached.
    """
    from dataclasses import replace

    sensors = tuple(
        replace(s, port=f"sim:{s.name}") if s.port is not None else replace(s, bus=SIM_BUS)
        for s in config.sensors
    )
    return replace(config, sensors=sensors, simulation=simulation)


def replace_data_dir(config: Config, data_dir: Path) -> Config:
    """The same config with another data directory (the store follows it when it was relative
    to the old one)."""
    from dataclasses import replace

    old = config.agent.data_dir

    def moved(path: Path | None) -> Path | None:
        if path is not None and path.is_relative_to(old):
            return data_dir / path.relative_to(old)
        return path

    store = replace(config.store, path=moved(config.store.path))
    metrics = replace(config.metrics, textfile=moved(config.metrics.textfile))
    state = replace(config.state, path=moved(config.state.path))
    routing = replace(config.routing, state_path=moved(config.routing.state_path))
    models = replace(config.models, cache_dir=moved(config.models.cache_dir))
    agent = replace(config.agent, data_dir=data_dir)
    return replace(
        config,
        agent=agent,
        store=store,
        metrics=metrics,
        state=state,
        models=models,
        routing=routing,
    )
