"""aiocoap 0.4.17 races the agent's transport quiets: a response that arrives for a request given
up on in the same event loop step. Driven through aiocoap's real UDP transport and a raw UDP peer
on loopback: the answer waits in the socket while the loop is held, and the request's response
future is cancelled in the loop step that reads it, ahead of aiocoap's own cancellation callback
(what happens when a block-wise transfer is abandoned under load)."""

from __future__ import annotations

import asyncio
import logging
import select
import socket
from collections.abc import AsyncIterator, Callable

import aiocoap
import pytest
from aiocoap import Code, Message

from agent.sync.transport import CoapTransport
from drivers.clock import RealClock


@pytest.fixture
async def peer() -> AsyncIterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


@pytest.fixture
async def transport(peer: socket.socket) -> AsyncIterator[CoapTransport]:
    port = peer.getsockname()[1]
    t = CoapTransport(RealClock(), uris=(f"coap://127.0.0.1:{port}",))
    yield t
    await t.close()


async def answer(peer: socket.socket, payload: bytes) -> None:
    """The peer reads one request and answers it (piggybacked 2.05 with ``payload``)."""
    async with asyncio.timeout(5):
        data, addr = await asyncio.get_running_loop().sock_recvfrom(peer, 2048)
    asked = Message.decode(data)
    reply = Message(code=Code.CONTENT, payload=payload)
    reply.mtype, reply.mid, reply.token = aiocoap.ACK, asked.mid, asked.token
    peer.sendto(reply.encode(), addr)


async def answer_late(
    ctx: aiocoap.Context,
    peer: socket.socket,
    *,
    blockwise: bool,
    give_up: Callable[[asyncio.Future[Message]], None],
) -> None:
    """Send a GET to ``peer``; the peer answers; while the answer waits in the client's socket,
    ``give_up(response future)`` is scheduled so that it runs in the loop step that reads it."""
    port = peer.getsockname()[1]
    request = ctx.request(
        Message(code=Code.GET, uri=f"coap://127.0.0.1:{port}/state"), handle_blockwise=blockwise
    )
    await answer(peer, b"late")
    loop = asyncio.get_running_loop()
    loop.call_soon(give_up, request.response)
    # hold the loop until the answer is in the client's socket: it is read in give_up's step
    own = ctx.request_interfaces[0].token_interface.message_interface.transport
    readable, _, _ = select.select([own.get_extra_info("socket")], [], [], 5)
    assert readable, "the answer never reached the client's socket"
    await asyncio.sleep(0)
    await asyncio.sleep(0.05)  # the cancellation callbacks run


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()[:100]}" for r in caplog.records if r.exc_info]


async def test_a_block_request_answered_as_it_is_cancelled_leaves_no_traceback(
    transport: CoapTransport, peer: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.sync.transport")
    ctx = await transport._context(0)
    await answer_late(ctx, peer, blockwise=False, give_up=lambda response: response.cancel())
    assert tracebacks(caplog) == []
    debug = [r.getMessage() for r in caplog.records if r.name == "agent.sync.transport"]
    # aiocoap's UDP transport logs it, then raises it on into the loop's exception handler
    assert "event=coap_response_after_request_ended logger=coap" in debug
    assert "event=coap_request_ended_race error='InvalidStateError'" in debug


async def test_a_blockwise_response_assembled_as_it_is_cancelled_leaves_no_traceback(
    transport: CoapTransport, peer: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.sync.transport")
    ctx = await transport._context(0)
    loop = asyncio.get_running_loop()
    # one step later: after the block's answer woke nothing yet, before the runner assembles
    await answer_late(
        ctx,
        peer,
        blockwise=True,
        give_up=lambda response: loop.call_soon(response.cancel),
    )
    assert tracebacks(caplog) == []
    debug = [r.getMessage() for r in caplog.records if r.name == "agent.sync.transport"]
    assert "event=coap_response_after_request_ended logger=coap.blockwise-requester" in debug


async def test_the_context_still_serves_after_a_late_response(
    transport: CoapTransport, peer: socket.socket
) -> None:
    ctx = await transport._context(0)
    await answer_late(ctx, peer, blockwise=False, give_up=lambda response: response.cancel())
    port = peer.getsockname()[1]
    request = ctx.request(Message(code=Code.GET, uri=f"coap://127.0.0.1:{port}/state"))
    await answer(peer, b"on time")
    async with asyncio.timeout(5):
        assert (await request.response).payload == b"on time"


async def test_other_invalid_state_errors_are_still_logged_with_their_traceback(
    transport: CoapTransport, caplog: pytest.LogCaptureFixture
) -> None:
    await transport._context(0)  # the filters are installed
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)

    def _run() -> None:  # the name alone does not match: the frame is not aiocoap's
        done.set_result(None)

    asyncio.get_running_loop().call_soon(_run)
    await asyncio.sleep(0)
    logging.getLogger("coap").error("not a race", exc_info=ValueError("other"))
    try:
        done.set_result(None)
    except asyncio.InvalidStateError as error:
        logging.getLogger("coap.blockwise-requester").error("elsewhere", exc_info=error)
    assert [r.name for r in caplog.records if r.exc_info] == [
        "asyncio",
        "coap",
        "coap.blockwise-requester",
    ]


def test_a_response_to_a_request_that_ended_is_one_debug_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiocoap warns (no traceback) when a response reaches the pipe of a request that already
    ended: the agent cancelled it at a stop as the answer arrived (seen once in the demo's
    stderr). Driven through aiocoap's own Pipe; another warning of that logger still shows."""
    from aiocoap.pipe import Pipe

    from agent.sync.transport import _LateResponseFilter

    _LateResponseFilter.install()
    coap = logging.getLogger("coap")
    pipe = Pipe(Message(code=Code.POST, uri="coap://127.0.0.1/records"), coap)
    pipe.add_response(Message(code=Code.CHANGED), is_last=True)  # answered: the pipe ends
    with caplog.at_level(logging.DEBUG):
        pipe.add_response(Message(code=Code.CHANGED), is_last=True)  # a late second answer
        coap.warning("another warning %s", "shows")
    shown = [r for r in caplog.records if r.name == "coap"]
    assert [r.getMessage() for r in shown] == ["another warning shows"]
    assert any("coap_response_after_request_ended" in r.getMessage() for r in caplog.records)
