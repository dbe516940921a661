"""Integrity of the data path whatever the transport: the real endpoint on loopback, real store
files, real CoAP.

1. An ack with conflicts is an error, never an ack: records the endpoint holds *other* records
   under (a forged batch) are kept, renumbered above the endpoint's last seq, and stored once.
2. A reflashed device whose clock is behind moves above the endpoint's last seq.
3. Validation verdicts are bound to the window that was sent (SHA-256 of its encoding).
4. Reported-state versions far ahead of any legitimate clock are refused per key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiocoap
import aiocoap.resource
import cbor2
import numpy as np
import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code

from agent.detect.detector import Alert, AlertKind, Verdict
from agent.store.queue import NewRecord, Store
from agent.store.settings import StoreSettings
from agent.sync import routing as routing_mod
from agent.sync import uplink as uplink_mod
from agent.sync.routing import Router, RoutingSettings
from agent.sync.state import StateSync
from agent.sync.statedata import StateSettings
from agent.sync.transport import CoapTransport, Endpoints
from agent.sync.uplink import Uplink, UplinkSettings
from agent.wire import statedoc
from agent.wire.batch import CodecError, IngestAck, WireRecord
from agent.wire.codec import encode_batch
from agent.wire.records import AlertBody, EventBody, Kind, TelemetryBody
from agent.wire.validation import window_digest
from cloud.server import CloudServer
from drivers.clock import Clock, RealClock
from tools.ports import free_port

DEVICE = "pump-31"
T0 = 1_700_000_000.0

pytestmark = pytest.mark.timeout(90)


def telemetry(i: int) -> NewRecord:
    body = TelemetryBody("motor", T0 + i, {"current_a": 1.0 + i / 1000, "supply_v": 230.0})
    return NewRecord(Kind.TELEMETRY, body.to_cbor(), created=T0 + i)


def alert(i: int) -> NewRecord:
    body = AlertBody(T0 + i, {"score": 0.9, "verdict": "NOVEL_ANOMALY", "raise": True})
    return NewRecord(Kind.ALERT, body.to_cbor(), created=T0 + i)


def forged(seq: int) -> WireRecord:
    """What an attacker (or an earlier life of the device) stored under ``seq``."""
    body = TelemetryBody("motor", T0 - seq % 1000, {"current_a": 99.0}).to_cbor()
    return WireRecord(seq, "telemetry", T0 - seq % 1000, body)


class BehindClock(RealClock):
    """A wall clock a day behind (an RTC without battery, NTP not synced yet)."""

    def time(self) -> float:
        return super().time() - 86_400.0


@pytest.fixture(autouse=True)
def fast_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uplink_mod, "IDLE_POLL", 0.2)
    monkeypatch.setattr(routing_mod, "IDLE_POLL", 0.2)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CloudServer]:
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await srv.add_device(DEVICE)
    yield srv
    await srv.stop()


async def open_store(path: Path, clock: Clock | None = None) -> Store:
    return await Store.open(StoreSettings(path=path, budget_bytes=64 << 20), clock=clock)


class Running:
    """An uplink task with its transport, stopped at the end of the test."""

    def __init__(self, store: Store, uri: str, clock: Clock, **settings: object) -> None:
        cfg = UplinkSettings(endpoints=(uri,), **settings)  # type: ignore[arg-type]
        self.transport = CoapTransport(clock, lanes=cfg.max_inflight)
        endpoints = Endpoints(cfg.endpoints, clock, primary_retry=cfg.primary_retry)
        self.uplink = Uplink(
            cfg, store, self.transport, endpoints, clock, device_id=DEVICE, rng=random.Random(1)
        )
        self.task = asyncio.create_task(self.uplink.run())

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.transport.close()


async def drain(store: Store, run: Running, within: float = 60.0) -> None:
    run.uplink.poke()

    async def empty() -> bool:
        return (await store.stats()).depth == 0

    await until(empty, within)


async def until(predicate: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    """Poll ``predicate`` (the state lives in other tasks): a bound on waiting, not a timing
    assertion."""
    async with asyncio.timeout(within):
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def payloads(store: Store) -> dict[int, bytes]:
    """Every queued record's payload by seq (leases them; the store is not shared then)."""
    return {r.seq: r.payload for r in await store.batch(100_000, 1 << 30)}


async def forge(server: CloudServer, seqs: list[int]) -> dict[int, bytes]:
    recs = [forged(s) for s in seqs]
    now = server.clock.time()
    result = await server.db(lambda s: s.ingest(DEVICE, recs, now))
    assert result.new == len(seqs)
    return {r.seq: r.body for r in recs}


# -- 1. an ack with conflicts is an error, never an ack --------------------------------------------


async def test_forged_seqs_are_never_acked_and_the_real_records_arrive_once_under_new_seqs(
    server: CloudServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.sync.uplink")
    store = await open_store(tmp_path / "queue.db")
    try:
        new = [telemetry(i) for i in range(300)] + [alert(i) for i in range(5)]
        seqs = await store.put(new)
        real = {s: r.payload for s, r in zip(seqs, new, strict=True)}
        # an attacker's earlier batch: seqs the device is about to send, and just above them
        top = seqs[-1]
        attacked = seqs[:200] + seqs[-5:] + list(range(top + 1, top + 11))
        fake = await forge(server, attacked)
        last = max(attacked)

        run = Running(store, server.uri, RealClock(), batch_records=50, backoff_base=0.05)
        try:
            await drain(store, run)
            # numbered after the first ack: above everything the endpoint held
            later = await store.put([telemetry(1000 + i) for i in range(20)])
            assert min(later) > last
            real.update(zip(later, [telemetry(1000 + i).payload for i in range(20)], strict=True))
            await drain(store, run)
        finally:
            await run.stop()
        stats = run.uplink.stats
    finally:
        await store.close()

    stored = await server.records(DEVICE)
    by_seq = {r.seq: r.body for r in stored}
    # the forged records are untouched
    assert {s: by_seq[s] for s in fake} == fake
    # every real record is stored exactly once, with its real content
    mine = [r.body for r in stored if r.seq not in fake]
    assert sorted(mine) == sorted(real.values())
    assert len(mine) == len(set(mine)) == len(real)
    # the colliding ones went under new seqs above the endpoint's last; the others kept theirs
    moved = [s for s in seqs if s in fake]
    assert all(by_seq.get(s) == p for s, p in real.items() if s not in fake)
    assert sum(1 for r in stored if r.seq > last) == len(moved) + 20
    assert stats.records_conflicted == len(moved)
    assert stats.seq_epochs >= 1
    lines = [r for r in caplog.records if "event=ack_conflict " in r.getMessage()]
    assert lines and all(r.levelno == logging.WARNING for r in lines)
    assert "action=resend_renumbered" in lines[0].getMessage()


async def _records(store: Store) -> list:
    recs = sorted(await store.batch(100_000, 1 << 30), key=lambda r: r.seq)
    await store.nack([r.seq for r in recs])
    return recs


async def test_renumber_moves_records_to_a_new_epoch_that_survives_a_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "queue.db"
    store = await open_store(path)
    try:
        seqs = await store.put([telemetry(i) for i in range(10)])
        floor = seqs[-1] + 1_000_000
        moved = await store.renumber([seqs[2], seqs[5], seqs[-1] + 7], floor)
        assert moved == {seqs[2]: floor + 1, seqs[5]: floor + 2}  # an unknown seq is skipped
        assert store.last_seq == floor + 2
        after = await store.put([telemetry(50)])
        assert after == [floor + 3]
        held = await _records(store)
        assert [r.seq for r in held] == [s for s in seqs if s not in moved] + [
            floor + 1,
            floor + 2,
            floor + 3,
        ]
        assert held[-3].payload == telemetry(2).payload and held[-3].attempts == 1
    finally:
        await store.close()
    # the database is lost: the side file still knows the new epoch
    path.unlink()
    store = await open_store(path)
    try:
        assert (await store.put([telemetry(60)]))[0] > floor + 3
    finally:
        await store.close()


# -- 2. a reflashed device starts above the endpoint's last seq -----------------------------------


async def test_a_reflashed_device_with_its_clock_behind_moves_above_the_endpoints_last_seq(
    server: CloudServer, tmp_path: Path
) -> None:
    clock = BehindClock()
    store = await open_store(tmp_path / "fresh" / "queue.db", clock)
    try:
        start = store.last_seq  # a time epoch from a clock a day behind
        # the endpoint holds the device's history from an earlier life: some seqs this store is
        # about to issue again, and seqs up to N from a clock that was right
        n = int(RealClock().time() * 1_000_000) + 50
        old = await forge(server, list(range(start + 1, start + 21)) + list(range(n - 49, n + 1)))
        first = await store.put([telemetry(i) for i in range(30)])
        assert first[-1] < n
        run = Running(store, server.uri, clock, batch_records=10, max_inflight=1)
        try:
            await drain(store, run)
            assert store.last_seq >= n  # moved above the endpoint's last before numbering more
            second = await store.put([alert(i) for i in range(30)])
            assert min(second) > n
            await drain(store, run)
        finally:
            await run.stop()
        assert run.uplink.stats.seq_epochs >= 1
    finally:
        await store.close()

    stored = await server.records(DEVICE)
    by_seq = {r.seq: r.body for r in stored}
    assert {s: by_seq[s] for s in old} == old
    mine = sorted(r.body for r in stored if r.seq not in old)
    want = sorted([telemetry(i).payload for i in range(30)] + [alert(i).payload for i in range(30)])
    assert mine == want  # all 60, each once, none lost


# -- 3. validation verdicts are bound to the window that was sent ---------------------------------


def an_alert(confidence: float = 0.3) -> Alert:
    return Alert(
        time=T0,
        kind=AlertKind.RAISE,
        score=1.5,
        threshold=1.0,
        channels=(("Volume Flow RateRMS", 1.5),),
        verdict=Verdict.NOVEL_ANOMALY,
        confidence=confidence,
        model="skab-ae",
    )


def model_window(seed: int, fault: bool) -> list[float]:
    """A model input (4 steps x 8 channels): noise, or the flow channel far below its reference."""
    w = np.random.default_rng(seed).normal(0.0, 0.3, (4, 8))
    if fault:
        w[1:, 7] = -5.0
    return [float(v) for v in w.reshape(-1).astype(np.float32)]


def router(
    tmp_path: Path, uri: str, transport: CoapTransport, store: Store | None = None
) -> Router:
    cfg = RoutingSettings(
        validation_deadline=2.0,
        backoff_base=0.05,
        backoff_max=0.2,
        state_path=tmp_path / "agent" / "routing.json",
    )
    return Router(
        cfg,
        device_id=DEVICE,
        store=store,
        transport=transport,
        endpoint=uri,
        clock=RealClock(),
        rng=random.Random(1),
    )


async def test_a_verdict_on_another_window_for_the_same_seq_never_reaches_the_device(
    server: CloudServer, tmp_path: Path
) -> None:
    transport = CoapTransport(RealClock(), lanes=2)
    try:
        # someone posts a benign window for the seq the device's next alert will have
        benign = model_window(3, fault=False)
        body = cbor2.dumps({"seq": 7, "alert": an_alert().to_dict(), "window": benign})
        resp = await transport.request(
            "POST", f"{server.uri}/validate/{DEVICE}", body, content_format=60, deadline=20.0
        )
        planted = cbor2.loads(resp.payload)
        assert planted["verdict"] == "false_alarm" and planted["digest"] == window_digest(benign)

        # the device's real alert for seq 7, with its own (faulty) raising window
        real = model_window(2, fault=True)
        rt = router(tmp_path, server.uri, transport)
        rt.on_alert(an_alert(), 7, np.asarray(real))
        async with asyncio.timeout(30):
            while 7 not in rt.verdicts:
                await rt.step()
                await asyncio.sleep(0.02)
    finally:
        await transport.close()
    got = rt.verdicts[7]
    assert got["digest"] == window_digest(real)
    assert got["anomalous"] is True and got["confirmed"] is True
    assert got["verdict"] in ("known_failure", "novel_anomaly")
    # both windows were judged, each once; the planted verdict is still the benign window's
    assert server.inference.validation_runs == {(DEVICE, 7): 2}
    assert await server.inference.verdict(DEVICE, 7, window_digest(benign)) == planted
    assert rt.stats.counts["verdicts_unbound"] == 0


async def test_the_verdict_on_a_renumbered_alert_names_the_alert_as_the_endpoint_holds_it(
    server: CloudServer, tmp_path: Path
) -> None:
    """The endpoint holds another record under the alert's seq (forged, or an earlier life of
    the device): the alert is renumbered and stored under its new seq. Its validation and its
    verdict event used to keep the old seq, so the endpoint kept the verdict under the forged
    record's seq, and the history's verdict event named that record."""
    window = model_window(2, fault=True)
    store = await open_store(tmp_path / "queue.db")
    transport = CoapTransport(RealClock(), lanes=1)
    run = Running(store, server.uri, RealClock(), backoff_base=0.05)
    try:
        body = AlertBody(T0, {**an_alert().to_dict(), "window": window})
        [seq] = await store.put([NewRecord(Kind.ALERT, body.to_cbor(), created=T0)])
        await forge(server, [seq])
        rt = router(tmp_path, server.uri, transport, store)
        rt.on_alert(an_alert(), seq, np.asarray(window))
        await drain(store, run)  # the alert: a conflict, then stored under a new seq
        async with asyncio.timeout(30):
            while not rt.verdicts:
                await rt.step()
                await asyncio.sleep(0.02)
        await drain(store, run)  # the verdict event
    finally:
        await run.stop()
        await transport.close()
        await store.close()
    stored = {r.seq: r for r in await server.records(DEVICE)}
    [new] = [s for s, r in stored.items() if r.kind == "alert"]
    assert new > seq
    events = [EventBody.from_cbor(r.body).data for r in stored.values() if r.kind == "event"]
    assert [e["seq"] for e in events if e["type"] == "verdict"] == [new]
    assert await server.inference.verdict(DEVICE, seq) is None
    assert (await server.inference.verdict(DEVICE, new, window_digest(window)))["seq"] == new
    assert sorted(rt.verdicts) == [new]


class _UnboundVerdicts(aiocoap.resource.Resource):
    """A peer that answers every validation with a verdict on some other window."""

    async def render_post(self, request: Message) -> Message:
        seq = cbor2.loads(request.payload)["seq"]
        verdict = {"seq": seq, "anomalous": False, "verdict": "false_alarm", "digest": "00" * 32}
        return Message(code=Code.CONTENT, payload=cbor2.dumps(verdict), content_format=60)


async def test_the_device_refuses_a_verdict_that_names_another_window(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.sync.routing")
    site = aiocoap.resource.Site()
    site.add_resource(["validate", DEVICE], _UnboundVerdicts())
    port = free_port()
    ctx = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", port), transports=["udp6"]
    )
    transport = CoapTransport(RealClock())
    try:
        rt = router(tmp_path, f"coap://127.0.0.1:{port}", transport)
        rt.on_alert(an_alert(), 9, np.asarray(model_window(2, fault=True)))
        await rt.step()
    finally:
        await transport.close()
        await ctx.shutdown()
    assert rt.verdicts == {} and sorted(rt.pending) == [9]  # no verdict: asked again later
    assert rt.stats.counts["verdicts_unbound"] == 1
    assert "event=verdict_digest_mismatch seq=9" in caplog.text


# -- 4. reported-state versions far ahead are refused ---------------------------------------------


class Hooks:
    def __init__(self) -> None:
        self.values: dict[str, object] = {"agent/version": "1.0.0", "sensor/motor/health": "ok"}

    def reported(self) -> dict[str, object]:
        return dict(self.values)

    def apply(self, key: str, value: object) -> None:
        raise ValueError("no desired keys in this test")


async def test_a_reported_version_far_ahead_is_refused_and_the_device_keeps_reporting(
    server: CloudServer, tmp_path: Path
) -> None:
    uri = f"{server.uri}/state/{DEVICE}/reported"
    now_ms = int(RealClock().time() * 1000)
    attack = {
        "sensor/motor/health": [statedoc.MAX_VERSION, "down"],  # would freeze the key
        "link/state": [now_ms + statedoc.MAX_VERSION_AHEAD + 10**7, "x"],  # beyond the bound
        "queue/depth": [now_ms + statedoc.MAX_VERSION_AHEAD - 10**7, 3],  # within: accepted
        "agent/version": [5, "0.0.1"],
    }
    async with contextlib.AsyncExitStack() as stack:
        client = await aiocoap.Context.create_client_context()
        stack.push_async_callback(client.shutdown)
        msg = Message(code=Code.PUT, uri=uri, payload=cbor2.dumps(attack), content_format=60)
        async with asyncio.timeout(10):
            resp = await client.request(msg).response
    assert resp.code == Code.CHANGED
    assert cbor2.loads(resp.payload) == {
        "agent/version": 5,
        "queue/depth": attack["queue/depth"][0],
    }  # the refused keys are left out of the answer
    stored = await server.reported(DEVICE)
    assert set(stored) == {"agent/version", "queue/depth"}

    # the device reports as usual: nothing of it is frozen
    hooks = Hooks()
    clock = RealClock()
    transport = CoapTransport(clock)
    sync = StateSync(
        StateSettings(report_interval=0.5, min_put_interval=0.02, deadline=2.0),
        transport,
        Endpoints((server.uri,), clock),
        clock,
        device_id=DEVICE,
        state_path=tmp_path / "state.cbor",
        hooks=hooks,
    )

    async def health_is(value: str) -> bool:
        entry = (await server.reported(DEVICE)).get("sensor/motor/health")
        return entry is not None and entry.value == value

    task = asyncio.create_task(sync.run())
    try:
        await until(lambda: health_is("ok"))
        first = (await server.reported(DEVICE))["sensor/motor/health"]
        assert first.version < statedoc.MAX_VERSION
        hooks.values["sensor/motor/health"] = "degraded"
        sync.changed()
        await until(lambda: health_is("degraded"))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await transport.close()
    assert (await server.reported(DEVICE))["agent/version"].value == "1.0.0"


# -- the wire forms ------------------------------------------------------------------------------


def test_an_ack_never_acknowledges_a_conflicting_seq() -> None:
    ack = IngestAck.for_seqs([4, 5, 6, 7], new=2, duplicate=2, conflicts=[5, 6], last=12)
    assert ack.ranges == ((4, 4), (7, 7)) and ack.conflicts == ((5, 6),) and ack.conflict == 2
    again = IngestAck.from_cbor(ack.to_cbor())
    assert again == ack and again.last == 12
    # an endpoint that lists a seq both ways: it is a conflict
    both = IngestAck(((1, 3),), new=0, duplicate=3, conflict=1, conflicts=((2, 2),))
    assert [s for s in (1, 2, 3) if s in both] == [1, 3] and both.in_conflict(2)
    with pytest.raises(CodecError):
        IngestAck.from_cbor(cbor2.dumps({"ack": [], "last": -1}))
    with pytest.raises(CodecError):
        IngestAck.from_cbor(cbor2.dumps({"ack": [], "conflicts": [[3, 1]]}))


def test_the_version_limit() -> None:
    now = 1_700_000_000.0
    ms = int(now * 1000)
    assert statedoc.version_limit(now, None) == ms + statedoc.MAX_VERSION_AHEAD
    far = statedoc.Entry(ms + 2 * statedoc.MAX_VERSION_AHEAD, "x")  # stored before the limit
    assert statedoc.version_limit(now, far) == far.version + 1
    assert statedoc.version_limit(1e20, None) == statedoc.MAX_VERSION


async def test_the_endpoint_names_conflicts_and_its_last_seq_in_the_ack(
    server: CloudServer,
) -> None:
    await forge(server, [5, 6, 40])
    mine = [
        WireRecord(s, "alert", T0 + s, AlertBody(T0 + s, {"n": s}).to_cbor()) for s in (4, 5, 6, 7)
    ]
    mine[2] = forged(6)  # an identical copy of what it holds: a plain duplicate
    transport = CoapTransport(RealClock())
    try:
        resp = await transport.request(
            "POST",
            f"{server.uri}/ingest/{DEVICE}",
            encode_batch(None, mine),
            content_format=112,
            deadline=10.0,
        )
    finally:
        await transport.close()
    ack = IngestAck.from_cbor(resp.payload)
    assert ack.ranges == ((4, 4), (6, 7)) and ack.conflicts == ((5, 5),)
    assert (ack.new, ack.duplicate, ack.conflict, ack.last) == (2, 2, 1, 40)
    assert {r.seq: r.body for r in await server.records(DEVICE)}[5] == forged(5).body
