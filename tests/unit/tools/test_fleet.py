"""tools/fleet.py's parts on their own: the hand-made CoAP message layer against a fake UDP peer
on loopback (a dropped first transmission, duplicated answers, separate responses, a dead peer,
abandoned exchanges) and its timer heap, one worker's device loops against a fake peer that acks
(or holds them off with 5.03, or never answers), a simulated device's store and forward, bulk
provisioning and the verification against a real SQLite storage. The fleet against a real
endpoint: tests/e2e/test_fleet.py."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import fleet
import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from fleetlib.coap import MAX_RETRANSMIT, CoapEndpoint, LinkStats, Outcome, Timers
from fleetlib.device import (
    DEFAULT_CONTENT_FORMAT,
    MAX_PAYLOAD,
    Device,
    InnerRequest,
    resolution,
)
from fleetlib.report import FleetReport
from fleetlib.worker import DeviceResult, Worker, WorkerResult, WorkerSpec
from hypothesis import given
from hypothesis import strategies as st

from agent.wire import codec
from agent.wire.batch import IngestAck, WireRecord
from agent.wire.predict import quantize
from agent.wire.records import TelemetryBody
from cloud.storage import SQLiteStorage

ACK_TIMEOUT = 0.05  # seconds: short, so that retransmissions come quickly


class Peer(asyncio.DatagramProtocol):
    """A fake CoAP server: records every datagram and hands it to ``behave(peer, msg, addr)``."""

    def __init__(self, behave: Callable[[Peer, Message, Any], None]) -> None:
        self.behave = behave
        self.received: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append(data)
        self.behave(self, Message.decode(data, addr), addr)

    def send(self, msg: Message, addr: Any) -> None:
        assert self.transport is not None
        self.transport.sendto(msg.encode(), addr)

    def messages(self) -> list[Message]:
        return [Message.decode(d) for d in self.received]


def answer(
    mtype: Type, mid: int, code: Code = Code.EMPTY, token: bytes = b"", payload: bytes = b""
) -> Message:
    msg = Message(code=code, payload=payload)
    msg.mtype, msg.mid, msg.token = mtype, mid, token
    return msg


def request() -> Message:
    return Message(code=Code.POST, uri_path=("ingest", "fleet-00001"), payload=b"batch")


@pytest.fixture
async def link() -> AsyncIterator[Callable[..., Any]]:
    """``await link(behave)`` -> (peer, endpoint) on loopback; closed afterwards."""
    opened: list[Any] = []

    async def make(behave: Callable[[Peer, Message, Any], None]) -> tuple[Peer, CoapEndpoint]:
        loop = asyncio.get_running_loop()
        transport, peer = await loop.create_datagram_endpoint(
            lambda: Peer(behave), local_addr=("127.0.0.1", 0)
        )
        port = transport.get_extra_info("sockname")[1]
        ep = await CoapEndpoint.open(
            ("127.0.0.1", port), random.Random(1), ack_timeout=ACK_TIMEOUT, stats=LinkStats()
        )
        opened.extend([transport, ep])
        return peer, ep

    yield make
    for item in opened:
        item.close()


@pytest.mark.timeout(10)
async def test_first_transmission_dropped_retransmits_same_bytes_and_ignores_duplicate_ack(
    link: Callable[..., Any],
) -> None:
    """The peer drops the first datagram and answers the retransmission twice (as a server does
    for a duplicate it already answered): one outcome, two identical transmissions."""

    def behave(peer: Peer, msg: Message, addr: Any) -> None:
        if len(peer.received) == 1:
            return  # lost
        reply = answer(Type.ACK, msg.mid, Code.CHANGED, msg.token, b"ok")
        peer.send(reply, addr)
        peer.send(reply, addr)

    peer, ep = await link(behave)
    outcome = await ep.request(request())
    assert outcome.error == ""
    assert outcome.response.code == Code.CHANGED and outcome.response.payload == b"ok"
    assert outcome.transmissions == 2 and not outcome.separate
    assert outcome.latency >= ACK_TIMEOUT  # the first send counts, not the retransmission
    await asyncio.sleep(4 * ACK_TIMEOUT)
    assert len(peer.received) == 2 and peer.received[0] == peer.received[1]
    assert ep.stats.retransmissions == 1
    assert ep.stats.stray == 1  # the duplicate ACK matched nothing any more
    assert ep.in_flight == 0


@pytest.mark.timeout(10)
async def test_separate_response_is_acknowledged_each_copy_and_delivered_once(
    link: Callable[..., Any],
) -> None:
    """Empty ACK, then a CON response, then the same CON again (our ACK was lost): no
    retransmission of the request after the empty ACK, both copies ACKed, one outcome."""
    server_mid = 4242

    def behave(peer: Peer, msg: Message, addr: Any) -> None:
        if msg.mtype is not Type.CON:
            return  # our ACKs of the separate response

        async def later() -> None:
            peer.send(answer(Type.ACK, msg.mid), addr)
            await asyncio.sleep(3 * ACK_TIMEOUT)  # longer than the request's timeout
            response = answer(Type.CON, server_mid, Code.CHANGED, msg.token, b"done")
            peer.send(response, addr)
            await asyncio.sleep(ACK_TIMEOUT)
            peer.send(response, addr)

        asyncio.get_running_loop().create_task(later())

    peer, ep = await link(behave)
    outcome = await ep.request(request())
    assert outcome.response is not None and outcome.response.payload == b"done"
    assert outcome.separate and outcome.transmissions == 1
    await asyncio.sleep(4 * ACK_TIMEOUT)
    kinds = [(m.mtype, m.code, m.mid) for m in peer.messages()]
    assert kinds[0][0] is Type.CON and len([k for k in kinds if k[0] is Type.CON]) == 1
    assert [k for k in kinds if k[0] is Type.ACK] == [(Type.ACK, Code.EMPTY, server_mid)] * 2
    assert ep.stats.empty_acks == 1 and ep.stats.separate_responses == 1
    assert ep.stats.duplicate_responses == 1 and ep.stats.retransmissions == 0


@pytest.mark.timeout(10)
async def test_dead_peer_times_out_after_max_retransmit(link: Callable[..., Any]) -> None:
    peer, ep = await link(lambda *_: None)
    outcome = await ep.request(request())
    assert outcome.response is None and outcome.error == "timeout"
    assert outcome.transmissions == 1 + MAX_RETRANSMIT
    assert len(set(peer.received)) == 1 and len(peer.received) == 1 + MAX_RETRANSMIT
    assert ep.stats.timeouts == 1 and ep.in_flight == 0


@pytest.mark.timeout(10)
async def test_reset_ends_the_exchange_and_unknown_response_gets_reset(
    link: Callable[..., Any],
) -> None:
    def behave(peer: Peer, msg: Message, addr: Any) -> None:
        if msg.mtype is Type.CON:
            peer.send(answer(Type.CON, 7, Code.CONTENT, b"nope"), addr)  # a token nobody sent
            peer.send(answer(Type.RST, msg.mid), addr)

    peer, ep = await link(behave)
    outcome = await ep.request(request())
    assert outcome.error == "reset" and outcome.response is None
    await asyncio.sleep(2 * ACK_TIMEOUT)
    assert (Type.RST, 7) in [(m.mtype, m.mid) for m in peer.messages()]
    assert ep.stats.resets_received == 1 and ep.stats.resets_sent == 1


@pytest.mark.timeout(10)
async def test_message_ids_and_tokens_differ_between_requests(link: Callable[..., Any]) -> None:
    def behave(peer: Peer, msg: Message, addr: Any) -> None:
        peer.send(answer(Type.ACK, msg.mid, Code.CHANGED, msg.token), addr)

    peer, ep = await link(behave)
    outcomes = await asyncio.gather(*(ep.request(request()) for _ in range(50)))
    assert all(o.response is not None for o in outcomes)
    sent = peer.messages()
    assert len({m.mid for m in sent}) == 50 and len({m.token for m in sent}) == 50


@pytest.mark.timeout(10)
async def test_send_calls_back_once_and_abandon_stops_the_retransmissions(
    link: Callable[..., Any],
) -> None:
    """The callback form: one call with the outcome, none for a late copy of the answer; an
    abandoned exchange sends nothing more and never calls back."""
    retransmitted = asyncio.Event()

    def behave(peer: Peer, msg: Message, addr: Any) -> None:
        if msg.opt.uri_path[-1] == "answered":
            reply = answer(Type.ACK, msg.mid, Code.CHANGED, msg.token, b"ok")
            peer.send(reply, addr)
            peer.send(reply, addr)
        elif len(peer.received) == 3:  # the abandoned one's first transmission and a repeat
            retransmitted.set()

    peer, ep = await link(behave)
    got: list[tuple[str, Outcome]] = []
    done = asyncio.Event()

    def callback(arg: str, outcome: Outcome) -> None:
        got.append((arg, outcome))
        done.set()

    req = Message(code=Code.POST, uri_path=("ingest", "answered"), payload=b"batch")
    ep.send(req, callback, "first")
    await asyncio.wait_for(done.wait(), 5)
    await asyncio.sleep(2 * ACK_TIMEOUT)
    assert [(arg, o.error, o.response.code, o.transmissions) for arg, o in got] == [
        ("first", "", Code.CHANGED, 1)
    ]
    assert ep.stats.stray == 1 and ep.in_flight == 0

    dead = ep.send(request(), callback, "abandoned")
    await asyncio.wait_for(retransmitted.wait(), 5)
    ep.abandon(dead)
    assert ep.in_flight == 0
    await asyncio.sleep(8 * ACK_TIMEOUT)
    assert len(peer.received) == 3 and len(got) == 1


@pytest.mark.timeout(10)
async def test_cancelled_request_sends_nothing_more(link: Callable[..., Any]) -> None:
    peer, ep = await link(lambda *_: None)
    future = ep.request(request())
    await asyncio.sleep(0)
    future.cancel()
    await asyncio.sleep(6 * ACK_TIMEOUT)
    assert len(peer.received) == 1 and ep.in_flight == 0 and ep.stats.retransmissions == 0


@pytest.mark.timeout(10)
async def test_timers_run_in_order_and_a_later_entry_does_not_delay_an_earlier_one() -> None:
    """Entries run in time order, not before their time; a cancelled one never runs; an entry
    added (far ahead) while others run leaves the next one on time."""
    loop = asyncio.get_running_loop()
    timers = Timers(loop)
    ran: list[tuple[str, float, float]] = []
    t0 = loop.time()

    def note(name: str) -> None:
        ran.append((name, loop.time() - t0, when[name]))
        if name == "first":
            timers.call_at(t0 + 30.0, note, "far")

    when = {"zeroth": 0.01, "first": 0.02, "cancelled": 0.04, "second": 0.06, "far": 30.0}
    timers.call_at(t0 + when["first"], note, "first")
    timers.call_at(t0 + when["second"], note, "second")
    Timers.cancel(timers.call_at(t0 + when["cancelled"], note, "cancelled"))
    timers.call_at(t0 + when["zeroth"], note, "zeroth")  # earlier than the armed one
    await asyncio.sleep(0.5)
    assert [name for name, _, _ in ran] == ["zeroth", "first", "second"]
    assert all(at >= due - 1e-6 for _, at, due in ran)
    assert ran[-1][1] < 0.4  # not waiting for "far"


# -- one worker against a fake peer ------------------------------------------------------------


class NoBarrier:
    def wait(self, timeout: float | None = None) -> int:
        return 0


def acknowledge(peer: Peer, msg: Message, addr: Any) -> None:
    """The endpoint's usual answer: 2.04 with every record of the batch acknowledged."""
    if msg.mtype is not Type.CON:
        return
    _, records = codec.decode_batch(bytes(msg.payload), msg.opt.content_format)
    ack = IngestAck.for_seqs([r.seq for r in records], len(records), 0)
    peer.send(answer(Type.ACK, msg.mid, Code.CHANGED, msg.token, ack.to_cbor()), addr)


def batches(peer: Peer) -> dict[str, list[list[int]]]:
    """Per device, the seqs of each request it sent (retransmissions not)."""
    out: dict[str, list[list[int]]] = {}
    seen = set()
    for msg in peer.messages():
        if msg.mtype is Type.CON and msg.mid not in seen:
            seen.add(msg.mid)
            _, records = codec.decode_batch(bytes(msg.payload), msg.opt.content_format)
            out.setdefault(msg.opt.uri_path[-1], []).append([r.seq for r in records])
    return out


async def run_worker(
    behave: Callable[[Peer, Message, Any], None], devices: int = 3, **spec: Any
) -> tuple[Peer, WorkerResult]:
    """One worker's devices (plain CoAP, 5 readings every 0.2 s) against a fake peer."""
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(
        lambda: Peer(behave), local_addr=("127.0.0.1", 0)
    )
    settings = WorkerSpec(
        index=0,
        target=("127.0.0.1", transport.get_extra_info("sockname")[1]),
        devices=tuple((i, f"fleet-{i + 1:05d}", None) for i in range(devices)),
        fleet_size=devices,
        interval=0.2,
        batch=5,
        duration=1.0,
        warmup=0.2,
        drain=2.0,
        content_format=DEFAULT_CONTENT_FORMAT,
        max_records=100,
        devices_per_socket=2,
        ack_timeout=ACK_TIMEOUT,
        seed=1,
    )
    try:
        result = await Worker(dataclasses.replace(settings, **spec)).run(NoBarrier())
    finally:
        transport.close()
    return peer, result


@pytest.mark.timeout(20)
async def test_worker_devices_post_each_tick_and_everything_is_acknowledged() -> None:
    peer, result = await run_worker(acknowledge)
    assert result.errors == {} and result.abandoned == 0 and result.sockets == 2
    assert result.requests_sent == result.requests_acked == len(peer.received)
    assert result.records_acked == 3 * 5 * 5  # five ticks in the second, five readings each
    for d in result.devices:
        assert d.generated == d.sent == 25 and d.acked == ((1, 25),)
    for seqs in batches(peer).values():
        assert seqs[0] == [1, 2, 3, 4, 5] and sorted(itertools.chain(*seqs)) == list(range(1, 26))
    assert len(result.tick_lag_ms) > 0 and len(result.latencies_ms) > 0
    assert sum(result.sent_per_s) == result.requests_sent
    assert sum(result.acked_per_s) == result.requests_acked
    assert result.link.retransmissions == 0 and result.link.timeouts == 0


@pytest.mark.timeout(20)
async def test_worker_device_holds_its_posts_for_max_age_after_503_and_makes_up_later() -> None:
    """The first request of each device gets 5.03 with Max-Age 1: no post for a second while
    readings go on; then one request with everything since, acknowledged."""
    refused: set[str] = set()

    def behave(peer: Peer, msg: Message, addr: Any) -> None:
        name = msg.opt.uri_path[-1]
        if msg.mtype is Type.CON and name not in refused:
            refused.add(name)
            reply = answer(Type.ACK, msg.mid, Code.SERVICE_UNAVAILABLE, msg.token)
            reply.opt.max_age = 1
            peer.send(reply, addr)
            return
        acknowledge(peer, msg, addr)

    peer, result = await run_worker(behave, devices=2, duration=1.8)
    assert result.errors == {"5.03": 2} and result.abandoned == 0
    for d in result.devices:
        assert d.generated == 45 and d.acked == ((1, 45),)
    for seqs in batches(peer).values():
        assert seqs[0] == [1, 2, 3, 4, 5]  # refused
        assert seqs[1][0] == 1 and len(seqs[1]) >= 25  # a second later, all of it


@pytest.mark.timeout(20)
async def test_worker_abandons_requests_still_out_when_the_drain_ends() -> None:
    peer, result = await run_worker(lambda *_: None, devices=2, duration=0.3, drain=0.2)
    assert result.abandoned == 2 and result.requests_acked == 0
    assert result.link.retransmissions > 0 and result.errors == {}
    sent = len(peer.received)
    await asyncio.sleep(0.5)  # nothing more goes out
    assert len(peer.received) == sent


# -- the simulated device --------------------------------------------------------------------------


def device(**kw: Any) -> Device:
    return Device("fleet-00001", batch=10, rng=random.Random(5), **kw)


def test_device_readings_decode_to_what_was_made() -> None:
    """The batch is the real compact encoding: it decodes to the records, values on their
    resolution grid come back exactly."""
    d = device()
    d.produce(1_700_000_010.0, 10.0)
    inner, seqs = d.next_request()  # type: ignore[misc]
    assert seqs == list(range(1, 11))
    assert inner.opt.content_format == DEFAULT_CONTENT_FORMAT
    assert inner.opt.uri_path == ("ingest", "fleet-00001")
    _, records = codec.decode_batch(bytes(inner.payload), DEFAULT_CONTENT_FORMAT)
    assert [r.seq for r in records] == seqs
    for got, made in zip(records, d.pending, strict=True):
        a, b = TelemetryBody.from_cbor(got.body), TelemetryBody.from_cbor(made.body)
        assert a.sensor == b.sensor and a.values == b.values
        for ch, value in b.values.items():  # on the channel's grid, as a sampler reports
            assert value == quantize(value, resolution(b.sensor, ch))  # type: ignore[arg-type]


def test_device_bodies_are_the_agents_telemetry_bodies() -> None:
    d = device()
    d.produce(1_700_000_010.0, 10.0)
    for record in d.pending:
        body = TelemetryBody.from_cbor(record.body)
        assert body.to_cbor() == record.body and body.time == record.created


def test_inner_request_copy_is_message_copy_without_sharing_changes() -> None:
    """OSCORE protects a copy of the inner request: the cheap copy has the same bytes as
    aiocoap's, and setting an option on it leaves the original alone."""
    d = device()
    d.produce(1_700_000_010.0, 10.0)
    inner, _ = d.next_request()  # type: ignore[misc]
    assert isinstance(inner, InnerRequest)
    for kwargs in ({}, {"echo": b"\x01" * 8}, {"uri_host": None, "proxy_uri": None}):
        ours, theirs = inner.copy(**kwargs), Message.copy(inner, **kwargs)
        for m in (ours, theirs):
            m.mtype, m.mid, m.token = Type.CON, 1, b"t"
        assert ours.encode() == theirs.encode()
    copy = inner.copy(echo=b"\x02" * 8)
    copy.opt.uri_path = ("elsewhere",)
    assert inner.opt.echo is None and inner.opt.uri_path == ("ingest", "fleet-00001")


def test_device_keeps_unacknowledged_records_and_sends_them_first() -> None:
    d = device()
    d.produce(1_700_000_010.0, 10.0)
    _, seqs = d.next_request()  # type: ignore[misc]
    ack = IngestAck.for_seqs([s for s in seqs if s not in (4, 5)], 8, 0)
    assert d.acknowledged(ack, seqs) == 8
    d.produce(1_700_000_020.0, 10.0)
    _, again = d.next_request()  # type: ignore[misc]
    assert again[:2] == [4, 5] and again[2:] == list(range(11, 21))
    assert d.acknowledged(IngestAck.for_seqs(again, 12, 0), again) == 12
    assert d.pending == [] and d.acked_ranges() == ((1, 20),)
    assert d.sent == 20 and d.generated == 20


def test_device_drops_conflicting_records_without_acknowledging_them() -> None:
    d = device()
    d.produce(1_700_000_010.0, 10.0)
    _, seqs = d.next_request()  # type: ignore[misc]
    ack = IngestAck.for_seqs(seqs, 0, 10, conflicts=[3])
    assert d.acknowledged(ack, seqs) == 9
    assert d.pending == [] and d.conflicted == 1
    assert d.acked_ranges() == ((1, 2), (4, 10))


def test_device_batch_fits_one_datagram() -> None:
    d = device(max_records=4096)
    for i in range(60):  # ten minutes of nothing acknowledged
        d.produce(1_700_000_000.0 + 10 * i, 10.0)
    inner, seqs = d.next_request()  # type: ignore[misc]
    assert len(inner.payload) <= MAX_PAYLOAD and seqs[0] == 1 and len(seqs) < 600


@given(st.lists(st.tuples(st.integers(1, 60), st.integers(0, 5)), max_size=30))
def test_acked_ranges_are_the_union_of_what_was_acknowledged(
    spans: list[tuple[int, int]],
) -> None:
    d = device()
    want: set[int] = set()
    for first, length in spans:
        d._add_acked(first, first + length)
        want |= set(range(first, first + length + 1))
    ranges = d.acked_ranges()
    got = {s for a, b in ranges for s in range(a, b + 1)}
    assert got == want
    assert all(b + 1 < c for (_, b), (c, _) in itertools.pairwise(ranges))


# -- provisioning and verification against a real storage ---------------------------------------


def test_provision_registers_devices_with_distinct_keys_and_rekeys_on_repeat(
    tmp_path: Path,
) -> None:
    storage = SQLiteStorage.in_dir(tmp_path)
    try:
        creds = fleet.provision(storage, 30, "fleet")
        assert [c.principal for c in creds] == [f"fleet-{i:05d}" for i in range(1, 31)]
        assert len({c.sender_id for c in creds}) == 30
        assert {d.id for d in storage.devices()} == {c.principal for c in creds}
        stored = {c.principal: c for c, revoked in storage.credentials() if not revoked}
        assert all(stored[c.principal].sender_id == c.sender_id for c in creds)
        again = fleet.provision(storage, 2, "fleet")
        assert [c.generation for c in again] == [2, 2]
        assert again[0].sender_id != creds[0].sender_id
    finally:
        storage.close()
    path = tmp_path / "creds.json"
    fleet.write_credentials(path, creds)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert fleet.read_credentials(path) == creds


def _report(acked: dict[str, tuple[tuple[int, int], ...]], sent: dict[str, int]) -> FleetReport:
    worker = WorkerResult(0, 1)
    worker.devices = [DeviceResult(n, acked[n], sent[n], sent[n], 0) for n in acked]
    return FleetReport.merge(
        [worker],
        devices=len(acked),
        processes=1,
        batch_interval_s=1.0,
        batch_size=10,
        duration_s=1.0,
        security="none",
        content_format=DEFAULT_CONTENT_FORMAT,
        target="coap://127.0.0.1:5683",
    )


def _store(storage: SQLiteStorage, device: str, seqs: range) -> None:
    t = 1_700_000_000.0
    body = TelemetryBody("motor", t, {"current_a": 1.0}).to_cbor()
    storage.ingest(device, [WireRecord(s, "telemetry", t, body) for s in seqs], t)


def test_verify_counts_lost_unacked_and_foreign_records(tmp_path: Path) -> None:
    """a: all acknowledged and stored; b: 6-10 acknowledged but not stored (lost), 11-12 stored
    without an ack (allowed); c: holds 50-51, which the fleet never sent (another run)."""
    storage = SQLiteStorage.in_dir(tmp_path)
    try:
        for name in ("a", "b", "c"):
            storage.add_device(name, 0.0)
        _store(storage, "a", range(1, 11))
        _store(storage, "b", range(1, 6))
        _store(storage, "b", range(11, 13))
        _store(storage, "c", range(50, 52))
        report = _report({"a": ((1, 10),), "b": ((1, 10),), "c": ()}, {"a": 10, "b": 12, "c": 0})
        result = fleet.verify(storage, report)
    finally:
        storage.close()
    lost, duplicated = result
    assert (lost, duplicated) == (5, 0)
    assert result.stored_unacked == 2 and result.foreign == 2
    assert result.stored == 19 and result.acked == 20 and result.devices == 3
    assert "acked" not in report.to_json() and report.to_json()["devices"] == 3
