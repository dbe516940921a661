"""A gateway whose clock is not set (no RTC, NTP blocked on the plant network) learns the
cloud's time from its /relay acks and tells its devices in theirs; an endpoint (or gateway)
whose clock is not set says nothing. A real gateway in this process, its real store, a real
endpoint on loopback (OSCORE), a real device transport."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agent.gateway.service import Gateway
from agent.gateway.settings import load_gateway_config
from agent.service.notify import Health
from agent.service.supervise import Supervisor
from agent.sync.security import ClientSecurity
from agent.sync.transport import CoapTransport
from agent.sync.walltime import EMPTY_BATCH, RTT_MAX, EndpointClock, ask_time
from agent.wire.batch import CF_SENML_CBOR, IngestAck
from agent.wire.relay import decode_relay
from cloud.server import CloudServer
from drivers.clock import WALL_FLOOR, RealClock
from tests.e2e.test_gateway_loops import one_device_gateway
from tests.e2e.test_security import batch

pytestmark = pytest.mark.timeout(90)

GW, DEVICE = "gw-1", "pump-01"


class NotSet(RealClock):
    """A wall clock never set since a boot at 1970: 1970-01-01T00:00:30Z + uptime."""

    def time(self) -> float:
        return 30.0 + time.monotonic()


async def within(seconds: float, check, what: str) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(seconds):
        while not check():  # noqa: ASYNC110 - the gateway's state is polled
            await asyncio.sleep(0.05)


@asynccontextmanager
async def gateway_and_device(
    server: CloudServer, tmp_path: Path, *, forward_interval: float
) -> AsyncIterator[tuple[Gateway, CoapTransport, str]]:
    """A gateway of ``server`` whose clock was never set (DEVICE attached), running, and
    DEVICE's transport to it (OSCORE) and its URI; all stopped after, ``server`` too."""
    (await one_device_gateway(tmp_path, server, forward_interval, readings=0)).close()
    clock = NotSet()
    config = load_gateway_config(tmp_path / "gateway.toml")
    gw = Gateway(config, Supervisor(clock, Health(clock)))
    assert gw.clock.time() < WALL_FLOOR
    running = asyncio.create_task(gw.run())
    transport = security = None
    try:
        await within(30.0, lambda: gw.server is not None and gw.forwarder is not None, "up")
        assert gw.server is not None
        uri = gw.server.uri
        cred = tmp_path / "gateway" / "devices" / f"{DEVICE}.json"
        security = ClientSecurity.open("oscore", (uri,), cred, tmp_path / "dev-oscore.json")
        transport = CoapTransport(RealClock(), uris=(uri,), security=security)
        yield gw, transport, uri
    finally:
        gw.stop()
        await running
        if transport is not None:
            await transport.close()
        if security is not None:
            security.close()
        await server.stop()


async def test_an_endpoint_whose_clock_is_not_set_says_no_time(tmp_path: Path) -> None:
    server = await CloudServer.start(
        tmp_path / "cloud", "127.0.0.1", 0, allow_any_device=True, allow_plain=True,
        clock=NotSet(),
    )  # fmt: skip
    transport = CoapTransport(RealClock(), uris=(server.uri,))
    try:
        resp = await transport.request(
            "POST", f"{server.uri}/ingest/{DEVICE}", EMPTY_BATCH, content_format=CF_SENML_CBOR
        )
        assert resp.dotted == "2.04"
        assert IngestAck.from_cbor(resp.payload).now is None
    finally:
        await transport.close()
        await server.stop()


async def test_a_gateway_without_a_set_clock_learns_the_clouds_time_and_tells_its_devices(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.sync.walltime")
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0)
    async with gateway_and_device(server, tmp_path, forward_interval=1.0) as (gw, transport, uri):
        # nothing to forward: it asks (an entry of an empty batch) and the ack says the time
        await within(30.0, lambda: gw.clock.offset is not None, "the gateway learned the time")
        assert abs(gw.clock.time() - time.time()) < 2.0  # the cloud's, within its round trip
        device = EndpointClock(NotSet())
        for _ in range(3):  # the first exchange of a fresh OSCORE context may take two trips
            if await ask_time(device, transport, uri, DEVICE, 0):
                break
        assert device.offset is not None and device.time() >= WALL_FLOOR
        assert abs(device.time() - time.time()) < 3.0  # two hops, each within its round trip
        learned = [r for r in caplog.records if "event=wall_clock_from_endpoint" in r.message]
        assert len(learned) == 2  # once by the gateway, once by the device


class Switched(RealClock):
    """The cloud's clock: not set (no "now" in its acks) until ``on``."""

    on = False

    def time(self) -> float:
        return time.time() if self.on else 30.0 + time.monotonic()


async def test_a_busy_gateway_on_a_slow_link_learns_the_time(tmp_path: Path) -> None:
    """Every pass has records to forward, and each /relay with records takes longer than
    RTT_MAX (a slow uplink: many Block1 blocks), so none of its acks gives a sample. Before:
    the gateway asked only on a pass with nothing to forward, which never came, and it never
    learned the time. Now a pass that did not teach the time ends with an ask (one entry of an
    empty batch, a single datagram)."""
    clock = Switched()
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, clock=clock)
    relay = server._relay_post

    async def slow_with_records(request, route):  # type: ignore[no-untyped-def]
        if any(e.batch != EMPTY_BATCH for e in decode_relay(request.payload)):
            await asyncio.sleep(RTT_MAX + 0.5)
        return await relay(request, route)

    server._relay_post = slow_with_records  # type: ignore[method-assign]
    async with gateway_and_device(server, tmp_path, forward_interval=0.5) as (gw, transport, uri):

        async def send() -> None:  # a reading every 0.1 s: no pass without records
            for seq in range(1, 10_000):
                await transport.request(
                    "POST", f"{uri}/ingest/{DEVICE}", batch(DEVICE, range(seq, seq + 1)),
                    content_format=CF_SENML_CBOR,
                )  # fmt: skip
                await asyncio.sleep(0.1)

        sending = asyncio.create_task(send())
        try:
            forwarder = gw.forwarder
            assert forwarder is not None
            await within(30.0, lambda: forwarder.forwarded > 0, "a pass forwarded records")
            clock.on = True  # from now on the cloud says its time
            await within(15.0, lambda: gw.clock.offset is not None, "the gateway learned it")
            assert abs(gw.clock.time() - time.time()) < 2.0
        finally:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
