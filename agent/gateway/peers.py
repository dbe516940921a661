"""Peer gateways of one site: the replicated state (:class:`PeerState`), its CoAP resources
(:class:`PeerSite`, :class:`PeerServer`) and anti-entropy between peers (:class:`PeerSync`).

The site's gateways share a key-value state (site configuration, model assignments, alert
acknowledgements, counters) that converges without the cloud: each gateway writes locally, and
every :data:`PERIOD` seconds exchanges state with one peer (round robin over the configured
peers). Merging is by the rule of each key's kind (:mod:`agent.gateway.crdt`), so the order,
repetition or loss of exchanges does not matter: once every write has reached every replica by
some path, all replicas hold the same state. A partitioned site keeps working on each side and
converges when the partition heals.

Resources (CBOR, content format 60)::

    GET   /peer/digest   { key => hash (8 bytes) }: the hash of each key's canonical state
    FETCH /peer/state    body [ key, ... ] (at most FETCH_KEYS): answers { key => state }
    POST  /peer/state    body { key => state }: merged key by key; answers { key => reason }
                         for the keys refused (an empty map when all merged)

FETCH (RFC 8132) is GET with a body: a list of keys does not fit in Uri-Query options.

One exchange (:meth:`PeerSync.sync_once`): get the peer's digest; fetch the keys whose hash
differs from ours or that we lack; merge them; push the keys the peer lacks or holds differently
(after our merge, our state of such a key includes the peer's, so one exchange makes both sides
equal for every key either side held).

Security: with a site secret (``[gateway.peers] secret``), the resources are served only through
OSCORE, one context per direction of each pair of peers (agent/gateway/peersecurity.py), and an
unprotected request gets 4.01; :class:`PeerSync` protects its requests through its transport.
Without one they are served over plain CoAP to any peer that reaches the port: acceptable only
on a closed site network (loopback, a network namespace), and the server warns at start when it
listens anywhere but loopback (docs/gateway.md, "Peer state").

Logging: debug for each exchange, info when a peer becomes reachable or unreachable, warning
(rate limited) for refused keys and bad messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import os
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource
from aiocoap.credentials import CredentialsMap
from aiocoap.numbers.codes import Code
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

from agent.errors import StoreError, SyncError
from agent.files import resolve_path, write_atomic
from agent.gateway.crdt import (
    HELD,
    LOCAL_ENTRY_BYTES,
    MAX_KEYS,
    MAX_MESSAGE_BYTES,
    Crdt,
    CrdtError,
    LWWRegister,
    ORSet,
    PNCounter,
    SiteState,
    check_key,
    decode_digest,
    decode_entries,
    encode_digest,
    kind_for,
)
from agent.gateway.hlc import MAX_DRIFT, ClockError, HybridClock, Timestamp, check_node
from agent.gateway.peersecurity import STATE_DIR, PeerContexts, PeerSecretError, read_secret
from agent.sync.transport import CoapTransport, transports_for
from agent.wire import records
from cloud.listen import port_to_bind
from drivers.base import Options
from drivers.clock import Clock

log = logging.getLogger(__name__)

# Timing (seconds); tests shorten them.
PERIOD = 5.0  # one exchange with one peer every PERIOD (+-25 % jitter)
REQUEST_DEADLINE = 5.0  # one request of an exchange
WARN_WINDOW = 60.0  # at most WARN_BURST warnings about refused keys per window
WARN_BURST = 10

FETCH_KEYS = 32  # keys asked for in one FETCH (32 x 16 KiB: half a message at most)
PUSH_BYTES = MAX_MESSAGE_BYTES // 2  # state pushed in one POST
MAX_FILE_BYTES = MAX_KEYS * (LOCAL_ENTRY_BYTES * 2 + 160)  # the state file
CF_CBOR = 60

DIGEST_PATH = ("peer", "digest")
STATE_PATH = ("peer", "state")


DEFAULT_PORT = 5690


@dataclass(frozen=True)
class PeerSettings:
    """The ``[gateway.peers]`` table of a gateway's config::

    [gateway.peers]
    listen = "0.0.0.0:5690"                      # where the peers reach this gateway
    peers = { gw-b = "coap://10.0.0.12:5690", gw-c = "coap://10.0.0.13:5690" }
    secret = "/etc/edge-agent/site.key"          # the site secret: OSCORE between the peers
    period = 5.0                                 # seconds between exchanges
    state = "peer-state.cbor"                    # relative: the data directory

    ``peers`` is a table of the peers' node names (their ``[agent] device_id``) and URIs; a plain
    list of URIs is taken without ``secret`` (names unknown). ``secret`` (relative: the data
    directory) is read and checked here; its contexts' state goes to ``DATA/peer-oscore/``.
    """

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    peers: tuple[str, ...] = ()
    period: float = PERIOD
    state: Path = Path("peer-state.cbor")
    names: tuple[str, ...] = ()  # the peers' node names, as ``peers`` (empty: not given)
    secret: bytes | None = field(default=None, repr=False)
    oscore_state: Path | None = None  # the contexts' state (with secret: DATA/peer-oscore)

    @property
    def named(self) -> dict[str, str]:
        """Node name -> URI of each peer (empty when the names were not given)."""
        return dict(zip(self.names, self.peers, strict=True))

    @classmethod
    def from_options(cls, opts: Options, data_dir: Path) -> PeerSettings:
        listen = opts.string("listen", f"0.0.0.0:{DEFAULT_PORT}")
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise opts.error("listen", f"{listen!r}: expected HOST:PORT")
        names: tuple[str, ...] = ()
        raw = opts.value("peers", ())
        if isinstance(raw, dict):
            for name in raw:
                try:
                    check_node(name)
                except ClockError as err:
                    raise opts.error("peers", str(err)) from None
            names = tuple(raw)
            peers = tuple(raw.values())
            if not all(isinstance(uri, str) for uri in peers):
                raise opts.error("peers", "expected a table of node name = URI strings")
        else:
            peers = opts.strings("peers", ())
        try:
            transports_for(peers)
        except SyncError as err:
            raise opts.error("peers", str(err)) from None
        secret = None
        if opts.has("secret"):
            try:
                secret = read_secret(resolve_path(data_dir, opts.string("secret")))
            except PeerSecretError as err:
                raise opts.error("secret", str(err)) from None
            if peers and not names:
                raise opts.error(
                    "peers", 'with secret, a table of node name = URI: { gw-b = "coap://..." }'
                )
        period = opts.number("period", PERIOD, minimum=0.05, maximum=3600.0)
        state = resolve_path(data_dir, opts.string("state", "peer-state.cbor"))
        opts.finish()
        return cls(
            host.strip("[]"), int(port), peers, period, state, names, secret,
            None if secret is None else data_dir / STATE_DIR,
        )  # fmt: skip


class _Warnings:
    """At most ``burst`` warnings per ``window`` seconds; the rest are counted and summed up in
    the next warning that passes."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._start = -WARN_WINDOW
        self._count = 0
        self._dropped = 0

    def warn(self, message: str, *args: Any) -> None:
        now = self.clock.monotonic()
        if now - self._start >= WARN_WINDOW:
            self._start, self._count = now, 0
        if self._count >= WARN_BURST:
            self._dropped += 1
            return
        self._count += 1
        if self._dropped:
            message += " suppressed=%d"
            args = (*args, self._dropped)
            self._dropped = 0
        log.warning(message, *args)


@dataclass
class MergeReport:
    """What a merge did: the keys whose state changed and, per refused key, why."""

    changed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


class PeerState:
    """This gateway's replica of the site state, kept in ``path`` (None: in memory only).

    Local writes (:meth:`set`, :meth:`delete`, :meth:`add`, :meth:`remove`,
    :meth:`increment`) take effect at once and are saved before they return (a small atomic
    file write); merges from peers are saved by :meth:`flush`. The hybrid clock's ceiling is
    kept beside the state, in ``<path>.hlc``."""

    def __init__(
        self, node_id: str, path: Path | None, clock: Clock, *, max_drift: float = MAX_DRIFT
    ) -> None:
        self.node = check_node(node_id)
        self.path = path
        self.clock = clock
        hlc_path = None if path is None else path.with_name(path.name + ".hlc")
        self.hlc = HybridClock(node_id, clock, hlc_path, max_drift=max_drift)
        self.site = SiteState()
        self.warnings = _Warnings(clock)
        self._generation = 0  # of the state in memory
        self._written = 0  # the generation in the file
        self._write_lock = threading.Lock()
        self._flush_lock = asyncio.Lock()
        self._load()

    # -- local writes ------------------------------------------------------------------------

    def set(self, key: str, value: Any) -> Timestamp:
        """Write ``value`` (CBOR data; None deletes) to an LWW key (``config/*``, ``model/*``);
        returns the write's timestamp."""
        self._expect(key, LWWRegister)
        ts = self.hlc.now()
        self._write(key, LWWRegister(ts, value))
        return ts

    def delete(self, key: str) -> Timestamp:
        """Delete an LWW key (a tombstone: a delayed older write cannot bring it back)."""
        return self.set(key, None)

    def add(self, key: str, element: str) -> None:
        """Add ``element`` to the set ``key`` (``ack/*``)."""
        current = self._expect(key, ORSet) or ORSet()
        self._write(key, current.add(self.node, element, self.hlc.now().packed))

    def remove(self, key: str, element: str) -> None:
        """Remove ``element`` from the set ``key``: the adds seen here are undone; an add made
        concurrently on another gateway survives (add wins)."""
        current = self._expect(key, ORSet)
        if current is not None and element in current.entries:
            self._write(key, current.remove(element))

    def increment(self, key: str, n: int = 1) -> int:
        """Add ``n`` (negative: subtract) to the counter ``key`` (``count/*``); its new value."""
        current = self._expect(key, PNCounter) or PNCounter()
        self._write(key, current.increment(self.node, n))
        return self.get(key)

    def _expect(self, key: str, kind: type[Crdt]) -> Any:
        if kind_for(key) is not kind:
            raise CrdtError(f"{key}: a {kind_for(key).kind} key, not a {kind.kind} key")
        return self.site.get(key)

    def _write(self, key: str, new: Crdt) -> None:
        self.site.write(key, new)
        self._generation += 1
        self.save()

    # -- reading -----------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        """The key's value: an LWW value (None when absent or deleted), a counter's total (0
        when absent), a set's elements (a frozenset, empty when absent)."""
        entry = self.site.get(check_key(key))
        if entry is not None:
            return entry.value()
        kind = kind_for(key)
        return 0 if kind is PNCounter else frozenset() if kind is ORSet else None

    def entry(self, key: str) -> Crdt | None:
        """The key's CRDT state (timestamps, dots, per-node counts), None when absent."""
        return self.site.get(key)

    def snapshot(self) -> dict[str, Any]:
        """Every key's plain value (:meth:`agent.gateway.crdt.SiteState.snapshot`)."""
        return self.site.snapshot()

    def digest(self) -> dict[str, bytes]:
        return self.site.digest()

    def encode(self, keys: Sequence[str] | None = None) -> bytes:
        """The canonical CBOR map ``key -> state`` of ``keys`` (None: every key)."""
        return self.site.encode(keys)

    # -- merging -----------------------------------------------------------------------------

    def merge_from(self, encoded: bytes, *, save: bool = True) -> MergeReport:
        """Merge a peer's ``{ key => state }`` key by key. A malformed key, a key of the wrong
        kind, or an LWW write timestamped more than ``max_drift`` ahead of this clock is refused
        (in the report) and the others merge. :class:`CrdtError` only when the message as a
        whole is unusable. ``save``: write the file now (else at the next :meth:`flush`)."""
        decoded = decode_entries(encoded)
        report = MergeReport(refused=dict(decoded.refused))
        for key, incoming in decoded.entries.items():
            try:
                if isinstance(incoming, LWWRegister):
                    self.hlc.update(incoming.ts)  # later local writes win over this one
                if self.site.merge(key, incoming):
                    report.changed.append(key)
            except (CrdtError, ClockError) as err:
                report.refused[key] = str(err)
        if report.changed:
            self._generation += 1
            if save:
                self.save()
        return report

    # -- the file ----------------------------------------------------------------------------

    def save(self) -> None:
        """Write the state file now (atomically), if it is behind. :class:`StoreError` when it
        cannot be written (the state in memory stays, and is written at the next save)."""
        if self.path is not None and self._written < self._generation:
            try:
                self._store(self._generation, self.encode())
            except OSError as err:
                raise StoreError(f"{self.path}: cannot save the peer state: {err}") from err

    async def flush(self) -> None:
        """:meth:`save`, with the file write off the event loop; a failure is logged (the next
        flush tries again), not raised."""
        if self.path is None or self._written >= self._generation:
            return
        async with self._flush_lock:
            generation, data = self._generation, self.encode()
            try:
                await self.clock.run_blocking(None, self._store, generation, data)
            except OSError as err:
                log.error("event=peer_state_not_saved path=%s error=%r", self.path, str(err))

    def _store(self, generation: int, data: bytes) -> None:
        assert self.path is not None
        with self._write_lock:
            if generation <= self._written:
                return  # a newer state is in the file already
            write_atomic(self.path, data, mode=0o600)
            self._written = generation

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as err:
            raise StoreError(f"{self.path}: cannot read the peer state: {err}") from err
        try:
            decoded = decode_entries(data, max_bytes=MAX_FILE_BYTES, bounds=HELD)
        except CrdtError as err:
            aside = self.path.with_name(f"{self.path.name}.corrupt")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.error(
                "event=peer_state_unreadable path=%s error=%r moved_to=%s note=starting empty; "
                "the peers send the site state back at the next exchanges",
                self.path,
                str(err),
                aside,
            )
            return
        for key, reason in itertools.islice(decoded.refused.items(), WARN_BURST):
            log.warning(
                "event=peer_state_key_refused path=%s key=%s reason=%r", self.path, key, reason
            )
        for key, entry in decoded.entries.items():
            with contextlib.suppress(CrdtError):
                self.site.merge(key, entry)
            if isinstance(entry, LWWRegister):
                self.hlc.witness(entry.ts)
        log.info(
            "event=peer_state_loaded path=%s keys=%d refused=%d",
            self.path,
            len(self.site),
            len(decoded.refused),
        )


def _message(code: Code, payload: bytes = b"") -> aiocoap.Message:
    msg = aiocoap.Message(code=code, payload=payload)
    if payload and code.is_successful():
        msg.opt.content_format = CF_CBOR
    return msg


class PeerSite(aiocoap.resource.Resource):
    """The peer resources of ``state`` as one aiocoap resource (serve it as a context's site).
    Every request it does not understand gets a 4.xx with a one-line diagnostic."""

    def __init__(self, state: PeerState, *, protected: bool = False) -> None:
        super().__init__()
        self.state = state
        self.protected = protected  # only requests that came through OSCORE
        self.stats: dict[str, int] = {"digest": 0, "fetch": 0, "push": 0, "refused": 0}

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        if self.protected and not getattr(request.remote, "authenticated_claims", None):
            self._refuse(request, "not protected with OSCORE")
            pipe.add_response(_message(Code.UNAUTHORIZED, b"OSCORE required"), is_last=True)
            return
        block1 = request.opt.block1
        size1 = request.opt.size1
        if (block1 is not None and block1.block_number * block1.size > MAX_MESSAGE_BYTES) or (
            size1 is not None and size1 > MAX_MESSAGE_BYTES
        ):
            self._refuse(request, "the body is larger than the limit")
            pipe.add_response(_message(Code.REQUEST_ENTITY_TOO_LARGE), is_last=True)
            return
        await super().render_to_pipe(pipe)

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        path = tuple(request.opt.uri_path)
        if path not in (DIGEST_PATH, STATE_PATH):
            return _message(Code.NOT_FOUND, b"no such resource")
        method = (path, request.code)
        try:
            if method == (DIGEST_PATH, Code.GET):
                self.stats["digest"] += 1
                return _message(Code.CONTENT, encode_digest(self.state.digest()))
            if method == (STATE_PATH, Code.FETCH):
                return self._fetch(bytes(request.payload))
            if method == (STATE_PATH, Code.POST):
                return await self._push(request, bytes(request.payload))
        except CrdtError as err:
            self._refuse(request, str(err))
            return _message(Code.BAD_REQUEST, str(err)[:200].encode())
        return _message(Code.METHOD_NOT_ALLOWED, b"GET /peer/digest, FETCH or POST /peer/state")

    def _fetch(self, payload: bytes) -> aiocoap.Message:
        try:
            keys = records.loads(payload, max_depth=2)
        except records.RecordError as err:
            raise CrdtError(f"FETCH: {err}") from None
        if not isinstance(keys, list) or len(keys) > FETCH_KEYS:
            raise CrdtError(f"FETCH: expected a list of at most {FETCH_KEYS} keys")
        self.stats["fetch"] += 1
        return _message(Code.CONTENT, self.state.encode([check_key(k) for k in keys]))

    async def _push(self, request: aiocoap.Message, payload: bytes) -> aiocoap.Message:
        if len(payload) > MAX_MESSAGE_BYTES:
            return _message(Code.REQUEST_ENTITY_TOO_LARGE)
        report = self.state.merge_from(payload, save=False)
        self.stats["push"] += 1
        if report.refused:
            self.stats["refused"] += len(report.refused)
            key, reason = next(iter(report.refused.items()))
            self._refuse(request, f"{len(report.refused)} keys refused, first {key}: {reason}")
        await self.state.flush()
        return _message(Code.CHANGED, records.dumps(report.refused))

    def _refuse(self, request: aiocoap.Message, reason: str) -> None:
        self.state.warnings.warn(
            "event=peer_request_refused peer=%s path=/%s reason=%r",
            request.remote.hostinfo if request.remote is not None else "?",
            "/".join(request.opt.uri_path),
            reason[:200],
        )


class PeerServer:
    """A CoAP server for :class:`PeerSite` on ``host:port`` (port 0: any free port; another,
    refused while another socket holds it, as the endpoint's: aiocoap binds with SO_REUSEPORT,
    so a second server on the port would start and the peers' requests split between them)."""

    def __init__(self, ctx: Any, site: PeerSite, host: str, port: int) -> None:
        self._ctx = ctx
        self.site = site
        self.host = host
        self.port = port

    @classmethod
    async def start(
        cls,
        state: PeerState,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        contexts: PeerContexts | None = None,
    ) -> PeerServer:
        """``contexts``: serve through OSCORE only (the site secret's contexts), else plainly."""
        site = PeerSite(state, protected=contexts is not None)
        served: Any = site
        creds: Any = None
        if contexts is not None:
            creds = CredentialsMap()
            creds[":peers"] = contexts
            served = OscoreSiteWrapper(site, creds)
        try:
            port = await port_to_bind(host, port)
        except OSError as err:  # one line that names the address and what to do
            raise SyncError(f"cannot serve the peer state: {err.strerror or err}") from err
        try:
            ctx = await aiocoap.Context.create_server_context(
                served, bind=(host, port), transports=["udp6"], server_credentials=creds
            )
        except OSError as err:
            raise SyncError(f"cannot serve the peer state on {host}:{port}: {err}") from err
        server = cls(ctx, site, host, port)
        log.info("event=peer_server_listening uri=%s node=%s", server.uri, state.node)
        if contexts is None and not _loopback(host):
            log.warning(
                "event=peer_state_unprotected uri=%s: the peer state is served over plain CoAP; "
                "anyone on this network can read and write it; set [gateway.peers] secret "
                "(docs/gateway.md, Peer state)",
                server.uri,
            )
        return server

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"coap://{host}:{self.port}"

    async def stop(self) -> None:
        await self._ctx.shutdown()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class Exchange:
    """One exchange with a peer: keys pulled (changed here), pushed, refused on either side."""

    peer: str
    pulled: list[str] = field(default_factory=list)
    pushed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


class PeerSync:
    """Anti-entropy with ``peers`` (base URIs, ``coap://host:port``) over ``transport``: one
    exchange every ``period`` seconds (+-25 %), with the next peer in turn."""

    def __init__(
        self,
        state: PeerState,
        peers: Sequence[str],
        transport: CoapTransport,
        *,
        period: float = PERIOD,
        deadline: float = REQUEST_DEADLINE,
        rng: random.Random | None = None,
    ) -> None:
        try:
            transports_for(peers)
        except SyncError as err:
            raise ValueError(f"peers: {err}") from None
        self.state = state
        self.peers = [p.rstrip("/") for p in peers]
        self.transport = transport
        self.clock = state.clock
        self.period = period
        self.deadline = deadline
        self.rng = rng or random.Random()
        self.reachable: dict[str, bool] = {}
        self.exchanges = 0
        self._turn = 0

    def next_peer(self) -> str:
        """The peer of the next exchange (round robin)."""
        peer = self.peers[self._turn % len(self.peers)]
        self._turn += 1
        return peer

    async def run(self, beat: Callable[[], None] | None = None) -> None:
        """Exchange with one peer per period, forever (cancel to stop). A failed exchange is
        logged and the next period goes on with the next peer. ``beat()`` after each exchange
        (an exchange that never ends stops the beats: the supervisor's health sees it)."""
        if not self.peers:
            log.info("event=peer_sync_idle node=%s reason=no_peers", self.state.node)
            return
        while True:
            await self.try_once(self.next_peer())
            if beat is not None:
                beat()
            await self.clock.sleep(self.period * (0.75 + 0.5 * self.rng.random()))

    async def try_once(self, peer: str) -> Exchange | None:
        """:meth:`sync_once`, with its failure logged instead of raised."""
        try:
            exchange = await self.sync_once(peer)
        except SyncError as err:
            self._mark(peer, False, str(err))
            return None
        except CrdtError as err:
            self.state.warnings.warn("event=peer_bad_answer peer=%s error=%r", peer, str(err))
            return None
        self._mark(peer, True)
        return exchange

    async def sync_once(self, peer: str) -> Exchange:
        """One exchange with ``peer``: digests, pull what differs, merge, push what the peer
        lacks or holds differently. :class:`SyncError` when the peer does not answer,
        :class:`CrdtError` when its digest is malformed."""
        peer = peer.rstrip("/")
        exchange = Exchange(peer)
        answer = await self._request("GET", f"{peer}/peer/digest")
        theirs = decode_digest(answer)
        mine = self.state.digest()
        wanted = sorted(k for k, h in theirs.items() if mine.get(k) != h)
        for start in range(0, len(wanted), FETCH_KEYS):
            chunk = records.dumps(wanted[start : start + FETCH_KEYS])
            report = self.state.merge_from(
                await self._request("FETCH", f"{peer}/peer/state", chunk), save=False
            )
            exchange.pulled += report.changed
            exchange.refused.update(report.refused)
        await self.state.flush()
        mine = self.state.digest()
        exchange.pushed = sorted(k for k, h in mine.items() if theirs.get(k) != h)
        for batch in self._batches(exchange.pushed):
            answer = await self._request("POST", f"{peer}/peer/state", self.state.encode(batch))
            with contextlib.suppress(records.RecordError):
                refused = records.loads(answer, max_depth=2)
                if isinstance(refused, dict):
                    exchange.refused.update({f"{peer}:{k}": str(v) for k, v in refused.items()})
        for key, reason in exchange.refused.items():
            self.state.warnings.warn("event=peer_key_refused key=%s reason=%r", key, reason)
        self.exchanges += 1
        log.debug(
            "event=peer_exchange peer=%s pulled=%d pushed=%d refused=%d",
            peer,
            len(exchange.pulled),
            len(exchange.pushed),
            len(exchange.refused),
        )
        return exchange

    async def sync_all(self) -> list[Exchange | None]:
        """One exchange with every peer, in turn."""
        return [await self.try_once(peer) for peer in self.peers]

    def _batches(self, keys: list[str]) -> list[list[str]]:
        batches: list[list[str]] = []
        size = PUSH_BYTES
        for key in keys:
            entry = self.state.entry(key)
            n = len(key) + (len(entry.to_cbor()) if entry is not None else 0)
            if size + n > PUSH_BYTES:
                batches.append([])
                size = 0
            batches[-1].append(key)
            size += n
        return batches

    async def _request(self, method: str, uri: str, payload: bytes = b"") -> bytes:
        response = await self.transport.request(
            method,
            uri,
            payload,
            content_format=CF_CBOR if payload else None,
            deadline=self.deadline,
        )
        if not response.success:
            reason = response.payload[:200].decode("utf-8", "replace")
            raise SyncError(f"{method} {uri}: {response.dotted} {reason}".rstrip())
        return response.payload

    def _mark(self, peer: str, ok: bool, error: str = "") -> None:
        if self.reachable.get(peer) == ok:
            if not ok:
                log.debug("event=peer_unreachable peer=%s error=%r", peer, error)
            return
        self.reachable[peer] = ok
        if ok:
            log.info("event=peer_reachable peer=%s node=%s", peer, self.state.node)
        else:
            log.info(
                "event=peer_unreachable peer=%s node=%s error=%r", peer, self.state.node, error
            )
