"""The endpoint's request plumbing: failures answered as 4.xx/5.xx messages, Block1 uploads
assembled per peer, the route table of the resource paths, link-format for discovery, and the
guards that keep hostile datagrams to one rate-limited log line (:class:`SecureFront`,
:func:`datagram_guard`, :class:`PeerLogFilter`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiocoap
import aiocoap.error
import aiocoap.interfaces
from aiocoap import Message, oscore
from aiocoap.blockwise import ContinueException
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import BlockOption

from agent.loopfilter import ExceptionFilter
from agent.wire import features, relay
from cloud.security import identity
from cloud.storebase import DataRefused

RETRY_AFTER = 10  # Max-Age of a 5.03 answer
BLOCK1_LIFETIME = 93.0  # RFC 7252 MAX_TRANSMIT_WAIT: an unfinished Block1 upload is dropped


class _Failure(Exception):
    """An error answer: code, diagnostic text, and options."""

    warn = True  # said as a bad request (rate limited); False: its raiser says it its own way

    def __init__(self, code: Code, message: str, **options: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.options = options

    def to_message(self) -> Message:
        msg = Message(code=self.code, payload=self.message.encode("utf-8")[:200])
        for name, value in self.options.items():
            setattr(msg.opt, name, value)
        return msg


def storage_failure(err: Exception) -> _Failure:
    """The answer to a storage failure: 4.00 for a value the database refuses (the request's
    fault, :class:`~cloud.storebase.DataRefused`; the storage logged it), else 5.03 with
    Max-Age (logged here)."""
    if isinstance(err, DataRefused):
        return _Failure(Code.BAD_REQUEST, str(err))
    logging.getLogger("cloud.server").error("event=storage_unavailable error=%s", err)
    return _Failure(Code.SERVICE_UNAVAILABLE, "storage unavailable", max_age=RETRY_AFTER)


class _RenderedFailure(aiocoap.error.RenderableError):
    """A :class:`_Failure` raised where aiocoap renders the error (Block1 reassembly)."""

    def __init__(self, failure: _Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure

    def to_message(self) -> Message:
        return self.failure.to_message()


def _too_large(limit: int, what: str) -> _Failure:
    return _Failure(
        Code.REQUEST_ENTITY_TOO_LARGE, f"{what} is larger than {limit} bytes", size1=limit
    )


@dataclass(frozen=True)
class Limits:
    """Size limits (bytes, records). Larger requests get 4.13 with Size1 = the limit."""

    batch_bytes: int = 64 * 1024
    batch_records: int = 4096
    state_bytes: int = 8 * 1024
    reported_keys: int = 256  # keys of reported state kept per device
    desired_doc_bytes: int = 1024  # a notification must fit one datagram
    open_uploads: int = 64  # Block1 uploads in progress at once
    uploads_per_peer: int = 8  # ... of one principal (or address): a device's default 8 lanes
    held_responses: int = 64  # answers larger than a block, held for their later blocks
    responses_per_peer: int = 8  # ... of one principal (or address); its oldest goes first
    relay_bytes: int = relay.MAX_BODY_BYTES  # a /relay request body
    relay_records: int = 4 * 4096  # records of all the batches of one /relay request
    batch_readings: int = features.MAX_BATCH_READINGS  # features records of a batch claim
    relay_readings: int = 4 * features.MAX_BATCH_READINGS  # ... of all batches of a /relay
    # records a device may send: a token bucket per device (cloud/ratelimit.py says why these);
    # more gets 5.03 with Max-Age. 0 = no limit.
    device_rate: float = 1000.0  # records/s, sustained
    device_burst: int = 8 * 4096  # records at once: 8 batches in flight of the largest size


def upload_owner(request: Message) -> str:
    """Whose Block1 upload this is: the principal, else the peer's address."""
    who = identity(request)
    if who is not None:
        return f"principal:{who}"
    return f"address:{getattr(request.remote, 'hostinfo', '')}"


class _Block1Uploads:
    """Block1 reassembly (RFC 7959 section 2.5) with a size limit per resource, a limit on
    uploads in progress and a smaller one per owner (a principal, or the peer's address when
    unauthenticated), so one peer cannot hold every slot. It stands in for aiocoap's own spool
    (same ``feed_and_take``), which has none of these limits."""

    def __init__(
        self,
        limit_for: Callable[[Message], int],
        limits: Limits,
        stats: Counter[str],
        authorize: Callable[[Message], object],
    ) -> None:
        """``authorize(request)`` raises the :class:`_Failure` of a peer that may not post to
        the request's path: every block is checked before anything is spooled."""
        self._limit_for = limit_for
        self._max_open = limits.open_uploads
        self._max_per_owner = limits.uploads_per_peer
        self._stats = stats
        self._authorize = authorize
        self._open: dict[Any, tuple[Message, float, str]] = {}

    @staticmethod
    def _key(req: Message) -> Any:
        ignore = [
            OptionNumber.BLOCK1,
            OptionNumber.BLOCK2,
            OptionNumber.OBSERVE,
            OptionNumber.SIZE1,
        ]
        return (req.remote.blockwise_key, req.code, req.get_cache_key(ignore))

    def _expire(self, now: float) -> None:
        for key in [k for k, (_, t, _) in self._open.items() if now - t > BLOCK1_LIFETIME]:
            del self._open[key]

    def _refuse_new(self, owner: str) -> None:
        """5.03 if no upload may open now: all slots taken, or all of ``owner``'s."""
        if len(self._open) >= self._max_open:
            reason = "too many uploads in progress"
        elif sum(o == owner for _, _, o in self._open.values()) >= self._max_per_owner:
            reason = f"this peer has {self._max_per_owner} uploads in progress: finish one first"
        else:
            return
        self._stats["block1_refused"] += 1
        raise _RenderedFailure(_Failure(Code.SERVICE_UNAVAILABLE, reason, max_age=RETRY_AFTER))

    def feed_and_take(self, req: Message) -> Message:
        block1 = req.opt.block1
        if block1 is None:
            return req
        try:
            self._authorize(req)
        except _Failure as failure:
            raise _RenderedFailure(failure) from None
        self._stats["block1_blocks"] += 1
        limit = self._limit_for(req)
        key = self._key(req)
        owner = upload_owner(req)
        now = time.monotonic()
        self._expire(now)
        if block1.block_number == 0:
            self._open.pop(key, None)
            if req.opt.size1 is not None and req.opt.size1 > limit:
                raise _RenderedFailure(_too_large(limit, "the request body (Size1)"))
            if len(req.payload) > limit:
                raise _RenderedFailure(_too_large(limit, "the request body"))
            if block1.more:
                self._refuse_new(owner)
            assembled = req
        else:
            try:
                assembled, _, _ = self._open.pop(key)
            except KeyError:
                raise aiocoap.error.RequestEntityIncomplete("no upload in progress") from None
            if len(assembled.payload) + len(req.payload) > limit:
                raise _RenderedFailure(_too_large(limit, "the request body"))
            try:
                assembled._append_request_block(req)
            except ValueError:
                raise aiocoap.error.RequestEntityIncomplete("block out of order") from None
        if block1.more:
            self._open[key] = (assembled, now, owner)
            raise ContinueException(block1)
        self._stats["block1_uploads"] += 1
        return assembled


class _Block2Responses:
    """Answers larger than one block, held for the requests of their later blocks (RFC 7959
    section 2.4), at most ``held_responses`` of them and ``responses_per_peer`` of one owner (a
    principal, or the peer's address when unauthenticated), each for :data:`BLOCK1_LIFETIME`
    after its last block was asked for (as aiocoap's: a slow transfer is served to its end).
    Over a bound the owner's least recently used goes (else the least recently used of all): a
    request for a later block of it gets 4.08 and the client starts over. It stands in for
    aiocoap's Block2Cache (same ``extract_or_insert``), which holds every such answer for 93 to
    186 s, as many as peers ask for with requests that differ in any elective option.
    ``authorize(request)`` is asked again at every later block (raises the :class:`_Failure` of
    a peer that may no longer read the answer: revoked, re-keyed since its first block), as
    render asks it at the first: a refused peer's held answer goes."""

    def __init__(
        self, limits: Limits, stats: Counter[str], authorize: Callable[[Message], object]
    ) -> None:
        self._authorize = authorize
        self._max = limits.held_responses
        self._max_per_owner = limits.responses_per_peer
        self._stats = stats
        self._held: dict[Any, tuple[Message, float, str]] = {}  # least recently used first

    def __len__(self) -> int:
        return len(self._held)

    async def extract_or_insert(
        self, req: Message, build: Callable[[], Awaitable[Message]]
    ) -> Message:
        key = _Block1Uploads._key(req)
        block2 = req.opt.block2
        now = time.monotonic()
        for old in [k for k, (_, t, _) in self._held.items() if now - t > BLOCK1_LIFETIME]:
            del self._held[old]
        if block2 is None or block2.block_number == 0:
            whole = await build()
        else:
            try:
                whole, _, owner = self._held.pop(key)
            except KeyError:
                raise aiocoap.error.RequestEntityIncomplete("no such answer held") from None
            try:
                self._authorize(req)
            except _Failure as failure:
                raise _RenderedFailure(failure) from None
            self._held[key] = (whole, now, owner)  # in use: 93 s from now, the newest again
        size = req.remote.maximum_payload_size
        if len(whole.payload) <= size and (block2 is None or len(whole.payload) <= block2.size):
            return whole
        if block2 is None or block2.block_number == 0:
            self._hold(key, whole, now, upload_owner(req))
        block2 = block2 or BlockOption.BlockwiseTuple(0, False, req.remote.maximum_block_size_exp)
        return whole._extract_block(block2.block_number, block2.size_exponent, size)

    def _hold(self, key: Any, whole: Message, now: float, owner: str) -> None:
        self._held.pop(key, None)
        mine = [k for k, (_, _, o) in self._held.items() if o == owner]
        while mine and len(mine) >= self._max_per_owner:
            del self._held[mine.pop(0)]
            self._stats["block2_dropped"] += 1
        while self._held and len(self._held) >= self._max:
            del self._held[next(iter(self._held))]
            self._stats["block2_dropped"] += 1
        self._held[key] = (whole, now, owner)


# Critical options (RFC 7252 section 5.4.1) this endpoint understands somewhere. Others: 4.02.
_KNOWN_CRITICAL = frozenset(
    {
        OptionNumber.IF_MATCH,
        OptionNumber.URI_HOST,
        OptionNumber.URI_PORT,
        OptionNumber.URI_PATH,
        OptionNumber.URI_QUERY,
        OptionNumber.ACCEPT,
        OptionNumber.BLOCK2,
        OptionNumber.BLOCK1,
        OptionNumber.PROXY_URI,
        OptionNumber.PROXY_SCHEME,
    }
)


@dataclass(frozen=True)
class _Route:
    name: str  # wkc, ingest, reported, desired, device, ... (security.py ACCESS)
    device: str | None  # the principal the path names (a device; a gateway for relay)
    methods: frozenset[Code]
    queries: bool = False  # takes Uri-Query
    conditional: bool = False  # takes If-Match


def _route(path: tuple[str, ...]) -> _Route:
    GET, POST, PUT = Code.GET, Code.POST, Code.PUT
    match path:
        case (".well-known", "core"):
            return _Route("wkc", None, frozenset({GET}), queries=True)
        case ("ingest", device):
            return _Route("ingest", device, frozenset({POST}))
        case ("state", device, "reported"):
            return _Route("reported", device, frozenset({GET, PUT}))
        case ("state", device, "desired"):
            return _Route("desired", device, frozenset({GET, PUT}), conditional=True)
        case ("devices", device):
            return _Route("device", device, frozenset({GET}))
        case ("models", _) | ("models", _, _, "manifest" | "file"):
            return _Route("models", None, frozenset({GET}))
        case ("releases",) | ("releases", _, "manifest" | "file"):  # cloud/releases.py
            return _Route("releases", None, frozenset({GET}))
        case ("infer", device):
            return _Route("infer", device, frozenset({POST}))
        case ("validate", device):
            return _Route("validate", device, frozenset({POST}))
        case ("learn", "masters", _):
            return _Route("masters", None, frozenset({GET}))
        case ("learn", device):
            return _Route("learn", device, frozenset({POST}))
        case ("logs", device):  # cloud/logroutes.py
            return _Route("logs", device, frozenset({POST}))
        case ("credential", device):  # cloud/credroutes.py
            return _Route("credential", device, frozenset({POST}))
        case ("relay", gateway):
            return _Route("relay", gateway, frozenset({POST}))
    raise _Failure(Code.NOT_FOUND, "no such resource")


def _link(href: str, **attrs: Any) -> str:
    parts = [f"<{href}>"]
    for name, value in attrs.items():
        if value is True:
            parts.append(name)
        elif isinstance(value, int):
            parts.append(f"{name}={value}")
        else:
            parts.append(f'{name}="{value}"')
    return ";".join(parts)


def _link_matches(link: dict[str, Any], queries: Iterable[str]) -> bool:
    """RFC 6690 section 4.1 filtering: ``name=value``, a trailing ``*`` matches a prefix."""
    for query in queries:
        name, eq, wanted = query.partition("=")
        have = link.get(name)
        if have is None:
            return False
        if not eq:
            continue  # a bare attribute name: present is enough
        values = str(have).split(" ") if name in ("rt", "if") else [str(have)]
        if wanted.endswith("*"):
            if not any(v.startswith(wanted[:-1]) for v in values):
                return False
        elif wanted not in values:
            return False
    return True


class SecureFront(aiocoap.interfaces.Resource):
    """The outermost site: OSCORE requests whose OSCORE option cannot even be parsed (a
    DecodeError, or an IndexError for an option cut short) get 4.02 (nothing for a NON), through
    the rate-limited warning, instead of aiocoap 0.4.17's 5.00 with a logged traceback (its
    OSCORE site wrapper catches only a missing option); everything else goes to ``inner`` (the
    OSCORE site wrapper around the resource tree)."""

    def __init__(
        self,
        inner: Any,
        on_bad: Callable[[Message, _Failure], None],
        limit: Callable[[Message, Message], Message] | None = None,
    ) -> None:
        super().__init__()
        self._inner = inner
        self._on_bad = on_bad
        self._limit = limit

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return False  # the inner site decides, after unprotecting

    async def render(self, request: Message) -> Message:
        raise NotImplementedError("served through render_to_pipe")

    def get_resources_as_linkheader(self) -> Any:
        return self._inner.get_resources_as_linkheader()

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        try:
            oscore.verify_start(request)
        except oscore.NotAProtectedMessage:
            pass
        except (oscore.DecodeError, IndexError, ValueError):  # IndexError: a truncated option
            failure = _Failure(Code.BAD_OPTION, "malformed OSCORE option")
            self._on_bad(request, failure)
            if request.mtype == aiocoap.CON:
                answer = failure.to_message()
                pipe.add_response(self._limit(request, answer) if self._limit else answer, True)
            return
        limited = _LimitedPipe(pipe, request, self._limit) if self._limit else pipe
        try:
            await self._inner.render_to_pipe(limited)
        except aiocoap.error.RenderableError as err:  # the OSCORE layer's refusals are raised
            message = err.to_message()
            if message is None:
                raise
            if message.opt.oscore is not None:  # a protected answer (Echo recovery): as it is
                pipe.add_response(message, is_last=True)
                return
            reason = bytes(message.payload).decode("utf-8", "replace")
            self._on_bad(request, _Failure(message.code, reason or type(err).__name__))
            limited.add_response(message, is_last=True)
        except aiocoap.error.Error:
            raise  # aiocoap's own (some are ValueErrors too): as aiocoap handles them
        except ValueError as err:
            # an OSCORE-protected request whose inner options do not decode (invalid UTF-8 in a
            # string option) escapes aiocoap 0.4.17's unprotection as a ValueError; the
            # resource tree below answers every error of its own
            failure = _Failure(Code.BAD_REQUEST, f"undecodable request: {type(err).__name__}")
            self._on_bad(request, failure)
            if request.mtype == aiocoap.CON:
                limited.add_response(failure.to_message(), is_last=True)


class _LimitedPipe:
    """A pipe whose unprotected answers (those to unauthenticated peers, and the OSCORE layer's
    own refusals, which aiocoap raises as errors) pass through the amplification limit."""

    def __init__(self, pipe: Any, request: Message, limit: Callable[[Message, Message], Message]):
        self._pipe = pipe
        self._request = request
        self._limit = limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def add_response(self, response: Message, is_last: bool = False) -> None:
        if response.opt.oscore is None:  # not protected: the peer is not known
            response = self._limit(self._request, response)
        self._pipe.add_response(response, is_last)

    def add_exception(self, exception: BaseException) -> None:
        if isinstance(exception, aiocoap.error.RenderableError):
            message = exception.to_message()
            if message is not None:
                self.add_response(message, is_last=True)
                return
        self._pipe.add_exception(exception)


#: An unauthenticated request gets at most this many times its own size back (RFC 9175 2.4:
#: no amplification for peers whose address is not verified).
AMPLIFICATION_LIMIT = 3
_HEADER_BYTES = 4  # a response's fixed header; the token is counted with the request's


class Amplification:
    """RFC 9175 section 2.4 for unauthenticated peers: an answer more than
    :data:`AMPLIFICATION_LIMIT` times the request's size is sent only to a peer that showed it
    receives at its address, by repeating the request with the Echo value of a 4.01 (a MAC of
    its address and the minute, valid for two minutes). libcoap and aiocoap clients repeat such
    requests by themselves."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._key = secrets.token_bytes(32)
        self._clock = clock

    def _echo(self, peer: str, minute: int) -> bytes:
        msg = f"{peer}|{minute}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).digest()[:8]

    def verified(self, request: Message) -> bool:
        echo = request.opt.echo
        if not echo:
            return False
        peer = str(getattr(request.remote, "hostinfo", ""))
        minute = int(self._clock() // 60)
        return any(hmac.compare_digest(echo, self._echo(peer, m)) for m in (minute, minute - 1))

    def limit(self, request: Message, response: Message) -> Message:
        """``response``; else the same error without its diagnostic payload; else (a success,
        or still too large) a bare 4.01 with an Echo to repeat the request with, or without the
        Echo when even that is too large for so small a request."""
        if self.verified(request):
            return response
        budget = AMPLIFICATION_LIMIT * wire_size(request)
        if wire_size(response, request.token) <= budget:
            return response
        if not response.code.is_successful():
            bare = Message(code=response.code)
            if wire_size(bare, request.token) <= budget:
                return bare
        bare = Message(code=Code.UNAUTHORIZED)
        bare.opt.echo = self._echo(
            str(getattr(request.remote, "hostinfo", "")), int(self._clock() // 60)
        )
        if wire_size(bare, request.token) <= budget:
            return bare
        return Message(code=Code.UNAUTHORIZED)


def wire_size(msg: Message, token: bytes | None = None) -> int:
    """Bytes of ``msg`` as a CoAP-over-UDP datagram (header, token, options, payload)."""
    tok = msg.token if token is None else token
    payload = len(msg.payload) + 1 if msg.payload else 0
    return _HEADER_BYTES + len(tok or b"") + len(msg.opt.encode()) + payload


def datagram_guard(on_bad: Callable[[BaseException], None]) -> ExceptionFilter:
    """aiocoap 0.4.17's UDP transport decodes each datagram in an event loop callback and catches
    only the errors it expects: a string option with invalid UTF-8 (and a few other malformed
    options) escapes as UnicodeDecodeError/ValueError, and asyncio logs a traceback per datagram.
    Installed while the endpoint runs, this filter turns exactly those into ``on_bad(error)`` (a
    rate-limited warning)."""
    return ExceptionFilter(
        lambda error, where: (
            isinstance(error, ValueError) and "RecvmsgSelectorDatagramTransport" in where
        ),
        on_bad,
    )


#: The loggers of aiocoap's server side: the context's (``create_server_context``'s default
#: name) and its OSCORE site wrapper's.
AIOCOAP_SERVER_LOGGERS = ("coap-server", "coap-server.oscore-site")


class PeerLogFilter(logging.Filter):
    """aiocoap 0.4.17 logs a warning about many a datagram it cannot use ("Ignoring unparsable
    message", a code that does not fit its type, a new request before the last was
    acknowledged), and an info line about each exchange (an ACK, an RST, a rendered error): a
    peer sending junk would fill the log. Installed on :data:`AIOCOAP_SERVER_LOGGERS` while the
    endpoint runs, this filter passes aiocoap's warnings through the endpoint's rate limit
    (``may_warn``), keeps its info and debug lines only when the endpoint itself logs at debug
    (they are per message: debug by the endpoint's policy), and passes its errors."""

    def __init__(self, may_warn: Callable[[], bool]) -> None:
        super().__init__()
        self._may_warn = may_warn

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if record.levelno >= logging.WARNING:
            return self._may_warn()
        return logging.getLogger("cloud").isEnabledFor(logging.DEBUG)

    def install(self) -> None:
        for name in AIOCOAP_SERVER_LOGGERS:
            logging.getLogger(name).addFilter(self)

    def remove(self) -> None:
        for name in AIOCOAP_SERVER_LOGGERS:
            logging.getLogger(name).removeFilter(self)


def _is_desired_get(request: Message) -> bool:
    """A GET of some device's desired state (the one observable resource)."""
    path = request.opt.uri_path
    return (
        request.code == Code.GET and len(path) == 3 and (path[0], path[2]) == ("state", "desired")
    )


def _is_masters_get(request: Message) -> bool:
    """A GET of a round's masters (``/learn/masters/<sha256>``: never changes once named)."""
    path = request.opt.uri_path
    return request.code == Code.GET and len(path) == 3 and path[:2] == ("learn", "masters")
