"""The reference cloud endpoint: an aiocoap server for ingest, device state and discovery.

Resources (docs/protocol.md is the normative description):

    GET  /.well-known/core                 RFC 6690 link format
    POST /ingest/{device}                  a batch of records (SenML-CBOR, 112); answers an ack
    GET  /state/{device}/reported          reported state
    PUT  /state/{device}/reported          the device reports state (per-key versions)
    GET  /state/{device}/desired           desired state; Observe (RFC 7641)
    PUT  /state/{device}/desired           operators set desired state (If-Match supported)
    GET  /devices/{device}                 the registry entry
    POST /infer/{device}                   full-precision inference on a window (cloud/inference.py)
    POST /validate/{device}                a verdict on an edge alert, stored per (device, seq)
    POST /relay/{gateway}                  several devices' batches from their gateway (relayroutes)
    GET  /models/{name}[/{version}/manifest|file]  model registry (cloud/models.py; Block2)

Use it in-process::

    server = await CloudServer.start(data_dir, "127.0.0.1", 0)
    ... server.port, await server.records("pump-01") ...
    await server.stop()

Every request that is not understood gets a 4.xx with a diagnostic payload (RFC 7252 section
5.5.2) and the server goes on; an unavailable database gets 5.03 with Max-Age. Logging policy:
debug per request, info for start/stop and registrations, warning for peers that send bad
requests (rate limited), error for lost function.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import aiocoap
import aiocoap.error
import aiocoap.interfaces
import aiocoap.resource
from aiocoap import Message
from aiocoap.credentials import CredentialsMap
from aiocoap.numbers.codes import Code
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

from agent.loopfilter import ExceptionFilter
from agent.wire import codec, features, records, statedoc
from agent.wire.batch import CF_CBOR, CF_LINK_FORMAT, DEVICE_ID, CodecError, IngestAck, WireRecord
from agent.wire.credentials import Credential
from agent.wire.learning import MAX_BODY_BYTES
from agent.wire.statedoc import StateError
from cloud import commandstore
from cloud.credroutes import CredentialRoutes
from cloud.dashboard import Dashboard
from cloud.desired import DesiredObservers, render_document
from cloud.dtls import DtlsEndpoint
from cloud.fastpath import IngestFastPath
from cloud.inference import DEFAULT_MODELS_DIR, CloudInference
from cloud.ingest import GroupCommit
from cloud.listen import bound_port, enlarge_receive_buffer, port_to_bind, server_protocol
from cloud.logroutes import LogRoutes
from cloud.models import ModelRegistry, ModelRequestError
from cloud.protocol import (
    _KNOWN_CRITICAL,
    Amplification,
    Limits,
    PeerLogFilter,
    SecureFront,
    _Block1Uploads,
    _Block2Responses,
    _Failure,
    _is_desired_get,
    _is_masters_get,
    _link,
    _link_matches,
    _Route,
    _route,
    _too_large,
    datagram_guard,
    storage_failure,
)
from cloud.ratelimit import DeviceRateLimit
from cloud.relayroutes import RelayRoutes
from cloud.releases import ReleaseRoutes
from cloud.security import (
    ENDPOINT_SEQUENCE,
    Principal,
    Principals,
    allowed,
    identity,
    issue_credential,
)
from cloud.serverroutes import ComputeRoutes
from cloud.storage import (
    DocumentTooLarge,
    PreconditionFailed,
    SQLiteStorage,
    Storage,
    StorageThread,
    StorageUnavailable,
    StoredRecord,
    UnknownDevice,
    open_storage,
)
from cloud.storebase import DataRefused, device_ids
from drivers.clock import Clock, RealClock

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5683

# Timing (seconds); tests may shorten them (those of desired state are in cloud/desired.py).
WARN_WINDOW = 10.0  # at most WARN_BURST warnings about bad requests per window
WARN_BURST = 10

RESOURCE_TYPES = {
    "ingest": "edge-agent.ingest",
    "reported": "edge-agent.state.reported",
    "desired": "edge-agent.state.desired",
    "device": "edge-agent.device",
    "infer": "edge-agent.infer",
    "validate": "edge-agent.validate",
    "learn": "edge-agent.learn",
    "relay": "edge-agent.relay",
}


class _Site(aiocoap.resource.ObservableResource):
    """The endpoint's one resource tree: routes by Uri-Path, checks, and answers. Served through
    aiocoap's public resource API (``render_to_pipe``, ``render``, ``add_observation``)."""

    def __init__(self, server: CloudServer) -> None:
        super().__init__()
        self._server = server
        # a peer may not upload to a path it may not post to, nor read a held answer: each block
        authorize = lambda req: server._authorize(req, server._check(req))  # noqa: E731
        self._block1 = _Block1Uploads(self._limit_for, server.limits, server.stats, authorize)
        self._block2 = _Block2Responses(server.limits, server.stats, authorize)

    def _limit_for(self, req: Message) -> int:
        path = tuple(req.opt.uri_path)
        if path[:1] == ("ingest",):
            return self._server.limits.batch_bytes
        if path[:1] in (("learn",), ("logs",)):  # logs: cloud/logroutes.py checks its own
            return MAX_BODY_BYTES
        if path[:1] == ("relay",):
            return self._server.limits.relay_bytes
        return self._server.limits.state_bytes

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        # Model files answer any Block2 number themselves (stateless, resumable); so do masters
        # (never changed) and desired state (cloud/desired.py; its notifications too).
        path = tuple(request.opt.uri_path)
        if path[-1:] == ("file",) and path[:1] in (("models",), ("releases",)):
            return False
        return not (_is_desired_get(request) or _is_masters_get(request))

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        unknown = identity(request) is None and not self._server.allow_plain
        if request.opt.block1 is not None and unknown:  # no spooling for unknown peers
            pipe.add_response(Message(code=Code.UNAUTHORIZED), is_last=True)
            return
        if request.opt.observe is not None and not _is_desired_get(request):
            # only desired state is observable: anything else is served as a plain request
            # (RFC 7641 section 4.1), Block1 reassembly included
            request.opt.observe = None
        try:
            await super().render_to_pipe(pipe)
        except aiocoap.error.RenderableError as err:  # from block-wise handling: 4.08, 4.13...
            message = err.to_message()
            if message is None:
                raise
            if not message.code.is_successful():  # 2.31 Continue is not a refusal
                reason = bytes(message.payload).decode("utf-8", "replace") or type(err).__name__
                self._server._bad_request(request, _Failure(message.code, reason))
            self._server.responses[str(message.code)] += 1
            pipe.add_response(message, is_last=True)

    async def add_observation(self, request: Message, serverobservation: Any) -> None:
        device = await self._server._observable(request)
        if device is None:
            DesiredObservers.refuse(serverobservation)  # render answers it (or the error)
        else:
            self._server._observers.add(device, serverobservation, identity(request))

    async def render(self, request: Message) -> Message:
        server = self._server
        try:
            response = await server._render(request)
        except _Failure as failure:
            response = failure.to_message()
            server._bad_request(request, failure)
        except StorageUnavailable as err:  # 5.03 with Max-Age; 4.00 for a value it refuses
            response = storage_failure(err).to_message()
        except Exception:
            log.exception("event=internal_error path=%r", "/" + "/".join(request.opt.uri_path))
            response = Message(code=Code.INTERNAL_SERVER_ERROR, payload=b"internal error")
        server.responses[str(response.code)] += 1
        return response


class CloudServer(ComputeRoutes, RelayRoutes, ReleaseRoutes, LogRoutes, CredentialRoutes):
    """The endpoint: a CoAP server, a storage thread, and the observers of desired state."""

    def __init__(
        self,
        storage: StorageThread,
        *,
        allow_any_device: bool = False,
        allow_plain: bool = False,
        clock: Clock | None = None,
        limits: Limits | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.storage = storage
        self.ingest = GroupCommit(storage, clock or RealClock())  # batches, many per commit
        self.allow_any_device = allow_any_device
        self.allow_plain = allow_plain  # unauthenticated requests may do what a device may
        self.principals = Principals(state_dir, self._sequence_block)
        self.amplification = Amplification()
        self.clock = clock or RealClock()
        self.limits = limits or Limits()
        self.responses: Counter[str] = Counter()  # answers rendered, by code ("4.00 Bad Request")
        self.stats: Counter[str] = Counter()  # block1_blocks, block1_uploads, rate_limited_*
        self.rate_limit = DeviceRateLimit.of(self.limits, self.clock.monotonic, self.stats)
        self.host = DEFAULT_HOST
        self.port = 0
        self.data_dir: Path | None = None  # set by start() when the storage is SQLite in a dir
        self.store_id: str | None = None  # the storage's identity (acks and desired state say it)
        self.models: ModelRegistry | None = None  # DATA/models, set by start()
        self.inference = CloudInference(DEFAULT_MODELS_DIR)  # start() keeps verdicts in data_dir
        self.worker = False  # one of several processes on one address (start(worker=True))
        self.receive_buffer = 0  # bytes, as the kernel granted them
        self._ctx: aiocoap.Context | None = None
        #: called with (device, content format, body) of every batch that decoded
        self.batch_observer: Callable[[str, int, bytes], None] | None = None
        self.fast_path: IngestFastPath | None = None  # single-datagram OSCORE ingest (fastpath.py)
        self.dtls: DtlsEndpoint | None = None  # coaps://, with start(dtls_listen=...)
        self.dashboard: Dashboard | None = None  # the web page: Dashboard.start(server, ...)
        self._known_devices: set[str] = set()
        self.relays: dict[str, str] = {}  # device -> the gateway it is attached to
        self._observers = DesiredObservers(self.db, self.clock, self.reload_principals)
        self._guard: ExceptionFilter | None = None
        self._peer_logs = PeerLogFilter(self._may_warn)
        self._warned = 0
        self._suppressed = 0
        self._warn_window = 0.0

    @classmethod
    async def start(
        cls,
        data_dir: str | Path,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        allow_any_device: bool = False,
        allow_plain: bool = False,
        clock: Clock | None = None,
        limits: Limits | None = None,
        storage_factory: Callable[[], Storage] | None = None,
        storage: str | None = None,
        models_dir: str | Path | None = None,
        dtls_listen: tuple[str, int] | None = None,
        worker: bool = False,
        fast_path: bool = True,
    ) -> CloudServer:
        """Open the storage (``storage``: a spec for :func:`cloud.storage.open_storage`, e.g.
        ``postgresql://...``; default: SQLite in ``data_dir``) and listen on ``host:port``
        (port 0: any free port). ``models_dir``: the full-precision models of /infer and
        /validate (models/cloud). ``dtls_listen``: also serve coaps:// (DTLS-PSK) on this
        (host, port) (cloud/dtls.py). ``worker``: one of several processes on this address
        (``serve --processes N``, cloud/processes.py): the port is shared on purpose (no check
        that it is free), and no OSCORE context state is kept in ``data_dir`` (the processes
        would overwrite each other's; a peer goes through Echo once per process instead).
        ``fast_path``: answer single-datagram OSCORE ingest below aiocoap (cloud/fastpath.py)."""
        if storage_factory is None:
            storage_factory = (
                (lambda: open_storage(storage))
                if storage is not None
                else (lambda: SQLiteStorage.in_dir(data_dir))
            )
        thread = StorageThread(storage_factory, clock)
        await thread.start()
        server = cls(
            thread,
            allow_any_device=allow_any_device,
            allow_plain=allow_plain,
            clock=clock,
            limits=limits,
            state_dir=None if worker else Path(data_dir) / "oscore",
        )
        server.worker = worker
        server.data_dir = Path(data_dir)
        server.models = ModelRegistry(Path(data_dir) / "models", thread)
        server.inference = CloudInference(
            Path(models_dir) if models_dir is not None else DEFAULT_MODELS_DIR,
            server.data_dir,
            server.db,
        )
        try:
            await server.reload_principals()
            server.store_id = await thread.call(lambda s: s.storage_id())
            await server.inference.start()
            await server._listen(host, port, dtls_listen, fast_path)
        except BaseException:
            await server.inference.close()
            await thread.stop()
            raise
        return server

    async def _listen(
        self, host: str, port: int, dtls: tuple[str, int] | None = None, fast: bool = True
    ) -> None:
        if not self.worker:  # workers share the port their parent checked
            port = await port_to_bind(host, port)
        creds = CredentialsMap()
        creds[":principals"] = self.principals
        limit = None if self.allow_plain else self.amplification.limit
        resources = _Site(self)
        site = SecureFront(OscoreSiteWrapper(resources, creds), self._bad_request, limit)
        self._ctx = await aiocoap.Context.create_server_context(
            site, bind=(host, port), transports=["udp6"], server_credentials=creds
        )
        if fast:
            self.fast_path = IngestFastPath(self.principals, resources.render)
            self.fast_path.install(server_protocol(self._ctx))
        self.host = host
        self.port = bound_port(self._ctx) if port == 0 else port  # 0: a worker's
        self.receive_buffer = enlarge_receive_buffer(self._ctx)
        if dtls is not None:  # after the plain socket, so that the DTLS port check sees it
            try:
                self.dtls = await DtlsEndpoint.start(site, self.principals, dtls)
            except BaseException:
                await self._ctx.shutdown()
                raise
        self._guard = datagram_guard(self._bad_datagram)
        self._guard.install(asyncio.get_running_loop())
        self._peer_logs.install()  # aiocoap's lines about each bad datagram: rate limited
        self._observers.start()
        log.info(
            "event=listening uri=%s dtls=%s principals=%d allow_any_device=%s allow_plain=%s "
            "rcvbuf=%d",
            self.uri,
            self.dtls.uri if self.dtls is not None else "-",
            len(self.principals),
            str(self.allow_any_device).lower(),
            str(self.allow_plain).lower(),
            self.receive_buffer,
        )
        if self.allow_plain:
            log.warning(
                "event=plain_access_allowed uri=%s: unauthenticated peers may post and read "
                "device data (security = none); use it only on a closed test network",
                self.uri,
            )

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"coap://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop listening, end observations, close the storage."""
        if self.dashboard is not None:
            await self.dashboard.stop()
        await self._observers.stop()
        if self.dtls is not None:
            dtls, self.dtls = self.dtls, None
            await dtls.stop()
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            if self.fast_path is not None:
                await self.fast_path.close()
                log.info("event=fast_path %s", self.fast_path.summary())
            await ctx.shutdown()
        self._peer_logs.remove()
        if self._guard is not None:
            self._guard.remove()
            self._guard = None
        await self.ingest.stop()
        self.principals.close()
        await self.inference.close()
        await self.storage.stop()
        log.info("event=stopped")

    # -- the operator and test API ---------------------------------------------------------------

    async def db(self, fn: Callable[[Storage], T]) -> T:
        """Run ``fn(storage)`` on the storage thread."""
        return await self.storage.call(fn)

    def _sequence_block(self, count: int, at_least: int) -> int:
        """A block of the endpoint's OSCORE sender sequence numbers (cloud/security.py). Called
        by aiocoap while it protects a message, on the event loop: it waits for the storage
        thread (once per SEQUENCE_BLOCK messages that need a number of their own)."""
        return self.storage.call_sync(
            lambda s: s.reserve_sequence(ENDPOINT_SEQUENCE, count, at_least)
        )

    async def add_device(self, device: str) -> bool:
        if not DEVICE_ID.match(device):
            raise ValueError(f"{device!r} is not a valid device id")
        now = self.clock.time()
        added = await self.db(lambda s: s.add_device(device, now))
        self._known_devices.add(device)
        if added:
            log.info("event=device_registered device=%s", device)
        return added

    async def register(self, principal: str, role: str = "device") -> Credential:
        """Make (or re-make: re-key) the principal's credential; a device is registered too.
        Returns the principal's side of it (what its credential file holds)."""
        if role == "device":
            await self.add_device(principal)
        now = self.clock.time()
        cred = await self.db(lambda s: issue_credential(s, principal, role, now))
        await self.reload_principals()
        log.info("event=credential_issued principal=%s role=%s", principal, role)
        return cred

    async def revoke(self, principal: str) -> bool:
        now = self.clock.time()
        done = await self.db(lambda s: s.revoke(principal, now))
        await self.reload_principals()
        if done:
            log.info("event=credential_revoked principal=%s", principal)
        return done

    async def reload_principals(self) -> None:
        """Credentials and gateway attachments, as the storage holds them now."""
        gone = self.principals.load(await self.db(lambda s: s.credentials()))
        self.relays = self.principals.acting(await self.db(lambda s: s.relays()))
        if gone and self.dtls is not None:
            self.dtls.end_sessions(gone)  # sessions made with a key that is no longer valid

    async def records(
        self, device: str, since: float | None = None, by_arrival: bool = False
    ) -> list[StoredRecord]:
        """The device's stored records in seq order (or in the order they arrived)."""
        return await self.db(lambda s: s.records(device, since, None, by_arrival))

    async def seqs(self, device: str) -> list[int]:
        """Every stored seq of the device, ascending."""
        return await self.db(lambda s: s.seqs(device))

    async def counts(self, device: str) -> dict[str, int]:
        """The device's stored records by kind."""
        return await self.db(lambda s: s.counts(device))

    async def reported(self, device: str) -> dict[str, statedoc.Entry]:
        return await self.db(lambda s: s.reported(device))

    async def desired(self, device: str) -> statedoc.DesiredDoc:
        return await self.db(lambda s: s.desired(device))

    async def set_desired(
        self, device: str, changes: dict[str, Any], if_match: list[bytes] | None = None
    ) -> tuple[statedoc.DesiredDoc, list[str]]:
        """Apply operator changes to desired state and notify the device's observers."""
        now = self.clock.time()
        limit = self.limits.desired_doc_bytes
        doc, changed = await self.db(lambda s: s.put_desired(device, changes, now, if_match, limit))
        if changed:
            log.info(
                "event=desired_changed device=%s rev=%d keys=%s", device, doc.rev, ",".join(changed)
            )
            self._observers.changed(device, doc.etag())
        return doc, changed

    def observers(self, device: str) -> int:
        """How many observe ``device``'s desired state."""
        return self._observers.count(device)

    async def _observable(self, request: Message) -> str | None:
        """The device whose desired state ``request`` may observe, or None (the request is then
        answered as a plain one: its error, or its document once)."""
        try:
            route = self._check(request)
            self._authorize(request, route)
            block2 = request.opt.block2
            if route.name != "desired" or route.device is None or (block2 and block2.block_number):
                return None  # (a later block of a document is fetched, never observed)
            return await self._device(route)  # registers it with allow_any_device
        except (_Failure, StorageUnavailable):
            return None
        except Exception as err:
            log.error("event=internal_error where=observe error=%r", f"{type(err).__name__}: {err}")
            return None

    # -- request handling ------------------------------------------------------------------------

    def _may_warn(self) -> bool:
        """The rate limit of warnings about bad input: WARN_BURST per WARN_WINDOW seconds."""
        now = time.monotonic()
        if now - self._warn_window > WARN_WINDOW:
            if self._suppressed:
                log.warning("event=bad_requests_suppressed count=%d", self._suppressed)
            self._warn_window, self._warned, self._suppressed = now, 0, 0
        if self._warned >= WARN_BURST:
            self._suppressed += 1
            return False
        self._warned += 1
        return True

    def _bad_request(self, request: Message, failure: _Failure) -> None:
        if failure.warn and self._may_warn():
            log.warning(
                "event=bad_request peer=%s code=%s method=%s path=%r reason=%r",
                getattr(request.remote, "hostinfo", "?"),
                failure.code,
                request.code,
                "/" + "/".join(request.opt.uri_path),  # the peer's text: %r, one line
                failure.message,
            )

    def _bad_datagram(self, error: BaseException) -> None:
        self.stats["undecodable_datagrams"] += 1
        if self._may_warn():
            log.warning("event=bad_datagram reason=%r", f"{type(error).__name__}: {error}"[:200])

    async def _known(self, device: str) -> bool:
        if device in self._known_devices:
            return True
        if await self.db(lambda s: s.device(device)) is not None:
            self._known_devices.add(device)
            return True
        return False

    def _check(self, request: Message) -> _Route:
        """Checks that need no storage: options, path, method, device id syntax."""
        for option in request.opt.option_list():
            number = option.number
            if number.is_critical() and number not in _KNOWN_CRITICAL:
                raise _Failure(Code.BAD_OPTION, f"critical option {int(number)} not supported")
        if request.opt.proxy_uri is not None or request.opt.proxy_scheme is not None:
            raise _Failure(Code.PROXYING_NOT_SUPPORTED, "this endpoint is not a proxy")
        route = _route(tuple(request.opt.uri_path))
        if request.code not in route.methods:
            allowed = ", ".join(str(m) for m in sorted(route.methods, key=int))
            raise _Failure(Code.METHOD_NOT_ALLOWED, f"allowed: {allowed}")
        if request.opt.uri_query and not route.queries:
            raise _Failure(Code.BAD_OPTION, "this resource takes no Uri-Query")
        if request.opt.if_match and not (route.conditional and request.code == Code.PUT):
            raise _Failure(Code.BAD_OPTION, "If-Match is only for PUT of desired state")
        if route.device is not None and not DEVICE_ID.match(route.device):
            raise _Failure(Code.NOT_FOUND, "no such device")
        accept = request.opt.accept
        wanted = CF_LINK_FORMAT if route.name == "wkc" else CF_CBOR
        own_format = route.name in ("models", "releases")  # they check Accept themselves
        if accept is not None and int(accept) != wanted and not own_format:
            raise _Failure(Code.NOT_ACCEPTABLE, f"this resource is served as {wanted}")
        return route

    async def _device(self, route: _Route) -> str:
        """The route's device if it is registered (or registered now, with allow_any_device)."""
        assert route.device is not None
        return await self._registered(route.device)

    async def _registered(self, device: str) -> str:
        """``device`` if it is registered (or registered now, with allow_any_device); else 4.04."""
        if await self._known(device):
            return device
        if self.allow_any_device:
            await self.add_device(device)
            return device
        raise _Failure(Code.NOT_FOUND, "no such device")

    def _payload(self, request: Message, formats: Iterable[int], limit: int) -> bytes:
        cf = request.opt.content_format
        return self._content(None if cf is None else int(cf), request.payload, formats, limit)

    def _content(self, cf: int | None, payload: bytes, formats: Iterable[int], limit: int) -> bytes:
        """``payload`` if its content format is one of ``formats`` and it fits ``limit``."""
        if cf is None or cf not in formats:
            listed = ", ".join(str(f) for f in formats)
            raise _Failure(
                Code.UNSUPPORTED_CONTENT_FORMAT, f"Content-Format must be one of {listed}"
            )
        if len(payload) > limit:
            raise _too_large(limit, "the request body")
        return bytes(payload)

    def _authorize(self, request: Message, route: _Route) -> Principal | None:
        """The principal asking, if it may; else 4.01 (not authenticated) or 4.03."""
        who = identity(request)
        if who is None and self.allow_plain:
            return None
        if who is not None and not self.principals.current(who):  # revoked or re-keyed since
            raise _Failure(Code.UNAUTHORIZED, "credential no longer valid")
        refusal = allowed(route.name, str(request.code.name), route.device, who, self.relays)
        if refusal == 401:
            raise _Failure(Code.UNAUTHORIZED, "")
        if refusal == 403:
            raise _Failure(Code.FORBIDDEN, "not this principal's resource")
        return who

    async def _render(self, request: Message) -> Message:
        route = self._check(request)
        self._authorize(request, route)
        log.debug(
            "event=request method=%s route=%s device=%s", request.code, route.name, route.device
        )
        handler: Callable[[Message, _Route], Awaitable[Message]] = getattr(
            self, f"_{route.name}_{str(request.code.name).lower()}"
        )
        return await handler(request, route)

    async def _wkc_get(self, request: Message, route: _Route) -> Message:
        who = identity(request)
        if who is None and not self.allow_plain:
            # nothing device-specific for an unauthenticated peer (and a small answer)
            return Message(
                code=Code.CONTENT, payload=b"</.well-known/core>", content_format=CF_LINK_FORMAT
            )
        if who is not None and who.role == "device":  # its own links: nothing of the others read
            ids = [str(who)] if await self._known(who) else []
        else:  # the ids alone
            ids = await self.db(device_ids)
            if who is not None and who.role == "gateway":  # its devices', and its relay
                ids = [d for d in ids if self.relays.get(d) == who]
        links = []
        cfs = codec.content_formats()
        formats: int | str = cfs[0] if len(cfs) == 1 else " ".join(str(f) for f in cfs)
        for d in ids:
            links += [
                {"href": f"/ingest/{d}", "rt": RESOURCE_TYPES["ingest"], "ct": formats},
                {"href": f"/state/{d}/reported", "rt": RESOURCE_TYPES["reported"], "ct": CF_CBOR},
                {
                    "href": f"/state/{d}/desired",
                    "rt": RESOURCE_TYPES["desired"],
                    "ct": CF_CBOR,
                    "obs": True,
                },
                {"href": f"/devices/{d}", "rt": RESOURCE_TYPES["device"], "ct": CF_CBOR},
                {"href": f"/infer/{d}", "rt": RESOURCE_TYPES["infer"], "ct": CF_CBOR},
                {"href": f"/validate/{d}", "rt": RESOURCE_TYPES["validate"], "ct": CF_CBOR},
            ]
        if who is not None and who.role == "gateway":
            links.append({"href": f"/relay/{who}", "rt": RESOURCE_TYPES["relay"], "ct": CF_CBOR})
        queries = list(request.opt.uri_query)
        text = ",".join(
            _link(link.pop("href"), **link) for link in links if _link_matches(link, queries)
        )
        return Message(
            code=Code.CONTENT, payload=text.encode("utf-8"), content_format=CF_LINK_FORMAT
        )

    async def _ingest_post(self, request: Message, route: _Route) -> Message:
        device = await self._device(route)
        cf = request.opt.content_format
        batch, _ = self._decode_batch(device, None if cf is None else int(cf), request.payload)
        ack = await self._store_batch(device, batch)
        return Message(code=Code.CHANGED, payload=ack.to_cbor(), content_format=CF_CBOR)

    def _decode_batch(
        self, device: str, cf: int | None, payload: bytes, readings: int | None = None
    ) -> tuple[list[WireRecord], int]:
        """The records of a batch for ``device`` (/ingest's body, or a /relay entry's), checked
        as /ingest checks them, and the readings its features records claim (at most
        ``readings``, default the batch limit); else the refusal (a :class:`_Failure`)."""
        payload = self._content(cf, payload, codec.content_formats(), self.limits.batch_bytes)
        assert cf is not None
        cap = self.limits.batch_readings
        cap = cap if readings is None else min(readings, cap)
        try:
            named, records = codec.encoding_for(cf).decode(payload)  # codec.decode_batch, with
            claimed = features.check_batch(records, cap)  # the limit of the readings claimed
        except features.FeaturesTooLarge as err:
            raise _Failure(
                Code.REQUEST_ENTITY_TOO_LARGE, str(err), size1=self.limits.batch_bytes
            ) from None
        except CodecError as err:
            raise _Failure(Code.BAD_REQUEST, str(err)) from None
        if named is not None and named != device:
            raise _Failure(Code.BAD_REQUEST, f"the batch names device {named!r}, not {device!r}")
        if len(records) > self.limits.batch_records:
            raise _Failure(
                Code.REQUEST_ENTITY_TOO_LARGE,
                f"a batch holds at most {self.limits.batch_records} records",
                size1=self.limits.batch_bytes,
            )
        if self.batch_observer is not None:  # a gateway learns its devices' resolutions
            self.batch_observer(device, cf, payload)
        return records, claimed

    async def _store_batch(self, device: str, records: list[WireRecord]) -> IngestAck:
        """Store a decoded batch through the group commit, if the device's rate limit takes it
        (else 5.03: cloud/ratelimit.py); its ack once committed."""
        self.rate_limit.take(device, len(records))
        try:
            result = await self.ingest.ingest(device, records)
        except UnknownDevice:
            raise _Failure(Code.NOT_FOUND, "no such device") from None
        except DataRefused as err:  # 4.00: a relay refuses that entry alone
            raise storage_failure(err) from None
        # a conflicting seq is never acknowledged: the device must keep that record
        ack = IngestAck.for_seqs(
            result.seqs, result.new, result.duplicate, result.conflict,
            conflicts=result.conflicts, last=result.last, store=self.store_id,
            now=self.clock.time(),  # said when set: a device may not know it (docs/protocol.md)
        )  # fmt: skip
        log.debug(
            "event=ingest device=%s records=%d new=%d dup=%d conflict=%d",
            device, len(records), result.new, result.duplicate, result.conflict,
        )  # fmt: skip
        return ack

    async def _reported_get(self, request: Message, route: _Route) -> Message:
        device = await self._device(route)
        entries = await self.db(lambda s: s.reported(device))
        payload = statedoc.encode_reported(entries)
        return Message(code=Code.CONTENT, payload=payload, content_format=CF_CBOR)

    async def _reported_put(self, request: Message, route: _Route) -> Message:
        device = await self._device(route)
        payload = self._payload(request, (CF_CBOR,), self.limits.state_bytes)
        try:
            entries = statedoc.parse_reported(payload)
        except StateError as err:
            raise _Failure(Code.BAD_REQUEST, str(err)) from None
        now = self.clock.time()
        limit = self.limits.reported_keys
        try:
            result = await self.db(lambda s: s.put_reported(device, entries, now, limit))
        except DocumentTooLarge as err:
            raise _Failure(Code.REQUEST_ENTITY_TOO_LARGE, str(err)) from None
        except StateError as err:  # a value the merge refuses (cyclic, invalid): the peer's fault
            raise _Failure(Code.BAD_REQUEST, str(err)) from None
        if done := commandstore.taken_results(entries, result.versions):  # command history
            await self.db(lambda s: s.note_command_results(device, done, now))
        if result.desired_changed:
            log.info(
                "event=model_blocked device=%s blocked=%s",
                device,
                ",".join(f"{k}@{v}" for k, v in result.desired.blocked.items()),
            )
            self._observers.changed(device, result.desired.etag())
        payload = records.dumps(result.versions)
        return Message(code=Code.CHANGED, payload=payload, content_format=CF_CBOR)

    async def _desired_get(self, request: Message, route: _Route) -> Message:
        device = await self._device(route)
        doc = await self.db(lambda s: s.desired(device))
        self._observers.seen(device, doc.etag())  # notifications render here too
        return render_document(request, doc)

    async def _desired_put(self, request: Message, route: _Route) -> Message:
        device = await self._device(route)
        payload = self._payload(request, (CF_CBOR,), self.limits.state_bytes)
        try:
            changes = statedoc.parse_desired_changes(payload)
        except statedoc.ValueTooLarge as err:
            raise _Failure(Code.REQUEST_ENTITY_TOO_LARGE, str(err)) from None
        except StateError as err:
            raise _Failure(Code.BAD_REQUEST, str(err)) from None
        if_match = list(request.opt.if_match) or None
        try:
            doc, changed = await self.set_desired(device, changes, if_match)
        except PreconditionFailed as err:
            raise _Failure(Code.PRECONDITION_FAILED, str(err)) from None
        except DocumentTooLarge as err:
            raise _Failure(
                Code.REQUEST_ENTITY_TOO_LARGE, str(err), size1=self.limits.desired_doc_bytes
            ) from None
        except StateError as err:  # set_desired checks the values again (the command line's way)
            raise _Failure(Code.BAD_REQUEST, str(err)) from None
        body = records.dumps({"rev": doc.rev, "changed": changed})
        response = Message(code=Code.CHANGED, payload=body, content_format=CF_CBOR)
        response.opt.etag = doc.etag()
        return response

    async def _models_get(self, request: Message, route: _Route) -> Message:
        if self.models is None:
            raise _Failure(Code.NOT_FOUND, "no model registry")
        try:
            return await self.models.render(request, tuple(request.opt.uri_path))
        except ModelRequestError as err:
            raise _Failure(err.code, err.message) from None

    async def _device_get(self, request: Message, route: _Route) -> Message:
        device = await self._device(route)
        info = await self.db(lambda s: s.device(device))
        if info is None:
            raise _Failure(Code.NOT_FOUND, "no such device")
        doc = {
            "id": info.id,
            "registered": info.registered,
            "last_seen": info.last_seen,
            "records": info.records,
            "last_seq": info.last_seq,
            "desired_rev": info.desired_rev,
        }
        payload = records.dumps(doc)
        return Message(code=Code.CONTENT, payload=payload, content_format=CF_CBOR)
