"""Where the endpoint listens: a check that its UDP port is free, one line for each reason it is
not, and the port a socket bound to port 0 got."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import aiocoap


def check_port_free(host: str, port: int) -> None:
    """Raise OSError if another socket holds ``host:port``. aiocoap binds with SO_REUSEPORT, so a
    second endpoint on the same port would start silently and share the requests at random."""
    _probe(host, port)


def free_port(host: str) -> int:
    """A UDP port no socket holds at ``host`` now, for a server asked for port 0. Linux gives a
    SO_REUSEPORT socket bound to port 0 a port that another such socket of the same user may
    already hold (the two then share its datagrams at random: of 3,000 such sockets bound at
    once, 175 got a port another one held); aiocoap's server sockets set SO_REUSEPORT, so the
    port is taken by a probe without it, which gets one no socket holds, and bound explicitly."""
    return _probe(host, 0)


async def port_to_bind(host: str, port: int) -> int:
    """The port a server on ``host:port`` binds: port 0, a :func:`free_port`; another, checked
    free (:func:`check_port_free`, off the loop)."""
    loop = asyncio.get_running_loop()
    if port == 0:
        return await loop.run_in_executor(None, free_port, host)
    await loop.run_in_executor(None, check_port_free, host, port)
    return port


def _probe(host: str, port: int) -> int:
    """Bind a UDP socket without SO_REUSEPORT to ``host:port``; the port it got. OSError (one
    line saying why) when it cannot."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as err:
        raise listen_failure(host, port, err) from err
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as err:
            raise listen_failure(host, port, err) from err
        return int(probe.getsockname()[1])


def listen_failure(host: str, port: int, err: OSError) -> OSError:
    """``err`` of binding ``host:port`` (or resolving ``host``) as an OSError whose strerror is
    the operator's line (:func:`listen_error`) and whose errno gives the exit code."""
    if isinstance(err, socket.gaierror):
        return OSError(
            errno.EADDRNOTAVAIL,
            f"{host}:{port}: cannot resolve {host} ({err.strerror}); listen on an address of "
            "this host (ip -brief address), or 0.0.0.0 for all of them",
        )
    return OSError(err.errno, listen_error(host, port, err))


def listen_error(host: str, port: int, err: OSError) -> str:
    """One line for an address the endpoint cannot listen on: what is wrong, what to do."""
    where = f"{host}:{port}"
    if err.errno == errno.EADDRINUSE:
        return f"{where} is in use by another process; stop it or choose another port"
    if err.errno == errno.EADDRNOTAVAIL:
        return (
            f"{where}: {host} is not an address of this host; listen on one of its addresses "
            "(ip -brief address), or 0.0.0.0 for all of them"
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return (
            f"{where}: permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE: "
            "choose a port from 1024 up"
        )
    return f"cannot listen on {where}: {err.strerror}"


def server_protocol(ctx: aiocoap.Context) -> Any:
    """The transport protocol (aiocoap's ``MessageInterfaceUDP6``) of the server context's UDP
    socket: it receives every datagram (``datagram_msg_received``) and holds the transport."""
    for interface in getattr(ctx, "request_interfaces", ()):
        messages = getattr(getattr(interface, "token_interface", None), "message_interface", None)
        if getattr(messages, "transport", None) is not None:
            return messages
    raise RuntimeError("cannot find the CoAP server socket")


def server_socket(ctx: aiocoap.Context) -> socket.socket:
    """The UDP socket of the server context (through the transport's ``get_extra_info``)."""
    sock = server_protocol(ctx).transport.get_extra_info("socket")
    if not isinstance(sock, socket.socket):
        raise RuntimeError("cannot find the CoAP server socket")
    return sock


def bound_port(ctx: aiocoap.Context) -> int:
    """The UDP port the server's socket is bound to."""
    return int(server_socket(ctx).getsockname()[1])


#: The server socket's receive buffer: datagrams that arrive while the process is busy (a garbage
#: collection, a burst of new peers) wait here instead of being dropped by the kernel (Linux's
#: default, net.core.rmem_default, is 208 KiB: about 1,500 small requests).
RECEIVE_BUFFER = 8 * 1024 * 1024


def enlarge_receive_buffer(ctx: aiocoap.Context, size: int = RECEIVE_BUFFER) -> int:
    """Ask for a ``size`` receive buffer on the server socket; returns what the kernel gave.
    SO_RCVBUF is capped by net.core.rmem_max; SO_RCVBUFFORCE (root or CAP_NET_ADMIN) is not."""
    sock = server_socket(ctx)
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:
        if force is None:
            raise PermissionError
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
