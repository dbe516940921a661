"""What every driver shares: the Driver protocol, the Reading record and option parsing (the
errors are in drivers/errors.py)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = ["Driver", "Identity", "OptionError", "Options", "Reading"]


@dataclass(frozen=True, slots=True)
class Identity:
    """What a probe found at an address: the part, and the evidence (chip id, serial number...)."""

    part: str
    detail: str


@dataclass(frozen=True, slots=True)
class Reading:
    """One read of one sensor: its channel values in engineering units, after scaling.

    ``seq`` increases by one for every reading the sampler produces in this process; ``t_mono`` is
    the clock's monotonic time and ``t_wall`` the wall-clock time of the read.
    """

    sensor: str
    values: Mapping[str, float]
    seq: int
    t_mono: float
    t_wall: float


@runtime_checkable
class Driver(Protocol):
    """A sensor part behind a bus.

    ``part`` names the part (``"bme280"``). ``channels`` are the names :meth:`read` returns, in the
    part's own units (volts, amperes, g, degrees Celsius, hPa ...); linear transducer scaling is
    applied by the sampler from the configuration, not by the driver.
    """

    part: ClassVar[str]
    channels: ClassVar[tuple[str, ...]]

    async def open(self) -> Identity:
        """Check identity, load calibration, configure the part. Raises DeviceNotFound."""

    async def read(self) -> dict[str, float]:
        """One reading of every channel. Raises a DriverError."""

    def resolution(self, channel: str) -> float:
        """The smallest step of ``channel`` in its unit, with the current settings."""

    async def close(self) -> None:
        """Put the part to sleep where it has a low-power mode and release the bus."""


class OptionError(ValueError):
    """A driver option is invalid. ``key`` is the option's name (config turns it into a path)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


@dataclass
class Options:
    """Reads a TOML table one typed key at a time (driver options, and the agent's own config).

    Each accessor validates its key and raises :class:`OptionError` naming it (with the table's
    ``prefix``, so nested tables report ``scaling.pressure.in``); :meth:`finish` refuses keys nobody
    asked for, so a misspelt key is an error rather than silently ignored.
    """

    raw: Mapping[str, Any]
    prefix: str = ""
    _used: set[str] = field(default_factory=set)

    def error(self, key: str, message: str) -> OptionError:
        return OptionError(f"{self.prefix}{key}", message)

    def has(self, key: str) -> bool:
        return key in self.raw

    def _get(self, key: str, default: Any) -> Any:
        self._used.add(key)
        return self.raw.get(key, default)

    def required(self, key: str) -> Any:
        self._used.add(key)
        if key not in self.raw:
            raise self.error(key, "is required")
        return self.raw[key]

    def number(
        self,
        key: str,
        default: float | None = None,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        above: float | None = None,
    ) -> float:
        value = self.required(key) if default is None else self._get(key, default)
        return check_number(self, key, value, minimum=minimum, maximum=maximum, above=above)

    def integer(
        self,
        key: str,
        default: int | None = None,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        value = self.required(key) if default is None else self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"{value} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"{value} is above the maximum {maximum}")
        return value

    def choice(self, key: str, default: Any, choices: Mapping[Any, Any] | tuple[Any, ...]) -> Any:
        """The value must be one of ``choices``; with a mapping, returns the mapped value."""
        value = self.required(key) if default is None else self._get(key, default)
        allowed = list(choices)
        if isinstance(value, bool) or value not in allowed:
            shown = ", ".join(repr(c) for c in allowed)
            raise self.error(key, f"{value!r} is not one of {shown}")
        return choices[value] if isinstance(choices, Mapping) else value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def string(self, key: str, default: str | None = None) -> str:
        value = self.required(key) if default is None else self._get(key, default)
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {value!r}")
        return value

    def strings(self, key: str, default: tuple[str, ...] | None = None) -> tuple[str, ...]:
        value = self.required(key) if default is None else self._get(key, default)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"expected a list of strings, got {value!r}")
        return tuple(value)

    def numbers(self, key: str, length: int | None = None) -> tuple[float, ...]:
        value = self.required(key)
        if not isinstance(value, list | tuple):
            raise self.error(key, f"expected a list of numbers, got {value!r}")
        if length is not None and len(value) != length:
            raise self.error(key, f"expected {length} numbers, got {len(value)}")
        return tuple(check_number(self, key, v) for v in value)

    def table(self, key: str, *, required: bool = False) -> Options:
        """A nested table, as Options whose errors carry ``key.`` in their path."""
        value = self.required(key) if required else self._get(key, {})
        if not isinstance(value, Mapping):
            raise self.error(key, f"expected a table, got {value!r}")
        return Options(value, prefix=f"{self.prefix}{key}.")

    def tables(self, key: str) -> list[Options]:
        """An array of tables (``[[key]]``), each with ``key[i].`` in its path."""
        value = self._get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise self.error(key, "expected an array of tables")
        return [Options(v, prefix=f"{self.prefix}{key}[{i}].") for i, v in enumerate(value)]

    def value(self, key: str, default: Any = None) -> Any:
        """The raw value, for structured options that the caller validates itself."""
        return self._get(key, default)

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self._used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def check_number(
    opts: Options,
    key: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise opts.error(key, f"expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise opts.error(key, f"expected a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise opts.error(key, f"{value:g} is below the minimum {minimum:g}")
    if maximum is not None and value > maximum:
        raise opts.error(key, f"{value:g} is above the maximum {maximum:g}")
    if above is not None and value <= above:
        raise opts.error(key, f"{value:g} must be greater than {above:g}")
    return value


class BaseDriver:
    """Shared defaults for driver classes.

    Contract for a driver module ``drivers/<part>.py``:

    - an I2C driver is built as ``Cls(device: I2CDevice, options)``; a serial driver as
      ``Cls(port: AsyncSerial, options)``; ``options`` is what :meth:`parse_options` returned, and
      ``None`` means the defaults. Time comes from ``device.clock`` / ``port.clock``.
    - ``parse_options`` validates the ``[sensor.options]`` table with :class:`Options` (pure, no
      I/O, used by ``edge-agent check-config``) and calls ``opts.finish()``.
    """

    part: ClassVar[str] = ""
    transport: ClassVar[str] = "i2c"  # "i2c" or "serial"
    channels: ClassVar[tuple[str, ...]] = ()
    addresses: ClassVar[tuple[int, ...]] = ()  # I2C addresses the part can be strapped to

    @classmethod
    def parse_options(cls, opts: Options) -> Any:
        opts.finish()
        return None

    @classmethod
    def channels_for(cls, options: Any) -> tuple[str, ...]:
        """The channels this part reports with ``options`` (serial instruments: from config)."""
        return cls.channels

    def longest_attempt(self) -> float:
        """Seconds an :meth:`open` and a :meth:`read` together may take with these options while
        the part works (0: a moment, within the bus's own per-transfer deadlines). Long windows,
        line timeouts and retries make it long; the agent counts a sensor's read as stuck only
        once it has run this much longer than a stage may (agent/sense/sampling.py)."""
        return 0.0

    async def close(self) -> None:
        return None
