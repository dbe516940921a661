"""The size of an answer (agent/sync/transport.py, ``max_body``) against a real aiocoap server on
loopback that sends a large body block-wise (RFC 7959).

Attack: an endpoint that answers a GET with hundreds of megabytes. aiocoap's own block-wise
client reassembles the whole body before anything can look at it (copying it again for every
block); the transport follows Block2 itself and stops past ``max_body``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiocoap
import aiocoap.resource
import pytest
from aiocoap import Code, Message
from aiocoap.optiontypes import BlockOption

from agent.errors import SyncError
from agent.sync.transport import CoapTransport
from drivers.clock import RealClock
from tools.ports import free_port

pytestmark = pytest.mark.timeout(60)

SZX = 6  # 1024-byte blocks


class HugeBody(aiocoap.resource.Resource):
    """``size`` bytes served block by block; with ``size2`` the first block says the size."""

    def __init__(self, size: int, *, size2: bool) -> None:
        super().__init__()
        self.size = size
        self.size2 = size2
        self.blocks = 0

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return False  # this resource answers each block itself

    def body(self, start: int, n: int) -> bytes:
        return bytes((start + i) % 251 for i in range(min(n, self.size - start)))

    async def render_get(self, request: Message) -> Message:
        self.blocks += 1
        number = request.opt.block2.block_number if request.opt.block2 else 0
        size = 16 << SZX
        start = number * size
        more = start + size < self.size
        msg = Message(code=Code.CONTENT, payload=self.body(start, size))
        msg.opt.block2 = BlockOption.BlockwiseTuple(number, more, SZX)
        if self.size2 and number == 0:
            msg.opt.size2 = self.size
        return msg


class Plain(aiocoap.resource.Resource):
    """A large answer left to aiocoap's server, which sends it block-wise by itself."""

    payload = bytes(range(256)) * 12

    async def render_get(self, request: Message) -> Message:
        return Message(code=Code.CONTENT, payload=self.payload)


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, dict[str, aiocoap.resource.Resource]]]:
    resources = {
        "huge": HugeBody(200_000_000, size2=False),
        "huge-size2": HugeBody(200_000_000, size2=True),
        "small": HugeBody(5000, size2=False),
        "plain": Plain(),
    }
    site = aiocoap.resource.Site()
    for name, resource in resources.items():
        site.add_resource([name], resource)
    port = free_port()
    ctx = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", port), transports=["udp6"]
    )
    yield f"coap://127.0.0.1:{port}", resources
    await ctx.shutdown()


@pytest.fixture
async def transport() -> AsyncIterator[CoapTransport]:
    t = CoapTransport(RealClock(), uris=("coap://127.0.0.1:1",))
    yield t
    await t.close()


async def test_huge_body_without_size2_stops_past_max_body(server, transport) -> None:
    uri, resources = server
    with pytest.raises(SyncError, match="larger than 16384 bytes"):
        await transport.request("GET", f"{uri}/huge", deadline=20.0, max_body=16384)
    assert resources["huge"].blocks == 17  # 16 KiB, then one block past it


async def test_huge_body_with_size2_is_refused_at_the_first_block(server, transport) -> None:
    uri, resources = server
    with pytest.raises(SyncError, match="Size2 200000000"):
        await transport.request("GET", f"{uri}/huge-size2", deadline=20.0)  # the default cap
    assert resources["huge-size2"].blocks == 1


async def test_body_within_max_body_is_reassembled(server, transport) -> None:
    uri, resources = server
    resp = await transport.request("GET", f"{uri}/small", deadline=20.0)
    assert resp.payload == resources["small"].body(0, 5000) and resp.block2 is None
    assert resources["small"].blocks == 5
    resp = await transport.request("GET", f"{uri}/plain", deadline=20.0)
    assert resp.payload == Plain.payload and resp.block2 is None


async def test_one_block_asked_for_is_answered_as_it_is(server, transport) -> None:
    """What model downloads do (agent/modelstore/fetch.py): block by block, by hand."""
    uri, resources = server
    resp = await transport.request("GET", f"{uri}/huge", deadline=20.0, block2=(3, SZX))
    assert resp.block2 == (3, True, SZX)
    assert resp.payload == resources["huge"].body(3 * 1024, 1024)
