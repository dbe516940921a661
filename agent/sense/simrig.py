"""The simulated rig: every configured simulated sensor gets its part model, fed by a signal source.

I2C parts sit on one :class:`~drivers.sim.smbus.FakeSMBus` at their configured addresses; serial
instruments sit behind pseudo-terminals, and the sensor's ``port = "sim:NAME"`` resolves to the pty
path. The mapping from physical signal to part input is the inverse of the sensor's configured
scaling: a pressure of 2.5 bar on a 0.5-4.5 V / -1..9 bar transducer becomes 1.9 V on the ADS1115
input. Inputs are refreshed from the source just before each bus transfer or serial request, so
what a driver reads at time t is exactly the source's value at t.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from typing import Any

from agent.sense.settings import RigConfig, SensorConfig
from drivers.clock import Clock
from drivers.sim.smbus import FakeSMBus, SimDevice
from drivers.sim.sources import SignalSource, build_source

log = logging.getLogger(__name__)

SIMULATORS: dict[str, str] = {
    "bme280": "drivers.sim.bme280:Bme280Sim",
    "adxl345": "drivers.sim.adxl345:Adxl345Sim",
    "ina219": "drivers.sim.ina219:Ina219Sim",
    "ads1115": "drivers.sim.ads1115:Ads1115Sim",
    "mcp9600": "drivers.sim.mcp9600:Mcp9600Sim",
    "modbus": "drivers.sim.modbus:ModbusSlaveSim",
    "line": "drivers.sim.line:LineSensorSim",
}


def simulator_class(driver: str) -> Any:
    module, _, attr = SIMULATORS[driver].partition(":")
    return getattr(importlib.import_module(module), attr)


def input_values(cfg: SensorConfig, signals: Mapping[str, float]) -> dict[str, float]:
    """The part inputs (driver channels, driver units) for the physical ``signals``."""
    out: dict[str, float] = {}
    for channel, signal in cfg.signals.items():
        if signal not in signals:
            continue
        value = signals[signal]
        scaling = cfg.scaling.get(channel)
        if scaling is not None:
            out[scaling.source] = scaling.invert(value)
        else:
            out[channel] = value
    return out


class _RefreshingModel:
    """Wraps a serial model so its inputs are refreshed before it answers or streams."""

    def __init__(self, model: Any, refresh: Any) -> None:
        self._model = model
        self._refresh = refresh

    def on_bytes(self, data: bytes) -> bytes:
        self._refresh()
        return self._model.on_bytes(data)

    def on_tick(self) -> bytes:
        """A streaming instrument's next line, with inputs refreshed first."""
        self._refresh()
        return self._model.on_tick()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class SimRig:
    """Builds and feeds the simulated parts for the simulated sensors of a config."""

    def __init__(self, config: RigConfig, clock: Clock, source: SignalSource | None = None) -> None:
        if config.simulation is None and source is None:
            raise ValueError("a simulated rig needs a [simulation] table or a source")
        self.config = config
        self.clock = clock
        self.source = source if source is not None else build_source(config.simulation)
        self.t0 = clock.monotonic()
        self.bus = FakeSMBus("sim")
        self.parts: dict[str, Any] = {}  # sensor name -> part model
        self.ports: dict[str, Any] = {}  # "sim:NAME" -> PtyPort
        self._by_address: dict[int, SensorConfig] = {}
        self._last_step: dict[str, int] = {}
        for cfg in config.sensors:
            if cfg.simulated:
                self._build(cfg)
        self.bus.before_access = self._before_i2c

    def _build(self, cfg: SensorConfig) -> None:
        cls = simulator_class(cfg.driver)
        part = cls(self.clock, cfg.options)
        self.parts[cfg.name] = part
        if isinstance(part, SimDevice):
            assert cfg.address is not None
            self.bus.attach(cfg.address, part)
            self._by_address[cfg.address] = cfg
        else:
            from drivers.sim.serialport import PtyPort

            assert cfg.port is not None
            model = _RefreshingModel(part, lambda c=cfg: self.refresh(c))
            self.ports[cfg.port] = PtyPort(model, self.clock)
        self.refresh(cfg, force=True)

    @property
    def elapsed(self) -> float:
        """Seconds of source time since the rig started."""
        return self.clock.monotonic() - self.t0

    def signals_now(self) -> Mapping[str, float]:
        return self.source.values_at(self.elapsed)

    def refresh(self, cfg: SensorConfig, *, force: bool = False) -> None:
        """Push the source's current values into the part behind ``cfg`` (once per source step)."""
        t = self.elapsed
        step = int(t // self.source.step)
        if not force and self._last_step.get(cfg.name) == step:
            return
        self._last_step[cfg.name] = step
        part = self.parts[cfg.name]
        for channel, value in input_values(cfg, self.source.values_at(t)).items():
            part.set_channel(channel, value)

    def _before_i2c(self, address: int, device: SimDevice) -> None:
        cfg = self._by_address.get(address)
        if cfg is not None:
            self.refresh(cfg)

    def serial_path(self, port: str) -> str:
        """The pty path behind a ``sim:NAME`` port."""
        try:
            return self.ports[port].path
        except KeyError:
            raise KeyError(f"no simulated instrument {port!r}") from None

    def part(self, sensor: str) -> Any:
        return self.parts[sensor]

    def close(self) -> None:
        for port in self.ports.values():
            port.close()
        self.ports.clear()
