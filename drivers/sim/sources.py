"""Physical signal sources that drive the simulated parts.

A source answers ``values_at(t)``: the physical value of each named signal ``t`` seconds after the
rig started. Signal names are the SKAB column names (``Accelerometer1RMS``, ``Current``,
``Pressure`` ...) plus the ambient conditions the BME280 sees. Two sources:

- :class:`SkabReplay` replays a SKAB CSV file (one row per ``period`` seconds, sample and hold);
- :class:`PumpModel` is a synthetic centrifugal pump with injectable faults (bearing wear,
  cavitation, a closing valve), tuned to the ranges of SKAB's anomaly-free recording.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol

from drivers.base import Options
from drivers.pump import SKAB_CHANNELS

AMBIENT_CHANNELS: tuple[str, ...] = ("AmbientTemperature", "AmbientHumidity", "AmbientPressure")


class SignalSource(Protocol):
    signals: tuple[str, ...]
    step: float  # values are constant within a step of this many seconds

    def values_at(self, t: float) -> Mapping[str, float]: ...


@dataclass(frozen=True)
class SkabFile:
    """One SKAB-format CSV: timestamps, the 8 channels, and the labels where present."""

    path: Path
    datetimes: tuple[str, ...]
    columns: tuple[str, ...]
    rows: tuple[tuple[float, ...], ...]
    anomaly: tuple[int, ...] | None
    changepoint: tuple[int, ...] | None

    def column(self, name: str) -> list[float]:
        i = self.columns.index(name)
        return [r[i] for r in self.rows]

    def seconds(self) -> list[float]:
        """Seconds since the first row, from the datetime column."""
        stamps = [datetime.strptime(d, "%Y-%m-%d %H:%M:%S") for d in self.datetimes]
        return [(s - stamps[0]).total_seconds() for s in stamps]


def read_skab_csv(path: str | Path) -> SkabFile:
    """Read a SKAB CSV (semicolon separated, header row, CRLF). Raises ValueError when malformed."""
    # imported at first use (the running agent's memory): only a SKAB replay reads CSV, and
    # agent.detect.features imports this module on every device
    import csv

    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=";")
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path}: empty file") from None
        if not header or header[0] != "datetime":
            raise ValueError(f"{path}: first column must be 'datetime', got {header[:1]}")
        missing = [c for c in SKAB_CHANNELS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        idx = [header.index(c) for c in SKAB_CHANNELS]
        has_labels = "anomaly" in header and "changepoint" in header
        ia = header.index("anomaly") if has_labels else -1
        ic = header.index("changepoint") if has_labels else -1
        datetimes: list[str] = []
        rows: list[tuple[float, ...]] = []
        anomaly: list[int] = []
        changepoint: list[int] = []
        for n, rec in enumerate(reader, start=2):
            if not rec:
                continue
            try:
                rows.append(tuple(float(rec[i]) for i in idx))
                if has_labels:
                    anomaly.append(int(float(rec[ia])))
                    changepoint.append(int(float(rec[ic])))
            except (ValueError, IndexError) as err:
                raise ValueError(f"{path}:{n}: {err}") from None
            datetimes.append(rec[0])
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return SkabFile(
        path=path,
        datetimes=tuple(datetimes),
        columns=SKAB_CHANNELS,
        rows=tuple(rows),
        anomaly=tuple(anomaly) if has_labels else None,
        changepoint=tuple(changepoint) if has_labels else None,
    )


class SkabReplay:
    """Replays a SKAB file: row ``i`` holds from ``i * period`` to ``(i + 1) * period`` seconds.

    Ambient signals, which SKAB does not record, are constant indoor values.
    """

    AMBIENT: ClassVar[dict[str, float]] = {
        "AmbientTemperature": 22.0,
        "AmbientHumidity": 45.0,
        "AmbientPressure": 1013.25,
    }

    def __init__(self, data: SkabFile, *, period: float = 1.0, loop: bool = True) -> None:
        self.data = data
        self.period = period
        self.step = period
        self.loop = loop
        self.signals = SKAB_CHANNELS + AMBIENT_CHANNELS

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> SkabReplay:
        return cls(read_skab_csv(path), **kwargs)

    def row_at(self, t: float) -> int:
        i = max(0, math.floor(t / self.period + 1e-9))
        n = len(self.data.rows)
        return i % n if self.loop else min(i, n - 1)

    def values_at(self, t: float) -> dict[str, float]:
        row = self.data.rows[self.row_at(t)]
        values = dict(zip(SKAB_CHANNELS, row, strict=True))
        values.update(self.AMBIENT)
        return values

    def label_at(self, t: float) -> int:
        if self.data.anomaly is None:
            return 0
        return self.data.anomaly[self.row_at(t)]


# -------------------------------------------------------------------------------------------
# Synthetic pump

FAULTS = ("bearing_wear", "cavitation", "valve_closing")


@dataclass(frozen=True)
class FaultEvent:
    fault: str
    at: float  # seconds after start
    ramp: float = 30.0  # seconds to reach full severity
    duration: float = math.inf  # seconds at (ramping to) severity before it clears
    severity: float = 1.0  # 0..1

    def level(self, t: float) -> float:
        """0..1: how much of this fault is present at ``t``."""
        if t < self.at or t >= self.at + self.duration:
            return 0.0
        if self.ramp <= 0:
            return self.severity
        return self.severity * min(1.0, (t - self.at) / self.ramp)


def parse_event(opts: Options) -> FaultEvent:
    """Validate one ``[[simulation.event]]`` table (raises OptionError naming the key path)."""
    fault = opts.choice("fault", None, FAULTS)
    at = opts.number("at", 0.0, minimum=0.0)
    ramp = opts.number("ramp", 30.0, minimum=0.0)
    duration = opts.number("duration", 1e12, above=0.0)
    severity = opts.number("severity", 1.0, minimum=0.0, maximum=1.0)
    opts.finish()
    return FaultEvent(fault, at, ramp, duration, severity)


class _Ar1:
    """A first-order autoregressive noise process with stationary s.d. ``sd``, time constant tau."""

    def __init__(self, rng: random.Random, sd: float, tau: float, dt: float) -> None:
        self.rng = rng
        self.a = math.exp(-dt / tau)
        self.k = sd * math.sqrt(1 - self.a * self.a)
        self.x = rng.gauss(0.0, sd)

    def step(self) -> float:
        self.x = self.a * self.x + self.k * self.rng.gauss(0.0, 1.0)
        return self.x


class PumpModel:
    """A centrifugal pump in a circulation loop, around SKAB's anomaly-free operating point.

    Normal running: flow ~125 l/min, loop pressure ~0.1 bar gauge with slow swings, motor current
    ~2.4 A, supply ~229 V, motor housing ~89 degC, fluid ~28.5 degC, vibration ~0.21/0.27 g RMS.
    Faults (each 0..1 severity, ramped):

    - bearing wear: vibration grows (up to +60 %), housing temperature and current creep up;
    - cavitation: flow drops and fluctuates, pressure falls, vibration becomes spiky;
    - valve closing (outlet): flow falls towards 30 %, pressure after the pump rises, the motor
      draws less current (a centrifugal pump takes less power at lower flow).
    """

    def __init__(self, *, seed: int = 1, events: Sequence[FaultEvent] = (), dt: float = 0.5):
        self.rng = random.Random(seed)
        self.events = tuple(events)
        self.step = dt
        self.signals = SKAB_CHANNELS + AMBIENT_CHANNELS
        r, d = self.rng, dt
        self._noise = {
            "acc1": _Ar1(r, 0.0040, 2.0, d),
            "acc2": _Ar1(r, 0.0035, 2.0, d),
            "current": _Ar1(r, 0.25, 8.0, d),
            "pressure": _Ar1(r, 0.20, 6.0, d),
            "voltage": _Ar1(r, 9.0, 5.0, d),
            "flow": _Ar1(r, 1.2, 10.0, d),
            "temp": _Ar1(r, 0.25, 60.0, d),
            "tc": _Ar1(r, 0.3, 120.0, d),
            "amb_t": _Ar1(r, 0.3, 600.0, d),
            "amb_h": _Ar1(r, 2.0, 600.0, d),
            "amb_p": _Ar1(r, 0.8, 900.0, d),
        }
        self._k = -1
        self._values: dict[str, float] = {}
        self._housing = 89.5  # thermal state of the motor housing

    def fault_levels(self, t: float) -> dict[str, float]:
        levels = dict.fromkeys(FAULTS, 0.0)
        for e in self.events:
            levels[e.fault] = max(levels[e.fault], e.level(t))
        return levels

    def label_at(self, t: float) -> int:
        return int(any(v > 0 for v in self.fault_levels(t).values()))

    def values_at(self, t: float) -> dict[str, float]:
        k = max(0, math.floor(t / self.step + 1e-9))
        while self._k < k:  # advance the noise processes step by step: deterministic in t
            self._k += 1
            self._values = self._compute(self._k * self.step)
        return self._values

    def _compute(self, t: float) -> dict[str, float]:
        n = {key: p.step() for key, p in self._noise.items()}
        f = self.fault_levels(t)
        wear, cav, valve = f["bearing_wear"], f["cavitation"], f["valve_closing"]
        spike = 0.0
        if cav and self.rng.random() < 0.3 * cav:
            spike = self.rng.uniform(0.02, 0.08) * cav

        flow = 125.2 * (1 - 0.70 * valve) * (1 - 0.15 * cav) + n["flow"] * (1 + 3 * cav)
        pressure = 0.11 + 0.85 * valve - 0.45 * cav + n["pressure"] * (1 + cav)
        current = 2.40 * (1 + 0.06 * wear - 0.25 * valve - 0.05 * cav) + n["current"]
        voltage = 228.6 + n["voltage"]
        # housing temperature relaxes towards a setpoint that follows the load
        setpoint = 89.5 + 3.0 * wear + 1.5 * (current - 2.4)
        self._housing += (setpoint - self._housing) * (self.step / 300.0)
        acc1 = 0.2126 * (1 + 0.6 * wear + 0.25 * cav) + n["acc1"] + spike
        acc2 = 0.2684 * (1 + 0.5 * wear + 0.20 * cav) + n["acc2"] + 0.8 * spike
        return {
            "Accelerometer1RMS": max(0.005, acc1),
            "Accelerometer2RMS": max(0.005, acc2),
            "Current": max(0.0, current),
            "Pressure": pressure,
            "Temperature": self._housing + n["temp"],
            "Thermocouple": 28.47 + n["tc"] + 0.5 * wear,
            "Voltage": voltage,
            "Volume Flow RateRMS": max(0.0, flow),
            "AmbientTemperature": 22.0 + n["amb_t"],
            "AmbientHumidity": min(100.0, max(0.0, 45.0 + n["amb_h"])),
            "AmbientPressure": 1013.25 + n["amb_p"],
        }


def build_source(simulation: Any) -> SignalSource:
    """The source a ``[simulation]`` config asks for (agent.service.config.SimulationConfig)."""
    if simulation.source == "skab":
        return SkabReplay.from_file(simulation.file, loop=simulation.loop)
    return PumpModel(seed=simulation.seed, events=simulation.events)
