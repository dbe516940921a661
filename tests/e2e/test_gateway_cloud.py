"""Gateways at the endpoint (docs/security.md "Gateways", docs/protocol.md "Gateways"): a real
endpoint on loopback as it runs by default (OSCORE required), each principal with its real
credential and the agent's real transport. A gateway acts for the devices attached to it and for
nothing else; ``POST /relay/<gateway>`` answers each device's batch as ``/ingest`` would; an
attachment made by the command line takes effect on the running endpoint; hostile relay bodies get
a 4.xx and never a traceback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from aiocoap import Code, Message

from agent.gateway.relay import RecordForwarder, prepare_store
from agent.wire import codec, records
from agent.wire.batch import IngestAck, WireRecord
from agent.wire.features import ChannelFeatures, FeaturesBody
from agent.wire.records import TelemetryBody
from agent.wire.relay import (
    MAX_ENTRIES,
    RelayEntry,
    RelayRefusal,
    decode_relay_answer,
    encode_relay,
)
from cloud import cli
from cloud.server import CloudServer, Limits
from cloud.storage import SQLiteStorage
from tests.e2e.test_fastpath import RawDevice, acked, ingest
from tests.e2e.test_security import T0, Principal, batch
from tools.fleetlib.device import OscoreSession

A, B, C = "pump-01", "pump-02", "pump-03"
GW, OTHER = "gw-1", "gw-2"
POLLS = 400  # rounds of 25 ms a test waits at most for the endpoint to notice a CLI write


async def gateway(server: CloudServer, tmp_path: Path, *attached: str) -> Principal:
    """The gateway GW with its credential, ``attached`` behind it."""
    gw = await Principal(server, tmp_path, GW).open("gateway")
    if attached:
        await server.attach(GW, attached)
    return gw


async def relay(p: Principal, entries: list[RelayEntry], to: str = GW) -> list[object]:
    resp = await p.req("POST", f"relay/{to}", encode_relay(entries), 60)
    assert resp.dotted == "2.04", (resp.dotted, resp.payload)
    return list(decode_relay_answer(resp.payload, len(entries)))


def senml(device: str, seqs: range) -> RelayEntry:
    return RelayEntry(device, 112, batch(device, seqs))


async def until(check: Callable[[], bool]) -> None:
    """Poll ``check`` a bounded number of times (the endpoint notices CLI writes by polling)."""
    for _ in range(POLLS):
        if check():
            return
        await asyncio.sleep(0.025)
    raise AssertionError("the endpoint did not notice the change")


def run_cli(*argv: str) -> Awaitable[int]:
    return asyncio.to_thread(cli.main, list(argv))


def features_record(first: int) -> WireRecord:
    """A features record of sensor "vib" for the three readings from ``first``."""
    cf = ChannelFeatures(1.0, 0.0, 2.0, 1.2, 0.5, 3.0, 1.6, (0.25,))
    return FeaturesBody("vib", tuple(range(first, first + 3)), T0, T0 + 1, {"x_g": cf}).to_record()


def reading(seq: int, value: float = 1.5) -> WireRecord:
    return WireRecord(seq, "telemetry", T0, TelemetryBody("m", T0, {"a": value}).to_cbor())


def on(site: SQLiteStorage) -> Callable[[Callable[[SQLiteStorage], Any]], Awaitable[Any]]:
    """The forwarder's ``db`` over a gateway's store opened in the test's own thread."""

    async def db(fn: Callable[[SQLiteStorage], Any]) -> Any:
        return fn(site)

    return db


@pytest.mark.timeout(90)
async def test_a_gateway_ingests_for_an_attached_device_and_nothing_else(
    server: CloudServer, tmp_path: Path
) -> None:
    """Its batch for A is stored under A with A's ack; the retry is a duplicate. Another
    device's ingest, desired PUT, another gateway's /relay, a device's or an operator's POST to
    its /relay: 4.03, nothing stored."""
    for device in (A, B):
        await server.add_device(device)
    gw = await gateway(server, tmp_path, A)
    other = await Principal(server, tmp_path, OTHER).open("gateway")
    dev_a = await Principal(server, tmp_path, A).open()
    op = await Principal(server, tmp_path, "alice").open("operator")
    try:
        first = await gw.req("POST", f"ingest/{A}", batch(A, range(1, 4)), 112)
        assert first.dotted == "2.04"
        ack = IngestAck.from_cbor(first.payload)
        assert (list(ack.seqs()), ack.new, ack.duplicate, ack.last) == ([1, 2, 3], 3, 0, 3)
        assert ack.store == server.store_id
        retry = await gw.req("POST", f"ingest/{A}", batch(A, range(1, 4)), 112)
        again = IngestAck.from_cbor(retry.payload)
        assert (list(again.seqs()), again.new, again.duplicate) == ([1, 2, 3], 0, 3)
        assert await server.seqs(A) == [1, 2, 3]
        stored = await server.records(A)
        assert TelemetryBody.from_cbor(stored[0].body).values == {"current_a": 1.0}
        desired = records.dumps({"sensor/motor/interval": 9.0})
        for who, method, path, body, cf in [
            (gw, "POST", f"ingest/{B}", batch(B, range(1, 4)), 112),
            (gw, "GET", f"state/{B}/desired", b"", None),
            (gw, "PUT", f"state/{B}/reported", records.dumps({"queue/depth": [1, 5]}), 60),
            (gw, "POST", f"validate/{B}", records.dumps({"seq": 1}), 60),
            (gw, "PUT", f"state/{A}/desired", desired, 60),  # an operator's, never a gateway's
            (gw, "POST", f"relay/{OTHER}", encode_relay([senml(A, range(7, 9))]), 60),
            (gw, "POST", f"relay/{A}", encode_relay([senml(A, range(7, 9))]), 60),
            (other, "POST", f"ingest/{A}", batch(A, range(7, 9)), 112),  # A is not behind it
            (other, "POST", f"relay/{GW}", encode_relay([senml(A, range(7, 9))]), 60),
            (dev_a, "POST", f"relay/{GW}", encode_relay([senml(A, range(7, 9))]), 60),
            (op, "POST", f"relay/{GW}", encode_relay([senml(A, range(7, 9))]), 60),
        ]:
            resp = await who.req(method, path, body, cf)
            assert resp.dotted == "4.03", (who.name, method, path, resp.dotted, resp.payload)
        assert await server.seqs(A) == [1, 2, 3] and await server.seqs(B) == []
        assert (await server.desired(A)).rev == 0
        wkc = await gw.req("GET", ".well-known/core")
        assert f"</ingest/{A}>".encode() in wkc.payload and f"</relay/{GW}>".encode() in wkc.payload
        assert f"/{B}>".encode() not in wkc.payload
    finally:
        for p in (gw, other, dev_a, op):
            await p.close()


@pytest.mark.timeout(90)
async def test_a_gateway_acts_for_no_device_whose_credential_is_revoked(
    server: CloudServer, tmp_path: Path
) -> None:
    """Attack: a device stolen from behind a gateway is revoked at the cloud. Before, the
    gateway's posts for it (/relay, /ingest, state) were taken as before: the endpoint checked
    only that the device was attached. Now a revoked device is acted for by no gateway (4.03)
    until it is given a credential again; the attachment stays."""
    for device in (A, B):
        await server.add_device(device)
    gw = await gateway(server, tmp_path, A, B)
    dev_a = await Principal(server, tmp_path, A).open()  # A's own credential, issued
    await dev_a.close()
    try:
        first = await relay(gw, [senml(A, range(1, 3)), senml(B, range(1, 3))])
        assert all(isinstance(r, IngestAck) for r in first)
        assert await server.revoke(A)
        after = await relay(gw, [senml(A, range(3, 5)), senml(B, range(3, 5))])
        assert isinstance(after[0], RelayRefusal) and after[0].dotted == "4.03", after[0]
        assert "revoked" in after[0].message
        assert isinstance(after[1], IngestAck) and after[1].new == 2  # B goes on
        for method, path, body, cf in [
            ("POST", f"ingest/{A}", batch(A, range(5, 7)), 112),
            ("PUT", f"state/{A}/reported", records.dumps({"queue/depth": [1, 5]}), 60),
            ("GET", f"state/{A}/desired", b"", None),
        ]:
            resp = await gw.req(method, path, body, cf)
            assert resp.dotted == "4.03", (method, path, resp.dotted, resp.payload)
        assert await server.seqs(A) == [1, 2]
        assert server.relays.get(B) == GW and (await server.db(lambda s: s.relays())).get(A) == GW
        again = await Principal(server, tmp_path / "new", A).open()  # a new credential
        await again.close()
        back = await relay(gw, [senml(A, range(3, 5))])
        assert isinstance(back[0], IngestAck) and back[0].new == 2
    finally:
        await gw.close()


@pytest.mark.timeout(90)
async def test_relay_answers_each_device_as_ingest_would(
    server: CloudServer, tmp_path: Path
) -> None:
    """Three devices, B not attached: two acks and one [4.03, ...]; A's batch in SenML, C's
    compact with a features record; stored under each device with /ingest's dedup (a resend
    through /relay or /ingest is a duplicate)."""
    for device in (A, B, C):
        await server.add_device(device)
    gw = await gateway(server, tmp_path, A, C)
    feats = features_record(20)
    compact = codec.encode_batch(C, [reading(5), feats], 65001, resolution=lambda _s, _c: 0.5)
    entries = [senml(A, range(1, 4)), senml(B, range(1, 4)), RelayEntry(C, 65001, compact)]
    try:
        transactions = server.ingest.transactions
        first = await relay(gw, entries)
        assert server.ingest.transactions == transactions + 1  # A's and C's, committed together
        assert isinstance(first[0], IngestAck) and list(first[0].seqs()) == [1, 2, 3]
        assert first[0].new == 3 and first[0].store == server.store_id
        assert isinstance(first[1], RelayRefusal) and first[1].dotted == "4.03"
        assert B in first[1].message
        assert isinstance(first[2], IngestAck) and list(first[2].seqs()) == [5, 20, 21, 22]
        assert first[2].new == 4  # the readings the features record stands for, counted
        assert await server.seqs(A) == [1, 2, 3] and await server.seqs(B) == []
        assert await server.seqs(C) == [5]
        assert [(f.first_seq, f.last_seq) for f in await server.db(lambda s: s.features(C))] == [
            (20, 22)
        ]
        again = await relay(gw, entries)
        assert isinstance(again[0], IngestAck) and (again[0].new, again[0].duplicate) == (0, 3)
        assert isinstance(again[2], IngestAck) and (again[2].new, again[2].duplicate) == (0, 4)
        direct = await gw.req("POST", f"ingest/{A}", batch(A, range(2, 5)), 112)
        ack = IngestAck.from_cbor(direct.payload)
        assert (list(ack.seqs()), ack.new, ack.duplicate) == ([2, 3, 4], 1, 2)
        assert await server.seqs(A) == [1, 2, 3, 4]
        assert await relay(gw, []) == []
    finally:
        await gw.close()


@pytest.mark.timeout(120)
async def test_the_gateways_forwarder_takes_features_records_up_too(
    server: CloudServer, tmp_path: Path
) -> None:
    """A features record a device's batch committed at the gateway (acknowledged to the device
    there) reaches the cloud, once, with the readings it stands for. The forwarder read the
    records table only: features records were acknowledged to the device and never left the
    gateway. Those a gateway stored before it queued them go at its first pass."""
    await server.add_device(C)
    gw = await gateway(server, tmp_path, C)
    site = SQLiteStorage.in_dir(tmp_path / "gw-store")  # the gateway's store, as its server has it
    db = on(site)
    data_dir = tmp_path / "gw-data"
    data_dir.mkdir()
    try:
        site.ingest_many([(C, [reading(5), features_record(20)], True)], T0)  # no queue yet
        forwarder = RecordForwarder(db, gw.transport, lambda: server.uri, data_dir, name=GW)
        assert await forwarder.forward_once() == 2
        assert await server.seqs(C) == [5]
        stored = await server.db(lambda s: s.features(C))
        assert [(f.first_seq, f.last_seq) for f in stored] == [(20, 22)]
        site.ingest_many([(C, [features_record(23)], False)], T0 + 2)  # queued by the trigger
        assert await forwarder.forward_once() == 1
        stored = await server.db(lambda s: s.features(C))
        assert [(f.first_seq, f.last_seq) for f in stored] == [(20, 22), (23, 25)]
        assert await forwarder.forward_once() == 0
        again = RecordForwarder(db, gw.transport, lambda: server.uri, data_dir, name=GW)
        assert (again.cursor, again.features_cursor) == (1, 2)
        assert await again.forward_once() == 0  # nothing twice after a restart
        assert forwarder.conflicts == 0
    finally:
        site.close()
        await gw.close()


@pytest.mark.timeout(120)
async def test_the_gateway_drops_what_the_cloud_holds_after_keep_forwarded(
    server: CloudServer, tmp_path: Path
) -> None:
    """The gateway's store kept every record forever (a disk that fills and then refuses every
    device). Now what the cloud acknowledged is dropped ``keep_forwarded`` seconds after the
    gateway received it, each device's newest record kept (its acks' ``last``); a record under
    a dropped seq that the store does not hold is a conflict, so a device that lost its store
    sends it again under a new number instead of the cloud keeping its old record in its place;
    a record the store still holds is a duplicate as before."""
    await server.add_device(C)
    gw = await gateway(server, tmp_path, C)
    first = SQLiteStorage.in_dir(tmp_path / "gw-store")
    prepare_store(first)  # as the gateway does before its server opens the store
    first.close()
    site = SQLiteStorage.in_dir(tmp_path / "gw-store")
    now = [T0 + 30.0]
    data_dir = tmp_path / "gw-data"
    data_dir.mkdir()
    forwarder = RecordForwarder(
        on(site),
        gw.transport,
        lambda: server.uri,
        data_dir,
        name=GW,
        keep=60.0,
        wall=lambda: now[0],
    )
    try:
        site.ingest_many([(C, [*(reading(i) for i in range(1, 6)), features_record(20)], True)], T0)
        assert await forwarder.forward_once() == 6
        assert await server.seqs(C) == [1, 2, 3, 4, 5]
        assert site.seqs(C) == [1, 2, 3, 4, 5]  # forwarded, but received 30 s ago only
        now[0] = T0 + 200.0
        assert await forwarder.prune() == 5  # 4 records and the features record
        assert site.seqs(C) == [5]  # the newest stays: the acks' "last"
        assert site.features(C) == [] and len(await server.db(lambda s: s.features(C))) == 1
        queue = site.db.execute("SELECT count(*) FROM relay_features").fetchone()[0]
        assert queue == 0
        again = site.ingest_many([(C, [reading(5), reading(3), reading(6)], False)], T0 + 201)
        result = again[0]
        assert not isinstance(result, Exception)
        assert (result.new, result.duplicate, result.conflicts) == (1, 1, (3,))
        assert result.last == 6
        assert await forwarder.forward_once() == 1  # seq 6 only
        assert await server.seqs(C) == [1, 2, 3, 4, 5, 6]
        stored = await server.records(C)
        assert all(TelemetryBody.from_cbor(r.body).values == {"a": 1.5} for r in stored)
        # a record the cloud holds another under (a conflict) is never dropped: the gateway's
        # copy is the only one (the device deleted its own at the gateway's ack)
        await server.db(lambda s: s.ingest(C, [reading(7, 9.0)], T0 + 202))
        site.ingest_many([(C, [reading(7), reading(8)], False)], T0 + 202)
        assert await forwarder.forward_once() == 1 and forwarder.conflicts == 1
        now[0] = T0 + 400.0
        await forwarder.prune()
        assert site.seqs(C) == [7, 8]  # 7 kept, 8 the newest
    finally:
        site.close()
        await gw.close()


@pytest.mark.timeout(120)
async def test_gateways_made_and_attached_by_the_command_line_take_effect_without_restart(
    server: CloudServer, tmp_path: Path
) -> None:
    data = str(server.data_dir)
    await server.add_device(A)
    gw = Principal(server, tmp_path, GW)
    cred = str(gw.dir / "credential.json")
    assert await run_cli("gateways", "add", "--data", data, GW, "--credential-out", cred) == 0
    await until(lambda: server.principals.credential(GW) is not None)
    gw.connect()
    try:
        assert (await gw.req("POST", f"ingest/{A}", batch(A, range(1, 3)), 112)).dotted == "4.03"
        assert await run_cli("gateways", "attach", "--data", data, GW, A) == 0
        await until(lambda: server.relays.get(A) == GW)
        resp = await gw.req("POST", f"ingest/{A}", batch(A, range(1, 3)), 112)
        assert resp.dotted == "2.04" and list(IngestAck.from_cbor(resp.payload).seqs()) == [1, 2]
        assert await run_cli("gateways", "detach", "--data", data, A) == 0
        await until(lambda: A not in server.relays)
        assert (await gw.req("POST", f"ingest/{A}", batch(A, range(3, 5)), 112)).dotted == "4.03"
        assert await server.seqs(A) == [1, 2]
    finally:
        await gw.close()


@pytest.mark.timeout(90)
async def test_state_through_a_gateway_keeps_the_devices_versions(
    server: CloudServer, tmp_path: Path
) -> None:
    """Reported PUT by the gateway: stored under the device with the device's versions, as the
    device itself reads them. Desired GET and Observe: the device's own document (versions,
    ETag); a desired change notifies the gateway's observation."""
    dev = await Principal(server, tmp_path, A).open()
    gw = await gateway(server, tmp_path, A)
    op = await Principal(server, tmp_path, "alice").open("operator")
    try:
        put = await gw.req(
            "PUT", f"state/{A}/reported", records.dumps({"agent/version": [1234567, "1.2"]}), 60
        )
        assert put.dotted == "2.04" and records.loads(put.payload) == {"agent/version": 1234567}
        own = await dev.req("GET", f"state/{A}/reported")
        assert records.loads(own.payload) == {"agent/version": [1234567, "1.2"]}
        assert (await server.reported(A))["agent/version"].version == 1234567
        body = records.dumps({"sensor/motor/interval": 2.0})
        assert (await op.req("PUT", f"state/{A}/desired", body, 60)).dotted == "2.04"
        mine = await dev.req("GET", f"state/{A}/desired")
        theirs = await gw.req("GET", f"state/{A}/desired")
        assert theirs.dotted == "2.05" and theirs.payload == mine.payload
        assert theirs.etag == mine.etag
        doc = records.loads(theirs.payload)
        assert doc["rev"] == 1 and doc["keys"] == {"sensor/motor/interval": [1, 2.0]}
        assert gw.transport is not None
        notes = gw.transport.observe(f"{server.uri}/state/{A}/desired", deadline=20)
        assert records.loads((await anext(notes)).payload)["rev"] == 1
        await server.set_desired(A, {"sensor/motor/interval": 3.0})
        note = await asyncio.wait_for(anext(notes), 20)
        assert records.loads(note.payload)["keys"]["sensor/motor/interval"] == [2, 3.0]
        await notes.aclose()
    finally:
        for p in (dev, gw, op):
            await p.close()


@pytest.mark.timeout(60)
async def test_single_datagram_ingest_of_a_gateway_goes_the_short_way_with_the_same_rule(
    server: CloudServer,
) -> None:
    """cloud/fastpath.py renders through the same authorisation: A's batch (attached) is
    stored, B's (not attached) is 4.03, both answered below aiocoap."""
    for device in (A, B):
        await server.add_device(device)
    raw = RawDevice(server, OscoreSession(await server.register(GW, "gateway")))
    await server.attach(GW, [A])
    try:
        assert acked(await raw.ask(ingest(A, range(1, 3)))) == [1, 2]  # through Echo: aiocoap
        fast = server.fast_path
        assert fast is not None
        handled = fast.handled
        assert acked(await raw.ask(ingest(A, range(3, 5)))) == [3, 4]
        assert (await raw.ask(ingest(B, range(1, 3)))).code == Code.FORBIDDEN
        assert fast.handled == handled + 2
        assert await server.seqs(A) == [1, 2, 3, 4] and await server.seqs(B) == []
    finally:
        raw.close()


@pytest.mark.timeout(120)
async def test_hostile_relay_bodies_get_4xx_and_never_a_traceback(
    server: CloudServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not an array, wrong entry shapes, lying lengths, huge arrays, a body over the limit,
    another content format: the request is refused whole (4.00, 4.13, 4.15). Bad batches, a
    batch naming another device, an entry over the batch limit, records over the request's
    budget: that entry is refused, the others stored. The endpoint serves on."""
    caplog.set_level(logging.INFO)
    for device in (A, B):
        await server.add_device(device)
    gw = await gateway(server, tmp_path, A, B)
    whole = [
        (cbor2.dumps({A: [112, b""]}), 60, "4.00"),
        (cbor2.dumps([[A, 112]]), 60, "4.00"),
        (cbor2.dumps([[1, 112, b"\x80"]]), 60, "4.00"),
        (cbor2.dumps([[A, "112", b"\x80"]]), 60, "4.00"),
        (cbor2.dumps([[A, 112, "\x80"]]), 60, "4.00"),
        (bytes.fromhex("9bffffffffffffffff"), 60, "4.00"),  # declares 2**64 entries
        (bytes.fromhex("81835bffffffffffffffff"), 60, "4.00"),  # a device of 2**64 bytes
        (b"\x81" * 5000, 60, "4.00"),  # nested 5,000 deep
        (b"\xff\x00", 60, "4.00"),
        (b"", 60, "4.00"),
        (cbor2.dumps([[A, 112, b"\x80"]] * (MAX_ENTRIES + 1)), 60, "4.13"),
        (cbor2.dumps([[A, 112, bytes(300 * 1024)]]), 60, "4.13"),  # over 256 KiB (Block1)
        (encode_relay([senml(A, range(1, 3))]), 112, "4.15"),
    ]
    try:
        for body, cf, code in whole:
            resp = await gw.req("POST", f"relay/{GW}", body, cf)
            assert resp.dotted == code, (body[:16].hex(), resp.dotted, resp.payload)
        server.limits = Limits(relay_records=4)
        mixed = [
            RelayEntry(A, 112, b"\x81\xa1"),  # a batch that does not decode
            RelayEntry(A, 112, batch(B, range(1, 3))),  # names another device
            RelayEntry(A, 60, b"\x80"),  # not an ingest content format
            RelayEntry(A, 112, bytes(65 * 1024)),  # over the batch limit
            RelayEntry("not a device!", 112, b"\x80"),
            senml(A, range(1, 4)),  # 3 records: within the request's budget of 4
            senml(B, range(1, 3)),  # 2 more: over it
            senml(B, range(9, 10)),  # 1 more: within it
        ]
        results = await relay(gw, mixed)
        codes = [r.dotted if isinstance(r, RelayRefusal) else "ack" for r in results]
        assert codes == ["4.00", "4.00", "4.15", "4.13", "4.03", "ack", "4.13", "ack"]
        assert await server.seqs(A) == [1, 2, 3] and await server.seqs(B) == [9]
        server.limits = Limits()
        assert (await relay(gw, [senml(B, range(1, 3))]))[0] == IngestAck.for_seqs([1, 2], 2, 0)
    finally:
        await gw.close()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert server.responses["5.00 Internal Server Error"] == 0


@pytest.mark.timeout(60)
async def test_an_unauthenticated_relay_is_refused(server: CloudServer) -> None:
    import aiocoap

    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        msg = Message(
            code=Code.POST,
            uri=f"{server.uri}/relay/{GW}",
            payload=encode_relay([senml(A, range(1, 3))]),
            content_format=60,
        )
        async with asyncio.timeout(20):
            resp = await ctx.request(msg).response
        assert resp.code == Code.UNAUTHORIZED
    finally:
        await ctx.shutdown()
