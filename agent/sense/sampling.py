"""The sampler: reads each sensor on its own interval, scales its channels, and emits Readings.

A sensor whose read fails is marked degraded and retried with exponential backoff; before each retry
its driver is opened again (the part may have been power-cycled and lost its configuration). A
failing sensor never stops the others: each runs in its own task. Reads are scheduled on a fixed
grid (``start + k * interval``), so they do not drift; slots missed because a read overran are
skipped and counted rather than bunched up.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.errors import DeviceDataError, DriverError
from agent.logsetup import SHIPPED
from agent.sense.settings import SensorConfig
from agent.wire.predict import quantize
from drivers.base import Reading
from drivers.clock import Clock, wait_event

log = logging.getLogger(__name__)

#: Backoff after a failure: first retry after BACKOFF_BASE (or the interval, if shorter), doubling
#: with each consecutive failure up to BACKOFF_MAX seconds.
BACKOFF_BASE = 1.0
BACKOFF_MAX = 60.0
#: Consecutive failures after which a degraded sensor is reported as down.
DOWN_AFTER = 5
#: What the log ring keeps of a withheld sensor's error text (Sampler._log).
WITHHELD = "withheld: the sensor has a local or drop channel ([data]); the journal has it"


class SensorState(enum.StrEnum):
    STARTING = "starting"
    OK = "ok"
    DEGRADED = "degraded"
    DOWN = "down"
    DISABLED = "disabled"


@dataclass
class SensorHealth:
    """Live health of one sensor, read by status, metrics and reported state."""

    name: str
    state: SensorState = SensorState.STARTING
    reads: int = 0
    errors: int = 0
    consecutive_errors: int = 0
    missed_slots: int = 0
    last_error: str = ""
    last_ok: float | None = None  # wall time of the last good read
    last_latency: float | None = None  # seconds the last good read took
    identity: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "reads": self.reads,
            "errors": self.errors,
            "consecutive_errors": self.consecutive_errors,
            "missed_slots": self.missed_slots,
            "last_error": self.last_error,
            "last_ok": self.last_ok,
            "last_latency": self.last_latency,
            "identity": self.identity,
        }


def backoff_delay(
    failures: int, interval: float, base: float = BACKOFF_BASE, cap: float = BACKOFF_MAX
) -> float:
    """Seconds to wait after ``failures`` consecutive failures (1 -> the first retry)."""
    first = min(base, interval)
    return min(cap, first * 2 ** max(0, failures - 1))


def channel_resolution(cfg: SensorConfig, driver: Any, channel: str) -> float | None:
    """The step of a reported channel: the config's override, else the part's resolution
    carried through the channel's scaling (None: unknown)."""
    if channel in cfg.resolution:
        return cfg.resolution[channel]
    try:
        step = float(driver.resolution(cfg.source_of(channel)))
    except (KeyError, ValueError, AttributeError, TypeError):
        return None
    scaling = cfg.scaling.get(channel)
    return step * abs(scaling.gain) if scaling else step


def scale_values(cfg: SensorConfig, raw: dict[str, float], driver: Any = None) -> dict[str, float]:
    """The reported channels of ``cfg`` from a driver's raw channel values, each on its
    resolution's grid when it has one (what the compact encodings carry exactly, so every
    encoding of a reading agrees)."""
    out: dict[str, float] = {}
    for ch in cfg.channels:
        scaling = cfg.scaling.get(ch)
        source = scaling.source if scaling else ch
        if source not in raw:
            raise DriverError(f"{cfg.name}: driver returned no value for channel {source!r}")
        value = raw[source]
        if scaling:
            value = scaling.apply(value)
        if not math.isfinite(value):
            scaled = f" ({source}={raw[source]!r} scaled)" if scaling else ""
            raise DeviceDataError(
                f"{cfg.name}: channel {ch!r} is {value!r}{scaled}; a reading must be a finite "
                "number: check the part and the channel's scaling"
            )
        step = channel_resolution(cfg, driver, ch) if driver is not None else None
        if step and abs(value / step) < 2**53:
            value = quantize(value, step) + 0.0  # + 0.0: never -0.0
        out[ch] = value
    return out


def _allowance(driver: Any) -> float:
    """The driver's :meth:`~drivers.base.BaseDriver.longest_attempt` (0 if it has none)."""
    longest = getattr(driver, "longest_attempt", None)
    return float(longest()) if callable(longest) else 0.0


Sink = Callable[[Reading], Awaitable[None]]


@dataclass
class SensorTask:
    cfg: SensorConfig
    driver: Any
    health: SensorHealth
    interval: float
    enabled: bool = True
    opened: bool = False
    busy_since: float | None = None  # clock time the current attempt started
    allowance: float = 0.0  # seconds an attempt may take by the driver's options
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Sampler:
    """Runs one task per sensor and hands every Reading to ``sink``."""

    def __init__(
        self,
        sensors: Sequence[tuple[SensorConfig, Any]],
        clock: Clock,
        sink: Sink,
        *,
        backoff_base: float = BACKOFF_BASE,
        backoff_max: float = BACKOFF_MAX,
        withheld: frozenset[str] = frozenset(),
    ) -> None:
        self.clock = clock
        #: sensors with a local or drop channel: their error texts stay on the device (_log)
        self.withheld = withheld
        self.sink = sink
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.tasks = {
            cfg.name: SensorTask(
                cfg, driver, SensorHealth(cfg.name), cfg.interval, allowance=_allowance(driver)
            )
            for cfg, driver in sensors
        }
        self._seq = 0
        self.last_progress = clock.monotonic()

    @property
    def health(self) -> dict[str, SensorHealth]:
        return {name: t.health for name, t in self.tasks.items()}

    def stuck(self, after: float) -> bool:
        """Whether a sensor's attempt (open and read) has run ``after`` seconds longer than its
        driver's options let one take (an ADXL345 window of 82 s is not stuck at 60 s)."""
        now = self.clock.monotonic()
        return any(
            t.busy_since is not None and now - t.busy_since > after + t.allowance
            for t in self.tasks.values()
        )

    def set_interval(self, name: str, interval: float) -> None:
        """Change a sensor's interval live (desired state); takes effect at the next slot."""
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"interval must be a positive number, got {interval!r}")
        task = self.tasks[name]
        if task.interval != interval:
            log.info("sensor=%s event=interval_changed interval=%g", name, interval)
            task.interval = interval
            task.wake.set()

    def set_enabled(self, name: str, enabled: bool) -> None:
        task = self.tasks[name]
        if task.enabled != enabled:
            log.info("sensor=%s event=%s", name, "enabled" if enabled else "disabled")
            task.enabled = enabled
            task.health.state = SensorState.STARTING if enabled else SensorState.DISABLED
            task.wake.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for task in self.tasks.values():
                tg.create_task(self._run_sensor(task), name=f"sensor-{task.cfg.name}")

    async def close(self) -> None:
        for task in self.tasks.values():
            await self._close(task)

    async def _close(self, task: SensorTask) -> None:
        """Close ``task``'s part if it is open (asleep where it has a low-power mode); opened
        (configured) again before its next read."""
        if not task.opened:
            return
        task.opened = False
        try:
            await task.driver.close()
        except Exception as err:  # closing must not stop the others closing
            self._log(logging.WARNING, task, "event=close_failed error=%r", str(err))

    async def _sleep_until(self, task: SensorTask, deadline: float) -> None:
        """Sleep until ``deadline`` on the clock, or until the task's settings change."""
        delay = deadline - self.clock.monotonic()
        if delay <= 0:
            return
        task.wake.clear()
        await wait_event(self.clock, task.wake, delay)

    async def _run_sensor(self, task: SensorTask) -> None:
        next_slot = self.clock.monotonic()
        while True:
            if not task.enabled:  # the part sleeps while its sensor is disabled
                await self._close(task)
                task.wake.clear()
                if not task.enabled:
                    await task.wake.wait()
                next_slot = self.clock.monotonic()
                continue
            ok = await self.sample_once(task)
            now = self.clock.monotonic()
            if ok:
                next_slot += task.interval
                if next_slot <= now:  # overran: skip the slots we missed, keep the grid
                    missed = math.floor((now - next_slot) / task.interval) + 1
                    task.health.missed_slots += missed
                    next_slot += missed * task.interval
            else:
                delay = backoff_delay(
                    task.health.consecutive_errors,
                    task.interval,
                    self.backoff_base,
                    self.backoff_max,
                )
                next_slot = now + delay
            await self._sleep_until(task, next_slot)

    async def sample_once(self, task: SensorTask) -> bool:
        """Open (if needed) and read one sensor; update its health; emit the Reading."""
        cfg, health = task.cfg, task.health
        started = self.clock.monotonic()
        task.busy_since = started
        try:
            if not task.opened:
                identity = await task.driver.open()
                health.identity = identity.detail
                task.opened = True
            raw = await task.driver.read()
            values = scale_values(cfg, raw, task.driver)
        except DriverError as err:
            self._failed(task, err)
            return False
        except Exception as err:  # a driver's bug: it must never cancel the other sensors
            self._failed(task, f"{type(err).__name__}: {err}", bug=True)
            return False
        finally:
            task.busy_since = None
        if not task.enabled:  # disabled while it was read: it stays so, the reading is not wanted
            return False
        finished = self.clock.monotonic()
        if health.state in (SensorState.DEGRADED, SensorState.DOWN):
            log.info(
                "sensor=%s event=recovered after_errors=%d", cfg.name, health.consecutive_errors
            )
        health.state = SensorState.OK
        health.reads += 1
        health.consecutive_errors = 0
        health.last_latency = finished - started
        health.last_ok = self.clock.time()
        self.last_progress = finished
        self._seq += 1
        reading = Reading(
            sensor=cfg.name,
            values=values,
            seq=self._seq,
            t_mono=finished,
            t_wall=self.clock.time(),
        )
        await self.sink(reading)
        return True

    def _failed(self, task: SensorTask, err: DriverError | str, *, bug: bool = False) -> None:
        """Count a failed attempt and log the sensor's change of state (``bug``: the driver
        raised something other than a DriverError, said as such)."""
        task.opened = False  # re-open (re-configure) before the next try
        if not task.enabled:  # disabled while it was read: it stays so
            return
        health = task.health
        health.errors += 1
        health.consecutive_errors += 1
        health.last_error = str(err)
        self.last_progress = self.clock.monotonic()
        previous = health.state
        health.state = (
            SensorState.DOWN if health.consecutive_errors >= DOWN_AFTER else SensorState.DEGRADED
        )
        if bug and previous != health.state:
            self._log(
                logging.ERROR,
                task,
                "driver=%s event=driver_bug state=%s errors=%d error=%r: a driver "
                "bug; the sensor is opened again and retried: report this line",
                task.cfg.driver,
                health.state.value,
                health.consecutive_errors,
                str(err),
            )
        elif previous != health.state:
            level = logging.ERROR if health.state is SensorState.DOWN else logging.WARNING
            self._log(
                level,
                task,
                "event=%s errors=%d error=%r",
                health.state.value,
                health.consecutive_errors,
                str(err),
            )
        else:
            self._log(logging.DEBUG, task, "event=read_failed error=%r", str(err))

    def _log(self, level: int, task: SensorTask, fmt: str, *args: Any) -> None:
        """Log ``sensor=NAME`` and ``fmt``, whose last argument, a driver's error text, may
        quote a reading (a line, an answer, registers): for a sensor with a local or drop
        channel the log ring, which the ``logs`` command uploads, gets WITHHELD instead
        (agent/logsetup.py)."""
        fmt, args = "sensor=%s " + fmt, (task.cfg.name, *args)
        withheld = task.cfg.name in self.withheld
        extra = {SHIPPED: fmt % (*args[:-1], WITHHELD)} if withheld else None
        log.log(level, fmt, *args, extra=extra)
