"""The endpoint's read-only web dashboard: ``edge-agent-cloud serve --http HOST:PORT``.

One page (cloud/web/: HTML, a script, a style sheet and the vendored uPlot) and a JSON API that
the page polls every few seconds (docs/dashboard.md):

    GET /api/fleet                                   every device, what it last reported
    GET /api/devices/{id}                            one device
    GET /api/devices/{id}/series?window=S[&until=T]  telemetry, per sensor channel
    GET /api/devices/{id}/alerts?window=S[&until=T]  alerts (score, threshold), the threshold
    GET /api/devices/{id}/link?window=S[&until=T]    link state, RTT and loss over time
    GET /api/learning                                federated learning jobs, newest first

Reads go through the endpoint's storage thread (``CloudServer.db``) and their answers are
bounded (cloud/dashdata.py; the learning jobs: cloud/dashlearn.py). HTTP is
cloud/httpserve.py: GET and HEAD, strict and bounded.

Who may look (:func:`exposure`): on a loopback address anyone on this host, without a password
(the default, ``127.0.0.1:8080``); the ``Host`` field must then name a loopback host, so a web
page elsewhere cannot reach the dashboard through DNS rebinding. On any other address, only
operators (``edge-agent-cloud operators add``) with HTTP Basic and their dashboard token
(cloud/webauth.py), and only over TLS (``--http-cert``/``--http-key``), since Basic sends the
token with every request: without at least one operator, or without TLS, ``serve`` refuses to
start.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import AgentError
from agent.exits import EX_DATAERR, EX_USAGE, os_error_code, os_error_line
from agent.wire.batch import DEVICE_ID
from cloud import dashdata, dashlearn, webauth
from cloud.httpserve import HttpError, HttpServer, Request, Response
from cloud.storage import StorageUnavailable

if TYPE_CHECKING:
    from cloud.server import CloudServer

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
WEB_DIR = Path(__file__).resolve().parent / "web"
MAX_FILE = 1 << 20  # bytes of one static file

WINDOW = 900.0  # seconds shown when the request names no window
WINDOW_MIN = 10.0
WINDOW_MAX = 30 * 86_400.0

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".md": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",  # LICENSE
}

#: Sent with every answer: the page runs only its own scripts and styles, loads nothing from
#: elsewhere, cannot be framed, and browsers do not guess content types.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class DashboardRefused(AgentError):
    """The dashboard may not be served as asked; the message says what to do, ``code`` is the
    exit code (64 for a refused address, 66 for a TLS file that is missing, 65 for one that is
    not what it should be)."""

    def __init__(self, message: str, code: int = EX_USAGE) -> None:
        super().__init__(message)
        self.code = code


def is_loopback(host: str) -> bool:
    """``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def exposure(host: str, operators: int, tls: bool) -> bool:
    """Whether the dashboard on ``host`` must ask for an operator; :class:`DashboardRefused`
    when it may not be served there at all."""
    if is_loopback(host):
        return False
    if operators == 0:
        raise DashboardRefused(
            f"--http {host}: a dashboard on a network address asks for an operator's password, "
            "and there is no operator: add one with `edge-agent-cloud operators add --data DIR "
            "NAME` (its password: `edge-agent-cloud operators token --data DIR NAME`), or serve "
            "it on 127.0.0.1 and reach it through an SSH tunnel"
        )
    if not tls:
        raise DashboardRefused(
            f"--http {host}: a dashboard on a network address is served over TLS only (the "
            "operator's password travels with every request): give --http-cert FILE and "
            "--http-key FILE, or serve it on 127.0.0.1"
        )
    return True


#: What each TLS file must hold (PEM): its flag and a line the file has.
_PEM = {"--http-cert": b"-----BEGIN CERTIFICATE-----", "--http-key": b"PRIVATE KEY-----"}


def tls_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """The dashboard's TLS context; :class:`DashboardRefused` names the file at fault."""
    for flag, path in (("--http-cert", cert), ("--http-key", key)):
        try:
            with open(path, "rb") as f:
                head = f.read(1 << 20)
        except OSError as err:
            raise DashboardRefused(os_error_line(err, flag), os_error_code(err)) from None
        if _PEM[flag] not in head:
            kind = "certificate" if flag == "--http-cert" else "private key"
            raise DashboardRefused(f"{flag} {path}: no PEM {kind} in it", EX_DATAERR)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as err:
        reason = getattr(err, "reason", None)
        if reason == "KEY_VALUES_MISMATCH":
            line = f"--http-key {key} is not the private key of --http-cert {cert}"
        else:
            line = f"--http-cert {cert} --http-key {key}: {reason or err}"
        raise DashboardRefused(line, EX_DATAERR) from None
    return context


def load_files(root: Path = WEB_DIR) -> dict[str, tuple[bytes, str]]:
    """Every servable file under ``root``, read once: URL path -> (bytes, content type). Paths
    are looked up in this map, never on the file system, so no request can reach another file."""
    files: dict[str, tuple[bytes, str]] = {}
    if not (root / "index.html").is_file():
        raise DashboardRefused(f"{root}/index.html is missing: the package is incomplete")
    for path in sorted(root.rglob("*")):
        kind = CONTENT_TYPES.get(path.suffix)
        if not path.is_file() or kind is None or path.stat().st_size > MAX_FILE:
            continue
        rel = path.relative_to(root).as_posix()
        files["/" + rel] = (path.read_bytes(), kind)
    files["/"] = files["/index.html"]
    return files


def _json(obj: Any) -> Response:
    body = json.dumps(obj, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return Response(200, body, "application/json", {"Cache-Control": "no-store"})


def _number(query: dict[str, str], name: str, default: float | None) -> float | None:
    text = query.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise HttpError(400, f"{name}: not a number") from None
    if not math.isfinite(value):
        raise HttpError(400, f"{name}: not a finite number")
    return value


class Dashboard:
    """The web dashboard of one :class:`cloud.server.CloudServer`: :meth:`start` serves it and
    sets ``server.dashboard``; the server's ``stop`` stops it."""

    def __init__(
        self, server: CloudServer, *, auth: bool, files: dict[str, tuple[bytes, str]]
    ) -> None:
        self.server = server
        self.auth = auth
        self.files = files
        self.http = HttpServer(self.handle, base_headers=SECURITY_HEADERS)
        self.tls = False

    @classmethod
    async def start(
        cls,
        server: CloudServer,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        auth: bool | None = None,
    ) -> Dashboard:
        """Serve on ``host:port`` (port 0: any free port). ``auth=True``: ask for an operator on
        loopback too (on other addresses :func:`exposure` always asks)."""
        if (tls_cert is None) != (tls_key is None):
            raise DashboardRefused("--http-cert and --http-key go together")
        creds = await server.db(lambda s: s.credentials())
        operators = sum(1 for c, revoked in creds if c.role == "operator" and not revoked)
        required = exposure(host, operators, tls_cert is not None)
        context = tls_context(tls_cert, tls_key) if tls_cert and tls_key else None
        # ``auth`` can ask for operators where the rule does not, never waive them where it does
        dashboard = cls(server, auth=required or bool(auth), files=load_files())
        await dashboard.http.start(host, port, context)
        dashboard.tls = context is not None
        server.dashboard = dashboard  # server.stop() stops it
        log.info(
            "event=dashboard_listening url=%s auth=%s operators=%d",
            dashboard.url,
            "basic" if dashboard.auth else "none",
            operators,
        )
        return dashboard

    @property
    def url(self) -> str:
        host = self.http.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.http.port}/"

    async def stop(self) -> None:
        await self.http.stop()

    # -- requests --------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        if self.auth:
            user = webauth.check_operator(
                request.headers.get("authorization"), self.server.principals.credential
            )
            if user is None:
                if "authorization" in request.headers and self.http.may_warn():
                    log.warning("event=dashboard_auth_failed peer=%s", request.peer)
                raise HttpError(401, "operator name and dashboard token", webauth.challenge())
        elif not is_loopback(_host_name(request.headers.get("host", ""))):
            raise HttpError(421, "this dashboard answers to a loopback host name only")
        path = request.path
        if path.startswith("/api/"):
            try:
                return await self._api(path[len("/api/") :].split("/"), dict(request.query))
            except StorageUnavailable as err:
                log.error("event=storage_unavailable where=dashboard error=%s", err)
                raise HttpError(503, "storage unavailable", {"Retry-After": "10"}) from None
        found = self.files.get(path)
        if found is None:
            raise HttpError(404, "no such page")
        body, kind = found
        return Response(200, body, kind, {"Cache-Control": "no-cache"})

    async def _api(self, parts: list[str], query: dict[str, str]) -> Response:
        now = self.server.clock.time()
        db = self.server.db
        if parts == ["fleet"]:
            return _json(await db(lambda s: dashdata.fleet(s, now)))
        if parts == ["learning"]:
            return _json(await db(lambda s: dashlearn.learning(s, now)))
        if len(parts) not in (2, 3) or parts[0] != "devices" or not DEVICE_ID.match(parts[1]):
            raise HttpError(404, "no such resource")
        device = parts[1]
        if len(parts) == 2:
            summary = await db(lambda s: dashdata.device(s, device, now))
            if summary is None:
                raise HttpError(404, "no such device")
            return _json(summary)
        what = parts[2]
        if what not in ("series", "alerts", "link"):
            raise HttpError(404, "no such resource")
        window = _number(query, "window", WINDOW)
        assert window is not None
        if not WINDOW_MIN <= window <= WINDOW_MAX:
            raise HttpError(400, f"window: {WINDOW_MIN:g} to {WINDOW_MAX:g} seconds")
        until = _number(query, "until", None)

        def read(s: Any) -> dict[str, Any] | None:
            if not dashdata.registered(s, device):
                return None
            end, anchor = (
                (until, "given")
                if until is not None
                else dashdata.window_end(s, device, now, window)
            )
            fn = {"series": dashdata.series, "alerts": dashdata.alerts, "link": dashdata.link}
            return {**fn[what](s, device, end - window, end), "anchor": anchor, "now": now}

        answer = await db(read)
        if answer is None:
            raise HttpError(404, "no such device")
        return _json(answer)


def _host_name(host: str) -> str:
    """The host part of a ``Host`` field value (``[::1]:8080`` -> ``::1``)."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
