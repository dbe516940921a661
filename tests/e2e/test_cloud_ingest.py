"""The cloud endpoint's ingest on loopback: dedup, overlapping batches, Block1, limits, registry,
5.03 when storage is gone. A real server, real SQLite, aiocoap's stock client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap import Code, Message

from agent.wire.batch import IngestAck, WireRecord
from agent.wire.codec import encode_batch
from agent.wire.records import AlertBody, TelemetryBody
from cloud.server import CloudServer, Limits
from cloud.storage import SQLiteStorage

T0 = 1_700_000_000.0
DEVICE = "pump-01"


def telemetry(seq: int, value: float = 1.0) -> WireRecord:
    body = TelemetryBody("motor", T0 + seq, {"current_a": value, "supply_v": 230.0})
    return WireRecord(seq, "telemetry", T0 + seq + 0.001, body.to_cbor())


def alert(seq: int) -> WireRecord:
    body = AlertBody(T0 + seq, {"score": 0.97, "verdict": "anomaly", "raise": True})
    return WireRecord(seq, "alert", T0 + seq, body.to_cbor())


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CloudServer]:
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await srv.add_device(DEVICE)
    yield srv
    await srv.stop()


async def post(
    ctx: aiocoap.Context, server: CloudServer, payload: bytes, device: str = DEVICE, cf: int = 112
) -> Message:
    msg = Message(code=Code.POST, uri=f"{server.uri}/ingest/{device}", payload=payload)
    msg.opt.content_format = cf
    async with asyncio.timeout(20):
        return await ctx.request(msg).response


async def test_batch_is_stored_and_acknowledged(
    server: CloudServer, client: aiocoap.Context
) -> None:
    records = [telemetry(1), telemetry(2, 1.5), alert(3)]
    response = await post(client, server, encode_batch(DEVICE, records))
    assert response.code == Code.CHANGED
    assert response.opt.content_format == 60
    ack = IngestAck.from_cbor(response.payload)
    assert ack == IngestAck(((1, 3),), new=3, duplicate=0)
    stored = await server.records(DEVICE)
    assert [(r.seq, r.kind, r.created, r.body) for r in stored] == [
        (r.seq, r.kind, r.created, r.body) for r in records
    ]
    assert stored[0].time == T0 + 1  # the reading's time, not the store's


async def test_same_batch_twice_is_stored_once_and_acked_twice(
    server: CloudServer, client: aiocoap.Context
) -> None:
    batch = encode_batch(DEVICE, [telemetry(s) for s in range(10, 20)])
    first = IngestAck.from_cbor((await post(client, server, batch)).payload)
    second = IngestAck.from_cbor((await post(client, server, batch)).payload)
    assert first == IngestAck(((10, 19),), new=10, duplicate=0)
    assert second == IngestAck(((10, 19),), new=0, duplicate=10)
    assert await server.db(lambda s: s.seqs(DEVICE)) == list(range(10, 20))


async def test_overlapping_and_out_of_order_batches(
    server: CloudServer, client: aiocoap.Context
) -> None:
    a = IngestAck.from_cbor(
        (
            await post(client, server, encode_batch(DEVICE, [telemetry(s) for s in range(0, 6)]))
        ).payload
    )
    # alerts first: a batch with a gap, seqs not in order, overlapping the first
    mixed = [alert(9), telemetry(4), telemetry(5), telemetry(6), telemetry(7)]
    b = IngestAck.from_cbor((await post(client, server, encode_batch(DEVICE, mixed))).payload)
    assert a.ranges == ((0, 5),) and a.new == 6
    assert b.ranges == ((4, 7), (9, 9))
    assert (b.new, b.duplicate, b.conflict) == (3, 2, 0)
    assert await server.seqs(DEVICE) == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    # arrival order: the first batch, then the new records of the second in batch order
    arrived = [r.seq for r in await server.records(DEVICE, by_arrival=True)]
    assert arrived == [0, 1, 2, 3, 4, 5, 9, 6, 7]


async def test_reused_seq_with_other_content_is_a_conflict_and_first_copy_stays(
    server: CloudServer, client: aiocoap.Context
) -> None:
    await post(client, server, encode_batch(DEVICE, [telemetry(1, 1.0)]))
    ack = IngestAck.from_cbor(
        (await post(client, server, encode_batch(DEVICE, [telemetry(1, 9.0)]))).payload
    )
    assert (ack.new, ack.duplicate, ack.conflict) == (0, 1, 1)
    [stored] = await server.records(DEVICE)
    assert TelemetryBody.from_cbor(stored.body).values["current_a"] == 1.0


async def test_batch_without_device_name_and_empty_batch(
    server: CloudServer, client: aiocoap.Context
) -> None:
    ack = IngestAck.from_cbor((await post(client, server, encode_batch(None, [alert(4)]))).payload)
    assert ack.ranges == ((4, 4),)
    empty = await post(client, server, encode_batch(DEVICE, []))
    assert empty.code == Code.CHANGED
    assert IngestAck.from_cbor(empty.payload) == IngestAck((), 0, 0)


async def test_batch_naming_another_device_is_refused(
    server: CloudServer, client: aiocoap.Context
) -> None:
    await server.add_device("other")
    response = await post(client, server, encode_batch("other", [alert(1)]))
    assert response.code == Code.BAD_REQUEST
    assert await server.records(DEVICE) == [] and await server.records("other") == []


async def test_large_batch_goes_block_wise(server: CloudServer, client: aiocoap.Context) -> None:
    records = [telemetry(s, s / 7) for s in range(400)]
    batch = encode_batch(DEVICE, records)
    assert len(batch) > 8 * 1024
    response = await post(client, server, batch)
    assert response.code == Code.CHANGED
    assert IngestAck.from_cbor(response.payload).ranges == ((0, 399),)
    assert server.stats["block1_uploads"] == 1
    assert server.stats["block1_blocks"] == -(-len(batch) // 1024)
    assert len(await server.records(DEVICE)) == 400


async def test_oversize_batch_gets_413_with_size1(tmp_path: Path, client: aiocoap.Context) -> None:
    limits = Limits(batch_bytes=4096, batch_records=50)
    srv = await CloudServer.start(tmp_path, "127.0.0.1", 0, limits=limits, allow_plain=True)
    try:
        await srv.add_device(DEVICE)
        big = encode_batch(DEVICE, [telemetry(s) for s in range(200)])
        assert len(big) > 4096
        response = await post(client, srv, big)
        assert response.code == Code.REQUEST_ENTITY_TOO_LARGE
        assert response.opt.size1 == 4096
        many = encode_batch(DEVICE, [alert(s) for s in range(51)])
        assert len(many) <= 4096
        assert (await post(client, srv, many)).code == Code.REQUEST_ENTITY_TOO_LARGE
        assert await srv.records(DEVICE) == []
        ok = await post(client, srv, encode_batch(DEVICE, [alert(s) for s in range(50)]))
        assert ok.code == Code.CHANGED
    finally:
        await srv.stop()


async def test_unknown_device_is_404_unless_any_device_is_allowed(
    tmp_path: Path, client: aiocoap.Context
) -> None:
    strict = await CloudServer.start(tmp_path / "a", "127.0.0.1", 0, allow_plain=True)
    try:
        response = await post(client, strict, encode_batch("stranger", [alert(1)]), "stranger")
        assert response.code == Code.NOT_FOUND
        assert await strict.db(lambda s: s.device("stranger")) is None
    finally:
        await strict.stop()
    open_ = await CloudServer.start(
        tmp_path / "b", "127.0.0.1", 0, allow_any_device=True, allow_plain=True
    )
    try:
        response = await post(client, open_, encode_batch("stranger", [alert(1)]), "stranger")
        assert response.code == Code.CHANGED
        info = await open_.db(lambda s: s.device("stranger"))
        assert info is not None and info.records == 1 and info.last_seq == 1
    finally:
        await open_.stop()


async def test_device_registered_by_the_cli_while_serving_is_found(
    server: CloudServer, client: aiocoap.Context
) -> None:
    assert server.data_dir is not None
    other = SQLiteStorage.in_dir(server.data_dir)  # as `edge-agent-cloud devices add` does
    try:
        other.add_device("late-01", T0)
    finally:
        other.close()
    response = await post(client, server, encode_batch("late-01", [alert(1)]), "late-01")
    assert response.code == Code.CHANGED


async def test_storage_unavailable_is_503_with_max_age_and_serving_goes_on(
    server: CloudServer, client: aiocoap.Context
) -> None:
    await server.db(lambda s: s.close())
    response = await post(client, server, encode_batch(DEVICE, [alert(1)]))
    assert response.code == Code.SERVICE_UNAVAILABLE
    assert response.opt.max_age == 10
    gone = Message(code=Code.GET, uri=f"{server.uri}/no/such/thing")
    async with asyncio.timeout(10):
        assert (await client.request(gone).response).code == Code.NOT_FOUND


async def test_a_value_the_database_refuses_is_400_not_503_and_serving_goes_on(
    server: CloudServer, client: aiocoap.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value the database refuses (PostgreSQL: text with a NUL) is the request's fault:
    4.00 with the reason, not a 5.03 the device would retry for ever."""
    from cloud.storebase import DataRefused

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise DataRefused("a value the database refuses: text with a NUL (0x00) character")

    monkeypatch.setattr(SQLiteStorage, "ingest_many", refuse)
    response = await post(client, server, encode_batch(DEVICE, [alert(1)]))
    assert response.code == Code.BAD_REQUEST and response.opt.max_age in (None, 60)
    assert b"NUL" in response.payload
    monkeypatch.undo()
    ok = await post(client, server, encode_batch(DEVICE, [alert(2)]))
    assert ok.code == Code.CHANGED


async def test_device_entry_and_restart_keeps_data(tmp_path: Path, client: aiocoap.Context) -> None:
    srv = await CloudServer.start(tmp_path, "127.0.0.1", 0, allow_plain=True)
    await srv.add_device(DEVICE)
    await post(client, srv, encode_batch(DEVICE, [telemetry(1), telemetry(2)]))
    await srv.stop()
    srv = await CloudServer.start(tmp_path, "127.0.0.1", 0, allow_plain=True)
    try:
        msg = Message(code=Code.GET, uri=f"{srv.uri}/devices/{DEVICE}")
        async with asyncio.timeout(10):
            response = await client.request(msg).response
        assert response.code == Code.CONTENT
        entry = cbor2.loads(response.payload)
        assert entry["id"] == DEVICE and entry["records"] == 2 and entry["last_seq"] == 2
        again = IngestAck.from_cbor(
            (await post(client, srv, encode_batch(DEVICE, [telemetry(2)]))).payload
        )
        assert again.duplicate == 1
    finally:
        await srv.stop()
