"""A minimal, strict HTTP/1.1 server on asyncio streams: what the read-only dashboard needs, and
nothing a hostile peer could lean on.

Why this and not ``http.server``: the endpoint is one asyncio process whose storage is reached
through ``CloudServer.db`` (a coroutine); a handler on the same event loop calls it directly,
where ``http.server`` in a thread would hop to the loop and back for every read. And
``http.server`` has neither a connection limit nor a deadline for the request head (one slow
peer per thread), answers errors with an HTML page, and logs through ``print``. aiohttp is not a
dependency. This module is about 400 lines, and every limit is a constant below.

What it serves (RFC 9110, RFC 9112):

- GET and HEAD (HEAD: RFC 9110 section 9.1 asks every general-purpose server for both; the
  answer is GET's without the body). Any other method: 405 with ``Allow``.
- One request per connection: every answer says ``Connection: close``. A dashboard polls every
  few seconds; keep-alive would save little and add state.
- No request bodies: ``Content-Length`` other than 0, or any ``Transfer-Encoding``: 400.
- The head is bounded: request line at most :data:`MAX_LINE` bytes (414), header section at most
  :data:`MAX_HEADER_BYTES` bytes and :data:`MAX_HEADERS` fields (431), the request line within
  :data:`FIRST_LINE_TIMEOUT` seconds and the whole head within :data:`HEAD_TIMEOUT` (408), so an
  idle connection is let go soon. A malformed request line or field, obsolete line folding,
  whitespace before a colon, a missing or repeated ``Host``: 400. A version other than 1.0/1.1:
  505. A request target that is not origin-form, a path with ``.``/``..`` segments, a backslash,
  a control character or an invalid percent-escape: 400.
- At most :data:`MAX_CONNECTIONS` connections at once, and :data:`MAX_PER_CLIENT` from one
  client address (so a few idle connections of one peer cannot lock an operator out); more get
  503 at once (over TLS: closed at once, before any handshake: a connection is counted, and TLS
  started on it, as it is accepted, so one in its handshake is held to these limits too).
- A handler that raises gets 500 and one error line in the log; a peer never sees a traceback,
  and garbage never produces one in the log (bad requests: a rate-limited warning line).

After the answer the server closes its sending side and discards what the peer still sends for
up to :data:`LINGER` seconds ("lingering close"), so that an unread request does not turn into a
TCP reset that destroys the answer on its way. A connection keeps its place under the limits
until its socket is closed: an answer the peer has not taken within :data:`WRITE_TIMEOUT` is
dropped and the connection reset (closing a socket waits for its unsent bytes, for as long as
the peer does not read).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import re
import ssl
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from cloud.listen import listen_failure

log = logging.getLogger(__name__)

# Limits and timing (tests may shorten them).
MAX_LINE = 8 * 1024  # bytes of the request line and of each header line
MAX_HEADER_BYTES = 16 * 1024  # bytes of the whole header section
MAX_HEADERS = 64  # header fields
MAX_QUERY_FIELDS = 16
MAX_CONNECTIONS = 128
MAX_PER_CLIENT = 8  # connections at once from one client address
FIRST_LINE_TIMEOUT = 3.0  # seconds for the request line (a browser sends its head at once)
HEAD_TIMEOUT = 10.0  # seconds for the whole request head
HANDLER_TIMEOUT = 30.0  # seconds for the handler's answer (then 503)
WRITE_TIMEOUT = 30.0  # seconds to hand the answer to the peer
LINGER = 1.0  # seconds to discard what the peer still sends after the answer
WARN_WINDOW = 10.0  # at most WARN_BURST warnings about bad requests per window
WARN_BURST = 10

METHODS = ("GET", "HEAD")
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_WARN_STATUSES = frozenset({400, 405, 408, 414, 431, 505})  # the peer's fault; 401/404 are not
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_FIELD_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_PATH_BAD = re.compile(r"[\x00-\x1f\x7f\\]")


@dataclass(frozen=True)
class Request:
    """A parsed request head. ``path`` is percent-decoded and free of dot segments; ``headers``
    has lower-case names (a repeated field: its values joined with ", ")."""

    method: str
    target: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    peer: str


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


class HttpError(Exception):
    """A refusal: answered with ``status`` and ``message`` as plain text."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})

    def response(self) -> Response:
        return Response(self.status, (self.message + "\n").encode("utf-8"), headers=self.headers)


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    """Serves ``handler`` on ``host:port`` (port 0: any free port); ``tls``: HTTPS."""

    def __init__(self, handler: Handler, *, base_headers: Mapping[str, str] | None = None):
        self._handler = handler
        self._base = dict(base_headers or {})
        self._server: asyncio.Server | None = None
        self._tls: ssl.SSLContext | None = None
        self._open = 0
        self._per_client: Counter[str] = Counter()  # open connections by client address
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned = 0
        self._suppressed = 0
        self._window = 0.0
        self.host = ""
        self.port = 0
        self.answered: dict[int, int] = {}  # status -> count (tests and metrics)

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        try:
            # TLS starts on a connection once it is counted (_connection): a connection in its
            # handshake holds a socket too, so it is held to the same limits
            self._server = await asyncio.start_server(
                self._connection, host, port, limit=MAX_LINE, reuse_address=True
            )
        except OSError as err:  # one line naming the address and what to do
            raise listen_failure(host, port, err) from err
        self._tls = tls
        self.host = host
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    # -- one connection ------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._open += 1
        peer = _peer(writer)
        host = peer.rpartition(":")[0]
        self._per_client[host] += 1
        abort = False
        try:
            if self._open > MAX_CONNECTIONS or self._per_client[host] > MAX_PER_CLIENT:
                if self._tls is not None:  # no answer before TLS: closed (counted as a 503)
                    self.answered[503] = self.answered.get(503, 0) + 1
                    return
                busy = "too many connections" + (
                    "" if self._open > MAX_CONNECTIONS else " from this address: close some"
                )
                await self._send(writer, HttpError(503, busy).response(), False)
                await _linger(reader, writer)
                return
            if self._tls is not None:
                abort = True  # no answer goes out before TLS (and no close waits on it)
                await writer.start_tls(self._tls, ssl_handshake_timeout=HEAD_TIMEOUT)
                abort = False
            await self._serve_one(reader, writer, peer)
        except (ConnectionError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError) as err:
            log.debug("event=http_connection_lost peer=%s error=%s", peer, type(err).__name__)
            abort = True  # lost, or its answer not taken in time: nothing more to deliver
        except asyncio.CancelledError:
            # stop(): the connection ends here. Not re-raised: Python 3.11's stream server logs
            # a traceback for a connection task that ends cancelled.
            log.debug("event=http_connection_closed peer=%s reason=stopping", peer)
            abort = True  # stopping waits for no peer
        except Exception as err:  # never a traceback: one line, the connection goes
            log.error("event=http_internal_error peer=%s error=%r", peer, _short(err))
        finally:
            try:
                if abort:
                    writer.transport.abort()
                else:
                    await _close(writer)
            finally:  # the slot is given back once the socket is gone
                self._open -= 1
                self._per_client[host] -= 1
                if not self._per_client[host]:
                    del self._per_client[host]
                self._tasks.discard(task)

    async def _serve_one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        head_only = False
        try:
            try:
                loop = asyncio.get_running_loop()
                end = loop.time() + HEAD_TIMEOUT
                async with asyncio.timeout_at(loop.time() + FIRST_LINE_TIMEOUT) as deadline:
                    request = await _read_head(reader, peer, lambda: deadline.reschedule(end))
            except TimeoutError:
                raise HttpError(408, "the request head did not arrive in time") from None
            if request is None:  # closed before sending anything
                return
            head_only = request.method == "HEAD"
            try:
                async with asyncio.timeout(HANDLER_TIMEOUT):
                    response = await self._handler(request)
            except HttpError:
                raise
            except TimeoutError:
                log.error("event=http_handler_timeout path=%s", request.path)
                response = HttpError(503, "the answer took too long").response()
            except Exception as err:
                log.error("event=http_internal_error path=%s error=%r", request.path, _short(err))
                response = HttpError(500, "internal error").response()
            log.debug(
                "event=http_request peer=%s method=%s path=%s status=%d",
                peer,
                request.method,
                request.path,
                response.status,
            )
        except HttpError as err:
            if err.status in _WARN_STATUSES and self.may_warn():
                log.warning(
                    "event=http_bad_request peer=%s status=%d reason=%r",
                    peer,
                    err.status,
                    err.message,
                )
            response = err.response()
        await self._send(writer, response, head_only)
        await _linger(reader, writer)

    async def _send(
        self, writer: asyncio.StreamWriter, response: Response, head_only: bool
    ) -> None:
        self.answered[response.status] = self.answered.get(response.status, 0) + 1
        reason = REASONS.get(response.status, "Unknown")
        headers = {
            "Date": email.utils.formatdate(usegmt=True),
            "Content-Type": response.content_type,
            "Content-Length": str(len(response.body)),
            "Connection": "close",
            **self._base,
            **response.headers,
        }
        lines = [f"HTTP/1.1 {response.status} {reason}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        writer.write(data if head_only else data + response.body)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()

    def may_warn(self) -> bool:
        now = time.monotonic()
        if now - self._window > WARN_WINDOW:
            if self._suppressed:
                log.warning("event=http_bad_requests_suppressed count=%d", self._suppressed)
            self._window, self._warned, self._suppressed = now, 0, 0
        if self._warned >= WARN_BURST:
            self._suppressed += 1
            return False
        self._warned += 1
        return True


# -- parsing ---------------------------------------------------------------------------------


async def _line(reader: asyncio.StreamReader, too_long: HttpError) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise too_long from None
    if len(line) > MAX_LINE:
        raise too_long
    line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
    if b"\r" in line:
        raise HttpError(400, "a bare CR in the request head")
    return line


async def _read_head(
    reader: asyncio.StreamReader, peer: str, got_line: Callable[[], None] = lambda: None
) -> Request | None:
    """The request head, parsed and checked; None when the peer closed without a byte.
    ``got_line`` is called once the request line is in."""
    try:
        first = await _line(reader, HttpError(414, f"request line over {MAX_LINE} bytes"))
    except asyncio.IncompleteReadError as err:
        if not err.partial:
            return None
        raise HttpError(400, "incomplete request line") from None
    got_line()
    method, target = _request_line(first)
    headers: dict[str, str] = {}
    total = 0
    count = 0
    too_big = HttpError(
        431, f"header section over {MAX_HEADER_BYTES} bytes or {MAX_HEADERS} fields"
    )
    while True:
        try:
            line = await _line(reader, too_big)
        except asyncio.IncompleteReadError:
            raise HttpError(400, "incomplete header section") from None
        if not line:
            break
        total += len(line) + 2
        count += 1
        if total > MAX_HEADER_BYTES or count > MAX_HEADERS:
            raise too_big
        name, value = _field(line)
        if name in headers:
            if name in ("host", "authorization", "content-length"):
                raise HttpError(400, f"repeated {name} field")
            headers[name] = f"{headers[name]}, {value}"
        else:
            headers[name] = value
    if "host" not in headers:
        raise HttpError(400, "no Host field (RFC 9112 section 3.2)")
    if method not in METHODS:
        raise HttpError(405, "only GET and HEAD", {"Allow": ", ".join(METHODS)})
    if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
        raise HttpError(400, "requests here have no body")
    path, query = _target(target)
    return Request(method, target, path, query, headers, peer)


def _request_line(line: bytes) -> tuple[str, str]:
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise HttpError(400, "malformed request line")
    version = _VERSION.fullmatch(parts[2])
    if version is None:
        raise HttpError(400, "malformed HTTP version")
    if version.group(1) != b"1":
        raise HttpError(505, "HTTP/1.1 only")
    try:
        target = parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "the request target is not ASCII") from None
    return parts[0].decode("ascii"), target


def _field(line: bytes) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise HttpError(400, "obsolete line folding")
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise HttpError(400, "malformed header field")
    value = value.strip(b" \t")
    if _FIELD_VALUE_BAD.search(value):
        raise HttpError(400, "control character in a header field")
    return name.decode("ascii").lower(), value.decode("latin-1")


def _target(target: str) -> tuple[str, dict[str, str]]:
    """Origin-form only: ``/path?query``. Returns the decoded path and the first value of each
    query parameter."""
    if not target.startswith("/") or "#" in target:
        raise HttpError(400, "the request target must be a path")
    raw_path, _, raw_query = target.partition("?")
    try:
        path = urllib.parse.unquote(raw_path, errors="strict")
        pairs = urllib.parse.parse_qsl(
            raw_query,
            keep_blank_values=True,
            strict_parsing=False,
            errors="strict",
            max_num_fields=MAX_QUERY_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "invalid escape or too many query fields") from None
    if _PATH_BAD.search(path):
        raise HttpError(400, "control character or backslash in the path")
    if any(segment in (".", "..") for segment in path.split("/")):
        raise HttpError(400, "dot segments in the path")
    query: dict[str, str] = {}
    for name, value in pairs:
        query.setdefault(name, value)
    return path, query


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER):
            discarded = 0
            while discarded < 1 << 20:
                chunk = await reader.read(64 * 1024)
                if not chunk:
                    break
                discarded += len(chunk)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close the connection once what was written to it has gone; reset it when the peer does
    not take that within :data:`WRITE_TIMEOUT` (or the server stops): closing waits for unsent
    bytes, so a peer that never reads would otherwise keep the socket, and the answer, for good."""
    writer.close()
    try:
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.wait_closed()
    except (Exception, asyncio.CancelledError):  # stop(): not re-raised, see _connection
        writer.transport.abort()


def _peer(writer: asyncio.StreamWriter) -> str:
    info = writer.get_extra_info("peername")
    if isinstance(info, tuple) and len(info) >= 2:
        host = f"[{info[0]}]" if ":" in str(info[0]) else str(info[0])
        return f"{host}:{info[1]}"
    return "?"


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:200]
