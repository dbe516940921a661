"""Block1 upload slots (docs/protocol.md "Limits and timing"): one device cannot hold the
endpoint's uploads in progress. Real endpoint (OSCORE), each device with its own credential."""

from __future__ import annotations

import asyncio
import hashlib
import types
from pathlib import Path

import aiocoap
import pytest
from aiocoap.optiontypes import BlockOption

from agent.wire import records
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


async def read_block(
    p: Principal, tag: int | None, number: int, path: str | None = None
) -> aiocoap.Message:
    """Block ``number`` (64 bytes) of ``path`` (the device's reported state), told apart by
    Request-Tag ``tag`` (None: none)."""
    assert p.transport is not None
    ctx = await p.transport._context(0)
    path = path or f"state/{p.name}/reported"
    m = aiocoap.Message(code=aiocoap.GET, uri=f"{p.server.uri}/{path}")
    m.opt.block2 = BlockOption.BlockwiseTuple(number, False, 2)
    if tag is not None:
        m.opt.request_tag = [tag.to_bytes(2, "big")]
    return await asyncio.wait_for(ctx.request(m, handle_blockwise=False).response, 20)


@pytest.mark.timeout(60)
async def test_one_device_cannot_make_the_endpoint_hold_its_answers_without_bound(
    tmp_path: Path,
) -> None:
    """Attack: an answer larger than a block was kept whole by aiocoap (its Block2Cache) for
    93 to 186 s, for every request that differed in an elective option, without any bound: a
    device that made its reported state large (256 keys of up to 8 KiB each: 2 MiB) and asked
    for it again and again with a new Request-Tag made the endpoint hold every copy. Now at
    most ``responses_per_peer`` answers of one principal are held (its oldest goes first) and
    ``held_responses`` in all; another device's answer stays."""
    limits = Limits(held_responses=6, responses_per_peer=4)
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, limits=limits)
    a = await Principal(server, tmp_path, A).open()
    b = await Principal(server, tmp_path, B).open()
    try:
        for p in (a, b):
            big = records.dumps({f"note/{i}": [1, "x" * 200] for i in range(4)})
            assert (await p.req("PUT", f"state/{p.name}/reported", big, 60)).dotted == "2.04"
        assert str((await read_block(b, 0, 0)).code) == "2.05 Content"
        firsts = [await read_block(a, tag, 0) for tag in range(6)]
        assert all(m.opt.block2 is not None and m.opt.block2.more for m in firsts)
        # its two oldest answers were let go: the client starts over (RFC 7959 2.9.2: 4.08)
        assert str((await read_block(a, 0, 1)).code) == "4.08 Request Entity Incomplete"
        assert str((await read_block(a, 5, 1)).code) == "2.05 Content"
        assert str((await read_block(b, 0, 1)).code) == "2.05 Content"
    finally:
        await a.close()
        await b.close()
        await server.stop()


@pytest.mark.timeout(60)
async def test_a_block2_transfer_slower_than_93_s_in_all_is_served_to_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A held answer lives for 93 s after its last block was asked for, not after its first
    (aiocoap's Block2Cache refreshed it at every block too): a large answer fetched over a slow
    link, a block every 60 s here, is served to its end instead of 4.08 at the same block at
    every start over. The owner's answer in use is not the oldest to go either."""
    now = [1000.0]
    monkeypatch.setattr("cloud.protocol.time", types.SimpleNamespace(monotonic=lambda: now[0]))
    limits = Limits(held_responses=6, responses_per_peer=2)
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, limits=limits)
    a = await Principal(server, tmp_path, A).open()
    try:
        big = records.dumps({f"note/{i}": [1, "x" * 200] for i in range(4)})
        assert (await a.req("PUT", f"state/{a.name}/reported", big, 60)).dotted == "2.04"
        assert (await read_block(a, 0, 0)).opt.block2.more
        for number in (1, 2):
            now[0] += 60
            assert str((await read_block(a, 0, number)).code) == "2.05 Content"
        assert (await read_block(a, 1, 0)).opt.block2.more  # a second answer of the owner's
        assert str((await read_block(a, 0, 3)).code) == "2.05 Content"
        assert (await read_block(a, 2, 0)).opt.block2.more  # a third: the least used one goes
        assert str((await read_block(a, 0, 4)).code) == "2.05 Content"
        assert str((await read_block(a, 1, 1)).code) == "4.08 Request Entity Incomplete"
    finally:
        await a.close()
        await server.stop()


async def read_masters_block(p: Principal, sha: str, number: int) -> aiocoap.Message:
    """Block ``number`` (64 bytes) of the masters named ``sha``."""
    return await read_block(p, None, number, f"learn/masters/{sha}")


@pytest.mark.timeout(60)
async def test_a_rounds_masters_fetched_by_more_devices_than_answers_are_held(
    tmp_path: Path,
) -> None:
    """A round's masters are fetched by every device of the round at once (their desired state
    names them in the same moment). Held once per device as any large answer, more devices than
    ``held_responses`` made the endpoint let go of the earlier ones' copies: their next block
    was 4.08, and so was every start over that other devices' fetches overtook. The masters are
    named by their SHA-256 and never change, so every block is served from them as they are
    stored, whoever fetched before."""
    limits = Limits(held_responses=1, responses_per_peer=1)
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, limits=limits)
    a = await Principal(server, tmp_path, A).open()
    b = await Principal(server, tmp_path, B).open()
    blob = bytes(range(256)) * 2
    sha = hashlib.sha256(blob).hexdigest()
    try:
        await server.db(lambda s: s.put_learn_blob(sha, blob))
        got = {}
        for p in (a, b):
            first = await read_masters_block(p, sha, 0)
            assert str(first.code) == "2.05 Content" and first.opt.block2.more
            got[p.name] = first.payload
        for number in range(1, 8):
            for p in (a, b):
                m = await read_masters_block(p, sha, number)
                assert str(m.code) == "2.05 Content"
                got[p.name] += m.payload
        assert got == {A: blob, B: blob}
    finally:
        await a.close()
        await b.close()
        await server.stop()
