"""The wall clock before it is set (docs/store.md, "Times before the clock is set").

A device without a real-time clock (a Raspberry Pi) boots with its wall clock at 1970, or at
fake-hwclock's last saved time, and NTP sets it seconds or hours later (or never, offline). The
agent runs meanwhile: its readings, alerts and events are stamped with the wall clock.

- The wall clock counts as set once it reads :data:`FLOOR` or later, a date before this release
  (nothing this agent measures can be older).
- :class:`WallClockWatch` looks every :data:`CHECK` seconds (monotonic). While the clock is
  before the floor it keeps the wall clock's offset to the monotonic clock; once it is set, every
  record this run queued with a time before the floor and that was never handed to the uplink
  gets the time it was taken: its time plus the change of the offset
  (:meth:`agent.store.queue.Store.restamp`), again at each look until one finds none left,
  ``settle`` seconds (the telemetry writer's commit window) or more after the look that saw the
  clock set (a reading stamped before the step may still be on its way into the store, waiting
  in the commit window). Records sent before that, and those of an earlier run (another
  monotonic origin after a reboot), keep their stamps.
- A step of the wall clock of more than :data:`STEP` seconds is logged
  (``event=wall_clock_stepped``), whichever way: times stamped before it by a clock that was off
  by a plausible amount (fake-hwclock's) cannot be told from right ones, the line says by how much
  they may be off.
"""

from __future__ import annotations

import asyncio
import logging

from agent.errors import StoreError
from agent.store.queue import Store
from drivers.clock import WALL_FLOOR, Clock

log = logging.getLogger(__name__)

#: A wall clock before it is not set (:data:`drivers.clock.WALL_FLOOR`, 2025-01-01).
FLOOR = WALL_FLOOR
#: Seconds between two looks at the wall clock.
CHECK = 10.0
#: Seconds to the next look while records wait to be restamped (one may still be on its way
#: into the store: the telemetry writer's commit window).
SOON = 2.0
#: A change of the wall clock's offset to the monotonic clock larger than this is a step.
STEP = 2.0


class WallClockWatch:
    """Restamps what was stamped before the wall clock was set, and logs its steps (module
    docstring). Make it right after the store is opened: records numbered above the store's
    last sequence number then are this run's."""

    def __init__(
        self, store: Store, clock: Clock, *, floor: float = FLOOR, settle: float = 0.0
    ) -> None:
        self.store = store
        self.clock = clock
        self.floor = floor
        self.settle = settle  # the commit window: readings wait that long before their commit
        self.set_at = 0.0  # monotonic time of the look that saw the clock set
        self.above = store.last_seq
        self.offset = clock.time() - clock.monotonic()
        self.unset_offset = self.offset if clock.time() < floor else None
        self.shift: float | None = None  # to add to the times stamped before the floor
        self.restamped = 0
        #: set once no record of this run waits to be restamped (the wall clock was set at the
        #: start, or it was set since and the restamping is done): the uplink holds records
        #: until then (agent/sync/uplink.py WALL_HOLD), so that they leave restamped
        self.settled = asyncio.Event()
        if self.unset_offset is None:
            self.settled.set()

    async def run(self) -> None:
        if self.unset_offset is not None:
            log.warning(
                "event=wall_clock_not_set time=%.0f floor=%.0f note=records taken now are "
                "restamped once it is set",
                self.clock.time(),
                self.floor,
            )
        while True:
            await self.clock.sleep(SOON if self.shift is not None else CHECK)
            await self.look()

    async def look(self) -> None:
        """One look at the wall clock (:meth:`run` calls it every CHECK seconds)."""
        wall = self.clock.time()
        offset = wall - self.clock.monotonic()
        if abs(offset - self.offset) > STEP:
            log.info("event=wall_clock_stepped by=%.3f time=%.0f", offset - self.offset, wall)
        self.offset = offset
        if self.unset_offset is not None and wall < self.floor:
            self.unset_offset = offset  # the offset the times before the floor were taken with
        elif self.unset_offset is not None:
            self.shift, self.unset_offset = offset - self.unset_offset, None
            self.set_at = self.clock.monotonic()
            log.info("event=wall_clock_set shift=%.3f", self.shift)
        if self.shift is None:
            return
        try:
            n = await self.store.restamp(self.shift, self.floor, self.above)
        except StoreError as err:
            log.warning("event=restamp_failed error=%r action=next_look", str(err))
            return
        self.restamped += n
        if n:
            log.info("event=records_restamped count=%d shift=%.3f", n, self.shift)
        elif self.clock.monotonic() - self.set_at > self.settle:
            self.shift = None  # none left, none waiting: later puts are stamped after the step
            self.settled.set()
