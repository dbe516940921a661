"""`edge-agent-cloud serve` as a process: it listens, serves, and stops cleanly on SIGTERM; and
a second endpoint on a port in use is refused instead of sharing the port."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import aiocoap
import pytest
from aiocoap import Code, Message

from agent.sync.security import ClientSecurity
from agent.sync.transport import CoapTransport
from agent.wire.batch import IngestAck, WireRecord
from agent.wire.codec import encode_batch
from agent.wire.records import AlertBody
from cloud.server import CloudServer
from cloud.storage import SQLiteStorage
from drivers.clock import RealClock

ROOT = Path(__file__).resolve().parents[2]


async def test_serve_process(tmp_path: Path) -> None:
    """The endpoint as a process, secure by default: a registered device posts over OSCORE with
    the credential `devices add` wrote; the same batch in plain CoAP is refused (4.01)."""
    data = tmp_path / "data"
    cred = tmp_path / "device" / "credential.json"
    add = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "cloud.cli", "devices", "add", "--data", str(data), "pump-01"),
        *("--credential-out", str(cred)),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
    )
    assert await add.wait() == 0
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cloud.cli",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data",
        str(data),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    transport = security = None
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
        match = re.search(r"listening on (coap://\S+),", line)
        assert match, line
        uri = match.group(1)
        body = AlertBody(1.7e9, {"score": 1.0}).to_cbor()
        payload = encode_batch("pump-01", [WireRecord(7, "alert", 1.7e9, body)])
        request = Message(
            code=Code.POST, uri=f"{uri}/ingest/pump-01", payload=payload, content_format=112
        )
        async with asyncio.timeout(10):
            response = await ctx.request(request).response
        assert response.code == Code.UNAUTHORIZED
        security = ClientSecurity.open("oscore", (uri,), cred, tmp_path / "device" / "oscore.json")
        transport = CoapTransport(RealClock(), uris=(uri,), security=security)
        answer = await transport.request(
            "POST", f"{uri}/ingest/pump-01", payload, content_format=112, deadline=20
        )
        assert answer.dotted == "2.04"
        assert IngestAck.from_cbor(answer.payload).ranges == ((7, 7),)
    finally:
        await ctx.shutdown()
        if transport is not None:
            await transport.close()
        if security is not None:
            security.close()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert b"event=stopped" in err
    storage = SQLiteStorage.in_dir(data)
    try:
        assert storage.seqs("pump-01") == [7]
    finally:
        storage.close()


async def test_a_second_endpoint_on_a_port_in_use_is_refused(tmp_path: Path) -> None:
    first = await CloudServer.start(tmp_path / "a", "127.0.0.1", 0, allow_plain=True)
    try:
        with pytest.raises(OSError, match="in use"):
            await CloudServer.start(tmp_path / "b", "127.0.0.1", first.port, allow_plain=True)
    finally:
        await first.stop()
