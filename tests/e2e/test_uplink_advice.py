"""The agent says when its records stay on the device, and what to do (agent/service/advice.py),
and the uplink says once that the device is not registered, then that it is (issue 14).

Real endpoints on loopback, a real store and real OSCORE; the advisor's repeats on a virtual
clock moved by hand."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.service import advice
from agent.service.advice import UplinkAdvisor, missing_credential
from agent.store.queue import NewRecord, Store
from agent.store.settings import StoreSettings
from agent.sync import uplink as uplink_mod
from agent.sync.security import ClientSecurity
from agent.sync.transport import CoapTransport, Endpoints
from agent.sync.uplink import Uplink, UplinkSettings
from agent.wire.records import Kind, TelemetryBody
from cloud.server import CloudServer
from drivers.clock import RealClock, VirtualClock

DEVICE = "pump-07"
T0 = 1_700_000_000.0

pytestmark = pytest.mark.timeout(60)


def telemetry(i: int) -> NewRecord:
    body = TelemetryBody("motor", T0 + i, {"current_a": 1.0 + i / 1000})
    return NewRecord(Kind.TELEMETRY, body.to_cbor(), created=T0 + i)


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uplink_mod, "IDLE_POLL", 0.2)
    monkeypatch.setattr(uplink_mod, "NOT_REGISTERED_PAUSE", 0.5)
    monkeypatch.setattr(advice, "FIRST_AFTER", 1.0)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    st = await Store.open(StoreSettings(path=tmp_path / "queue.db"))
    await st.put([telemetry(i) for i in range(5)])
    yield st
    await st.close()


class Running:
    def __init__(self, uplink: Uplink, transport: CoapTransport, security: object = None):
        self.uplink = uplink
        self.transport = transport
        self.security = security
        self.task = asyncio.create_task(uplink.run())

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.transport.close()
        if self.security is not None:
            self.security.close()


def start_uplink(store: Store, uri: str, security: ClientSecurity | None = None) -> Running:
    clock = RealClock()
    cfg = UplinkSettings(endpoints=(uri,), backoff_base=0.05, backoff_max=0.2)
    transport = CoapTransport(clock, lanes=cfg.max_inflight, uris=cfg.endpoints, security=security)
    endpoints = Endpoints(cfg.endpoints, clock)
    up = Uplink(cfg, store, transport, endpoints, clock, device_id=DEVICE, rng=random.Random(1))
    return Running(up, transport, security)


async def until(predicate, within: float = 20.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def lines(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    """The agent's lines of ``event`` (the endpoint in the same process logs its own)."""
    return [
        r
        for r in caplog.records
        if r.name.startswith("agent.") and f"event={event} " in r.getMessage() + " "
    ]


async def test_unregistered_device_says_the_pause_once_then_that_it_is_registered(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    run = start_uplink(store, srv.uri)
    try:
        await until(lambda: run.uplink.stats.by_code.get("4.04", 0) >= 3)  # three tries
        (said,) = lines(caplog, "device_not_registered")  # once, not at every try
        text = said.getMessage()
        assert said.levelno == logging.ERROR and "retry_in=0.5s" in text
        assert f"edge-agent-cloud devices add --data DIR {DEVICE} --credential-out FILE" in text
        await srv.add_device(DEVICE)
        await until(lambda: run.uplink.stats.records_acked == 5)
        (ok,) = lines(caplog, "device_registered")
        assert ok.levelno == logging.INFO and "sending what is queued" in ok.getMessage()
    finally:
        await run.stop()
        await srv.stop()


async def test_no_uplink_is_said_at_start_then_every_ten_minutes(
    caplog: pytest.LogCaptureFixture,
):
    clock = VirtualClock()
    advisor = UplinkAdvisor(
        clock,
        device_id=DEVICE,
        config_path=Path("agent.toml"),
        configured=False,
        queued=lambda: 42,
    )
    advisor.check()
    (first,) = lines(caplog, "no_uplink")
    assert first.levelno == logging.WARNING
    assert "queued=42" in first.getMessage() and "add one naming the endpoint" in first.getMessage()
    clock.advance(advice.REPEAT_EVERY - 1)
    advisor.check()
    assert len(lines(caplog, "no_uplink")) == 1  # rarely
    clock.advance(1)
    advisor.check()
    assert len(lines(caplog, "no_uplink")) == 2


def test_missing_credential_names_the_command_that_registers_the_device(tmp_path: Path):
    text = missing_credential(tmp_path / "pump-07.json", DEVICE)
    assert (
        f"edge-agent-cloud devices add --data DIR {DEVICE} --credential-out "
        f"{tmp_path / 'pump-07.json'}"
    ) in text
    assert "restart the agent" in text


async def test_an_endpoint_that_does_not_answer_is_said_with_what_to_check(
    store: Store, caplog: pytest.LogCaptureFixture
):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a port nobody serves
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = start_uplink(store, f"coap://127.0.0.1:{port}")
    clock = RealClock()
    advisor = UplinkAdvisor(
        clock,
        device_id=DEVICE,
        config_path=Path("agent.toml"),
        configured=True,
        uplink=run.uplink,
    )
    try:
        await until(lambda: (advisor.check(), lines(caplog, "uplink_unreachable"))[1])
    finally:
        await run.stop()
    (said,) = lines(caplog, "uplink_unreachable")
    assert f"UDP port {port}" in said.getMessage()
    assert "edge-agent-cloud serve --listen ADDR" in said.getMessage()


async def test_a_credential_the_endpoint_does_not_know_is_said_as_refused(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
):
    """The credential of another endpoint's registration (hostile or stale: a re-created
    cloud-data): OSCORE answers 4.01 without protection; the advisor says to re-key."""
    other = await CloudServer.start(tmp_path / "other", "127.0.0.1", 0)
    (await other.register(DEVICE)).write(tmp_path / "cred.json")
    await other.stop()
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0)
    await srv.add_device(DEVICE)
    security = ClientSecurity.open(
        "oscore", (srv.uri,), tmp_path / "cred.json", tmp_path / "oscore.json"
    )
    run = start_uplink(store, srv.uri, security)
    advisor = UplinkAdvisor(
        RealClock(),
        device_id=DEVICE,
        config_path=Path("agent.toml"),
        configured=True,
        uplink=run.uplink,
        credential=tmp_path / "cred.json",
    )
    try:
        await until(lambda: (advisor.check(), lines(caplog, "uplink_refused"))[1])
    finally:
        await run.stop()
        await srv.stop()
    (said,) = lines(caplog, "uplink_refused")
    assert "answer 4.01" in said.getMessage()
    assert f"devices rekey --data DIR {DEVICE} --credential-out {tmp_path / 'cred.json'}" in (
        said.getMessage()
    )
    assert (await store.stats()).depth == 5  # nothing lost meanwhile
