"""Stage supervision: each stage of the agent runs in its own task under a :class:`Supervisor`, so
one stage's failure never cancels another (a failing uplink must not take the telemetry writer
and its buffered readings with it).

A stage that raises is restarted after a backoff with full jitter (``RESTART_BASE`` doubling up
to ``RESTART_CAP``). Logging: one error line when a stage starts failing (its exception's type
and message), debug for further failures of the same kind, a new error line if the failure
changes, and one info line when the stage has run for ``HEALTHY_AFTER`` seconds again. A stage
that stays down longer than ``DOWN_AFTER`` counts as stuck to :class:`~agent.service.notify.Health`,
so the systemd watchdog is no longer fed and systemd restarts the whole agent.

Stopping is the owner's business: cancelling the task :meth:`Supervisor.start` returns stops the
stage (the owner stops the telemetry writer through its own ``stop()`` and waits, never cancels).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.service.notify import Health
from agent.sync.backoff import full_jitter
from drivers.clock import Clock

log = logging.getLogger(__name__)

RESTART_BASE = 0.5  # seconds before the first restart (upper bound of the jitter)
RESTART_CAP = 60.0  # longest wait between restarts
HEALTHY_AFTER = 30.0  # a restarted stage that runs this long is healthy again
DOWN_AFTER = 120.0  # a stage failing for this long is stuck: the watchdog stops


@dataclass
class StageState:
    name: str
    failures: int = 0  # failures in a row (reset once the stage is healthy again)
    restarts: int = 0  # restarts ever
    down_since: float | None = None  # first failure of the current episode
    last_error: str = ""
    finished: bool = False  # the stage returned (it had nothing more to do)


class Supervisor:
    """Runs stages, restarts the ones that fail, and tells ``health`` which stay down."""

    def __init__(self, clock: Clock, health: Health, rng: random.Random | None = None) -> None:
        self.clock = clock
        self.health = health
        self.rng = rng or random.Random()
        self.stages: dict[str, StageState] = {}

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Start ``run()`` as the stage ``name``; returns the supervising task."""
        state = StageState(name)
        self.stages[name] = state
        self.health.check(f"{name}-down", lambda: self._down_too_long(state))
        return asyncio.get_running_loop().create_task(self._supervise(state, run), name=name)

    def heartbeat(self, name: str, deadline: float) -> Callable[[], None]:
        """A beat a stage calls each time round its loop: without one for ``deadline`` seconds
        (a round that never ends) the health counts ``name`` stuck."""
        return self.health.register(name, deadline)

    def _down_too_long(self, state: StageState) -> bool:
        since = state.down_since
        return since is not None and self.clock.monotonic() - since > DOWN_AFTER

    def down(self) -> list[str]:
        """Stages failing right now (restarting, or restarted and not yet healthy)."""
        return [s.name for s in self.stages.values() if s.down_since is not None]

    def status(self) -> dict[str, dict[str, object]]:
        return {
            s.name: {
                "restarts": s.restarts,
                "down": s.down_since is not None,
                "last_error": s.last_error or None,
            }
            for s in self.stages.values()
        }

    async def _supervise(self, state: StageState, run: Callable[[], Awaitable[None]]) -> None:
        clock = self.clock
        while True:
            started = clock.monotonic()
            healthy = asyncio.get_running_loop().create_task(self._mark_healthy(state))
            try:
                await run()
                state.finished = True
                state.down_since = None
                return
            except Exception as err:
                self._failed(state, err, clock.monotonic() - started)
            finally:
                healthy.cancel()
            state.restarts += 1
            await clock.sleep(full_jitter(state.failures, RESTART_BASE, RESTART_CAP, self.rng))

    async def _mark_healthy(self, state: StageState) -> None:
        await self.clock.sleep(HEALTHY_AFTER)
        if state.down_since is not None:
            log.info(
                "event=stage_recovered stage=%s restarts=%d down_for=%.0fs",
                state.name,
                state.restarts,
                self.clock.monotonic() - state.down_since - HEALTHY_AFTER,
            )
        state.down_since = None
        state.failures = 0

    def _failed(self, state: StageState, err: Exception, ran: float) -> None:
        what = f"{type(err).__name__}: {err}"
        first = state.down_since is None
        if first:
            state.down_since = self.clock.monotonic()
        state.failures += 1
        if first or what != state.last_error:
            log.error(
                "event=stage_failed stage=%s error=%r ran=%.1fs action=restart",
                state.name,
                what,
                ran,
            )
        else:
            log.debug("event=stage_failed_again stage=%s failures=%d", state.name, state.failures)
        state.last_error = what
