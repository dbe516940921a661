"""cloud/httpserve.py connection slots: a few idle TCP connections of one client cannot lock
operators out of the dashboard (audit http_slots.py). A real server on loopback; the attacker
connects from 127.0.0.2, the operator from 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloud import httpserve
from cloud.dashboard import tls_context
from cloud.httpserve import HttpServer, Request, Response
from tests.e2e.test_dashboard import self_signed


async def ok(request: Request) -> Response:
    return Response(200, b"ok")


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    srv = HttpServer(ok)
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.stop()


async def get(srv: HttpServer, source: str) -> str:
    r, w = await asyncio.open_connection(srv.host, srv.port, local_addr=(source, 0))
    w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await w.drain()
    line = await r.readline()
    w.close()
    return line.decode().strip()


@pytest.mark.timeout(30)
async def test_idle_connections_of_one_address_do_not_lock_out_another(
    server: HttpServer,
) -> None:
    """Attack: 32 idle connections (no byte sent) took every slot (32, global) and an
    operator's GET got 503. Now one address holds at most MAX_PER_CLIENT of them."""
    held = []
    for _ in range(32):
        held.append(
            await asyncio.open_connection(server.host, server.port, local_addr=("127.0.0.2", 0))
        )
    try:
        assert await get(server, "127.0.0.2") == "HTTP/1.1 503 Service Unavailable"
        assert await get(server, "127.0.0.1") == "HTTP/1.1 200 OK"
        # those beyond the address's share were answered 503 at once, the others 408 later
        answers = await asyncio.gather(*(r.read(12) for r, _ in held))
        refused = sum(a.startswith(b"HTTP/1.1 503") for a in answers)
        assert refused == 32 - httpserve.MAX_PER_CLIENT
    finally:
        for _, w in held:
            w.close()


@pytest.mark.timeout(30)
async def test_an_idle_connection_is_let_go_after_the_first_line_timeout(
    server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request line is due within FIRST_LINE_TIMEOUT, the head within HEAD_TIMEOUT: an
    idle connection gets 408 (here HEAD_TIMEOUT is longer than the test may run)."""
    monkeypatch.setattr(httpserve, "FIRST_LINE_TIMEOUT", 0.2)
    monkeypatch.setattr(httpserve, "HEAD_TIMEOUT", 600.0)
    r, w = await asyncio.open_connection(server.host, server.port)
    try:
        line = await r.readline()
        assert line.startswith(b"HTTP/1.1 408")
    finally:
        w.close()


@pytest.mark.timeout(30)
async def test_attack_idle_connections_that_never_start_tls_are_held_to_their_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack on the dashboard over TLS (the only one served on a network address): 32 idle
    TCP connections from one address, no ClientHello. The handshake ran before a connection was
    counted, so each held a socket for the whole handshake timeout, whatever MAX_PER_CLIENT and
    MAX_CONNECTIONS said (file descriptors without bound). Now the connections beyond the
    address's share are closed at once, and an operator elsewhere still gets in."""
    monkeypatch.setattr(httpserve, "HEAD_TIMEOUT", 600.0)  # longer than the test may run
    cert, key = self_signed(tmp_path)
    srv = HttpServer(ok)
    await srv.start("127.0.0.1", 0, tls_context(cert, key))
    held = []
    try:
        for _ in range(32):
            held.append(
                await asyncio.open_connection(srv.host, srv.port, local_addr=("127.0.0.2", 0))
            )
        reads = [asyncio.ensure_future(r.read(1)) for r, _ in held]
        done: set[asyncio.Future[bytes]] = set()
        while len(done) < 32 - httpserve.MAX_PER_CLIENT:
            finished, _ = await asyncio.wait(
                [t for t in reads if t not in done], return_when=asyncio.FIRST_COMPLETED
            )
            done |= finished
        assert all(t.result() == b"" for t in done)  # closed, nothing sent
        client = ssl.create_default_context(cafile=str(cert))
        client.check_hostname = False
        r, w = await asyncio.open_connection(
            srv.host, srv.port, ssl=client, local_addr=("127.0.0.1", 0)
        )
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await r.readline()).startswith(b"HTTP/1.1 200")
        w.close()
        for t in reads:
            t.cancel()
    finally:
        for _, w in held:
            w.close()
        await srv.stop()


@pytest.mark.timeout(30)
async def test_attack_a_client_that_never_reads_its_answer_does_not_keep_the_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attack: ask for a large answer and never read it. The server gave up after WRITE_TIMEOUT
    and stopped counting the connection, but closing it waited for the unsent answer to go, so
    the socket and the answer's bytes were held for as long as the peer kept its window shut:
    an address could hold any number of them beyond MAX_PER_CLIENT, one every WRITE_TIMEOUT per
    slot (the peer, reading once the server was done, still got the whole 16 MB answer). Now a
    connection whose answer is not taken in time is reset before its slot is given back."""
    monkeypatch.setattr(httpserve, "WRITE_TIMEOUT", 0.2)
    monkeypatch.setattr(httpserve, "LINGER", 0.1)
    body = b"x" * (16 << 20)  # more than the sockets' buffers hold
    asked = asyncio.Event()

    async def large(request: Request) -> Response:
        asked.set()
        return Response(200, body)

    srv = HttpServer(large)
    await srv.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (srv.host, srv.port))
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(asked.wait(), 10)
        await asyncio.gather(*srv._tasks)  # the server is done with the connection
        assert srv._open == 0
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := await loop.sock_recv(sock, 1 << 20):
                received += len(chunk)
        assert received < len(body)
    finally:
        sock.close()
        await srv.stop()
