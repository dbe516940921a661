"""Attack: candidate eviction. Anyone who knows a device's OSCORE key id (4 bytes, in clear in
every request) can send the endpoint requests with that key id and ID Contexts of its own
choosing; the endpoint derives a candidate context for each before it can authenticate it, and
keeps only a few. A device that lost its OSCORE state (reflash) comes back with a new ID
Context, gets 4.01 + Echo, and repeats its request with the Echo: forged datagrams that arrive
in between must not keep that repetition from being accepted (docs/security.md, "OSCORE contexts
without nonce reuse", point 3).

A real endpoint on loopback, the agent's real transport and OSCORE context, a UDP relay in
between that holds the endpoint's 4.01 until the forged datagrams were all answered, so they
always come between the device's first request and its repetition (no timing involved)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiocoap import Message

from agent.wire.batch import CF_CBOR, CF_SENML_CBOR
from cloud.security import MAX_CANDIDATES
from cloud.server import CloudServer
from tests.e2e.test_security import A, Principal, batch

#: Forged datagrams sent between the 4.01 and the device's repetition, in bursts (each burst
#: answered before the next is sent, so the endpoint's receive buffer never drops one).
FORGED = 64 * MAX_CANDIDATES
BURST = 32


def forged(kid: bytes, mid: int) -> bytes:
    """A confirmable POST with an OSCORE option naming ``kid``, a random ID Context and Partial
    IV, and a random ciphertext: what anyone can send who saw one of the device's requests."""
    piv, id_context = os.urandom(2), os.urandom(8)
    value = bytes([0x18 | len(piv)]) + piv + bytes([len(id_context)]) + id_context + kid
    assert 13 <= len(value) < 269
    head = bytes([0x40, 0x02, mid >> 8, mid & 0xFF])  # version 1, CON, no token, POST
    option = bytes([(9 << 4) | 13, len(value) - 13])  # OSCORE (9), extended length
    return head + option + value + b"\xff" + os.urandom(24)


class Interposer:
    """A UDP relay between the device and the endpoint. After :meth:`arm`, the first datagram
    the endpoint sends back (the 4.01 + Echo to the device's first request under a new ID
    Context) and everything after it is held until :data:`FORGED` forged datagrams with the
    device's key id were sent to the endpoint from another socket and answered."""

    def __init__(self, target: tuple[str, int], kid: bytes) -> None:
        self.target, self.kid = target, kid
        self.port = 0
        self.armed = False
        self.holding = False
        self.held: list[tuple[bytes, tuple[str, int]]] = []
        self.forged_answers: list[bytes] = []
        self.requests = 0  # datagrams from the device
        self.requests_at_release = 0  # ... by the time it was passed on
        self._front: asyncio.DatagramTransport | None = None
        self._ups: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        relay = self

        class Front(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                relay.requests += 1
                relay._spawn(relay._up(data, addr))

        self._front, _ = await loop.create_datagram_endpoint(Front, local_addr=("127.0.0.1", 0))
        self.port = self._front.get_extra_info("sockname")[1]

    def arm(self) -> None:
        self.armed = True

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _up(self, data: bytes, addr: tuple[str, int]) -> None:
        up = self._ups.get(addr)
        if up is None:
            relay = self

            class Up(asyncio.DatagramProtocol):
                def datagram_received(self, answer: bytes, _src: tuple[str, int]) -> None:
                    relay._down(answer, addr)

            up, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                Up, remote_addr=self.target
            )
            self._ups[addr] = up
        up.sendto(data)

    def _down(self, answer: bytes, addr: tuple[str, int]) -> None:
        assert self._front is not None
        if self.armed:
            self.armed, self.holding = False, True
            self.held.append((answer, addr))
            self._spawn(self._flood_then_release())
        elif self.holding:
            self.held.append((answer, addr))
        else:
            self._front.sendto(answer, addr)

    async def _flood_then_release(self) -> None:
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        class Attacker(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, _src: tuple[str, int]) -> None:
                answers.put_nowait(data)

        attacker, _ = await loop.create_datagram_endpoint(Attacker, remote_addr=self.target)
        try:
            for start in range(0, FORGED, BURST):
                for mid in range(start, start + BURST):
                    attacker.sendto(forged(self.kid, mid))
                for _ in range(BURST):  # every forged datagram is answered (4.00) before the next
                    async with asyncio.timeout(20):
                        self.forged_answers.append(await answers.get())
        finally:
            attacker.close()
            assert self._front is not None
            self.holding = False
            self.requests_at_release = self.requests
            for answer, addr in self.held:
                self._front.sendto(answer, addr)
            self.held.clear()

    def close(self) -> None:
        for up in self._ups.values():
            up.close()
        if self._front is not None:
            self._front.close()


#: (method, path, payload, content format, the code that shows the repetition was accepted):
#: ingest is answered by the endpoint's short way (cloud/fastpath.py), GET by aiocoap, and a
#: POST to /logs is unprotected by the short way and handed on to aiocoap with its Echo (an
#: empty CBOR map is no log upload: a protected 4.00, not a 4.01).
REQUESTS = [
    ("POST", f"ingest/{A}", batch(A, range(3, 5)), CF_SENML_CBOR, "2.04"),
    ("GET", f"devices/{A}", b"", None, "2.05"),
    ("POST", f"logs/{A}", b"\xa0", CF_CBOR, "4.00"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method,path,payload,cf,code", REQUESTS, ids=["ingest", "get", "logs"])
async def test_forged_key_id_datagrams_between_4_01_and_echo_do_not_lock_out_a_reflashed_device(
    server: CloudServer,
    tmp_path: Path,
    method: str,
    path: str,
    payload: bytes,
    cf: int | None,
    code: str,
) -> None:
    cred = await server.register(A)
    relay = Interposer(("127.0.0.1", server.port), cred.sender_id)
    await relay.start()
    # the device's side (test_security.py's), talking to the endpoint through the relay
    through = SimpleNamespace(uri=f"coap://127.0.0.1:{relay.port}")
    device = Principal(through, tmp_path, A)  # type: ignore[arg-type]
    cred.write(device.dir / "credential.json")
    try:
        device.connect()
        first = await device.req("POST", f"ingest/{A}", batch(A, range(1, 3)), CF_SENML_CBOR)
        assert first.dotted == "2.04"
        await device.close()

        (device.dir / "oscore.json").unlink()  # reflashed: its next start picks a new ID Context
        device.connect()
        relay.arm()
        resp = await device.req(method, path, payload, cf)
        assert resp.dotted == code, resp  # not 4.01: the repetition with the Echo was accepted
        # the forged datagrams all reached the endpoint and were refused, between the 4.01 and
        # the repetition with the Echo (the relay held the 4.01 until they were answered)
        assert len(relay.forged_answers) == FORGED
        assert {Message.decode(a).code.dotted[0] for a in relay.forged_answers} == {"4"}
        assert relay.requests > relay.requests_at_release  # the repetition came after them
        again = await device.req("POST", f"ingest/{A}", batch(A, range(5, 7)), CF_SENML_CBOR)
        assert again.dotted == "2.04" and again.attempts == 1  # the new context is the context
        assert {1, 2, 5, 6} <= set(await server.seqs(A))
    finally:
        await device.close()
        relay.close()
