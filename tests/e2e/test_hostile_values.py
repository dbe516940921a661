"""Hostile values through a real endpoint on loopback: a batch or a reported document holding a
bignum, a map that contains itself (CBOR tags 28/29) or telemetry names with terminal escapes gets
4.00 and one log line without a traceback, nothing of it is stored, and the endpoint goes on
serving other devices."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap import Code, Message

from agent.wire.batch import IngestAck, WireRecord
from agent.wire.codec import encode_batch
from agent.wire.records import TelemetryBody
from cloud.server import CloudServer

T0 = 1_700_000_000.0
EVIL, GOOD = "evil", "pump-01"
# tag 28 (shareable) on a map whose "self" is tag 29 (shared) 0: a map that contains itself
CYCLIC_MAP = bytes([0xD8, 0x1C, 0xA2]) + cbor2.dumps("kind") + cbor2.dumps("x")
CYCLIC_MAP += cbor2.dumps("self") + bytes([0xD8, 0x1D, 0x00])
TERM = "\x1b]52;c;cm0gLXJmIH4K\x07\x1b[1A\x1b[2K\u202eevil\u202c\x00"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CloudServer]:
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await srv.add_device(EVIL)
    await srv.add_device(GOOD)
    yield srv
    await srv.stop()


async def send(
    ctx: aiocoap.Context, code: Code, uri: str, payload: bytes, cf: int = 112
) -> Message:
    msg = Message(code=code, uri=uri, payload=payload)
    msg.opt.content_format = cf
    async with asyncio.timeout(20):
        return await ctx.request(msg).response


def good_batch(seq: int) -> bytes:
    body = TelemetryBody("motor", T0 + seq, {"current_a": 1.5}).to_cbor()
    return encode_batch(GOOD, [WireRecord(seq, "telemetry", T0 + seq, body)])


HOSTILE_BATCHES = {
    "alert_time_bignum": WireRecord(
        1, "alert", T0, cbor2.dumps([2**1100, {"kind": "raise", "score": 1.0}])
    ),
    "event_note_bignum_2e15000": WireRecord(
        2, "event", T0, cbor2.dumps([T0, {"kind": "clear", "note": 2**15000}])
    ),
    "telemetry_value_bignum": WireRecord(
        3, "telemetry", T0, cbor2.dumps(["pump", T0, {"x": 2**1100}])
    ),
    "alert_cyclic_map": WireRecord(4, "alert", T0, b"\x82" + cbor2.dumps(T0) + CYCLIC_MAP),
    "telemetry_vd_escape_names": WireRecord(
        5, "telemetry", T0, TelemetryBody("pump" + TERM, T0, {"x" + TERM: 1.0}).to_cbor()
    ),
}


@pytest.mark.parametrize("cf", [112, 65001])
@pytest.mark.parametrize("attack", sorted(HOSTILE_BATCHES))
async def test_attack_hostile_batch_gets_4_00_and_other_devices_are_served(
    server: CloudServer,
    client: aiocoap.Context,
    caplog: pytest.LogCaptureFixture,
    attack: str,
    cf: int,
) -> None:
    caplog.set_level(logging.INFO)
    uri = f"{server.uri}/ingest"
    rec = HOSTILE_BATCHES[attack]
    response = await send(client, Code.POST, f"{uri}/{EVIL}", encode_batch(EVIL, [rec], cf), cf)
    assert response.code == Code.BAD_REQUEST, response.payload
    assert await server.records(EVIL) == []
    # the endpoint goes on: another device's batch (and the same device's good one) is stored
    ok = await send(client, Code.POST, f"{uri}/{GOOD}", good_batch(7))
    assert ok.code == Code.CHANGED
    assert IngestAck.from_cbor(ok.payload).new == 1
    assert [r.seq for r in await server.records(GOOD)] == [7]
    assert [r.getMessage()[:100] for r in caplog.records if r.exc_info] == []


@pytest.mark.parametrize(
    "value",
    [
        cbor2.dumps(2**1100),
        cbor2.dumps(2**15000),
        cbor2.dumps(-(2**1100)),
        CYCLIC_MAP,
        cbor2.dumps({"result": {"n": 2**15000}}),
    ],
    ids=["bignum", "bignum_2e15000", "negative_bignum", "cyclic_map", "nested_bignum"],
)
async def test_attack_hostile_reported_value_gets_4_00_and_nothing_is_stored(
    server: CloudServer, client: aiocoap.Context, caplog: pytest.LogCaptureFixture, value: bytes
) -> None:
    caplog.set_level(logging.INFO)
    uri = f"{server.uri}/state/{EVIL}/reported"
    doc = b"\xa2" + cbor2.dumps("agent/version") + b"\x82" + cbor2.dumps(10) + value
    doc += cbor2.dumps("queue/depth") + cbor2.dumps([10, 3])
    response = await send(client, Code.PUT, uri, doc, 60)
    assert response.code == Code.BAD_REQUEST, response.payload
    assert await server.reported(EVIL) == {}
    good = cbor2.dumps({"queue/depth": [11, 2**64 - 1]})  # the widest integer is kept
    assert (await send(client, Code.PUT, uri, good, 60)).code == Code.CHANGED
    assert (await server.reported(EVIL))["queue/depth"].value == 2**64 - 1
    assert [r.getMessage()[:100] for r in caplog.records if r.exc_info] == []
