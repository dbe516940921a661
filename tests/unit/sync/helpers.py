"""Shared by the sync unit tests."""

from __future__ import annotations

import asyncio
from typing import Any


async def run_for(stage: Any, seconds: float, stop: asyncio.Event | None = None) -> None:
    """Run a stage (``stage.run()``: the uplink, the state sync) for ``seconds`` of virtual time
    (or until ``stop``); it must not die."""
    task = asyncio.create_task(stage.run())
    try:
        waiter = asyncio.ensure_future((stop or asyncio.Event()).wait())
        await asyncio.wait({task, waiter}, timeout=seconds)
        waiter.cancel()
        assert not task.done(), task.exception()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
