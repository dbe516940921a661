"""The cloud transport: CoAP requests with deadlines, several lanes, and an endpoint list.

CoAP lets an endpoint keep one confirmable exchange in flight towards a server (NSTART = 1, RFC
7252 section 4.7), and aiocoap enforces it per client context. A transport here owns several
*lanes*, each an aiocoap client context with its own UDP socket, so the uplink can keep several
confirmable POSTs in flight on a long, thin link while each lane obeys NSTART = 1; how many lanes
are used at once is the uplink's congestion window.

Every exchange gets a deadline (aiocoap has none of its own). The retransmission timeout can be
set per request from the measured round-trip time (``ack_timeout``), the way CoCoA (RFC 9006's
predecessor, draft-ietf-core-cocoa) adapts it, instead of RFC 7252's fixed 2 s.

:class:`Endpoints` keeps the ordered list of endpoint URIs: the first that works is used, a
failing one is left for the next, and the primary is tried again after ``primary_retry`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import warnings
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from agent.errors import SyncError
from agent.files import read_json, write_atomic
from agent.loopfilter import ExceptionFilter
from drivers.clock import Clock

log = logging.getLogger(__name__)

#: Default deadline of one exchange, seconds (covers CoAP's retransmissions of a CON).
REQUEST_TIMEOUT = 30.0
#: Bounds of an adaptive ACK_TIMEOUT, seconds.
ACK_TIMEOUT_MIN = 0.3
ACK_TIMEOUT_MAX = 8.0
#: An OSCORE request answered with an unprotected 4.01 is sent once more under a new sequence
#: number (an endpoint refuses a number below its replay window as a replay, and after a restart
#: its window starts at the first request that came back with its Echo).
STALE_RETRIES = 1
#: The largest answer body a request takes unless it says otherwise (``max_body``). An answer
#: sent block-wise (RFC 7959) is fetched block by block and the transfer stops beyond it.
MAX_BODY = 1 << 20
#: A request body up to this size goes in one message (aiocoap's block size): the Block2 of its
#: answer is followed here, under ``max_body``; a larger body needs aiocoap's Block1 handling,
#: which follows Block2 too (its answer's size is checked when it is whole).
ONE_BLOCK = 1024


@dataclass(frozen=True)
class Response:
    code: int  # CoAP code as class * 32 + detail (2.04 -> 68)
    payload: bytes
    content_format: int | None = None
    max_age: int | None = None
    etag: bytes | None = None
    size2: int | None = None
    block2: tuple[int, bool, int] | None = None  # Block2 of the answer: (num, more, szx)
    attempts: int = 1  # 2: sent again after an unprotected 4.01 (STALE_RETRIES): two round trips

    @property
    def dotted(self) -> str:
        return f"{self.code >> 5}.{self.code & 31:02d}"

    @property
    def success(self) -> bool:
        return self.code >> 5 == 2


def code(dotted: str) -> int:
    """'2.04' -> 68."""
    cls, _, detail = dotted.partition(".")
    return int(cls) * 32 + int(detail)


def _tuning(confirmable: bool, ack_timeout: float | None) -> Any:
    """aiocoap's per-message transport parameters: CON with an adapted ACK_TIMEOUT, or NON."""
    from aiocoap.numbers.constants import Reliable, Unreliable

    if not confirmable:
        return Unreliable()
    if ack_timeout is None:
        return Reliable()

    class Tuned(Reliable):
        ACK_TIMEOUT = min(ACK_TIMEOUT_MAX, max(ACK_TIMEOUT_MIN, ack_timeout))

    return Tuned()


#: aiocoap's client transport for each URI scheme the agent accepts.
SCHEME_TRANSPORTS = {
    "coap": "udp6",
    "coap+tcp": "tcpclient",
    "coaps": "tinydtls",
    "coaps+tcp": "tlsclient",
}


def transports_for(uris: Iterable[str]) -> list[str]:
    """The aiocoap client transports that the schemes of ``uris`` need, and only those.

    aiocoap's default loads every transport it can (TCP, TLS, WebSockets, DTLS, OSCORE), which
    costs the device about 8 MB of memory for sockets and code it never uses."""
    out: list[str] = []
    for uri in uris:
        scheme = uri.partition(":")[0].lower()
        transport = SCHEME_TRANSPORTS.get(scheme)
        if transport is None:
            raise SyncError(
                f"{uri}: unsupported scheme {scheme!r} ({', '.join(SCHEME_TRANSPORTS)})"
            )
        if transport not in out:
            out.append(transport)
    return out


class Protection(Protocol):
    """What protects a transport's requests: :class:`~agent.sync.security.ClientSecurity` (the
    way up), :class:`~agent.gateway.peersecurity.PeerContexts` (the site's peers)."""

    @property
    def transports(self) -> list[str]: ...

    def configure(self, ctx: Any) -> None: ...


class CoapTransport:
    """CoAP client lanes (aiocoap), one client context per lane.

    ``uris``: the endpoints this transport will talk to; their schemes choose the aiocoap
    transports loaded (:func:`transports_for`). Without them aiocoap loads all it has.
    ``security``: the protection of every request (OSCORE, DTLS-PSK; None: plain CoAP)."""

    def __init__(
        self,
        clock: Clock,
        *,
        lanes: int = 1,
        uris: Iterable[str] = (),
        security: Protection | None = None,
    ) -> None:
        if lanes < 1:
            raise ValueError("at least one lane")
        self.clock = clock
        self.lanes = lanes
        self.security = security
        own = transports_for(uris)
        self.transports = ([*security.transports, *own] if security else own) or None
        self._sessions = "tinydtls" in own  # DTLS: a session the endpoint may have lost
        self._contexts: list[Any] = []
        self._lock = asyncio.Lock()
        self._observing: dict[int, int] = {}  # lane -> observations running on it
        self.stale_retries = 0  # requests sent again after an unprotected 4.01 (STALE_RETRIES)
        self._retired: set[asyncio.Task[None]] = set()  # contexts shutting down
        self._tinydtls_clock: Any = None  # agent/sync/dtlsclient.py, made with the first context

    async def _context(self, lane: int) -> Any:

        async with self._lock:
            while len(self._contexts) <= lane:
                self._contexts.append(await self._new_context())
        return self._contexts[lane]

    async def _new_context(self) -> Any:
        import aiocoap

        ctx = await aiocoap.Context.create_client_context(transports=self.transports)
        _quiet_aiocoap_races(asyncio.get_running_loop())
        if self.transports is None or "tinydtls" in self.transports:
            # aiocoap's DTLS client spins on its handshake retransmissions and keeps a session
            # the endpoint closed: this context's connections wait on tinydtls's clock, and end
            # at the endpoint's close_notify
            from agent.dtlsclock import TinydtlsClock
            from agent.sync import dtlsclient

            if self._tinydtls_clock is None:
                self._tinydtls_clock = TinydtlsClock()
            dtlsclient.install(ctx, self._tinydtls_clock)
        if self.security is not None:
            self.security.configure(ctx)
        return ctx

    async def request(
        self,
        method: str,
        uri: str,
        payload: bytes = b"",
        *,
        content_format: int | None = None,
        accept: int | None = None,
        deadline: float = REQUEST_TIMEOUT,
        lane: int = 0,
        ack_timeout: float | None = None,
        confirmable: bool = True,
        block2: tuple[int, int] | None = None,
        etags: tuple[bytes, ...] = (),
        max_body: int = MAX_BODY,
    ) -> Response:
        """One exchange; raises SyncError when it fails or misses its deadline.
        ``etags``: the request's ETag options (a GET answered 2.03 Valid when one is current).

        ``block2``: (block number, szx) asks for that one block (RFC 7959), without block-wise
        transfer (the default); the answer's Block2 is ``Response.block2``. Without it an answer
        sent block-wise is fetched whole, within ``deadline``, and SyncError ends the transfer
        as soon as the answer (its Size2, or the blocks so far) is larger than ``max_body``."""
        end = asyncio.get_running_loop().time() + deadline
        auto = block2 is None and len(payload) > ONE_BLOCK  # aiocoap's Block1 (and Block2)

        async def exchange(body: bytes, block: tuple[int, int] | None) -> Response:
            # the later blocks' requests keep every option (a server finds the answer it is
            # sending by them, as aiocoap's Block2Cache does), without the body
            return await self._exchange(
                method, uri, body, content_format=content_format, accept=accept, end=end,
                deadline=deadline, lane=lane, ack_timeout=ack_timeout, confirmable=confirmable,
                block2=block, etags=etags, blockwise=auto,
            )  # fmt: skip

        resp = await exchange(payload, block2)
        if block2 is not None:
            return resp
        too_large = f"{method} {uri}: the answer is larger than {max_body} bytes"
        if auto or resp.block2 is None or not resp.block2[1]:
            if len(resp.payload) > max_body:
                raise SyncError(too_large)
            return replace(resp, block2=None)  # whole, as aiocoap gives a one-block answer
        if resp.block2[0] != 0:
            raise SyncError(f"{method} {uri}: the answer starts at block {resp.block2[0]}")
        if resp.size2 is not None and resp.size2 > max_body:
            raise SyncError(f"{too_large} (Size2 {resp.size2})")
        body = bytearray()
        part = resp
        while True:
            assert part.block2 is not None
            number, more, szx = part.block2
            size = 16 << szx
            if number * size != len(body) or (more and len(part.payload) != size):
                raise SyncError(f"{method} {uri}: block {number} does not follow {len(body)} bytes")
            if part.etag != resp.etag:
                raise SyncError(f"{method} {uri}: the resource changed during the transfer")
            body += part.payload
            if len(body) > max_body:
                raise SyncError(too_large)
            if not more:
                return replace(resp, payload=bytes(body), block2=None)
            part = await exchange(b"", (len(body) // size, szx))
            if part.block2 is None:  # not block-wise any more: that answer stands (as aiocoap)
                return part

    async def _exchange(
        self,
        method: str,
        uri: str,
        payload: bytes,
        *,
        content_format: int | None,
        accept: int | None,
        end: float,
        deadline: float,
        lane: int,
        ack_timeout: float | None,
        confirmable: bool,
        block2: tuple[int, int] | None,
        etags: tuple[bytes, ...],
        blockwise: bool,
    ) -> Response:
        """One request and its answer, by ``end`` (the loop's time); ``blockwise``: aiocoap's
        block-wise transfer in both directions."""
        import aiocoap
        from aiocoap import error as coap_error
        from aiocoap.optiontypes import BlockOption

        retries = 0
        while True:
            ctx = await self._context(lane % self.lanes)  # a retry: the lane's current context
            msg = aiocoap.Message(
                code=getattr(aiocoap, method),
                uri=uri,
                payload=payload,
                transport_tuning=_tuning(confirmable, ack_timeout),
            )
            if content_format is not None:
                msg.opt.content_format = content_format
            if accept is not None:
                msg.opt.accept = accept
            if block2 is not None:
                msg.opt.block2 = BlockOption.BlockwiseTuple(block2[0], False, block2[1])
            if etags:
                msg.opt.etags = etags
            try:
                req = ctx.request(msg, handle_blockwise=blockwise)
            except (coap_error.Error, ValueError, OSError) as err:
                raise SyncError(f"{method} {uri}: {err}") from err
            try:
                async with asyncio.timeout_at(end):
                    resp = await req.response
            except TimeoutError as err:
                req.response.cancel()
                if confirmable:
                    await self._reset_lane(lane % self.lanes, ctx)
                raise SyncError(f"{method} {uri}: no answer within {deadline:g} s") from err
            except asyncio.CancelledError:
                req.response.cancel()
                raise
            except (coap_error.Error, OSError) as err:
                plain = getattr(err, "plain_message", None)  # an unprotected answer to OSCORE
                code = getattr(plain, "code", None)
                if code is None:
                    raise SyncError(f"{method} {uri}: {type(err).__name__}: {err}") from err
                if code == aiocoap.UNAUTHORIZED and retries < STALE_RETRIES:
                    # the endpoint took this request's sequence number for a replay: it came
                    # in behind a newer one (another lane's, or the request that set up the
                    # endpoint's window after a restart); the same request under a fresh
                    # number is new to it (a refused context answers that 4.01 too)
                    retries += 1
                    self.stale_retries += 1
                    log.debug("event=oscore_stale_retry method=%s uri=%s", method, uri)
                    continue
                raise SyncError(
                    f"{method} {uri}: answer {code.dotted} without OSCORE "
                    f"({type(err).__name__}: the endpoint refuses this credential's context)"
                ) from err
            return _response(resp, attempts=1 + retries)

    async def _reset_lane(self, lane: int, ctx: Any) -> None:
        """Give ``lane`` a fresh client context after a confirmable request missed its deadline.

        aiocoap keeps retransmitting a confirmable message whose request was cancelled, and
        holds every later confirmable message to the same server behind it (NSTART = 1) until
        its retransmissions run out, which can take a minute. A new context (a new socket) drops
        that exchange, and a DTLS session the endpoint no longer knows (it restarted: it drops
        the old session's records silently, and aiocoap never makes a new handshake by itself).
        A lane with an observation on it is left alone, unless it runs over DTLS: then the
        observation is most likely dead too, and ends with the old context (callers register
        again)."""

        if self._observing.get(lane) and not self._sessions:
            return
        async with self._lock:
            if lane >= len(self._contexts) or self._contexts[lane] is not ctx:
                return  # already replaced
            self._contexts[lane] = await self._new_context()
        task = asyncio.get_running_loop().create_task(_shutdown(ctx))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)
        log.debug("event=lane_reset lane=%d", lane)

    async def observe(
        self, uri: str, *, deadline: float = REQUEST_TIMEOUT, lane: int = 0
    ) -> AsyncIterator[Response]:
        """GET with Observe: yields the first response, then each notification. Ends (raises
        SyncError) when the observation ends or fails; callers re-register."""
        import aiocoap
        from aiocoap import error as coap_error

        lane %= self.lanes
        ctx = await self._context(lane)
        msg = aiocoap.Message(code=aiocoap.GET, uri=uri, observe=0)
        req = ctx.request(msg)
        self._observing[lane] = self._observing.get(lane, 0) + 1
        missed = False
        try:
            async with asyncio.timeout(deadline):
                first = await req.response
            yield _response(first)
            if not req.observation:
                return
            notifications = _subscribe(req.observation)
            while True:
                item = await notifications.get()
                if isinstance(item, coap_error.NotObservable | coap_error.ObservationCancelled):
                    return  # the endpoint ended it
                if isinstance(item, BaseException):
                    raise item
                yield _response(item)
        except TimeoutError as err:
            missed = True
            raise SyncError(f"observe {uri}: no answer within {deadline:g} s") from err
        except (coap_error.Error, OSError) as err:
            raise SyncError(f"observe {uri}: {type(err).__name__}: {err}") from err
        finally:
            self._observing[lane] -= 1
            with contextlib.suppress(Exception):
                if req.observation is not None:
                    req.observation.cancel()
            req.response.cancel()
            if missed:  # as for a request: a new context (and a new DTLS session)
                await self._reset_lane(lane, ctx)

    async def close(self) -> None:
        contexts, self._contexts = self._contexts, []
        for ctx in contexts:
            await _shutdown(ctx)
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)


def _subscribe(observation: Any) -> asyncio.Queue[Any]:
    """A queue of the observation's notifications and of the error that ends it.

    aiocoap 0.4.17's ``async for`` iterator over an observation re-raises, from its ``__del__``,
    any error that ended it other than a cancellation (a network error, or ResourceChanged when
    a block-wise notification changes between its blocks): an "Exception ignored" traceback on
    stderr whenever it is collected, although the error was handled here. Its callback interface
    (deprecated in favour of the iterator, still there in the pinned 0.4.17) has no such
    finalizer."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        observation.register_callback(queue.put_nowait)
        observation.register_errback(queue.put_nowait)
    return queue


async def _shutdown(ctx: Any) -> None:
    with contextlib.suppress(Exception):
        await ctx.shutdown()


def _response(resp: Any, attempts: int = 1) -> Response:
    opt = resp.opt
    cf = opt.content_format
    b2 = opt.block2
    return Response(
        code=int(resp.code),
        payload=bytes(resp.payload),
        content_format=int(cf) if cf is not None else None,
        max_age=opt.max_age,
        etag=opt.etag,
        size2=opt.size2,
        block2=None if b2 is None else (b2.block_number, bool(b2.more), b2.size_exponent),
        attempts=attempts,
    )


class Endpoints:
    """The ordered endpoint list: use the first that works, fall back in order, and go back to
    the primary once it recovers (tried again every ``primary_retry`` seconds while on a
    fallback).

    A fallback is the same deployment behind another address: endpoint processes that share one
    storage (docs/protocol.md, "Fallback endpoints"). Acks and desired-state documents name the
    storage they come from; the first storage any endpoint names is this device's (kept in
    ``store_path``), and an endpoint that names another is refused: records it acknowledged stay
    queued for the device's own storage, and its desired state is not applied, so records never
    split across storages and desired versions are never compared across them."""

    def __init__(
        self,
        uris: tuple[str, ...],
        clock: Clock,
        *,
        primary_retry: float = 60.0,
        store_path: Path | None = None,
    ):
        if not uris:
            raise ValueError("no endpoints")
        self.uris = uris
        self.clock = clock
        self.primary_retry = primary_retry
        self.index = 0
        self._left_primary_at: float | None = None
        self.store_path = store_path
        self.home = _read_home(store_path)
        self.refused: dict[str, str] = {}  # uri -> the other storage it named

    @property
    def current(self) -> str:
        return self.uris[self.index]

    def _next(self) -> None:
        for _ in range(len(self.uris)):
            self.index = (self.index + 1) % len(self.uris)
            if self.uris[self.index] not in self.refused:
                return

    def failed(self, uri: str) -> None:
        """``uri`` is not answering: move to the next endpoint (wrapping around)."""
        if uri != self.current or len(self.uris) == 1:
            return
        self._next()
        if self.index != 0 and self._left_primary_at is None:
            self._left_primary_at = self.clock.monotonic()
        if self.index == 0:
            self._left_primary_at = None
        if self.current != uri:
            log.warning("event=endpoint_fallback from=%s to=%s", uri, self.current)

    def want_primary(self) -> bool:
        """True when on a fallback and it is time to try the primary again."""
        return (
            self.index != 0
            and self.uris[0] not in self.refused
            and self._left_primary_at is not None
            and self.clock.monotonic() - self._left_primary_at >= self.primary_retry
        )

    def primary_ok(self) -> None:
        if self.uris[0] in self.refused:
            return
        if self.index != 0:
            log.info("event=endpoint_primary_back uri=%s", self.uris[0])
        self.index = 0
        self._left_primary_at = None

    def retried_primary_failed(self) -> None:
        self._left_primary_at = self.clock.monotonic()

    async def check_store(self, uri: str, store: str | None) -> bool:
        """Whether ``uri``, which named the storage ``store`` (None: an endpoint that names
        none), belongs to this device's deployment. The first storage named becomes the
        device's (written to ``store_path``); an endpoint naming another is refused."""
        if store is None:
            return uri not in self.refused
        if self.home is None:
            self.home = store
            log.info("event=endpoint_storage store=%s uri=%s", store, uri)
            if self.store_path is not None:
                data = (json.dumps({"store": store}) + "\n").encode()
                try:
                    await self.clock.run_blocking(None, write_atomic, self.store_path, data)
                except OSError as err:
                    log.error(
                        "event=endpoint_storage_not_saved path=%s error=%r",
                        self.store_path,
                        str(err),
                    )
        if store == self.home:
            self.refused.pop(uri, None)  # reconfigured onto the device's storage
            return True
        if self.refused.get(uri) != store:
            log.error(
                "event=endpoint_refused uri=%s reason=other_storage store=%s device_store=%s "
                "note=a fallback endpoint must share the primary's storage (docs/protocol.md); "
                "records stay queued for the device's own",
                uri,
                store,
                self.home,
            )
        self.refused[uri] = store
        if uri == self.current and len(self.uris) > 1:
            self._next()
        return False


def _read_home(path: Path | None) -> str | None:
    """The device's storage identity, as recorded (None: none yet, or unreadable)."""
    if path is None:
        return None
    try:
        doc = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("event=endpoint_storage_unreadable path=%s error=%r", path, str(err))
        return None
    store = doc.get("store") if isinstance(doc, dict) else None
    return store if isinstance(store, str) and store else None


def _late_response(error: BaseException) -> bool:
    """aiocoap 0.4.17 sets a result on a request's response future that is already done when a
    response arrives for a request given up on in the same loop step: a block request of a
    block-wise transfer that was cancelled (the document changed between blocks, an observation
    cancelled for a re-registration) before its cancellation callback ran, or the assembled
    response of a block-wise observation that ended meanwhile. Both raise ``InvalidStateError``
    from a ``_run`` in aiocoap/protocol.py; the request was already given up, nothing is lost."""
    if not isinstance(error, asyncio.InvalidStateError) or error.__traceback__ is None:
        return False
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    where = Path(code.co_filename).parts[-2:]
    return code.co_name == "_run" and where == ("aiocoap", "protocol.py")


class _LateResponseFilter(logging.Filter):
    """aiocoap logs a late response (``_late_response``) with a traceback: the block-wise
    requester from its "should be unreachable" branch, the UDP transport when the error passes
    through ``dispatch_message``. And without one, as a warning, when the response reaches the
    request's pipe after the request ended (:data:`ENDED`: the agent cancelled the request, at a
    stop or a deadline, as the answer was on its way; its records stay unacknowledged and go
    again). The agent has already moved on (it re-registers, or asks again); the record becomes
    one debug line."""

    LOGGERS = ("coap", "coap.blockwise-requester")
    #: aiocoap/pipe.py's message for a response added to a pipe that has ended
    ENDED = "Response %r added after %r has already ended"

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if (error is not None and _late_response(error)) or record.msg == self.ENDED:
            log.debug("event=coap_response_after_request_ended logger=%s", record.name)
            return False
        return True

    @classmethod
    def install(cls) -> None:
        for name in cls.LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, cls) for f in logger.filters):
                logger.addFilter(cls())


#: aiocoap's OSCORE client transport, and the agent's (agent/sync/oscoreclient.py).
_OSCORE = ("TransportOSCORE", "OscoreRequests")


def _quiet_aiocoap_races(loop: asyncio.AbstractEventLoop) -> None:
    """Two aiocoap 0.4.17 failures reach the event loop's exception handler, which logs them with
    a traceback: a late response (``_late_response``), which the UDP transport raises on after
    logging it; and the OSCORE client transport failing in a task's done callback when a context
    is shut down with a request in flight (a lane reset, a stop: the request is cancelled or gets
    LibraryShutdown, and passing that on fails again). A loop exception filter (installed once
    per loop) turns exactly those into a debug line; :class:`_LateResponseFilter` (once per
    process) quiets aiocoap's own log records of a late response."""
    _LateResponseFilter.install()
    if getattr(loop, "_edge_agent_aiocoap_quiet", False):
        return
    ExceptionFilter(
        lambda error, where: (
            _late_response(error) or any(f"{c}.request.<locals>.done" in where for c in _OSCORE)
        ),
        lambda error: log.debug("event=coap_request_ended_race error=%r", type(error).__name__),
    ).install(loop)
    loop._edge_agent_aiocoap_quiet = True  # type: ignore[attr-defined]
