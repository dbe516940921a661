"""Time for the agent: the real clock, and a virtual clock for tests and fast replay.

Every stage takes a :class:`Clock` instead of calling ``time`` or ``asyncio.sleep`` itself, so
a test can run an hour of sensor data in seconds. Blocking work (bus transfers, serial I/O,
SQLite) goes through :meth:`Clock.run_blocking`, which lets the virtual clock hold time still
while real work is in flight.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import selectors
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar, runtime_checkable

T = TypeVar("T")

#: 2025-01-01T00:00:00Z: a wall clock that reads earlier is not set yet (a device without a
#: real-time clock boots at 1970 until NTP sets it); this release is later.
WALL_FLOOR = 1_735_689_600.0


@runtime_checkable
class Clock(Protocol):
    """The time seam."""

    def monotonic(self) -> float:
        """Seconds on a monotonic clock (the event loop's time)."""

    def time(self) -> float:
        """Wall-clock seconds since the Unix epoch."""

    async def sleep(self, seconds: float) -> None:
        """Sleep on this clock."""

    async def run_blocking(self, executor: Executor | None, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call on ``executor`` (None: the loop's default) and await its result."""


def _run_in_executor(executor: Executor | None, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    return loop.run_in_executor(executor, functools.partial(ctx.run, fn, *args))


class RealClock:
    """Wall and monotonic time as the operating system keeps them."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def run_blocking(self, executor: Executor | None, fn: Callable[..., T], *args: Any) -> T:
        return await _run_in_executor(executor, fn, *args)


class _VirtualSelector(selectors.BaseSelector):
    """Wraps the loop's selector: when the loop would block waiting for a timer, jump to it."""

    def __init__(self, inner: selectors.BaseSelector, clock: VirtualClock) -> None:
        self._inner = inner
        self._clock = clock

    def register(self, fileobj, events, data=None):  # type: ignore[no-untyped-def]
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj):  # type: ignore[no-untyped-def]
        return self._inner.unregister(fileobj)

    def modify(self, fileobj, events, data=None):  # type: ignore[no-untyped-def]
        return self._inner.modify(fileobj, events, data)

    def get_map(self):  # type: ignore[no-untyped-def]
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()

    def select(self, timeout: float | None = None):  # type: ignore[no-untyped-def]
        ready = self._inner.select(0)
        if ready or timeout == 0:
            return ready
        if self._clock._inflight:
            # Real work is running in a thread: wait for it in real time, time stands still.
            return self._inner.select(timeout if timeout is None else min(timeout, 0.05))
        if timeout is None:
            return self._inner.select(None)
        self._clock._advance(timeout)
        return []


class VirtualClock:
    """Simulated time: the event loop jumps straight to its next timer when nothing else is ready.

    Use :meth:`run` (or :meth:`new_event_loop` with ``asyncio.Runner``) to run a coroutine on it;
    ``asyncio.sleep`` and ``asyncio.timeout`` then run on virtual time too.
    """

    def __init__(
        self, start_wall: float = 1_700_000_000.0, start_monotonic: float = 1000.0
    ) -> None:
        self._now = start_monotonic
        self._wall_offset = start_wall - start_monotonic
        self._inflight = 0
        self._lock = threading.Lock()

    def _advance(self, seconds: float) -> None:
        if seconds > 0:
            self._now += seconds

    def advance(self, seconds: float) -> None:
        """Move time forward by hand (for code that is not running on the virtual loop)."""
        self._advance(seconds)

    def step_wall(self, seconds: float) -> None:
        """Step the wall clock by ``seconds`` (negative: back), as NTP or an operator does; the
        monotonic clock runs on."""
        self._wall_offset += seconds

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def run_blocking(self, executor: Executor | None, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            self._inflight += 1
        try:
            return await _run_in_executor(executor, fn, *args)
        finally:
            with self._lock:
                self._inflight -= 1

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.SelectorEventLoop()
        loop._selector = _VirtualSelector(loop._selector, self)  # type: ignore[attr-defined]
        loop.time = self.monotonic  # type: ignore[method-assign]
        return loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` to completion on a fresh event loop driven by this clock."""
        with asyncio.Runner(loop_factory=self.new_event_loop) as runner:
            return runner.run(coro)


class ScaledClock(RealClock):
    """Real time running ``rate`` times faster: for simulated rigs, so a long scenario (an
    outage of minutes, hours of readings) plays out in less real time with real I/O. Network
    deadlines inside the transport stay in real time; the agent's own intervals, backoffs and
    timestamps follow this clock."""

    def __init__(self, rate: float) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"time scale must be a positive number, got {rate!r}")
        self.rate = rate
        self._real0 = time.monotonic()
        self._wall0 = time.time()

    def monotonic(self) -> float:
        return self._real0 + (time.monotonic() - self._real0) * self.rate

    def time(self) -> float:
        return self._wall0 + (time.monotonic() - self._real0) * self.rate

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.rate)


async def wait_event(
    clock: Clock, event: asyncio.Event, seconds: float, also: asyncio.Future[Any] | None = None
) -> bool:
    """Wait until ``event`` is set or ``seconds`` pass on ``clock`` (or ``also``, left running,
    is done). True if the event is set."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    waits: set[asyncio.Future[Any]] = {waiter, sleeper} if also is None else {waiter, sleeper, also}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        sleeper.cancel()
    return event.is_set()
