"""A server asked for port 0 gets a port no other socket holds; one asked for a port another
socket holds is refused.

aiocoap's server sockets set SO_REUSEPORT, and Linux may give a SO_REUSEPORT socket bound to port 0
a port another SO_REUSEPORT socket of the same user already holds; the two then share its
datagrams at random (a CI run saw a test's request answered by another test's endpoint)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import SyncError
from agent.gateway.peers import PeerServer, PeerState
from cloud.listen import free_port
from cloud.server import CloudServer
from drivers.clock import RealClock

HELD = 400  # SO_REUSEPORT sockets on port-0 ports, as other endpoints would hold them


@contextlib.contextmanager
def reuseport_sockets(n: int) -> Iterator[set[int]]:
    """``n`` dual-stack SO_REUSEPORT UDP sockets bound to 127.0.0.1 port 0, as aiocoap binds."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::ffff:127.0.0.1", 0))
        yield {s.getsockname()[1] for s in socks}
    finally:
        for s in socks:
            s.close()


def test_free_port_is_never_one_a_reuseport_socket_holds() -> None:
    with reuseport_sockets(HELD) as held:
        got = [free_port("127.0.0.1") for _ in range(HELD)]
        assert not held & set(got)


async def test_servers_on_port_0_take_a_port_of_their_own(tmp_path: Path) -> None:
    with reuseport_sockets(HELD) as held:
        server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
        try:
            assert server.port not in held
        finally:
            await server.stop()
        peers = await PeerServer.start(PeerState("gw-1", tmp_path / "gw-1.cbor", RealClock()))
        try:
            assert peers.port not in held
        finally:
            await peers.stop()


async def test_a_peer_server_on_a_port_another_socket_holds_is_refused(tmp_path: Path) -> None:
    """The gateway's peer server checks a configured port free as the endpoint does: a second
    server on it would start (SO_REUSEPORT) and the peers' requests split between the two."""
    with reuseport_sockets(1) as held:
        (port,) = held
        with pytest.raises(SyncError, match=f"127.0.0.1:{port} is in use by another process"):
            await PeerServer.start(
                PeerState("gw-1", tmp_path / "gw-1.cbor", RealClock()), "127.0.0.1", port
            )
    peers = await PeerServer.start(
        PeerState("gw-1", tmp_path / "gw-1.cbor", RealClock()), "127.0.0.1", port
    )  # the port once free
    try:
        assert peers.port == port
    finally:
        await peers.stop()
