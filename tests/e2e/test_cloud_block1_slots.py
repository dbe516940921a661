"""Block1 upload slots (docs/protocol.md "Limits and timing"): one device cannot hold the
endpoint's uploads in progress. Real endpoint (OSCORE), each device with its own credential."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiocoap
import pytest
from aiocoap.optiontypes import BlockOption

from agent.wire.batch import CF_SENML_CBOR
from cloud.server import CloudServer, Limits
from tests.e2e.test_security import Principal

A, B = "pump-01", "pump-02"


async def block0(p: Principal, path: str, tag: int) -> aiocoap.Message:
    """The first 64-byte block of an upload (more to come), told apart by its Request-Tag."""
    assert p.transport is not None
    ctx = await p.transport._context(0)
    m = aiocoap.Message(code=aiocoap.POST, uri=f"{p.server.uri}/{path}", payload=b"x" * 64)
    m.opt.content_format = CF_SENML_CBOR
    m.opt.block1 = BlockOption.BlockwiseTuple(0, True, 2)
    m.opt.request_tag = [tag.to_bytes(2, "big")]
    return await asyncio.wait_for(ctx.request(m, handle_blockwise=False).response, 20)


@pytest.mark.timeout(60)
async def test_one_device_cannot_hold_every_upload_slot(tmp_path: Path) -> None:
    """Attack (audit block1_slots.py): a device opened the 64 uploads in progress to paths it
    may not post to, so every other device's block-wise batch got 5.03. Now a path it may not
    post to is refused at block 0 (4.03, nothing spooled), and its own path holds at most
    ``uploads_per_peer`` uploads: another device still gets its slot."""
    limits = Limits(open_uploads=6, uploads_per_peer=4)
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, limits=limits)
    a = await Principal(server, tmp_path, A).open()
    b = await Principal(server, tmp_path, B).open()
    try:
        codes = {str((await block0(a, f"ingest/victim-{i}", i)).code) for i in range(8)}
        assert codes == {"4.03 Forbidden"}
        assert server.stats["block1_blocks"] == 0  # refused before the spool
        own = [str((await block0(a, f"ingest/{A}", i)).code) for i in range(5)]
        assert own == ["2.31 Continue"] * 4 + ["5.03 Service Unavailable"]
        assert str((await block0(b, f"ingest/{B}", 0)).code) == "2.31 Continue"
    finally:
        await a.close()
        await b.close()
        await server.stop()
