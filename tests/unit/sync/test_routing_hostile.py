"""Cloud validation (agent/sync/routing.py) against an endpoint that answers hostile verdicts:
a real aiocoap server on loopback, the real transport and the real routing.json.

Attacks: a verdict whose number is NaN or infinite, bytes or a long text where text belongs,
fields the protocol does not have. Such a verdict used to be merged as it was: json.dumps
(allow_nan=False) then failed on every save, the routing stage crash-looped, routing.json was
never rewritten and the validation was sent again after every restart.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource
import numpy as np
import pytest
from aiocoap import Code, Message

from agent.sync.routing import Router, RoutingSettings, checked_verdict
from agent.sync.transport import CoapTransport
from agent.wire import records
from agent.wire.validation import DIGEST_KEY
from drivers.clock import RealClock
from tests.unit.sync.helpers import an_alert, honest_verdict
from tools.ports import free_port

pytestmark = pytest.mark.timeout(60)

DEVICE = "pump-22"


class HostileValidate(aiocoap.resource.Resource):
    """``POST /validate/{device}``: a verdict bound to the window it got, with ``extra`` fields
    over the honest ones."""

    def __init__(self) -> None:
        super().__init__()
        self.extra: dict[str, Any] = {}
        self.requests = 0

    async def render_post(self, request: Message) -> Message:
        self.requests += 1
        req = records.loads(request.payload)
        verdict = {**honest_verdict(req), **self.extra}
        return Message(code=Code.CONTENT, payload=records.dumps(verdict), content_format=60)


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[str, HostileValidate]]:
    resource = HostileValidate()
    site = aiocoap.resource.Site()
    site.add_resource(["validate", DEVICE], resource)
    port = free_port()
    ctx = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", port), transports=["udp6"]
    )
    yield f"coap://127.0.0.1:{port}", resource
    await ctx.shutdown()


async def validate_once(state: Path, uri: str, seq: int, steps: int = 1) -> Router:
    """A router with its state in ``state``: alert ``seq`` is unsure; ``steps`` passes."""
    transport = CoapTransport(RealClock())
    router = Router(
        RoutingSettings(state_path=state, validation_deadline=5.0),
        device_id=DEVICE,
        store=None,
        transport=transport,
        endpoint=uri,
        rng=random.Random(1),
    )
    try:
        router.on_alert(an_alert(), seq, np.linspace(0.0, 1.0, 32))
        for _ in range(steps):
            await router.step()
    finally:
        await transport.close()
    return router


@pytest.mark.parametrize(
    ("attack", "extra"),
    [
        ("nan_score", {"score": math.nan}),
        ("infinite_confidence", {"confidence": math.inf}),
        ("bytes_verdict", {"verdict": b"\x00\x01"}),
        ("huge_integer_threshold", {"threshold": 10**400}),
        ("long_model_name", {"model": "m" * 10_000}),
        ("text_anomalous", {"anomalous": "yes"}),
    ],
)
async def test_hostile_verdict_is_refused_once_and_the_stage_goes_on(
    tmp_path: Path,
    endpoint: tuple[str, HostileValidate],
    caplog: pytest.LogCaptureFixture,
    attack: str,
    extra: dict[str, Any],
) -> None:
    uri, resource = endpoint
    resource.extra = extra
    caplog.set_level(logging.INFO, logger="agent.sync.routing")
    state = tmp_path / "routing.json"
    router = await validate_once(state, uri, 7, steps=2)
    assert resource.requests == 1
    assert router.pending == {} and router.verdicts == {}
    assert router.stats.counts["verdicts_refused"] == 1
    refused = [r for r in caplog.records if "event=verdict_refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.WARNING
    assert len(refused[0].getMessage()) < 300
    assert json.loads(state.read_text())["pending"] == []  # saved: not sent again on restart


async def test_verdict_keeps_only_the_protocols_fields(
    tmp_path: Path, endpoint: tuple[str, HostileValidate]
) -> None:
    uri, resource = endpoint
    resource.extra = {"unknown": math.nan, "blob": b"\x00" * 64, 7: "not a text key"}
    state = tmp_path / "routing.json"
    router = await validate_once(state, uri, 8)
    merged = router.verdicts[8]
    assert merged["verdict"] == "known_failure" and merged["confirmed"] is True
    assert not {"unknown", "blob", 7, "7"} & set(merged)
    saved = json.loads(state.read_text())
    assert [v["seq"] for v in saved["verdicts"]] == [8] and saved["pending"] == []


def test_checked_verdict_takes_an_honest_verdict_as_it_is() -> None:
    verdict = {
        "seq": 3,
        "anomalous": False,
        "score": 0.2,
        "threshold": 1,
        "verdict": "false_alarm",
        "fault": None,
        "confidence": 0.0,
        "model": "skab-ae",
        "classifier": "skab-clf",
        "precision": "float32",
        DIGEST_KEY: "ab" * 32,
    }
    assert checked_verdict(verdict) == verdict


async def test_state_json_cannot_hold_is_a_failed_save_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Defence in depth: whatever gets into the state unchecked fails the save (logged, retried
    later) instead of ending the routing stage."""
    router = Router(
        RoutingSettings(state_path=tmp_path / "routing.json"),
        device_id=DEVICE,
        store=None,
        transport=None,  # type: ignore[arg-type]
        endpoint="coap://127.0.0.1:9",
    )
    router.verdicts[1] = {"seq": 1, "score": math.nan}
    router._dirty = True
    assert await router.save() is False
    assert "event=routing_state_write_failed" in caplog.text
    router.verdicts[1] = {"seq": 1, "blob": b"\x00"}
    assert await router.save() is False
