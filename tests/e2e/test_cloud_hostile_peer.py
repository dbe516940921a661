"""A peer that attacks the endpoint's log and its state merge (cloud/server.py, agent/logsetup.py):
a Uri-Path that forges log lines, a reported value the merge cannot keep. Each is answered 4.xx
with one log line of the endpoint's own, and the endpoint goes on."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap import Code, Message

from agent import logsetup
from agent.wire import records, statedoc
from cloud.server import CloudServer
from tests.e2e import older_endpoint
from tests.e2e.test_security import Principal

DEVICE = "pump-01"
OSC52 = "\x1b]52;c;cm0gLXJmIH4K\x07"  # writes "rm -rf ~" to the clipboard of who reads the log
FORGED = (
    "x\n2026-12-06 15:30:00,000 level=INFO logger=cloud.server "
    f"event=credential_revoked principal=op1\n{OSC52}\u202e"
)


@pytest.mark.timeout(60)
async def test_an_unauthenticated_peer_cannot_forge_lines_in_the_endpoint_log(
    server: CloudServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack: a client without a credential sends a GET whose Uri-Path segment holds a newline,
    a whole forged log line, an OSC 52 sequence and a right-to-left override. The endpoint's
    warning about it is one line: the path is logged with %r, and the log's formatter
    (agent/logsetup.py) escapes whatever control character would still be in a record."""
    caplog.set_level(logging.WARNING, logger="cloud.server")
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        msg = Message(code=Code.GET, uri=f"{server.uri}/")
        msg.opt.uri_path = ("ingest", "a", FORGED)
        async with asyncio.timeout(20):
            answer = await ctx.request(msg).response
    finally:
        await ctx.shutdown()
    assert answer.code == Code.NOT_FOUND, answer
    warned = [r for r in caplog.records if "event=bad_request" in r.getMessage()]
    assert len(warned) == 1
    message = warned[0].getMessage()
    assert "\n" not in message and "\x1b" not in message and "\u202e" not in message
    assert "principal=op1\\n\\x1b]52;c;cm0gLXJmIH4K\\x07" in message  # shown, not acted on
    line = logsetup.Formatter().format(warned[0])
    assert "\n" not in line and "\x1b" not in line and "\u202e" not in line
    assert [r for r in caplog.records if r.exc_info] == []


def _cyclic_reported(version: int) -> bytes:
    """``{"foo/cyc": [version, 28({"kind": "x", "self": 29(0)})]}``: CBOR value sharing makes a
    map that holds itself."""
    shared = (
        bytes([0xD8, 0x1C, 0xA2])
        + cbor2.dumps("kind")
        + cbor2.dumps("x")
        + cbor2.dumps("self")
        + bytes([0xD8, 0x1D, 0x00])
    )
    return bytes([0xA1]) + cbor2.dumps("foo/cyc") + bytes([0x82]) + cbor2.dumps(version) + shared


@pytest.mark.timeout(60)
async def test_a_reported_value_the_merge_cannot_keep_is_4_00_not_a_traceback(
    server: CloudServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack: a device reports a value that holds itself (CBOR tags 28/29). The endpoint
    answers 4.00 with the reason and logs one warning line, no traceback; nothing of it is
    kept and the device's next, well-formed PUT is taken."""
    caplog.set_level(logging.WARNING)
    device = await Principal(server, tmp_path, DEVICE).open()
    version = int(time.time() * 1000)
    try:
        resp = await device.req("PUT", f"state/{DEVICE}/reported", _cyclic_reported(version), 60)
        assert resp.dotted == "4.00", (resp.dotted, resp.payload)
        good = records.dumps({"queue/depth": [version + 1, 3]})
        resp = await device.req("PUT", f"state/{DEVICE}/reported", good, 60)
        assert resp.dotted == "2.04", resp.payload
    finally:
        await device.close()
    reported = await server.reported(DEVICE)
    assert "foo/cyc" not in reported and reported["queue/depth"].value == 3
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert server.responses["5.00 Internal Server Error"] == 0
    assert len([r for r in caplog.records if "event=bad_request" in r.getMessage()]) == 1


@pytest.mark.timeout(60)
async def test_a_reported_value_an_older_endpoint_kept_is_replaced_not_an_error_for_ever(
    server: CloudServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bignum an older endpoint stored as a reported value (its decoder took it; this one
    refuses such a value): the device's next report of that key is stored (2.04), not 5.00 at
    every report for ever, and the keys around it read as before."""
    caplog.set_level(logging.WARNING)
    assert server.data_dir is not None
    device = await Principal(server, tmp_path, DEVICE).open()
    try:
        older_endpoint.put_reported(
            server.data_dir, DEVICE, {"queue/depth": 2**1100, "foo/big": 2**1100}, 1.0
        )
        version = int(time.time() * 1000)
        good = records.dumps({"queue/depth": [version, 3]})
        resp = await device.req("PUT", f"state/{DEVICE}/reported", good, 60)
        assert resp.dotted == "2.04", resp.payload
    finally:
        await device.close()
    reported = await server.reported(DEVICE)
    assert reported["queue/depth"].value == 3
    assert reported["foo/big"].value == statedoc.RawValue(cbor2.dumps(2**1100))
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert server.responses["5.00 Internal Server Error"] == 0
