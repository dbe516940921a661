"""systemd's notify protocol (sd_notify) and the health-gated watchdog.

``READY=1`` is sent once the service is up (the agent: sensors and models; the gateway: its store
open and its CoAP servers listening); ``WATCHDOG=1`` is sent from the main loop only while every
stage reports progress within its deadline, so a stuck stage stops the pings and systemd
restarts the process; ``STATUS=`` carries a one-line summary for ``systemctl status``.
Without ``NOTIFY_SOCKET`` (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from drivers.clock import Clock

log = logging.getLogger(__name__)


class Notifier:
    """Sends datagrams to ``$NOTIFY_SOCKET`` (a path, or an abstract socket starting with '@')."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._sock: socket.socket | None = None
        if self.address:
            target = self.address
            if target.startswith("@"):
                target = "\0" + target[1:]
            self._target = target
            # Non-blocking: a receiver that does not read must never stall the event loop; a
            # message that does not fit is dropped (the next ping follows soon).
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self._target)
            return True
        except BlockingIOError:
            log.debug("event=notify_dropped reason=receiver_busy")
            return False
        except OSError as err:
            log.warning("event=notify_failed socket=%s error=%r", self.address, str(err))
            return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, if the watchdog is on for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


@dataclass
class Heartbeat:
    """A stage's proof of life: it calls :meth:`beat` each time round its loop."""

    name: str
    deadline: float  # seconds without a beat after which the stage counts as stuck
    last: float = 0.0

    def beat(self, now: float) -> None:
        self.last = now


class Health:
    """The stages' heartbeats; and stuck-checks; healthy while none reports a stuck stage."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.beats: dict[str, Heartbeat] = {}
        self.checks: dict[str, Callable[[], bool]] = {}

    def register(self, name: str, deadline: float) -> Callable[[], None]:
        hb = Heartbeat(name, deadline, self.clock.monotonic())
        self.beats[name] = hb
        return lambda: hb.beat(self.clock.monotonic())

    def check(self, name: str, is_stuck: Callable[[], bool]) -> None:
        """Register a predicate that says whether a stage is stuck right now."""
        self.checks[name] = is_stuck

    def stuck(self) -> list[str]:
        now = self.clock.monotonic()
        names = [hb.name for hb in self.beats.values() if now - hb.last > hb.deadline]
        names += [name for name, is_stuck in self.checks.items() if is_stuck()]
        return names


async def watchdog_loop(
    notifier: Notifier, health: Health, clock: Clock, interval: float, status: Callable[[], str]
) -> None:
    """Ping systemd every ``interval`` seconds while no stage is stuck."""
    was_stuck: list[str] = []
    while True:
        stuck = health.stuck()
        if stuck:
            if stuck != was_stuck:
                log.error("event=watchdog_withheld stuck=%s", ",".join(stuck))
            notifier.status(f"stuck: {', '.join(stuck)}")
        else:
            if was_stuck:
                log.info("event=watchdog_resumed")
            notifier.send("WATCHDOG=1", f"STATUS={status()}")
        was_stuck = stuck
        await clock.sleep(interval)


async def run_watchdog(
    notifier: Notifier, health: Health, clock: Clock, status: Callable[[], str]
) -> None:
    interval = watchdog_interval()
    if interval is None or not notifier.enabled:
        await asyncio.Event().wait()  # nothing to do; park until cancelled
        return
    await watchdog_loop(notifier, health, clock, interval, status)


async def announce(
    notifier: Notifier, health: Health, clock: Clock, status: Callable[[], str]
) -> None:
    """The service is up: ``READY=1`` with its status line, then :func:`run_watchdog` until
    cancelled (the agent's and the gateway's start-up end here)."""
    notifier.ready(status())
    await run_watchdog(notifier, health, clock, status)


class Announcer:
    """:func:`announce` and ``STOPPING=1`` for a service that does not hold the notifier itself
    (``edge-agent gateway`` gives one to agent/gateway/service.py, which may not import this)."""

    def __init__(self, notifier: Notifier, health: Health, clock: Clock) -> None:
        self.notifier, self.health, self.clock = notifier, health, clock

    async def run(self, status: Callable[[], str]) -> None:
        await announce(self.notifier, self.health, self.clock, status)

    def stopping(self) -> None:
        self.notifier.stopping()
