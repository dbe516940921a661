"""Compact batches (65002: compact + deflate + preset dictionary) posted to a real CloudServer on
loopback: stored exactly as they decode; a corrupt payload gets 4.00, an unknown format 4.15, and
the endpoint keeps serving. aiocoap's stock client, real SQLite."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import pytest
from aiocoap import Code, Message

from agent.wire.batch import IngestAck, WireRecord
from agent.wire.codec import decode_batch, encode_batch
from agent.wire.compact import CF_COMPACT, CF_COMPACT_DEFLATE, CF_COMPACT_DICT
from agent.wire.predict import quantize
from agent.wire.records import AlertBody, EventBody, TelemetryBody
from cloud.server import CloudServer

T0 = 1_700_000_000.0
DEVICE = "pump-01"
STEPS = {"current_a": 0.0002, "supply_v": 0.004, "x_g": 0.0039, "vibration_rms_g": 0.0004875}


def resolution(sensor: str, channel: str) -> float | None:
    return STEPS.get(channel)  # the thermocouple has none: its values go exactly


def rig_records(first_seq: int, rows: int) -> list[WireRecord]:
    rng = random.Random(first_seq)
    seq = first_seq
    out = []
    for i in range(rows):
        t = T0 + first_seq + i * 0.1
        readings = [
            ("motor", {"current_a": 2.4 + rng.gauss(0, 0.05), "supply_v": 229.1 + rng.random()}),
            ("accel", {"x_g": rng.gauss(0, 0.2), "vibration_rms_g": 0.3 + rng.random() / 10}),
            ("thermo", {"hot_junction_c": 61.0 + i / 100}),
        ]
        for sensor, raw in readings:
            # as the sampler reports them: on each channel's resolution grid
            values = {k: quantize(v, STEPS[k]) if k in STEPS else v for k, v in raw.items()}
            body = TelemetryBody(sensor, t, values).to_cbor()
            out.append(WireRecord(seq, "telemetry", t + 0.002, body))
            seq += 1
        if i == rows // 2:
            alert = AlertBody(t, {"score": 0.97, "verdict": "anomaly", "raise": True})
            out.append(WireRecord(seq, "alert", t, alert.to_cbor()))
            seq += 1
            nan = TelemetryBody("motor", t, {"current_a": math.nan, "supply_v": 229.0})
            out.append(WireRecord(seq, "telemetry", t, nan.to_cbor()))  # goes as its body
            seq += 1
    out.append(WireRecord(seq, "event", T0, EventBody(T0, {"sensor": "accel"}).to_cbor()))
    return out


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CloudServer]:
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await srv.add_device(DEVICE)
    yield srv
    await srv.stop()


async def post(ctx: aiocoap.Context, server: CloudServer, payload: bytes, cf: int) -> Message:
    msg = Message(code=Code.POST, uri=f"{server.uri}/ingest/{DEVICE}", payload=payload)
    msg.opt.content_format = cf
    async with asyncio.timeout(20):
        return await ctx.request(msg).response


def _rows(records: list[WireRecord]) -> list[tuple[int, str, float, bytes]]:
    return [(r.seq, r.kind, r.created, r.body) for r in records]


async def test_compact_dict_batch_is_stored_as_it_decodes(
    server: CloudServer, client: aiocoap.Context
) -> None:
    records = rig_records(1000, 60)
    payload = encode_batch(DEVICE, records, CF_COMPACT_DICT, resolution=resolution)
    assert len(payload) < 1024  # a low-level batch: one datagram
    device, decoded = decode_batch(payload, CF_COMPACT_DICT)
    assert device == DEVICE and len(decoded) == len(records)
    response = await post(client, server, payload, CF_COMPACT_DICT)
    assert response.code == Code.CHANGED, response.payload
    ack = IngestAck.from_cbor(response.payload)
    assert ack.new == len(records) and ack.duplicate == 0
    assert set(ack.seqs()) == {r.seq for r in records}
    stored = await server.records(DEVICE)
    assert _rows(stored) == _rows(decoded)
    # the alert, the event and the NaN reading arrive byte for byte
    exact = [r for r in records if r.kind != "telemetry" or b"\xf9\x7e\x00" in r.body]
    assert len(exact) == 3 and set(_rows(exact)) <= set(_rows(stored))
    # the readings exactly (on their grid) and their time to the ms
    by_seq = {r.seq: r for r in stored}
    for rec in records[:30]:
        got = TelemetryBody.from_cbor(by_seq[rec.seq].body)
        want = TelemetryBody.from_cbor(rec.body)
        assert got.time == round(want.time * 1000) / 1000
        for channel, x in want.values.items():
            step = STEPS.get(channel)
            assert got.values[channel] == x, (channel, step)


async def test_endpoint_announces_the_compact_formats(
    server: CloudServer, client: aiocoap.Context
) -> None:
    request = Message(code=Code.GET, uri=f"{server.uri}/.well-known/core")
    async with asyncio.timeout(20):
        response = await client.request(request).response
    text = response.payload.decode()
    assert f'ct="112 {CF_COMPACT} {CF_COMPACT_DEFLATE} {CF_COMPACT_DICT}"' in text


async def test_corrupt_or_unknown_format_gets_4xx_and_the_endpoint_keeps_serving(
    server: CloudServer, client: aiocoap.Context
) -> None:
    good = encode_batch(DEVICE, rig_records(5000, 20), CF_COMPACT_DICT, resolution=resolution)
    rng = random.Random(6)
    corrupt = [
        good[: len(good) // 2],  # truncated
        b"\x09" + good[1:],  # an unknown dictionary
        bytes(b ^ 0x5A if i % 7 == 3 else b for i, b in enumerate(good)),  # mangled
        rng.randbytes(300),
        b"",
    ]
    for payload in corrupt:
        response = await post(client, server, payload, CF_COMPACT_DICT)
        assert response.code == Code.BAD_REQUEST, payload.hex()
    plain = encode_batch(DEVICE, rig_records(6000, 5), CF_COMPACT)
    response = await post(client, server, plain[:-1], CF_COMPACT)
    assert response.code == Code.BAD_REQUEST
    response = await post(client, server, good, 64999)
    assert response.code == Code.UNSUPPORTED_CONTENT_FORMAT
    assert await server.records(DEVICE) == []
    # still serving: the good batches go in
    for payload, cf in [(good, CF_COMPACT_DICT), (plain, CF_COMPACT)]:
        response = await post(client, server, payload, cf)
        assert response.code == Code.CHANGED
    assert len(await server.records(DEVICE)) == len(decode_batch(good, CF_COMPACT_DICT)[1]) + len(
        decode_batch(plain, CF_COMPACT)[1]
    )
