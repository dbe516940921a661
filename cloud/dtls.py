"""DTLS-PSK (``coaps://``): the endpoint's interop profile, on aiocoap 0.4.17's ``tinydtls_server``
transport (DTLSSocket; TLS_PSK_WITH_AES_128_CCM_8, the only suite tinydtls offers). docs/dtls.md
has the commands.

:class:`DtlsEndpoint` is a second aiocoap server context beside the plain one, serving the same
resource tree (the same site object) on exactly the port asked for. Its PSK lookup is
:class:`PrincipalPsks`, a ``CredentialsMap`` whose ``find_dtls_psk(identity)`` asks the live
:class:`~cloud.security.Principals` registry (PSK identity = principal name): registering,
re-keying and revoking take effect at the next handshake, without a restart. The claims it
returns are a :class:`~cloud.security.Principal`, which aiocoap puts into the remote's
``authenticated_claims``, so :func:`cloud.security.identity` and the access rule treat a DTLS
request like an OSCORE one.

What aiocoap's DTLS server does not do by itself, and what is done here:

- Established sessions outlive the key they were made with: :meth:`DtlsEndpoint.end_sessions`
  ends those of re-keyed and revoked principals (close_notify, then the state goes), called
  whenever the registry is reloaded.
- Peer state is never freed (every source address, junk included, gets a tinydtls context, and
  a session that ends with a warning-level close_notify keeps it): a front before the server
  socket (asyncio's ``transport.set_protocol``) ends the least recently active peer when a new
  address would make more than :data:`MAX_PEERS`, and the "Unhandled alert level 1 code 0"
  warning of each normal session end is dropped from the log.
- The state of an address remembers the identity of its first handshake, and refuses another
  one for good ("DTLS stack tried accessing different keys", a traceback): a client restarted
  on the same port, or a NAT mapping reused for another device. The front starts from fresh
  state when a ClientHello (epoch 0) comes from an address whose state got as far as the PSK
  lookup (earlier would break the cookie exchange: tinydtls keeps its cookie secret per state).
- A restarted endpoint does not know the sessions of the old one, and clients do not notice:
  :meth:`DtlsEndpoint.stop` sends each client a close_notify, so it makes a new handshake with
  its next request (after a crash the agent's missed deadline does it, agent/sync/transport.py).
- A PSK longer than 16 bytes overruns tinydtls' buffer and crashes the process: registration
  refuses them (agent/wire/credentials.py) and the lookup refuses any that got through; so are
  identities longer than tinydtls' 32 bytes.
- Unknown, revoked or malformed identities are logged (rate-limited). A wrong key is not visible
  to the server: tinydtls drops the client's Finished silently.

The front and the ending of peers use internals of the transport (its socket's asyncio protocol,
its ``_connections`` table, each peer's ``_psk_store`` claims and ``_inject_error``, the way its
own shutdown ends peers); if they are not found (another aiocoap), a warning says so and the
endpoint serves on without them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

import aiocoap
import aiocoap.error
from aiocoap.credentials import CredentialsMap

from agent.wire.credentials import PSK_BYTES, PSK_IDENTITY_BYTES
from cloud.listen import port_to_bind
from cloud.security import Principal, Principals

log = logging.getLogger(__name__)

#: Peer states (DTLS sessions, handshakes, junk senders) kept at most; about 2.3 KB each.
MAX_PEERS = 4096
WARN_WINDOW = 10.0  # at most WARN_BURST warnings about refused identities per window
WARN_BURST = 10
#: The logger of the DTLS context (aiocoap's transport logs through it).
AIOCOAP_LOGGER = "coap-server.dtls"
ANY_ADDRESSES = ("", "::", "0.0.0.0", "*")


class DtlsUnavailable(RuntimeError):
    """DTLS cannot be served here; the message names the fix."""


def check_listen(host: str) -> None:
    """ValueError (one line, with the fix) for an address the DTLS server cannot bind."""
    if host in ANY_ADDRESSES:
        raise ValueError(
            f"--dtls-listen {host or '(empty)'}: aiocoap's DTLS server cannot bind the "
            "any-address; give the address clients reach, e.g. --dtls-listen 192.0.2.10:5684 "
            "(run one endpoint per address)"
        )


def require_dtlssocket() -> None:
    """DtlsUnavailable unless the DTLSSocket module (tinydtls) can be imported."""
    from aiocoap import defaults

    missing = defaults.dtls_missing_modules()
    if missing:
        raise DtlsUnavailable(
            f"DTLS needs the Python module(s) {', '.join(missing)}: run ./tools/dev setup, or "
            "pip install -e '.[dtls]' (it builds from source, with autoconf and automake)"
        )


class _Limiter:
    """At most WARN_BURST log lines per WARN_WINDOW; counts the rest."""

    def __init__(self) -> None:
        self.window = 0.0
        self.used = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self.window > WARN_WINDOW:
            if self.suppressed:
                log.warning("event=dtls_refusals_suppressed count=%d", self.suppressed)
            self.window, self.used, self.suppressed = now, 0, 0
        if self.used >= WARN_BURST:
            self.suppressed += 1
            return False
        self.used += 1
        return True


class PrincipalPsks(CredentialsMap):
    """The DTLS server's credentials: each principal's PSK, looked up in the live registry.

    aiocoap's transport calls :meth:`find_dtls_psk` during each handshake (twice: whether the
    identity is known, then its key); the second item it returns becomes the session's
    ``authenticated_claims``."""

    def __init__(self, principals: Principals) -> None:
        super().__init__()
        self.principals = principals
        self.refused = 0  # handshakes with an identity that has no usable PSK
        self._limiter = _Limiter()

    def __bool__(self) -> bool:
        return True  # aiocoap replaces a false (empty) map with a new one of its own

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, Principal]:
        ident = bytes(identity)
        psk = self.principals.psk(ident) if len(ident) <= PSK_IDENTITY_BYTES else None
        cred = self.principals.credential(ident.decode("utf-8", "replace")) if psk else None
        if psk is None or cred is None:
            self._refuse(ident, "unknown or revoked")
            raise KeyError(ident)
        if len(psk) > PSK_BYTES:  # tinydtls would overrun its 16-byte buffer: never hand it over
            self._refuse(ident, f"PSK longer than {PSK_BYTES} bytes")
            raise KeyError(ident)
        return psk, Principal(cred.principal, cred.role)

    def _refuse(self, ident: bytes, why: str) -> None:
        self.refused += 1
        if self._limiter.allow():
            shown = ident[:PSK_IDENTITY_BYTES].decode("ascii", "backslashreplace")
            log.warning("event=dtls_identity_refused identity=%r reason=%s", shown, why)


class _SessionEndFilter(logging.Filter):
    """Drops tinydtls_server's warning about a warning-level close_notify (alert 1/0): that is
    how libcoap and aiocoap clients end a session, once per session."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.msg == "Unhandled alert level %d code %d" and tuple(record.args or ()) == (1, 0)
        )


_SESSION_END_FILTER = _SessionEndFilter()


def _client_hello(data: bytes) -> bool:
    """Whether ``data`` starts with a DTLS record holding a ClientHello at epoch 0 (RFC 6347
    4.1: content type 22, version, epoch, sequence, length; then the handshake type, 1)."""
    return len(data) >= 25 and data[0] == 22 and data[3:5] == b"\0\0" and data[13] == 1


def _claims(peer: Any) -> Any:
    """What the peer authenticated as (its PSK identity's Principal), or None."""
    return getattr(getattr(peer, "_psk_store", None), "_claims", None)


class _Front:
    """In front of aiocoap's DTLS server socket (asyncio's ``transport.set_protocol``): sees
    each datagram before the transport does, to keep its peer table bounded and to start from
    fresh state when a new handshake comes from an address whose old state authenticated."""

    def __init__(self, endpoint: DtlsEndpoint, pool: Any) -> None:
        self._endpoint = endpoint
        self._pool = pool

    def datagram_received(self, data: bytes, sockaddr: Any) -> None:
        table = self._pool._connections
        peer = table.get(sockaddr)
        if peer is None:
            self._endpoint._evict(MAX_PEERS - 1, "peer table full")
        elif _client_hello(data) and _claims(peer) is not None:
            # the client restarted on the same port, or a NAT gave the port to another device:
            # the old state would refuse another identity ("different keys") for good
            self._endpoint.restarted += 1
            self._endpoint._end(table, sockaddr, peer, "new handshake", notify=False)
        self._pool.datagram_received(data, sockaddr)

    def __getattr__(self, name: str) -> Any:  # error_received, connection_lost, ...
        return getattr(self._pool, name)


class DtlsEndpoint:
    """``coaps://host:port``: a server context with aiocoap's tinydtls_server transport."""

    def __init__(self, principals: Principals) -> None:
        self.principals = principals
        self.credentials = PrincipalPsks(principals)
        self.host = ""
        self.port = 0
        self.evicted = 0  # peers ended because the table was full
        self.restarted = 0  # peers whose state went for a new handshake from their address
        self.ended = 0  # sessions ended because their principal was re-keyed or revoked
        self._ctx: aiocoap.Context | None = None
        self._table: Any = None  # the transport's peer table: ip:port -> peer, LRU first

    @classmethod
    async def start(
        cls,
        site: Any,
        principals: Principals,
        listen: tuple[str, int],
    ) -> DtlsEndpoint:
        """Serve ``site`` on ``coaps://HOST:PORT`` (``listen``; port 0: any free port). A port
        another socket holds is refused (aiocoap binds with SO_REUSEPORT: a second endpoint
        would share the port silently; cloud/listen.py)."""
        host, port = listen
        check_listen(host)
        require_dtlssocket()
        port = await port_to_bind(host, port)
        self = cls(principals)
        logger = logging.getLogger(AIOCOAP_LOGGER)
        if _SESSION_END_FILTER not in logger.filters:
            logger.addFilter(_SESSION_END_FILTER)
        # the transport binds its bind port + 1 (5683 -> 5684); port 0 - 1 + 1 is any free port
        self._ctx = await aiocoap.Context.create_server_context(
            site,
            bind=(host, port - 1),
            transports=["tinydtls_server"],
            server_credentials=self.credentials,
            loggername=AIOCOAP_LOGGER,
        )
        if self._ctx.server_credentials is not self.credentials:  # the lookup must be live
            await self._ctx.shutdown()
            raise RuntimeError("aiocoap did not keep the DTLS credentials object")
        self.host = host
        pool = self._pool()
        transport = getattr(pool, "_transport", None)
        self.port = port
        table = getattr(pool, "_connections", None)
        if transport.get_protocol() is pool and hasattr(table, "move_to_end"):
            self._table = table
            transport.set_protocol(_Front(self, pool))
        else:
            log.warning(
                "event=dtls_peer_table_unavailable: this aiocoap's DTLS server is not built the "
                "way 0.4.17's is; its peers are not bounded and sessions of re-keyed or revoked "
                "principals are not ended (check cloud/dtls.py against the new aiocoap)"
            )
        return self

    def _pool(self) -> Any:
        """aiocoap's DTLS server socket (its asyncio protocol)."""
        for interface in getattr(self._ctx, "request_interfaces", ()):
            messages = getattr(
                getattr(interface, "token_interface", None), "message_interface", None
            )
            if hasattr(messages, "_pool"):
                return messages._pool
        raise RuntimeError("cannot find aiocoap's DTLS server socket")

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"coaps://{host}:{self.port}"

    @property
    def peers(self) -> int:
        """Peer states held now (sessions, handshakes, senders of junk)."""
        return 0 if self._table is None else len(self._table)

    async def stop(self) -> None:
        if self._ctx is not None:
            # close_notify to every client with a session: it makes a new handshake with its
            # next request (a restarted endpoint does not know the old session)
            self._evict(0, "endpoint stopping", count=False)
            ctx, self._ctx = self._ctx, None
            await ctx.shutdown()

    # -- the peer table ----------------------------------------------------------------------------

    def _end(self, table: Any, key: Any, peer: Any, why: str, notify: bool = True) -> None:
        if notify and _claims(peer) is not None:
            # a handshake got as far as the key: tell the client (close_notify), so that it
            # starts a new handshake at once instead of timing out
            with contextlib.suppress(Exception):
                peer._dtls_socket.resetPeer(peer._dtls_session)
        try:
            peer._inject_error(aiocoap.error.LibraryShutdown(why))
        except Exception as err:  # whatever went wrong, the state must go
            log.debug("event=dtls_end_failed peer=%s error=%r", key, err)
        if table.get(key) is peer:
            del table[key]
        log.debug("event=dtls_peer_ended peer=%s reason=%s", key, why)

    def _evict(self, limit: int, why: str, count: bool = True) -> int:
        """End the least recently active peers beyond ``limit``."""
        table = self._table
        ended = 0
        while table is not None and len(table) > limit:
            key, peer = next(iter(table.items()))
            self._end(table, key, peer, why)
            ended += 1
        if count:
            self.evicted += ended
        return ended

    def end_sessions(self, principals: Iterable[str]) -> int:
        """End the sessions authenticated as any of ``principals`` (re-keyed or revoked)."""
        names = set(principals)
        table = self._table
        if not names or table is None:
            return 0
        doomed = [(key, peer) for key, peer in table.items() if _claims(peer) in names]
        for key, peer in doomed:
            self._end(table, key, peer, "credential re-keyed or revoked")
        if doomed:
            self.ended += len(doomed)
            log.info(
                "event=dtls_sessions_ended principals=%s count=%d",
                ",".join(sorted(names)),
                len(doomed),
            )
        return len(doomed)
