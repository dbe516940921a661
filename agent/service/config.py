"""The agent's configuration: a TOML file read with tomllib into frozen dataclasses.

Every problem is reported as one :class:`~agent.errors.ConfigError` line naming the file and the
key path, for example ``agent.toml: sensor[2].address: 0x99 is not a 7-bit I2C address``.
Relative paths in the file are taken relative to the file's own directory.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from agent.detect.analyzer import AnalyzerSettings
from agent.errors import ConfigError
from agent.exits import EX_USAGE, CommandError
from agent.files import config_path_exists, read_config_text, resolve_path, toml_document
from agent.learn.settings import LearnSettings
from agent.metrics import MetricsSettings
from agent.modelstore.settings import ModelsSettings
from agent.ota.settings import UpdateSettings
from agent.sense.settings import (
    NAME_RE,
    SIM_BUS,
    SensorConfig,
    SimulationConfig,
    parse_sensor,
    parse_simulation,
)
from agent.service.logring import LogSettings
from agent.store.settings import StoreSettings
from agent.sync.datapolicy import DROP, DataSettings
from agent.sync.link import LinkSettings
from agent.sync.routing import RoutingSettings
from agent.sync.statedata import StateSettings
from agent.sync.uplink import UplinkSettings
from drivers.base import OptionError, Options

T = TypeVar("T")

EX_CONFIG = 78  # sysexits.h: configuration error


@dataclass(frozen=True)
class AgentSection:
    device_id: str
    data_dir: Path
    log_level: str = "info"
    cpu_affinity: str = "single"  # "single": the process on one CPU (agent/service/cpu.py); "all"


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
    learn: LearnSettings = field(default_factory=LearnSettings)  # federated rounds
    data: DataSettings = field(default_factory=DataSettings)  # what of each channel leaves
    logs: LogSettings = field(default_factory=LogSettings)  # the ring of recent log lines
    update: UpdateSettings | None = None  # [update]: signed agent releases (docs/ota.md)

    def sensor(self, name: str) -> SensorConfig:
        for s in self.sensors:
            if s.name == name:
                return s
        raise KeyError(name)


def load(path: str | Path) -> Config:
    """Read and validate a config file. Raises ConfigError (one line) on any problem."""
    path = Path(path)
    return loads(read_config_text(path), path=path, label=path.name)


def loads(text: str, *, path: Path = Path("agent.toml"), label: str | None = None) -> Config:
    label = label or path.name
    return parse_toml(text, label, lambda raw: parse_config(raw, path.resolve().parent, path))


def parse_toml(text: str, label: str, parse: Callable[[dict[str, Any]], T]) -> T:
    """``parse`` of the TOML document ``text``; every problem is one ConfigError line
    ``LABEL: key.path: message``."""
    raw = toml_document(text, label)
    try:
        return parse(raw)
    except OptionError as err:
        raise ConfigError(label, err.key, err.message) from None


def parse_config(
    raw: dict[str, Any], base: Path, path: Path, *, top: Options | None = None
) -> Config:
    """The Config of a decoded TOML document (``base``: where relative paths start). ``top``
    reads ``raw`` (agent/service/configref.py passes one that records every key read)."""
    top = Options(raw) if top is None else top
    agent = _parse_agent(top.table("agent", required=True), base)
    store = StoreSettings.from_options(top.table("store"), agent.data_dir)
    metrics = MetricsSettings.from_options(top.table("metrics"), agent.data_dir)
    uplink = (
        UplinkSettings.from_options(top.table("uplink"), agent.data_dir, base)
        if top.has("uplink")
        else None
    )
    state = StateSettings.from_options(top.table("state"), agent.data_dir)
    models = ModelsSettings.from_options(top.table("models"), agent.data_dir, base)
    routing = RoutingSettings.from_options(top.table("routing"), agent.data_dir)
    link = LinkSettings.from_options(top.table("link"))
    learn = LearnSettings.from_options(top.table("learn"))
    logs = LogSettings.from_options(top.table("logs"))
    update = UpdateSettings.from_options(top.table("update"), base) if top.has("update") else None
    simulation = parse_simulation(top.table("simulation"), base) if top.has("simulation") else None
    sensors = tuple(parse_sensor(t) for t in top.tables("sensor"))
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
        key = (port_of(s.port), None) if s.port is not None else (s.bus, s.address)
        if key in places:
            raise OptionError(
                f"sensor[{i}].{'port' if s.port else 'address'}",
                f"{s.location} is already used by sensor[{places[key]}]"
                + (f" (both are {key[0]})" if s.port not in (None, key[0]) else ""),
            )
        places[key] = i
        if s.simulated and simulation is None:
            raise OptionError(f"sensor[{i}].bus", "a simulated sensor needs a [simulation] table")
    data = DataSettings.from_options(top.table("data"), sensors)
    detect = (
        AnalyzerSettings.from_options(top.table("detect"), base, sensors)
        if top.has("detect")
        else None
    )
    for model_channel, (sensor, channel) in (detect.inputs if detect else {}).items():
        if data.policy(sensor, channel) == DROP:  # the detector would never get a whole row
            raise OptionError(
                "data.policy",
                f"{sensor}/{channel} is 'drop', but [detect] reads it as {model_channel}; give "
                "it 'local' (the detector reads it, nothing of it leaves the device)",
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
        data=data,
        learn=learn,
        logs=logs,
        update=update,
    )


def _parse_agent(t: Options, base: Path) -> AgentSection:
    device_id = t.string("device_id")
    if not NAME_RE.match(device_id):
        raise t.error("device_id", f"{device_id!r} must be 1-63 letters, digits, '_', '-', '.'")
    data_dir = resolve_path(base, t.string("data_dir", "/var/lib/edge-agent"))
    config_path_exists(t, "data_dir", data_dir)  # made at start: a name the system can look up
    level = t.choice("log_level", "info", ("debug", "info", "warning", "error"))
    affinity = t.choice("cpu_affinity", "single", ("single", "all"))
    t.finish()
    return AgentSection(
        device_id=device_id, data_dir=data_dir, log_level=level, cpu_affinity=affinity
    )


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
    uplink = config.uplink
    if uplink is not None:
        uplink = replace(
            uplink,
            credential=moved(uplink.credential),
            security_state=moved(uplink.security_state),
        )
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
        uplink=uplink,
    )


def port_of(port: str) -> str:
    """The device a serial port path names, links followed (``/dev/serial/by-id/...`` and
    ``/dev/ttyUSB0`` are one port once the adapter is plugged in); a URL (``socket://``,
    ``rfc2217://``, ``sim:``) as it is."""
    return os.path.realpath(port) if port.startswith("/") else port


def example_config() -> Path:
    """The packaged config of the reference pump rig."""
    return Path(str(resources.files("agent") / "examples" / "pump-rig.toml"))


def notes(config: Config) -> list[str]:
    """What a valid config still leaves to do (``check-config`` prints them; the agent says the
    same at start): files it names that are not there yet, and records that cannot leave."""
    from agent.wire.credentials import register_command

    out = []
    up = config.uplink
    if up is None:
        out.append(
            "no [uplink]: readings and alerts stay queued on the device (docs/config.md, [uplink])"
        )
    elif up.security != "none" and up.credential is not None and not up.credential.exists():
        out.append(
            f"uplink.credential: {up.credential} does not exist yet: nothing is sent until it "
            f"does ({register_command(config.agent.device_id, str(up.credential))})"
        )
    key = config.models.public_key
    if key is not None and not key.exists():
        registry = key.parent.parent if key.parent.name == "models" else Path("DIR")
        out.append(
            f"models.public_key: {key} does not exist yet: model downloads are refused until it "
            f"does (edge-agent-cloud models keygen --data {registry} writes "
            f"{registry}/models/signing.key.pub; copy it there)"
        )
    return out


def strip_tables(text: str, *names: str) -> str:
    """A config's text without the top-level tables ``names`` (with their sub-tables and the
    comment lines just above them): for tools and tests that put their own ``[uplink]`` into
    the packaged example."""
    header = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?")
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    skipping = False
    for line in lines:
        m = header.match(line)
        if m:
            skipping = m.group(1).split(".")[0] in names
            if skipping:
                while out and out[-1].lstrip().startswith("#"):
                    out.pop()
        if not skipping:
            out.append(line)
    return "".join(out)


def simulation_from_args(args: argparse.Namespace) -> SimulationConfig | None:
    """The simulation asked for on the command line (``--simulate`` and its options), or None."""
    source = getattr(args, "simulate", None)
    if getattr(args, "fault", None) and source != "pump":
        raise CommandError(EX_USAGE, "edge-agent: --fault goes with --simulate pump")
    if not source:
        return None
    if source == "skab":
        file = Path(args.skab_file).resolve() if args.skab_file else None
        if file is None or not file.is_file():
            raise ConfigError("--skab-file", "", f"{args.skab_file or '(none)'}: no such file")
        from drivers.sim.sources import read_skab_csv

        try:  # read once here: a file that is not a SKAB recording is one line, not a traceback
            read_skab_csv(file).seconds()
        except (OSError, ValueError) as err:
            raise ConfigError("--skab-file", "", f"not a SKAB recording: {err}") from None
        return SimulationConfig(source="skab", file=file, loop=True)
    events = ()
    if getattr(args, "fault", None):
        from drivers.sim.sources import FaultEvent

        events = (FaultEvent(args.fault, at=args.fault_at, ramp=20.0, duration=1e12),)
    return SimulationConfig(source="pump", seed=args.seed, events=events)
