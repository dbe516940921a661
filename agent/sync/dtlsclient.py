"""The agent's DTLS client connections (``coaps://`` lanes, ``security = "dtls"``): aiocoap
0.4.17's tinydtls client transport, with its retransmissions timed on tinydtls's own clock.

aiocoap's connection waits for the next retransmission of its handshake flight for ``when -
now``: ``when`` from tinydtls (milliseconds since the whole second at which the process's newest
DTLS context was made), ``now`` from aiocoap's own clock, started when its transport module was
imported. Once the agent has been up longer than a retransmission timeout (2 s), the wait comes
out negative and the task spins, a core's worth of CPU, until tinydtls's retransmission is due:
for as long as an endpoint does not answer a handshake.

:func:`install` gives the tinydtls transport of one client context connections of
:class:`_Connection`, which wait on :class:`TinydtlsClock`. Nothing else in the process changes:
no class or module of aiocoap is patched, other contexts keep aiocoap's own connections.
agent/sync/transport.py calls it for every client context it makes.

It relies on internals of aiocoap 0.4.17's ``tinydtls`` transport: the message interface's
``_connection_for_address`` and ``_pool`` (connections by host, port and PSK identity), the
connection's ``_run_retransmissions`` and ``_dtls_socket``. Without them :func:`install` logs
``event=dtls_retransmission_fix_unavailable`` and leaves the transport as aiocoap made it.

The endpoint waits on the same clock for its peers (agent/dtlsclock.py, cloud/dtls.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Any

from aiocoap.transports.tinydtls import (
    CODE_CLOSE_NOTIFY,
    LEVEL_WARNING,
    CloseNotifyReceived,
    DTLSClientConnection,
    MessageInterfaceTinyDTLS,
)

from agent.dtlsclock import TinydtlsClock

log = logging.getLogger(__name__)


class _Connection(DTLSClientConnection):
    """aiocoap's DTLS client connection, waiting for its retransmissions on tinydtls's clock,
    and ended when the endpoint ends the session.

    The endpoint ends a session (idle, credential revoked or re-keyed, endpoint stopping) with
    a warning-level close_notify, which aiocoap's connection only logs ("Unhandled alert level
    1 code 0"): tinydtls has dropped the session, requests already sent wait for their deadline,
    an observation stops without a word, and the next request starts a handshake whose first
    message is lost. Here the connection ends at once: pending requests and observations fail
    (the agent registers its observation again), the next request makes a new connection."""

    def __init__(
        self, host: str, port: int, psk_id: bytes, psk: bytes, transport: Any, clock: TinydtlsClock
    ) -> None:
        self._tinydtls_clock = clock
        clock.context_made()  # the connection makes its tinydtls context as it starts
        super().__init__(host, port, psk_id, psk, transport)

    async def _run_retransmissions(self) -> None:
        while True:
            due = self._dtls_socket.checkRetransmit()  # sends those that are due
            if not due:
                return  # nothing queued (the next send starts this again)
            await asyncio.sleep(self._tinydtls_clock.delay(due))

    def _event(self, level: int, code: int) -> None:
        if (level, code) == (LEVEL_WARNING, CODE_CLOSE_NOTIFY):
            # after tinydtls's handling returns: it still uses its peer after this callback
            with contextlib.suppress(RuntimeError):  # no loop: the connection is going anyway
                asyncio.get_running_loop().call_soon(self._closed_by_endpoint)
            return
        super()._event(level, code)

    def _closed_by_endpoint(self) -> None:
        if self._connection is None:
            return
        log.debug("event=dtls_session_closed_by_endpoint host=%s port=%s", self._host, self._port)
        self._connection = None  # tinydtls has freed the session: nothing to reset
        self._inject_error(CloseNotifyReceived())


class _Connections:
    """A transport's ``_connection_for_address``: the connection to (host, port) under a PSK
    identity that its pool holds, or a new :class:`_Connection` (kept there, weakly, as aiocoap
    keeps its own)."""

    def __init__(self, transport: MessageInterfaceTinyDTLS, clock: TinydtlsClock) -> None:
        self._transport = weakref.ref(transport)
        self.clock = clock

    def __call__(self, host: str, port: int, psk_id: bytes, psk: bytes) -> Any:
        transport = self._transport()
        if transport is None:
            raise RuntimeError("the DTLS transport is gone")
        key = (host, port, psk_id)
        connection = transport._pool.get(key)
        if connection is None:
            log.debug("event=dtls_connection_new host=%s port=%s", host, port)
            connection = _Connection(host, port, psk_id, psk, transport, self.clock)
            transport._pool[key] = connection
        return connection


def _tinydtls_transports(ctx: Any) -> list[MessageInterfaceTinyDTLS]:
    found = []
    for interface in getattr(ctx, "request_interfaces", ()):
        messages = getattr(getattr(interface, "token_interface", None), "message_interface", None)
        if isinstance(messages, MessageInterfaceTinyDTLS):
            found.append(messages)
    return found


def install(ctx: Any, clock: TinydtlsClock) -> int:
    """Make the tinydtls transport of the aiocoap client context ``ctx`` (if it has one) use
    connections that wait on ``clock``. Returns how many transports it changed (0 or 1)."""
    changed = 0
    for transport in _tinydtls_transports(ctx):
        usable = isinstance(getattr(transport, "_pool", None), weakref.WeakValueDictionary)
        if not usable or not callable(getattr(transport, "_connection_for_address", None)):
            log.warning(
                "event=dtls_retransmission_fix_unavailable: this aiocoap's DTLS client is not "
                "built the way 0.4.17's is; a handshake with an endpoint that does not answer "
                "may use a core until it gives up (check agent/sync/dtlsclient.py)"
            )
            continue
        transport._connection_for_address = _Connections(transport, clock)  # type: ignore[method-assign]
        changed += 1
    return changed
