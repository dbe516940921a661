"""Interop with CoAP implementations we did not write: libcoap's coap-client (Debian's
libcoap3-bin) and aiocoap's stock client, against the endpoint on loopback."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap import Code, Message

from agent.wire.batch import IngestAck, WireRecord
from agent.wire.codec import content_formats, encode_batch
from agent.wire.records import EventBody, TelemetryBody
from agent.wire.statedoc import DesiredDoc
from cloud.server import CloudServer

COAP_CLIENT = "/usr/bin/coap-client-notls"
DEVICE = "rig-7"
T0 = 1_700_000_000.0

needs_libcoap = pytest.mark.skipif(
    shutil.which(COAP_CLIENT) is None,
    reason=f"{COAP_CLIENT} not found: install Debian's libcoap3-bin (./tools/dev bootstrap does)",
)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CloudServer]:
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await srv.add_device(DEVICE)
    yield srv
    await srv.stop()


async def coap_client(*args: str) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        COAP_CLIENT,
        "-B",
        "15",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    return proc.returncode or 0, out + err


@needs_libcoap
async def test_coap_client_posts_a_batch_block_wise(server: CloudServer, tmp_path: Path) -> None:
    records = [
        WireRecord(
            seq,
            "telemetry",
            T0 + seq,
            TelemetryBody("vib_motor", T0 + seq, {"vibration_rms_g": 0.01 * seq}).to_cbor(),
        )
        for seq in range(1, 21)
    ]
    batch = encode_batch(DEVICE, records)
    (tmp_path / "batch.cbor").write_bytes(batch)
    out = tmp_path / "ack.cbor"
    rc, text = await coap_client(
        "-m",
        "post",
        "-b",
        "64",
        "-t",
        "112",
        "-f",
        str(tmp_path / "batch.cbor"),
        "-o",
        str(out),
        f"{server.uri}/ingest/{DEVICE}",
    )
    assert rc == 0, text
    assert IngestAck.from_cbor(out.read_bytes()) == IngestAck(((1, 20),), new=20, duplicate=0)
    assert server.stats["block1_blocks"] == -(-len(batch) // 64)  # really in 64-byte blocks
    stored = await server.records(DEVICE)
    assert [(r.seq, r.body) for r in stored] == [(r.seq, r.body) for r in records]


@needs_libcoap
async def test_coap_client_gets_desired_state_and_discovery(
    server: CloudServer, tmp_path: Path
) -> None:
    await server.set_desired(DEVICE, {"sensor/vib_motor/interval": 0.25})
    out = tmp_path / "desired.cbor"
    rc, text = await coap_client(
        "-m", "get", "-o", str(out), f"{server.uri}/state/{DEVICE}/desired"
    )
    assert rc == 0, text
    doc = DesiredDoc.from_cbor(out.read_bytes())
    assert doc.rev == 1
    assert doc.entries["sensor/vib_motor/interval"].value == 0.25

    wkc = tmp_path / "core.txt"
    rc, text = await coap_client("-m", "get", "-o", str(wkc), f"{server.uri}/.well-known/core")
    assert rc == 0, text
    links = wkc.read_text().strip().split(",")
    formats = " ".join(str(cf) for cf in content_formats())  # 112 and the compact encodings
    assert f'</ingest/{DEVICE}>;rt="edge-agent.ingest";ct="{formats}"' in links
    assert f'</state/{DEVICE}/desired>;rt="edge-agent.state.desired";ct=60;obs' in links

    rc, text = await coap_client(
        "-m", "get", "-o", str(wkc), f"{server.uri}/.well-known/core?rt=edge-agent.state.*"
    )
    assert rc == 0, text
    filtered = wkc.read_text().strip().split(",")
    assert sorted(filtered) == sorted(
        [
            f'</state/{DEVICE}/reported>;rt="edge-agent.state.reported";ct=60',
            f'</state/{DEVICE}/desired>;rt="edge-agent.state.desired";ct=60;obs',
        ]
    )


@needs_libcoap
async def test_coap_client_gets_a_clear_404(server: CloudServer) -> None:
    _, text = await coap_client("-m", "get", f"{server.uri}/state/nobody/desired")
    assert b"4.04" in text


async def test_aiocoap_stock_client(server: CloudServer) -> None:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        async with asyncio.timeout(20):
            wkc = await ctx.request(
                Message(code=Code.GET, uri=f"{server.uri}/.well-known/core")
            ).response
            assert wkc.code == Code.CONTENT and wkc.opt.content_format == 40
            assert f"</devices/{DEVICE}>" in wkc.payload.decode()

            body = EventBody(T0, {"what": "sensor_recovered", "sensor": "motor"}).to_cbor()
            post = Message(
                code=Code.POST,
                uri=f"{server.uri}/ingest/{DEVICE}",
                payload=encode_batch(DEVICE, [WireRecord(1, "event", T0, body)]),
                content_format=112,
            )
            ack = await ctx.request(post).response
            assert ack.code == Code.CHANGED
            assert IngestAck.from_cbor(ack.payload).new == 1

            put = Message(
                code=Code.PUT,
                uri=f"{server.uri}/state/{DEVICE}/reported",
                payload=cbor2.dumps({"agent/version": [1, "0.1.0"], "queue/depth": [1, 0]}),
                content_format=60,
            )
            response = await ctx.request(put).response
            assert response.code == Code.CHANGED
            assert cbor2.loads(response.payload) == {"agent/version": 1, "queue/depth": 1}

            entry = await ctx.request(
                Message(code=Code.GET, uri=f"{server.uri}/devices/{DEVICE}")
            ).response
            assert cbor2.loads(entry.payload)["records"] == 1
    finally:
        await ctx.shutdown()
