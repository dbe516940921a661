"""Shared by the sync unit tests."""

from __future__ import annotations

import asyncio
from typing import Any

from agent.detect.detector import Alert, AlertKind, Verdict
from agent.wire.validation import DIGEST_KEY, window_digest


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


def an_alert() -> Alert:
    """A raised alert the edge is unsure of (the router validates it)."""
    return Alert(
        time=1.0,
        kind=AlertKind.RAISE,
        score=1.5,
        threshold=1.0,
        channels=(("Volume Flow RateRMS", 1.5),),
        verdict=Verdict.NOVEL_ANOMALY,
        confidence=0.2,
        model="skab-ae",
    )


def honest_verdict(req: dict[str, Any]) -> dict[str, Any]:
    """An endpoint's verdict on the validation request ``req``, bound to its window."""
    return {
        "seq": req["seq"],
        "anomalous": True,
        "score": 2.5,
        "threshold": 1.0,
        "verdict": "known_failure",
        "fault": "valve",
        "confidence": 0.9,
        "model": "skab-ae",
        "classifier": None,
        "precision": "float32",
        DIGEST_KEY: window_digest(req["window"]),
    }
