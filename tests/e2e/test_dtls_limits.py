"""The endpoint's DTLS bounds (cloud/dtls.py, docs/dtls.md "Limits of aiocoap's DTLS server"),
against the real endpoint in-process and, for the agent's side, its real CoapTransport:

- retransmissions timed on tinydtls's clock, on both sides: aiocoap's own clock is made to look
  100 s old (as after 100 s of uptime), where the old scheduling spins (~10^5 wakeups a second);
- handshakes that time out, sessions that idle out (and the agent handshakes again, its
  observation ends with an error and is registered again);
- floods: junk from many new addresses, many addresses from one IP, a forged ClientHello.

No timing assertions: wakeups are counted, timeouts are driven through ``sweep(now)``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap.transports import tinydtls as aiocoap_tinydtls
from aiocoap.transports import tinydtls_server as aiocoap_tinydtls_server

from agent.errors import SyncError
from agent.sync import dtlsclient
from agent.sync.security import ClientSecurity
from agent.sync.statedata import StateSettings
from agent.sync.transport import CoapTransport
from agent.wire.credentials import Credential
from cloud import desired as desired_mod
from cloud import dtls as dtls_mod
from cloud.server import CloudServer
from drivers.clock import RealClock
from tests.e2e.dtls_peer import RawClient, client_hello

pytestmark = pytest.mark.timeout(60)

DEVICE, OTHER = "pump-01", "pump-02"
OWN = f"state/{DEVICE}/desired"
#: Far below the ~10^5 wakeups a second of the spin, far above a handful of retransmissions.
WAKEUP_BOUND = 1000


@pytest.fixture(autouse=True)
def dtlssocket() -> None:
    from aiocoap import defaults

    missing = defaults.dtls_missing_modules()
    if missing:
        pytest.fail(
            f"DTLS tests need the Python module(s) {', '.join(missing)}: run ./tools/dev setup",
            pytrace=False,
        )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CloudServer]:
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, dtls_listen=("127.0.0.1", 0))
    yield srv
    dtls = srv.dtls
    assert dtls is not None
    # the bounds' own counts agree with the transport's table
    assert dtls.peers == dtls.sessions + dtls.handshakes == sum(dtls._per_ip.values())
    await srv.stop()
    assert dtls.peers == 0


def target(server: CloudServer) -> tuple[str, int]:
    assert server.dtls is not None
    return ("127.0.0.1", server.dtls.port)


def peers_from(server: CloudServer, ip: str) -> int:
    """Peer states the transport holds for ``ip`` (read from its table, as any version has it)."""
    assert server.dtls is not None
    return sum(1 for key in server.dtls._table if key[0] == ip)


async def session(server: CloudServer, name: str = DEVICE, **kw: Any) -> RawClient:
    cred = server.principals.credential(name)
    client = RawClient(target(server), name.encode(), cred.psk, **kw)
    assert await client.handshake()
    assert await client.get(f"state/{name}/desired") == "2.05 Content"
    return client


async def flood(to: tuple[str, int], sources: list[str], data: bytes = client_hello()) -> None:
    """One datagram (a ClientHello: anything else from a new address makes no state) from each
    of ``sources`` (an IP address each, a new port each)."""
    for i, ip in enumerate(sources):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
            s.sendto(data, to)
        if i % 50 == 49:
            await asyncio.sleep(0.01)  # let the endpoint read them
    await asyncio.sleep(0.2)


class CountingDtls:
    """Stands in for a tinydtls context (DTLSSocket's DTLS object): counts checkRetransmit()
    calls, each a wakeup of the retransmission task."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.checks = 0

    def checkRetransmit(self) -> int:  # DTLSSocket's name
        self.checks += 1
        return self.inner.checkRetransmit()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# -- retransmissions ------------------------------------------------------------------------------


async def test_a_half_open_handshake_does_not_spin_the_endpoint(
    server: CloudServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: ClientHello, ClientHello with the cookie, then silence (no CPU needed on the
    attacker's side). aiocoap's server waited ``when - now`` with ``now`` on its own clock."""
    assert server.dtls is not None
    monkeypatch.setattr(aiocoap_tinydtls_server, "DTLS_CLOCK_OFFSET", time.time() - 100)
    await server.register(DEVICE)
    cred = server.principals.credential(DEVICE)
    client = RawClient(target(server), DEVICE.encode(), cred.psk, send_limit=2)
    client.start()  # the ClientHello: the endpoint answers with a cookie
    peer = await _peer_of(server, client)
    counting = peer._dtls_socket = CountingDtls(peer._dtls_socket)
    # the ClientHello with the cookie: the endpoint sends its flight and waits for the client
    await client.until(lambda: False, within=3.2)
    flights = [d for d in client.received if d[0] == 22 and d[13] == 2]  # ServerHello
    assert len(flights) >= 2, "the endpoint did not retransmit its flight"
    assert counting.checks < WAKEUP_BOUND, counting.checks
    client.close()


async def _peer_of(server: CloudServer, client: RawClient) -> Any:
    assert server.dtls is not None
    for _ in range(200):
        peer = server.dtls._table.get(client.address)
        if peer is not None:
            return peer
        await asyncio.sleep(0.005)
    raise AssertionError("the endpoint made no peer for the client")


async def test_handshakes_that_do_not_finish_in_time_are_ended(server: CloudServer) -> None:
    """Attack: half-open handshakes and junk, each holding a tinydtls context."""
    assert server.dtls is not None
    await server.register(DEVICE)
    alive = await session(server)
    cred = server.principals.credential(DEVICE)
    half = RawClient(target(server), DEVICE.encode(), cred.psk, send_limit=2)
    half.start()
    await half.until(lambda: len(half.received) >= 2, within=3.0)  # cookie, then the flight
    await flood(target(server), ["127.0.0.1"])
    assert peers_from(server, "127.0.0.1") == 3
    now = time.monotonic()
    server.dtls.sweep(now + dtls_mod.HELLO_TIMEOUT + 1)  # the junk had no cookie exchange
    assert peers_from(server, "127.0.0.1") == 2
    server.dtls.sweep(now + dtls_mod.HANDSHAKE_TIMEOUT + 1)  # the half-open handshake
    assert peers_from(server, "127.0.0.1") == 1
    assert server.dtls.timed_out == 2
    assert await alive.get(OWN) == "2.05 Content"  # the session is not idle yet
    half.close()
    alive.close()


def _dtls_transport(ctx: Any) -> Any:
    for interface in ctx.request_interfaces:
        messages = getattr(getattr(interface, "token_interface", None), "message_interface", None)
        if isinstance(messages, aiocoap_tinydtls.MessageInterfaceTinyDTLS):
            return messages
    raise AssertionError("no tinydtls transport")


async def test_the_agent_waits_for_its_handshake_retransmissions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coaps:// endpoint that does not answer: aiocoap's client waited ``when - now`` with
    ``now`` on its own clock, and spun while the agent waited for the handshake."""
    monkeypatch.setattr(aiocoap_tinydtls, "DTLS_CLOCK_OFFSET", time.time() - 100)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    uri = f"coaps://127.0.0.1:{sink.getsockname()[1]}"
    cred = Credential.generate(DEVICE, "device", b"\x01")
    cred = Credential(**{**cred.__dict__, "psk": b"pump01-ascii-key"})
    security = ClientSecurity("dtls", (uri,), cred, tmp_path / "oscore.json")
    transport = CoapTransport(RealClock(), lanes=1, uris=(uri,), security=security)
    other = await aiocoap.Context.create_client_context(transports=["tinydtls"])
    try:
        request = asyncio.ensure_future(transport.request("GET", f"{uri}/x", deadline=3.5))
        connection = None
        for _ in range(200):
            await asyncio.sleep(0.005)
            pool = _dtls_transport(transport._contexts[0])._pool if transport._contexts else {}
            connection = next(iter(pool.values()), None)
            if getattr(connection, "_dtls_socket", None) is not None:
                break
        assert connection is not None
        counting = connection._dtls_socket = CountingDtls(connection._dtls_socket)
        with pytest.raises(SyncError, match="no answer"):
            await request
        hellos = 0
        with contextlib.suppress(BlockingIOError):
            while sink.recv(4096):
                hellos += 1
        assert hellos >= 2, "the agent did not retransmit its ClientHello"
        assert counting.checks < WAKEUP_BOUND, counting.checks
        # only the agent's contexts changed: another context keeps aiocoap's connections
        assert "_connection_for_address" not in vars(_dtls_transport(other))
        assert isinstance(
            vars(_dtls_transport(transport._contexts[0]))["_connection_for_address"],
            dtlsclient._Connections,
        )
    finally:
        await transport.close()
        await other.shutdown()
        sink.close()


# -- the peer table -------------------------------------------------------------------------------


async def test_a_flood_from_new_addresses_does_not_push_out_sessions(
    server: CloudServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: one datagram each from many (spoofable) source addresses, no cookie needed."""
    assert server.dtls is not None
    monkeypatch.setattr(dtls_mod, "MAX_PEERS", 64)  # 16 for handshakes, 48 for sessions
    await server.register(DEVICE)
    alive = await session(server)
    await flood(target(server), [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(300)])
    assert await alive.get(OWN) == "2.05 Content"  # the same session, no new handshake
    assert server.dtls.peers <= 64 and server.dtls.evicted > 0
    assert server.dtls.handshakes <= dtls_mod.handshake_cap() == 16
    alive.close()


async def test_a_new_session_beyond_the_sessions_share_pushes_out_the_least_recent(
    server: CloudServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a client that finished its handshake (it holds a key) ends another session."""
    assert server.dtls is not None
    monkeypatch.setattr(dtls_mod, "MAX_PEERS", 8)  # 2 for handshakes, 6 for sessions
    await server.register(DEVICE)
    clients = [await session(server) for _ in range(6)]
    await flood(target(server), ["127.0.0.1"] * 5)  # handshakes push out handshakes only
    assert [await c.get(OWN) for c in clients] == ["2.05 Content"] * len(clients)
    clients.append(await session(server))
    assert server.dtls.sessions == dtls_mod.session_cap() == 6
    assert await clients[0].until(lambda: (1, 0) in clients[0].events, within=30)  # close_notify
    assert [await c.get(OWN) for c in clients[1:]] == ["2.05 Content"] * (len(clients) - 1)
    for c in clients:
        c.close()


async def test_one_ip_address_holds_at_most_its_share_of_peers(
    server: CloudServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: many source ports of one address (a flood not spread over addresses)."""
    assert server.dtls is not None
    monkeypatch.setattr(dtls_mod, "MAX_PEERS_PER_ADDRESS", 8)
    await server.register(DEVICE)
    await server.register(OTHER)
    first = await session(server)
    await flood(target(server), ["127.0.0.1"] * 50)
    assert peers_from(server, "127.0.0.1") <= 8
    assert await first.get(OWN) == "2.05 Content"
    # an address whose share is all sessions: a new port from it is dropped, they stay
    monkeypatch.setattr(dtls_mod, "MAX_PEERS_PER_ADDRESS", 2)
    server.dtls.sweep(time.monotonic() + dtls_mod.HELLO_TIMEOUT + 1)  # the junk goes
    second = await session(server, OTHER)
    await flood(target(server), ["127.0.0.1"] * 3)
    assert server.dtls.dropped == 3
    assert await first.get(OWN) == "2.05 Content"
    assert await second.get(f"state/{OTHER}/desired") == "2.05 Content"
    first.close()
    second.close()


async def test_a_forged_client_hello_does_not_end_a_session(server: CloudServer) -> None:
    """Attack: a ClientHello with a session's source address (anyone can forge it). A real new
    handshake from that address (a client restarted on the same port, another device behind
    the same NAT mapping) passes the cookie exchange and replaces the old state."""
    assert server.dtls is not None
    await server.register(DEVICE)
    await server.register(OTHER)
    alive = await session(server)
    alive.sock.send(client_hello())  # as if from a forger: the answer goes to the client
    await asyncio.sleep(0.1)
    alive.pump(handle=False)  # the client drops the stray cookie
    assert await alive.get(OWN) == "2.05 Content"
    assert server.dtls.restarted == 0
    port = alive.address
    alive.close()
    other = await session(server, OTHER, bind=port)  # the same ip:port, another identity
    assert server.dtls.restarted == 1
    assert peers_from(server, "127.0.0.1") == 1
    other.close()


# -- idle sessions --------------------------------------------------------------------------------


def test_the_idle_timeout_outlasts_the_agents_own_traffic() -> None:
    """An observing session carries a confirmable notification (and its ACK) every
    DESIRED_REFRESH, and the agent reports its state every report_interval."""
    assert desired_mod.DESIRED_REFRESH < dtls_mod.IDLE_TIMEOUT
    assert StateSettings().report_interval < dtls_mod.IDLE_TIMEOUT


async def test_idle_sessions_end_and_the_agent_handshakes_again(
    server: CloudServer, tmp_path: Path
) -> None:
    assert server.dtls is not None
    cred = await server.register(DEVICE)
    uri = server.dtls.uri
    security = ClientSecurity("dtls", (uri,), cred, tmp_path / "oscore.json")
    transport = CoapTransport(RealClock(), lanes=2, uris=(uri,), security=security)
    stream = transport.observe(f"{uri}/{OWN}", deadline=5.0, lane=0)
    try:
        assert (await anext(stream)).dotted == "2.05"
        assert (await transport.request("GET", f"{uri}/{OWN}", lane=1, deadline=5.0)).success
        assert server.dtls.sweep(time.monotonic() + dtls_mod.IDLE_TIMEOUT + 1) == 2
        assert server.dtls.idled == 2 and server.dtls.peers == 0
        # close_notify: the observation ends with an error (the agent registers it again) ...
        with pytest.raises(SyncError):
            async with asyncio.timeout(5):
                await anext(stream)
        # ... and the next request makes a new handshake
        assert (await transport.request("GET", f"{uri}/{OWN}", lane=1, deadline=5.0)).success
        assert server.dtls.peers == server.dtls.sessions == 1
    finally:
        await stream.aclose()
        await transport.close()
