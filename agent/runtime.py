"""Builds the agent's stages from the config and runs them in one asyncio TaskGroup.

Stages talk through the store and small in-memory queues, never through globals. SIGINT and SIGTERM
stop the agent gracefully: the stages are cancelled, the sensors closed, the store flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from agent.clock import Clock, RealClock
from agent.config import Config
from agent.hardware import Hardware
from agent.sampling import Sampler
from drivers.base import Reading

log = logging.getLogger(__name__)

ReadingHook = Callable[[Reading], Awaitable[None] | None]


class Agent:
    """The running agent: hardware, sampler and (as they are configured) the later stages."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        rig: Any = None,
        on_reading: ReadingHook | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or RealClock()
        self.rig = rig
        self.on_reading = on_reading
        self.hardware = Hardware(config, self.clock, rig)
        self.sampler: Sampler | None = None
        self.readings = 0
        self._stop = asyncio.Event()
        self.started = self.clock.monotonic()

    def request_stop(self) -> None:
        self._stop.set()

    async def _sink(self, reading: Reading) -> None:
        self.readings += 1
        log.debug(
            "sensor=%s seq=%d %s",
            reading.sensor,
            reading.seq,
            " ".join(f"{k}={v:.6g}" for k, v in reading.values.items()),
        )
        if self.on_reading is not None:
            result = self.on_reading(reading)
            if asyncio.iscoroutine(result):
                await result

    async def run(self, *, install_signals: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop)
        self.sampler = Sampler(self.hardware.build(), self.clock, self._sink)
        log.info(
            "event=start device=%s sensors=%d",
            self.config.agent.device_id,
            len(self.config.sensors),
        )
        try:
            async with asyncio.TaskGroup() as tg:
                sampler_task = tg.create_task(self.sampler.run(), name="sampler")
                await self._stop.wait()
                sampler_task.cancel()
        finally:
            await self.sampler.close()
            self.hardware.close()
            if install_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(Exception):
                        loop.remove_signal_handler(sig)
            log.info("event=stop readings=%d", self.readings)
