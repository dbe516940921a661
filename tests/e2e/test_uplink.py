"""The uplink against the real endpoint on loopback, through the link impairment proxy.

Real store files, a real CoAP server, real UDP: loss, duplication, an outage, endpoint fallback
and return, priorities, and the endpoint's refusals."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from linkem import Impairment, LinkEmulator

from agent.store.queue import NewRecord, Store
from agent.store.settings import StoreSettings
from agent.sync import uplink as uplink_mod
from agent.sync.transport import CoapTransport, Endpoints
from agent.sync.uplink import Uplink, UplinkSettings
from agent.wire.records import AlertBody, Kind, TelemetryBody
from cloud.server import CloudServer, Limits
from drivers.clock import RealClock

DEVICE = "pump-07"
T0 = 1_700_000_000.0


def telemetry(i: int) -> NewRecord:
    body = TelemetryBody("motor", T0 + i, {"current_a": 1.0 + i / 1000, "supply_v": 230.0})
    return NewRecord(Kind.TELEMETRY, body.to_cbor(), created=T0 + i)


def alert(i: int) -> NewRecord:
    body = AlertBody(T0 + i, {"score": 0.9, "verdict": "NOVEL_ANOMALY", "raise": True})
    return NewRecord(Kind.ALERT, body.to_cbor(), created=T0 + i)


@pytest.fixture(autouse=True)
def fast_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uplink_mod, "IDLE_POLL", 0.2)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CloudServer]:
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await srv.add_device(DEVICE)
    yield srv
    await srv.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    st = await Store.open(StoreSettings(path=tmp_path / "queue.db", budget_bytes=64 << 20))
    yield st
    await st.close()


class Running:
    """An uplink task with its transport, stopped at the end of the test."""

    def __init__(self, uplink: Uplink, transport: CoapTransport) -> None:
        self.uplink = uplink
        self.transport = transport
        self.task = asyncio.create_task(uplink.run())

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.transport.close()


def start_uplink(store: Store, uris: list[str], **settings) -> Running:
    clock = RealClock()
    cfg = UplinkSettings(endpoints=tuple(uris), **settings)
    transport = CoapTransport(clock, lanes=cfg.max_inflight)
    endpoints = Endpoints(cfg.endpoints, clock, primary_retry=cfg.primary_retry)
    up = Uplink(cfg, store, transport, endpoints, clock, device_id=DEVICE, rng=random.Random(1))
    return Running(up, transport)


async def until(predicate, within: float = 60.0, step: float = 0.05) -> None:
    """Poll an async predicate (the state lives in another task or process)."""
    async with asyncio.timeout(within):
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(step)


async def drained(store: Store) -> bool:
    return (await store.stats()).depth == 0


async def test_drains_everything_exactly_once_through_loss_and_duplication(
    server: CloudServer, store: Store
):
    seqs = await store.put([telemetry(i) for i in range(1500)])
    imp = Impairment(delay=0.02, jitter=0.005, loss=0.10, dup=0.02, reorder=0.02)
    async with LinkEmulator(
        listen=("127.0.0.1", 0), target=("127.0.0.1", server.port), impairment=imp, seed=3
    ) as proxy:
        run = start_uplink(
            store, [f"coap://127.0.0.1:{proxy.port}"], batch_records=100, backoff_base=0.05
        )
        try:
            await until(lambda: drained(store), within=90)
        finally:
            await run.stop()
    stored = await server.seqs(DEVICE)
    assert stored == sorted(seqs)  # every record, once
    assert run.uplink.stats.records_acked >= len(seqs)
    assert proxy.counters("up").duplicated > 0


async def test_alerts_go_ahead_of_telemetry_queued_before_them(server: CloudServer, store: Store):
    await store.put([telemetry(i) for i in range(500)])
    alert_seqs = await store.put([alert(1000 + i) for i in range(5)])
    run = start_uplink(store, [server.uri], batch_records=50, max_inflight=1)
    try:
        await until(lambda: drained(store))
    finally:
        await run.stop()
    arrived = await server.records(DEVICE, by_arrival=True)
    first_kinds = [r.kind for r in arrived[:5]]
    assert first_kinds == ["alert"] * 5
    assert sorted(r.seq for r in arrived[:5]) == alert_seqs


async def test_outage_backs_off_without_busy_loop_then_delivers(server: CloudServer, store: Store):
    await store.put([telemetry(i) for i in range(200)])
    async with LinkEmulator(
        listen=("127.0.0.1", 0), target=("127.0.0.1", server.port), seed=4
    ) as proxy:
        proxy.outage(True)
        run = start_uplink(
            store,
            [f"coap://127.0.0.1:{proxy.port}"],
            deadline=1.0,
            backoff_base=0.2,
            backoff_max=2.0,
        )
        try:
            await asyncio.sleep(8.0)
            sent_during_outage = proxy.counters("up").packets_in
            assert (await store.stats()).depth == 200
            assert run.uplink.state == "offline"
            proxy.outage(False)
            await until(lambda: drained(store), within=30)
            assert run.uplink.state == "online"
        finally:
            await run.stop()
    # one probe at a time with CoAP's retransmissions: a handful of datagrams a second at most
    assert sent_during_outage < 8.0 * 6
    assert await server.seqs(DEVICE) == sorted(set(await server.seqs(DEVICE)))
    assert len(await server.seqs(DEVICE)) == 200


async def test_falls_back_to_an_endpoint_on_the_same_storage_and_returns_to_the_primary(
    tmp_path: Path, store: Store
):
    """A fallback is the same deployment behind another address: a second endpoint process on
    the primary's storage. Every record lands in that one storage, once."""
    primary = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    secondary = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await primary.add_device(DEVICE)
    assert primary.store_id == secondary.store_id
    async with LinkEmulator(
        listen=("127.0.0.1", 0), target=("127.0.0.1", primary.port), seed=5
    ) as proxy:
        proxy.outage(True)  # the primary is unreachable
        run = start_uplink(
            store,
            [f"coap://127.0.0.1:{proxy.port}", secondary.uri],
            deadline=1.0,
            backoff_base=0.05,
            backoff_max=0.2,
            fallback_after=2,
            primary_retry=2.0,
        )
        try:
            first = await store.put([telemetry(i) for i in range(50)])
            run.uplink.poke()
            await until(lambda: drained(store), within=30)
            assert run.uplink.endpoints.index == 1
            proxy.outage(False)  # the primary recovers
            await asyncio.sleep(2.5)
            more = await store.put([telemetry(100 + i) for i in range(50)])
            run.uplink.poke()
            await until(lambda: drained(store), within=30)
            await until(lambda: _true(run.uplink.endpoints.index == 0), within=10)
            later = await store.put([telemetry(200 + i) for i in range(20)])
            run.uplink.poke()
            await until(lambda: drained(store), within=30)
        finally:
            await run.stop()
    assert await primary.seqs(DEVICE) == sorted(first + more + later)  # one storage, once each
    assert not run.uplink.endpoints.refused
    await primary.stop()
    await secondary.stop()


async def test_hostile_config_fallback_on_another_storage_is_refused_and_nothing_splits(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
):
    """A "fallback" that is another deployment (its own storage): the device refuses it once
    it names its storage, keeps what it acknowledged queued, and delivers everything to its own
    storage when that is back. The other storage holds at most the one batch it was sent."""
    own = await CloudServer.start(tmp_path / "own", "127.0.0.1", 0, allow_plain=True)
    other = await CloudServer.start(tmp_path / "other", "127.0.0.1", 0, allow_plain=True)
    for srv in (own, other):
        await srv.add_device(DEVICE)
    assert own.store_id != other.store_id
    async with LinkEmulator(
        listen=("127.0.0.1", 0), target=("127.0.0.1", own.port), seed=6
    ) as proxy:
        run = start_uplink(
            store,
            [f"coap://127.0.0.1:{proxy.port}", other.uri],
            deadline=1.0,
            backoff_base=0.05,
            backoff_max=0.2,
            fallback_after=2,
            primary_retry=2.0,
            batch_records=10,
        )
        try:
            first = await store.put([telemetry(i) for i in range(20)])
            run.uplink.poke()
            await until(lambda: drained(store), within=30)  # the device's storage is known now
            proxy.outage(True)
            more = await store.put([telemetry(100 + i) for i in range(40)])
            run.uplink.poke()
            await until(lambda: _true(other.uri in run.uplink.endpoints.refused), within=30)
            assert (await store.stats()).depth == 40  # nothing the other storage took is gone
            proxy.outage(False)
            await until(lambda: drained(store), within=60)
        finally:
            await run.stop()
    assert await own.seqs(DEVICE) == sorted(first + more)
    assert len(await other.seqs(DEVICE)) <= 10  # at most the one batch that revealed it
    assert any("event=endpoint_refused" in r.getMessage() for r in caplog.records)
    await own.stop()
    await other.stop()


async def _true(value: bool) -> bool:
    return value


async def test_unregistered_device_pauses_and_too_large_batches_shrink(
    tmp_path: Path, store: Store
):
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    try:
        await store.put([telemetry(i) for i in range(20)])
        run = start_uplink(store, [srv.uri])
        await until(lambda: _true(run.uplink.stats.by_code.get("4.04", 0) >= 1), within=10)
        before = run.uplink.stats.batches_sent
        await asyncio.sleep(1.0)
        assert run.uplink.stats.batches_sent == before  # paused, not hammering
        assert (await store.stats()).depth == 20  # nothing lost
        await run.stop()

        await srv.add_device(DEVICE)
        run = start_uplink(store, [srv.uri])
        try:
            await until(lambda: drained(store), within=30)
        finally:
            await run.stop()
        assert len(await srv.seqs(DEVICE)) == 20
    finally:
        await srv.stop()


async def test_batches_shrink_when_the_endpoint_says_too_large(tmp_path: Path, store: Store):
    srv = await CloudServer.start(
        tmp_path / "cloud", "127.0.0.1", 0, limits=Limits(batch_records=16), allow_plain=True
    )
    try:
        await srv.add_device(DEVICE)
        seqs = await store.put([telemetry(i) for i in range(200)])
        run = start_uplink(store, [srv.uri], batch_records=100)
        try:
            await until(lambda: drained(store), within=30)
        finally:
            await run.stop()
        assert run.uplink.stats.by_code.get("4.13", 0) >= 1
        assert run.uplink.policy.batch_records <= 16
        assert await srv.seqs(DEVICE) == sorted(seqs)
    finally:
        await srv.stop()
