"""A DTLS-PSK client driven by hand, for tests of the endpoint's DTLS bounds: tinydtls (through
DTLSSocket) on its own UDP socket, pumped from the test's event loop. Unlike aiocoap's client it
never makes a new handshake by itself, so a test sees whether the endpoint kept its session."""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
from collections.abc import Callable
from typing import Any

import aiocoap

CONNECTED = (0, 0x01DE)  # tinydtls's DTLS_EVENT_CONNECTED
_ids = itertools.count(1)


def client_hello(cookie: bytes = b"") -> bytes:
    """A DTLS 1.2 record (epoch 0) holding a ClientHello for TLS_PSK_WITH_AES_128_CCM_8 (RFC
    6347 4.2.1), with ``cookie``: what anyone can send with any source address."""
    body = (
        b"\xfe\xfd"
        + bytes(32)
        + b"\x00"
        + bytes([len(cookie)])
        + cookie
        + b"\x00\x02\xc0\xa8\x01\x00"
    )
    n = len(body).to_bytes(3, "big")
    handshake = b"\x01" + n + b"\x00\x00" + b"\x00\x00\x00" + n + body
    return (
        struct.pack("!BHH", 22, 0xFEFD, 0)
        + bytes(6)
        + struct.pack("!H", len(handshake))
        + handshake
    )


class RawClient:
    """``send_limit``: the client's writes after this many are not sent (2: ClientHello and the
    ClientHello with the cookie, then silence: a half-open handshake)."""

    def __init__(
        self,
        target: tuple[str, int],
        identity: bytes,
        psk: bytes,
        bind: tuple[str, int] = ("127.0.0.1", 0),
        send_limit: int | None = None,
    ) -> None:
        from DTLSSocket import dtls

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(bind)
        self.sock.connect(target)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()
        self.send_limit = send_limit
        self.writes = 0
        self.events: list[tuple[int, int]] = []
        self.received: list[bytes] = []  # every datagram from the endpoint, as it came
        self._app: list[bytes] = []
        self._dtls: Any = dtls.DTLS(
            read=self._read,
            write=self._write,
            event=self._event,
            pskId=identity,
            pskStore={identity: psk},
        )
        self._session: Any = None

    def _read(self, _sender: Any, data: bytes) -> int:
        self._app.append(bytes(data))
        return len(data)

    def _write(self, _recipient: Any, data: bytes) -> int:
        self.writes += 1
        if self.send_limit is not None and self.writes > self.send_limit:
            return len(data)
        try:
            return self.sock.send(data)
        except OSError:
            return -1

    def _event(self, level: int, code: int) -> None:
        self.events.append((level, code))

    @property
    def connected(self) -> bool:
        return CONNECTED in self.events

    def start(self) -> None:
        """Send the ClientHello."""
        self._session = self._dtls.connect("::1", 1234)

    def pump(self, handle: bool = True) -> int:
        """Read what has arrived; ``handle``: hand it to tinydtls (else only record it)."""
        n = 0
        while True:
            try:
                data = self.sock.recv(4096)
            except (BlockingIOError, OSError):
                return n
            self.received.append(data)
            n += 1
            if handle and self._session is not None:
                self._dtls.handleMessage(self._session, data)

    async def until(self, done: Callable[[], bool], within: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + within
        while not done() and loop.time() < end:
            self.pump()
            await asyncio.sleep(0.01)
        return done()

    async def handshake(self, within: float = 30.0) -> bool:
        self.start()
        return (
            await self.until(
                lambda: self.connected or any(level == 2 for level, _ in self.events), within
            )
            and self.connected
        )

    async def get(self, path: str, within: float = 3.0) -> str:
        """GET over the session: the answer's code, or "no answer"."""
        n = next(_ids)
        msg = aiocoap.Message(code=aiocoap.GET, uri_path=[p for p in path.split("/") if p])
        msg.mtype, msg.mid, msg.token = aiocoap.CON, n & 0xFFFF, n.to_bytes(4, "big")
        self._app.clear()
        self._dtls.write(self._session, msg.encode())
        if not await self.until(lambda: bool(self._app), within):
            return "no answer"
        return str(aiocoap.Message.decode(self._app[0]).code)

    def close(self) -> None:
        """Drop the session without a word (close_notify would end it at the endpoint)."""
        self.sock.close()
