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
  a session that ends with a warning-level close_notify keeps it). A front before the server
  socket (asyncio's ``transport.set_protocol``) makes each peer itself (:class:`_Peer`), for a
  ClientHello only (tinydtls drops anything else from an unknown address), ends it when the
  client ends the session, and bounds them: at most :data:`MAX_PEERS`, of which peers without
  an established session (forged ClientHellos, handshakes) hold at most the share
  :data:`SESSION_SHARE` leaves, so that new (spoofable) source addresses only ever push out
  other handshakes, never a session; at most :data:`MAX_PEERS_PER_ADDRESS` from one IP
  address. A sweep ends handshakes that did not pass the cookie exchange within
  :data:`HELLO_TIMEOUT` or did not finish within :data:`HANDSHAKE_TIMEOUT`, and sessions idle
  for :data:`IDLE_TIMEOUT` (close_notify). The "Unhandled alert level 1 code 0" warning of each
  normal session end is dropped from the log.
- aiocoap schedules a peer's retransmissions on its own clock (started when its transport module
  was imported) while tinydtls's timestamps count from the whole second at which the process's
  newest DTLS context was made: once the process has been up longer than a retransmission
  timeout, the waits come out negative and the retransmission task spins until tinydtls's
  retransmission is due (a core for 14 s per half-open handshake). :class:`_Peer` waits on
  tinydtls's own clock (:class:`agent.dtlsclock.TinydtlsClock`).
- The state of an address remembers the identity of its first handshake, and refuses another
  one for good ("DTLS stack tried accessing different keys", a traceback): a client restarted
  on the same port, or a NAT mapping reused for another device. A ClientHello (epoch 0) from an
  address whose state got as far as the PSK lookup goes to fresh state beside the old one; only
  when that passes the cookie exchange (the client is really at that address) does it replace
  the old state, so a spoofed ClientHello ends nothing. (tinydtls keeps its cookie secret per
  state: a retry must reach the state that sent the cookie.)
- A restarted endpoint does not know the sessions of the old one, and clients do not notice:
  :meth:`DtlsEndpoint.stop` sends each client a close_notify, so it makes a new handshake with
  its next request (after a crash the agent's missed deadline does it, agent/sync/transport.py).
- A PSK longer than 16 bytes overruns tinydtls' buffer and crashes the process: registration
  refuses them (agent/wire/credentials.py) and the lookup refuses any that got through; so are
  identities longer than tinydtls' 32 bytes.
- Unknown, revoked or malformed identities are logged (rate-limited). A wrong key is not visible
  to the server: tinydtls drops the client's Finished silently (the handshake then times out).

The front and the peers use internals of the transport (its socket's asyncio protocol, its
``_connections`` table and message interface, the peer class ``_AddressDTLS`` with its
retransmission task, callbacks and ``_psk_store`` claims, the way its own shutdown ends peers);
if they are not found (another aiocoap), a warning says so and the endpoint serves on without
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import aiocoap
import aiocoap.error
from aiocoap.credentials import CredentialsMap
from aiocoap.transports.tinydtls import (
    CODE_CLOSE_NOTIFY,
    DTLS_EVENT_CONNECTED,
    LEVEL_NOALERT,
    LEVEL_WARNING,
)
from aiocoap.transports.tinydtls_server import _AddressDTLS

from agent.dtlsclock import TinydtlsClock
from agent.wire.credentials import PSK_BYTES, PSK_IDENTITY_BYTES
from cloud.listen import port_to_bind
from cloud.security import Principal, Principals

log = logging.getLogger(__name__)

#: Peer states (DTLS sessions, handshakes, junk senders) kept at most; about 2.3 KB each.
MAX_PEERS = 4096
#: The share of MAX_PEERS only established sessions may use: peers without one (junk, handshakes)
#: hold at most the rest (1,024 of 4,096), so a flood from new source addresses (spoofable, no
#: cookie needed) only pushes out other handshakes. A session is pushed out only by a newer one.
SESSION_SHARE = 0.75
#: Peer states from one IP address at most. Each agent lane is a session of its own (its own UDP
#: port): 256 is e.g. 64 devices with 4 lanes behind one NAT address. At the cap, a new address
#: pushes out that IP's oldest handshake; if it has only sessions, the datagram is dropped.
MAX_PEERS_PER_ADDRESS = 256
#: Seconds from a peer's first datagram to pass the cookie exchange (the server's ServerHello):
#: junk and unanswered ClientHellos go then. A client whose retry comes later gets a new cookie.
HELLO_TIMEOUT = 5.0
#: Seconds from a peer's first datagram to an established session: a half-open handshake goes
#: then (tinydtls would retransmit its flight for longer; clients give up after about 30 s).
HANDSHAKE_TIMEOUT = 30.0
#: Seconds without a datagram from its client after which a session is ended (close_notify: the
#: agent makes a new handshake with its next request, an observation over it is registered
#: again). Longer than the refresh of desired state (cloud/desired.py, 240 s: confirmable
#: notifications, so the agent's ACKs keep an observing session active) and than the agent's
#: full report of state (report_interval, 300 s by default).
IDLE_TIMEOUT = 600.0
SWEEP_INTERVAL = 1.0  # how often the timeouts above are checked
WARN_WINDOW = 10.0  # at most WARN_BURST warnings about refused identities per window
WARN_BURST = 10
#: The logger of the DTLS context (aiocoap's transport logs through it).
AIOCOAP_LOGGER = "coap-server.dtls"
ANY_ADDRESSES = ("", "::", "0.0.0.0", "*")

# a peer's stage: before the cookie exchange, in the handshake after it, with a session
HELLO, HANDSHAKE, SESSION = "hello", "handshake", "session"


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


def handshake_cap() -> int:
    """Peers without an established session at most (MAX_PEERS and SESSION_SHARE)."""
    return max(1, MAX_PEERS - int(MAX_PEERS * SESSION_SHARE))


def session_cap() -> int:
    """Established sessions at most: the rest of the table."""
    return max(1, MAX_PEERS - handshake_cap())


class _Limiter:
    """At most WARN_BURST log lines per WARN_WINDOW; counts the rest."""

    def __init__(self, event: str = "dtls_refusals_suppressed") -> None:
        self.event = event
        self.window = 0.0
        self.used = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self.window > WARN_WINDOW:
            if self.suppressed:
                log.warning("event=%s count=%d", self.event, self.suppressed)
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
        return psk, Principal(cred.principal, cred.role, cred.generation)

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


def _server_hello(data: bytes) -> bool:
    """Whether ``data`` (written by a peer) starts with a ServerHello (handshake type 2): the
    peer's tinydtls accepted the client's cookie (RFC 6347 4.2.1)."""
    return len(data) >= 25 and data[0] == 22 and data[13] == 2


def _claims(peer: Any) -> Any:
    """What the peer looked up a key for (its PSK identity's Principal), or None. Set at the
    PSK lookup, before the client has shown it holds the key: only the stage SESSION says so."""
    return getattr(getattr(peer, "_psk_store", None), "_claims", None)


def _count(counts: dict[Any, int], key: Any, step: int) -> None:
    """Add ``step`` to ``counts[key]``; a count that reaches 0 goes."""
    left = counts.get(key, 0) + step
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class _Peer(_AddressDTLS):
    """One client address's state (aiocoap's peer, with its own tinydtls context), made by the
    front: its retransmissions wait on tinydtls's clock, it reports its stage (cookie exchange
    passed, session established) and its end to the endpoint, and sends nothing once ended."""

    def __init__(self, endpoint: DtlsEndpoint, pool: Any, sockaddr: Any, now: float) -> None:
        self._endpoint = endpoint
        self.key = sockaddr
        self.made = self.seen = now
        self.stage = HELLO
        self.tracked = False  # counted in the endpoint's bounds (in the peer table)
        self.ended = False
        endpoint.tinydtls_clock.context_made()  # super() makes the context (and starts the task)
        super().__init__(pool, sockaddr)

    async def _run_retransmissions(self) -> None:
        clock = self._endpoint.tinydtls_clock
        while True:
            due = self._dtls_socket.checkRetransmit()  # sends those that are due
            if not due:
                return  # nothing queued: a datagram from the client starts this again
            await asyncio.sleep(clock.delay(due))

    def _write(self, recipient: Any, data: bytes) -> int:
        if self.ended:
            return len(data)
        if self.stage == HELLO and _server_hello(data):
            self._endpoint._advance(self, HANDSHAKE)
        return super()._write(recipient, data)

    def _event(self, level: int, code: int) -> None:
        if (level, code) == (LEVEL_NOALERT, DTLS_EVENT_CONNECTED) and not self.ended:
            self._endpoint._advance(self, SESSION)
        elif (level, code) == (LEVEL_WARNING, CODE_CLOSE_NOTIFY) and not self.ended:
            # the client ended the session (tinydtls dropped it; aiocoap kept the peer): the
            # state goes once tinydtls's handling returns (it still uses its peer after this)
            asyncio.get_running_loop().call_soon(self._endpoint._closed_by_client, self)
        super()._event(level, code)

    def send(self, message: bytes) -> None:
        if self.ended:  # tinydtls would start a handshake towards the client instead
            log.debug("event=dtls_send_after_end peer=%s", self.key)
            return
        super().send(message)

    def _inject_error(self, e: BaseException) -> None:
        """End this peer: its state goes first, then pending exchanges get ``e``."""
        if self.ended:
            return
        self.ended = True
        self._retransmission_task.cancel()
        table = self._protocol._connections
        if table.get(self.key) is self:
            del table[self.key]
        self._endpoint._forget(self)
        self._protocol._message_interface._received_exception(self, e)


class _Front:
    """In front of aiocoap's DTLS server socket (asyncio's ``transport.set_protocol``): sees
    each datagram before the transport does, makes the peer of a new address (within the
    bounds), and routes a new handshake from an address with authenticated state to fresh
    state beside it."""

    def __init__(self, endpoint: DtlsEndpoint, pool: Any) -> None:
        self._endpoint = endpoint
        self._pool = pool

    def datagram_received(self, data: bytes, sockaddr: Any) -> None:
        endpoint = self._endpoint
        now = endpoint.monotonic()
        peer = self._pool._connections.get(sockaddr)
        if peer is None:
            if not _client_hello(data):
                # only a ClientHello starts state in tinydtls: anything else from an unknown
                # address (junk, records of a session that ended) would be dropped by it
                endpoint.ignored += 1
                return
            peer = endpoint._admit(sockaddr, now)
            if peer is None:
                return  # no room for this address
        elif _client_hello(data) and (
            _claims(peer) is not None or sockaddr in endpoint._candidates
        ):
            # the client restarted on the same port, or a NAT gave the port to another device
            # (or someone forged this address): the old state would refuse another identity
            endpoint._new_handshake(sockaddr, peer, data, now)
            return
        peer.seen = now
        self._pool.datagram_received(data, sockaddr)

    def __getattr__(self, name: str) -> Any:  # error_received, connection_lost, ...
        return getattr(self._pool, name)


class DtlsEndpoint:
    """``coaps://host:port``: a server context with aiocoap's tinydtls_server transport."""

    def __init__(
        self, principals: Principals, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.principals = principals
        self.credentials = PrincipalPsks(principals)
        self.monotonic = monotonic
        self.tinydtls_clock = TinydtlsClock()
        self.host = ""
        self.port = 0
        self.evicted = 0  # peers ended to keep within the bounds
        self.dropped = 0  # ClientHellos from a new address of an IP address at its cap
        self.ignored = 0  # datagrams from an unknown address that were not a ClientHello
        self.restarted = 0  # peers replaced by a new handshake from their address
        self.ended = 0  # sessions ended because their principal was re-keyed or revoked
        self.timed_out = 0  # handshakes ended by HELLO_TIMEOUT or HANDSHAKE_TIMEOUT
        self.idled = 0  # sessions ended by IDLE_TIMEOUT
        self._ctx: aiocoap.Context | None = None
        self._pool: Any = None  # aiocoap's DTLS server socket (its asyncio protocol)
        self._table: Any = None  # the transport's peer table: ip:port -> peer, LRU first
        # peers in the table without a session, oldest first, by stage; peers per IP address
        self._stages: dict[str, OrderedDict[Any, _Peer]] = {
            HELLO: OrderedDict(),
            HANDSHAKE: OrderedDict(),
        }
        self._sessions = 0
        self._per_ip: dict[Any, int] = {}  # IP address -> peers
        self._per_ip_sessions: dict[Any, int] = {}  # IP address -> sessions
        #: fresh state for a new handshake from an address with authenticated state, until it
        #: passes the cookie exchange (then it replaces the old state) or HELLO_TIMEOUT
        self._candidates: dict[Any, _Peer] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._address_warnings = _Limiter("dtls_address_full_suppressed")

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
        pool = self._find_pool()
        transport = getattr(pool, "_transport", None)
        self.port = port
        table = getattr(pool, "_connections", None)
        if (
            transport.get_protocol() is pool
            and hasattr(table, "move_to_end")
            and isinstance(pool._Address, type)
            and issubclass(_Peer, pool._Address)
            and hasattr(pool, "_message_interface")
        ):
            self._pool, self._table = pool, table
            transport.set_protocol(_Front(self, pool))
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep_forever(), name="DTLS peer sweep"
            )
        else:
            log.warning(
                "event=dtls_peer_table_unavailable: this aiocoap's DTLS server is not built the "
                "way 0.4.17's is; its peers are not bounded, handshakes and idle sessions do not "
                "time out, and sessions of re-keyed or revoked principals are not ended (check "
                "cloud/dtls.py against the new aiocoap)"
            )
        return self

    def _find_pool(self) -> Any:
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

    @property
    def sessions(self) -> int:
        """Established sessions held now."""
        return self._sessions

    @property
    def handshakes(self) -> int:
        """Peers held now without an established session."""
        return sum(len(stage) for stage in self._stages.values())

    def peers_from(self, ip: str) -> int:
        """Peer states held now for the IP address ``ip``."""
        return self._per_ip.get(ip, 0)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._ctx is not None:
            for peer in list(self._candidates.values()):
                self._end(peer, "endpoint stopping")
            # close_notify to every client with a session: it makes a new handshake with its
            # next request (a restarted endpoint does not know the old session)
            for peer in list(self._table.values() if self._table is not None else ()):
                self._end(peer, "endpoint stopping")
            ctx, self._ctx = self._ctx, None
            await ctx.shutdown()

    # -- the peer table ----------------------------------------------------------------------------

    def _admit(self, sockaddr: Any, now: float) -> _Peer | None:
        """A new peer for ``sockaddr``, in the table, after making room for it within the
        bounds; None: its IP address has MAX_PEERS_PER_ADDRESS sessions (the datagram is
        dropped: a forged source address must not end sessions)."""
        ip = sockaddr[0]
        held = self._per_ip.get(ip, 0)
        if held >= MAX_PEERS_PER_ADDRESS:
            has_handshakes = held > self._per_ip_sessions.get(ip, 0)
            oldest = self._oldest_handshake(ip) if has_handshakes else None
            if oldest is None:
                self.dropped += 1
                if self._address_warnings.allow():
                    log.warning(
                        "event=dtls_address_full ip=%s sessions=%d note=new handshakes from this "
                        "address wait for one of its sessions to end (MAX_PEERS_PER_ADDRESS)",
                        ip,
                        held,
                    )
                return None
            self._end(oldest, "address full")
            self.evicted += 1
        while self.handshakes >= handshake_cap() or len(self._table) >= MAX_PEERS:
            victim = self._oldest_handshake()  # never a session (see _advance for those)
            if victim is None:
                break
            self._end(victim, "peer table full")
            self.evicted += 1
        peer = _Peer(self, self._pool, sockaddr, now)
        self._table[sockaddr] = peer
        self._track(peer)
        return peer

    def _new_handshake(self, sockaddr: Any, old: Any, data: bytes, now: float) -> None:
        """A ClientHello from an address whose state did a PSK lookup: to fresh state, which
        replaces the old one once it has passed the cookie exchange."""
        fresh = self._candidates.get(sockaddr)
        if fresh is None:
            fresh = self._candidates[sockaddr] = _Peer(self, self._pool, sockaddr, now)
        fresh.seen = now
        self._pool._message_interface._received_datagram(fresh, data)
        if fresh.stage == HELLO or fresh.ended:
            return
        self._candidates.pop(sockaddr, None)
        self.restarted += 1
        self._end(old, "new handshake", notify=False)
        self._table[sockaddr] = fresh
        self._track(fresh)
        log.debug("event=dtls_peer_replaced peer=%s", sockaddr)

    def _oldest_handshake(self, ip: Any = None) -> _Peer | None:
        """The oldest peer without a session (of IP address ``ip``): those that did not pass
        the cookie exchange first."""
        for stage in self._stages.values():
            for key, peer in stage.items():
                if ip is None or key[0] == ip:
                    return peer
        return None

    def _least_recent_session(self) -> Any:
        for peer in self._table.values():
            if getattr(peer, "stage", SESSION) == SESSION:
                return peer
        return None

    def _track(self, peer: _Peer) -> None:
        """Count ``peer``, now in the table, in the bounds."""
        peer.tracked = True
        ip = peer.key[0]
        _count(self._per_ip, ip, 1)
        if peer.stage == SESSION:
            self._sessions += 1
            _count(self._per_ip_sessions, ip, 1)
        else:
            self._stages[peer.stage][peer.key] = peer

    def _forget(self, peer: _Peer) -> None:
        """``peer`` ended: out of the bounds (idempotent)."""
        if self._candidates.get(peer.key) is peer:
            del self._candidates[peer.key]
        if not peer.tracked:
            return
        peer.tracked = False
        ip = peer.key[0]
        _count(self._per_ip, ip, -1)
        if peer.stage == SESSION:
            self._sessions -= 1
            _count(self._per_ip_sessions, ip, -1)
        elif self._stages[peer.stage].get(peer.key) is peer:
            del self._stages[peer.stage][peer.key]

    def _advance(self, peer: _Peer, stage: str) -> None:
        """``peer`` passed the cookie exchange (HANDSHAKE) or finished its handshake
        (SESSION). A new session beyond session_cap() ends the least recently active one."""
        if stage == peer.stage:
            return
        if not peer.tracked:
            peer.stage = stage
            return
        self._forget(peer)
        peer.stage = stage
        self._track(peer)
        if stage == SESSION and self._sessions > session_cap():
            oldest = self._least_recent_session()
            if oldest is not None and oldest is not peer:
                self._end(oldest, "sessions full")
                self.evicted += 1

    def _end(self, peer: Any, why: str, notify: bool = True) -> None:
        if notify and _claims(peer) is not None:
            # a handshake got as far as the key: tell the client (close_notify), so that it
            # starts a new handshake at once instead of timing out
            with contextlib.suppress(Exception):
                peer._dtls_socket.resetPeer(peer._dtls_session)
        key = getattr(peer, "key", None)
        try:
            peer._inject_error(aiocoap.error.LibraryShutdown(why))
        except Exception as err:  # whatever went wrong, the state must go
            log.debug("event=dtls_end_failed peer=%s error=%r", key, err)
        if self._table is not None and key is not None and self._table.get(key) is peer:
            del self._table[key]
        if isinstance(peer, _Peer):
            peer.ended = True
            self._forget(peer)
        log.debug("event=dtls_peer_ended peer=%s reason=%s", key, why)

    def _closed_by_client(self, peer: _Peer) -> None:
        if not peer.ended:
            self._end(peer, "closed by client", notify=False)

    # -- timeouts --------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                self.sweep()
            except Exception:  # the sweep must go on
                log.exception("event=dtls_sweep_failed")

    def sweep(self, now: float | None = None) -> int:
        """End handshakes past HELLO_TIMEOUT or HANDSHAKE_TIMEOUT and sessions idle for
        IDLE_TIMEOUT (monotonic time ``now``). Returns how many peers it ended."""
        now = self.monotonic() if now is None else now
        ended = 0
        for peer in list(self._candidates.values()):
            if now - peer.made > HELLO_TIMEOUT:
                self._end(peer, "no cookie exchange", notify=False)
                ended += 1
        for stage, limit in ((HELLO, HELLO_TIMEOUT), (HANDSHAKE, HANDSHAKE_TIMEOUT)):
            late = [peer for peer in self._stages[stage].values() if now - peer.made > limit]
            for peer in late:
                self._end(peer, f"{stage} timeout", notify=False)
            self.timed_out += len(late)
            ended += len(late)
        if self._table is not None:
            idle = [
                peer
                for peer in self._table.values()
                if getattr(peer, "stage", None) == SESSION and now - peer.seen > IDLE_TIMEOUT
            ]
            for peer in idle:
                self._end(peer, "idle")  # close_notify: the client handshakes again
            self.idled += len(idle)
            ended += len(idle)
        return ended

    def end_sessions(self, principals: Iterable[str]) -> int:
        """End the sessions authenticated as any of ``principals`` (re-keyed or revoked)."""
        names = set(principals)
        table = self._table
        if not names or table is None:
            return 0
        doomed = [peer for peer in table.values() if _claims(peer) in names]
        for peer in doomed:
            self._end(peer, "credential re-keyed or revoked")
        if doomed:
            self.ended += len(doomed)
            log.info(
                "event=dtls_sessions_ended principals=%s count=%d",
                ",".join(sorted(names)),
                len(doomed),
            )
        return len(doomed)
