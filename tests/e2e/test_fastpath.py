"""The endpoint's short way for single-datagram OSCORE ingest (cloud/fastpath.py), against a real
endpoint on loopback, with raw UDP on the device's side so that every datagram is chosen by the
test: which requests it answers itself and which it leaves to aiocoap, duplicates, replays, a
tampered request, a request for another device's resource, a copy that arrives while its batch
is being committed."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator

import pytest
from aiocoap import Code, Message
from aiocoap.numbers.types import Type

from agent.wire import codec
from agent.wire.batch import IngestAck, WireRecord
from agent.wire.records import TelemetryBody
from cloud.fastpath import IngestFastPath
from cloud.server import CloudServer
from tools.fleetlib.device import OscoreSession

T0 = 1_700_000_000.0
A, B = "pump-01", "pump-02"
CF_COMPACT = 65001


def ingest(device: str, seqs: range) -> Message:
    recs = [
        WireRecord(
            s, "telemetry", T0 + s, TelemetryBody("motor", T0 + s, {"current_a": s}).to_cbor()
        )
        for s in seqs
    ]
    payload = codec.encode_batch(None, recs, CF_COMPACT, resolution=lambda _s, _c: 0.001)
    return Message(
        code=Code.POST, uri_path=("ingest", device), content_format=CF_COMPACT, payload=payload
    )


class RawDevice:
    """A device's OSCORE context and a UDP socket: each datagram built and sent by hand."""

    def __init__(self, server: CloudServer, session: OscoreSession) -> None:
        self.session = session
        self.addr = (server.host, server.port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(self.addr)
        self.mid = 100

    def protect(self, inner: Message, echo: bytes | None = None) -> tuple[bytes, object]:
        outer, request_id = self.session.protect(inner, echo)
        outer.mtype, outer.mid, outer.token = Type.CON, self.mid, self.mid.to_bytes(2, "big")
        self.mid += 1
        return outer.encode(), request_id

    async def send_raw(self, data: bytes) -> bytes:
        """Send one datagram; the answer's bytes."""
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, data)
        async with asyncio.timeout(20):
            return await loop.sock_recv(self.sock, 4096)

    async def send(self, data: bytes) -> Message:
        """Send one request; its response (a separate one after an empty ACK, as when the
        endpoint took longer than aiocoap's empty-ACK delay under load: :meth:`receive`)."""
        await asyncio.get_running_loop().sock_sendall(self.sock, data)
        return (await self.receive([Message.decode(data).token]))[0]

    async def receive(self, tokens: list[bytes]) -> list[Message]:
        """The responses with these tokens, in that order. An empty ACK announces a separate
        response (RFC 7252 5.2.2), which is awaited and acknowledged when confirmable."""
        loop = asyncio.get_running_loop()
        answers: dict[bytes, Message] = {}
        async with asyncio.timeout(20):
            while len(answers) < len(tokens):
                answer = Message.decode(await loop.sock_recv(self.sock, 4096))
                if answer.mtype == Type.CON:
                    ack = Message(mtype=Type.ACK, code=Code.EMPTY, mid=answer.mid)
                    await loop.sock_sendall(self.sock, ack.encode())
                if answer.code != Code.EMPTY:
                    answers[answer.token] = answer
        return [answers[t] for t in tokens]

    async def ask(self, inner: Message) -> Message:
        """Protect, send, open the answer (going through Echo first if the endpoint asks)."""
        data, request_id = self.protect(inner)
        answer = self.session.unprotect(await self.send(data), request_id)
        if answer.code == Code.UNAUTHORIZED and answer.opt.echo:
            data, request_id = self.protect(inner, answer.opt.echo)
            answer = self.session.unprotect(await self.send(data), request_id)
        return answer

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def dev(server: CloudServer) -> AsyncIterator[RawDevice]:
    """Device A, past its Echo round trip, records 1 and 2 stored (both by the short way)."""
    device = RawDevice(server, OscoreSession(await server.register(A)))
    try:
        first = await device.ask(ingest(A, range(1, 3)))
        assert first.code == Code.CHANGED
        yield device
    finally:
        device.close()


def short_way(server: CloudServer) -> IngestFastPath:
    assert server.fast_path is not None
    return server.fast_path


def tamper(data: bytes) -> bytes:
    """``data`` with a bit of its ciphertext (or tag) flipped, as on the way."""
    tampered = bytearray(data)
    tampered[-3] ^= 0x01
    return bytes(tampered)


def with_mid(data: bytes, mid: int) -> bytes:
    """The same datagram under another message ID (bytes 2 and 3 of the header)."""
    return data[:2] + (mid & 0xFFFF).to_bytes(2, "big") + data[4:]


def acked(answer: Message) -> list[int]:
    assert answer.code == Code.CHANGED, (answer.code, answer.payload)
    ack = IngestAck.from_cbor(answer.payload)
    return [s for first, last in ack.ranges for s in range(first, last + 1)]


@pytest.mark.timeout(60)
async def test_the_echo_round_trip_and_ingest_are_answered_by_the_short_way(
    server: CloudServer, dev: RawDevice
) -> None:
    fast = short_way(server)
    # the fixture's first request: 4.01 + Echo, then the request with the Echo, stored
    assert (fast.handled, fast.echoes, fast.handed_on) == (2, 1, 0)
    for n in range(3, 30, 3):
        assert acked(await dev.ask(ingest(A, range(n, n + 3)))) == [n, n + 1, n + 2]
    assert (fast.handled, fast.echoes, fast.handed_on) == (11, 1, 0)
    assert await server.seqs(A) == list(range(1, 30))
    stored = await server.records(A)
    assert TelemetryBody.from_cbor(stored[-1].body).values == {"current_a": 29}


@pytest.mark.timeout(60)
async def test_duplicate_datagram_gets_the_same_answer_and_is_stored_once(
    server: CloudServer, dev: RawDevice
) -> None:
    data, request_id = dev.protect(ingest(A, range(3, 6)))
    first = await dev.send_raw(data)
    again = await dev.send_raw(data)  # the same datagram: a retransmission of the exchange
    assert first == again
    assert acked(dev.session.unprotect(Message.decode(first), request_id)) == [3, 4, 5]
    assert short_way(server).duplicates == 1
    assert await server.seqs(A) == [1, 2, 3, 4, 5]


@pytest.mark.timeout(60)
async def test_replayed_request_under_a_new_message_id_is_refused(
    server: CloudServer, dev: RawDevice
) -> None:
    data, request_id = dev.protect(ingest(A, range(3, 6)))
    acked(dev.session.unprotect(await dev.send(data), request_id))
    answer = await dev.send(with_mid(data, dev.mid + 1000))  # an attacker's copy
    assert answer.code == Code.UNAUTHORIZED and answer.opt.oscore is None
    assert b"Replay" in answer.payload
    assert await server.seqs(A) == [1, 2, 3, 4, 5]


@pytest.mark.timeout(60)
async def test_requests_it_does_not_take_reach_aiocoap_with_their_sequence_number_unused(
    server: CloudServer, dev: RawDevice
) -> None:
    fast = short_way(server)
    handled, handed_on = fast.handled, fast.handed_on
    # a protected GET: unprotected here, put back, unprotected again by aiocoap
    desired = await dev.ask(Message(code=Code.GET, uri_path=("state", A, "desired")))
    assert desired.code == Code.CONTENT
    # Block1 inside: aiocoap's block-wise reassembly takes it
    big = ingest(A, range(3, 5))
    big.opt.block1 = (0, False, 6)
    assert (await dev.ask(big)).code == Code.CHANGED
    assert fast.handed_on == handed_on + 2
    assert fast.handled == handled
    assert acked(await dev.ask(ingest(A, range(5, 7)))) == [5, 6]
    assert fast.handled == handled + 1


@pytest.mark.timeout(60)
async def test_tampered_request_is_refused_and_does_not_burn_its_sequence_number(
    server: CloudServer, dev: RawDevice
) -> None:
    data, request_id = dev.protect(ingest(A, range(3, 6)))
    answer = await dev.send(tamper(data))
    assert answer.code == Code.BAD_REQUEST and answer.opt.oscore is None
    genuine = with_mid(data, dev.mid)  # the genuine request, sent again later
    dev.mid += 1
    assert acked(dev.session.unprotect(await dev.send(genuine), request_id)) == [3, 4, 5]
    assert await server.seqs(A) == [1, 2, 3, 4, 5]


@pytest.mark.timeout(60)
async def test_a_device_posting_to_another_devices_ingest_gets_4_03(
    server: CloudServer, dev: RawDevice
) -> None:
    await server.register(B)
    fast = short_way(server)
    handled = fast.handled
    answer = await dev.ask(ingest(B, range(1, 3)))
    assert answer.code == Code.FORBIDDEN
    assert fast.handled == handled + 1
    assert await server.seqs(B) == []


@pytest.mark.timeout(60)
async def test_copy_arriving_while_the_batch_commits_is_dropped_and_answered_once(
    server: CloudServer, dev: RawDevice
) -> None:
    release = threading.Event()
    try:
        # hold the storage thread: the next batch waits for its commit
        held = asyncio.ensure_future(server.db(lambda _s: release.wait(20)))
        data, request_id = dev.protect(ingest(A, range(3, 6)))
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(dev.sock, data)
        await loop.sock_sendall(dev.sock, data)  # the device retransmits before any answer
        fast = short_way(server)
        handled = fast.handled
        for _ in range(2000):  # the endpoint's loop reads both copies (this loop is its loop)
            if fast.duplicates:
                break
            await asyncio.sleep(0.01)
        assert fast.duplicates == 1
        assert fast.handled == handled  # nothing answered while the commit waits
        release.set()
        await held
        async with asyncio.timeout(20):
            answer = Message.decode(await loop.sock_recv(dev.sock, 4096))
        assert acked(dev.session.unprotect(answer, request_id)) == [3, 4, 5]
        assert fast.handled == handled + 1 and fast.duplicates == 1
        assert await server.seqs(A) == [1, 2, 3, 4, 5]
    finally:
        release.set()


@pytest.fixture
async def new(server: CloudServer) -> AsyncIterator[RawDevice]:
    """Device A before its first request: the endpoint has no replay window for it yet."""
    device = RawDevice(server, OscoreSession(await server.register(A)))
    try:
        yield device
    finally:
        device.close()


def challenge(dev: RawDevice, answer: Message, request_id: object) -> bytes:
    """The Echo value of a protected 4.01 + Echo (RFC 9175)."""
    assert answer.mtype == Type.ACK and answer.opt.oscore is not None
    inner = dev.session.unprotect(answer, request_id)
    assert inner.code == Code.UNAUTHORIZED and inner.opt.echo
    return bytes(inner.opt.echo)


@pytest.mark.timeout(60)
async def test_copies_and_replays_of_the_first_request_get_the_same_challenge(
    server: CloudServer, new: RawDevice
) -> None:
    fast = short_way(server)
    data, request_id = new.protect(ingest(A, range(1, 3)))
    first = await new.send_raw(data)
    again = await new.send_raw(data)  # a retransmission before the device saw the answer
    replayed = await new.send_raw(with_mid(data, new.mid + 500))  # an attacker's copy
    assert first == again
    # the same answer, same sequence number (the OSCORE option), under the copy's message ID
    assert replayed == with_mid(first, new.mid + 500)
    echo = challenge(new, Message.decode(first), request_id)
    assert (fast.echoes, fast.duplicates) == (2, 1)  # the retransmission is a duplicate
    assert fast.remembered == 1  # the device's exchange; the replay's is not remembered
    data, request_id = new.protect(ingest(A, range(1, 3)), echo)
    answered = await new.send(data)
    assert acked(new.session.unprotect(answered, request_id)) == [1, 2]
    assert (fast.handled, fast.echoes, fast.handed_on) == (3, 2, 0)
    assert await server.seqs(A) == [1, 2]
    # the request that came with the Echo, replayed: the window refuses it (aiocoap's path)
    refused = await new.send(with_mid(data, new.mid + 600))
    assert refused.code == Code.UNAUTHORIZED and refused.opt.oscore is None
    assert b"Replay" in refused.payload
    assert await server.seqs(A) == [1, 2]


@pytest.mark.timeout(60)
async def test_a_wrong_echo_gets_a_new_challenge_and_stores_nothing(
    server: CloudServer, new: RawDevice
) -> None:
    fast = short_way(server)
    data, request_id = new.protect(ingest(A, range(1, 3)), b"\x00" * 8)
    echo = challenge(new, await new.send(data), request_id)
    assert echo != b"\x00" * 8
    assert await server.seqs(A) == []
    data, request_id = new.protect(ingest(A, range(1, 3)), echo)
    assert acked(new.session.unprotect(await new.send(data), request_id)) == [1, 2]
    assert (fast.echoes, fast.handed_on) == (1, 0)


@pytest.mark.timeout(60)
async def test_a_first_request_that_does_not_decrypt_gets_no_challenge(
    server: CloudServer, new: RawDevice
) -> None:
    fast = short_way(server)
    data, _ = new.protect(ingest(A, range(1, 3)))
    answer = await new.send(tamper(data))
    assert answer.code == Code.BAD_REQUEST and answer.opt.oscore is None  # aiocoap's refusal
    assert (fast.echoes, fast.handed_on) == (0, 1)
    # the window is still not initialised: a genuine request is challenged, then stored
    assert acked(await new.ask(ingest(A, range(1, 3)))) == [1, 2]
    assert (fast.echoes, fast.handed_on) == (1, 1)


@pytest.mark.timeout(60)
async def test_a_first_request_that_is_not_ingest_is_challenged_here_and_served_by_aiocoap(
    server: CloudServer, new: RawDevice
) -> None:
    fast = short_way(server)
    desired = await new.ask(Message(code=Code.GET, uri_path=("state", A, "desired")))
    assert desired.code == Code.CONTENT
    # the challenge here; the GET with the Echo left to aiocoap, which initialised the window
    # from it (the short way had put it back as not initialised)
    assert (fast.handled, fast.echoes, fast.handed_on) == (1, 1, 1)
    assert acked(await new.ask(ingest(A, range(1, 3)))) == [1, 2]
    assert (fast.handled, fast.echoes, fast.handed_on) == (2, 1, 1)  # no second challenge


@pytest.mark.timeout(60)
async def test_requests_after_one_left_to_aiocoap_with_the_echo_keep_their_order(
    server: CloudServer, new: RawDevice
) -> None:
    """A GET with the Echo goes to aiocoap, which unprotects it in a task; an ingest with the
    Echo that the endpoint reads before that task runs must not start the window above the
    GET's number (both datagrams are given to the endpoint in one step of its loop)."""
    fast = short_way(server)
    get = Message(code=Code.GET, uri_path=("state", A, "desired"))
    data, request_id = new.protect(get)
    echo = challenge(new, await new.send(data), request_id)
    first, get_id = new.protect(get, echo)
    second, ingest_id = new.protect(ingest(A, range(1, 3)), echo)
    host, port = new.sock.getsockname()
    peer = (f"::ffff:{host}", port, 0, 0)  # as the endpoint's IPv6 socket sees the device
    # IPV6_PKTINFO: the address the datagram came to (in6_pktinfo: address, interface index)
    to = socket.inet_pton(socket.AF_INET6, f"::ffff:{server.host}") + bytes(4)
    ancdata = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, to)]
    for datagram in (first, second):
        fast._datagram(datagram, ancdata, 0, peer)  # what the transport calls for each
    assert fast.handed_on == 2  # both to aiocoap, which unprotects them in order
    answers = await new.receive([Message.decode(first).token, Message.decode(second).token])
    assert new.session.unprotect(answers[0], get_id).code == Code.CONTENT
    assert acked(new.session.unprotect(answers[1], ingest_id)) == [1, 2]
    assert acked(await new.ask(ingest(A, range(3, 5)))) == [3, 4]
    assert fast.handed_on == 2  # the window is initialised: the short way again
