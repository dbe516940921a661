"""The ``edge-agent-cloud`` command line: run the reference endpoint and look at its data.

edge-agent-cloud serve --listen HOST:PORT [--dtls-listen HOST:PORT] --data DIR [--allow-any-device]
                      [--http HOST:PORT [--http-cert FILE --http-key FILE]]
                      [--storage SPEC] [--processes N] [--no-fast-path]
edge-agent-cloud devices add --data DIR ID [ID ...] [--psk-file FILE]
edge-agent-cloud devices list --data DIR [--json]
edge-agent-cloud operators add|rekey|revoke|token --data DIR NAME
edge-agent-cloud gateways add|rekey|revoke|attach|detach|list --data DIR ...  (cloud/gatewaycli.py)
edge-agent-cloud export --data DIR --device ID [--since T] [--format csv|json] [--output FILE]
edge-agent-cloud desired set (--data DIR | --server URI) --device ID KEY=VALUE [...]
edge-agent-cloud desired show --data DIR --device ID
edge-agent-cloud reported show --data DIR --device ID
edge-agent-cloud models keygen (--data DIR | --out KEYFILE)
edge-agent-cloud models publish --data DIR FILE --name N --version V [--key KEYFILE] [--entry E]
edge-agent-cloud models list --data DIR [--json]
edge-agent-cloud releases keygen|publish|list|assign, groups add|remove|list  (docs/ota.md)
edge-agent-cloud migrate --from sqlite:DIR --to postgresql://...   (cloud/migrate.py)

``desired set --data`` writes the database directly; a server running on it notices within a
second and notifies the device's observers. ``--server coap://HOST:PORT`` sends a CoAP PUT instead.

``serve --dtls-listen HOST:PORT`` also serves coaps:// with each principal's DTLS PSK (identity =
the device id; docs/dtls.md). A device's PSK is random unless ``devices add --psk-file`` gives one.

``serve --http HOST:PORT`` also serves the read-only web dashboard (docs/dashboard.md): on
loopback without a password; elsewhere only over TLS and to operators, whose password
``operators token NAME`` prints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import logging
import signal
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import logsetup
from agent.exits import (
    EX_DATAERR,
    EX_FAIL,
    EX_IOERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_OK,
    EX_UNAVAILABLE,
    EX_USAGE,
    CommandError,
    UsageParser,
    os_error_code,
    os_error_line,
    stdout_closed,
)
from agent.files import ensure_writable_dir
from agent.wire import records, statedoc
from agent.wire.batch import CF_CBOR, DEVICE_ID
from agent.wire.credentials import PSK_BYTES, PSK_IDENTITY_BYTES
from agent.wire.statedoc import StateError
from cloud import (
    commandcli,
    export,
    gatewaycli,
    groupcli,
    learncli,
    migrate,
    modelcli,
    processes,
    prunecli,
    ratelimit,
    releasecli,
    terminal,
)
from cloud.dashboard import DEFAULT_PORT as HTTP_PORT
from cloud.dashboard import Dashboard, DashboardRefused
from cloud.dtls import DtlsUnavailable, check_listen, require_dtlssocket
from cloud.listen import check_port_free
from cloud.security import issue_credential
from cloud.server import DEFAULT_HOST, DEFAULT_PORT, CloudServer, Limits
from cloud.storage import (
    DB_NAME,
    STORAGE_SCHEMES,
    CredentialChanged,
    DocumentTooLarge,
    SQLiteStorage,
    Storage,
    StorageUnavailable,
    UnknownDevice,
    describe_storage,
    open_storage,
)
from cloud.storebase import DataRefused
from cloud.webauth import dashboard_token

DTLS_PORT = 5684  # coaps:// (RFC 7252)
REQUEST_TIMEOUT = 10.0  # seconds for `desired set --server`

log = logging.getLogger("cloud.cli")


class UsageError(Exception):
    """A bad argument: exit 64 with the message."""


def parse_listen(
    text: str, flag: str = "--listen", default_port: int = DEFAULT_PORT
) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6ADDR]:PORT``, ``HOST`` or ``:PORT`` -> (host, port)."""
    host, port = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UsageError(f"{flag} {text}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise UsageError(f"{flag} {text}: expected [ADDR]:PORT")
        port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    host = host or DEFAULT_HOST
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{flag} {text}: port must be 0..65535")
    return host, int(port)


def parse_since(text: str | None) -> float | None:
    """Unix seconds, or an ISO 8601 date/time (UTC unless it names an offset)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since {text}: expected Unix seconds or ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _device(text: str) -> str:
    if not DEVICE_ID.match(text):
        raise UsageError(
            f"{text!r} is not a valid device id (a letter, then letters, digits, _ . -)"
        )
    return text


def _open(data: str, *, existing: bool = False, storage: str | None = None) -> Storage:
    """The endpoint's storage: ``storage`` (``--storage``, e.g. postgresql://...) or SQLite in
    ``data``. ``existing``: only look (export, list, show): the directory must hold an
    endpoint's data already. Otherwise it is created if missing."""
    if storage is not None:
        return open_storage(storage)
    path = Path(data)
    if existing and not (path / DB_NAME).is_file():
        raise CommandError(
            EX_NOINPUT,
            f"error: {path}: no endpoint data here (no {DB_NAME}); give the --data DIR that "
            "`edge-agent-cloud serve` and `devices add` use",
        )
    if not existing:
        writable_dir(path)
    return SQLiteStorage.in_dir(path)


def writable_dir(path: Path, what: str = "data directory", fix: str = "") -> None:
    """Create ``path`` if missing and check that this user can write in it: CommandError (one
    line with the fix, 77 or 73) when not."""
    try:
        ensure_writable_dir(path)
    except OSError as err:
        raise CommandError(
            os_error_code(err),
            "error: " + os_error_line(err, what, fix or "choose a writable --data DIR"),
        ) from None


# -- serve ----------------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    dtls = None
    if args.dtls_listen is not None:
        dtls = parse_listen(args.dtls_listen, "--dtls-listen", DTLS_PORT)
        try:
            check_listen(dtls[0])
        except ValueError as err:
            raise UsageError(str(err)) from None
        try:
            require_dtlssocket()
        except DtlsUnavailable as err:
            print(f"error: {err}", file=sys.stderr)
            return EX_UNAVAILABLE
    http = parse_listen(args.http, "--http", HTTP_PORT) if args.http is not None else None
    if http is None and (args.http_cert or args.http_key):
        raise UsageError("--http-cert and --http-key go with --http")
    server = await CloudServer.start(
        args.data,
        host,
        port,
        allow_any_device=args.allow_any_device,
        allow_plain=args.insecure,
        dtls_listen=dtls,
        storage=args.storage,
        worker=args.worker,
        fast_path=not args.no_fast_path,
        limits=ratelimit.limits_of(args),  # --device-rate, --device-burst
    )
    if http is not None:
        try:
            await Dashboard.start(server, *http, tls_cert=args.http_cert, tls_key=args.http_key)
        except BaseException as err:
            await server.stop()
            if isinstance(err, DashboardRefused):
                raise CommandError(err.code, f"error: {err}") from None
            raise
    uris = server.uri if server.dtls is None else f"{server.uri}, {server.dtls.uri}"
    # what exists now (modules, principals, models) lives as long as the process: kept out of
    # the collector's full passes, which then scan only what requests create
    gc.freeze()
    if args.worker:
        processes.signal_ready(args.ready_fd)
    else:
        print(f"edge-agent-cloud listening on {uris}, {_where(args)}", flush=True)
    if server.dashboard is not None:
        print(f"dashboard on {server.dashboard.url}", flush=True)
    retention = prunecli.start_serving(args, server.clock)  # --retain-days (cloud/prunecli.py)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await retention.stop()
        await server.stop()
    return EX_OK


def _where(args: argparse.Namespace) -> str:
    if args.storage is None:
        return f"data in {args.data}"
    return f"storage {describe_storage(args.storage)}, files in {args.data}"


def cmd_serve(args: argparse.Namespace) -> int:
    writable_dir(Path(args.data))
    if args.processes < 1:
        raise UsageError("--processes must be 1 or more")
    if args.processes == 1 or args.worker:
        return asyncio.run(_serve(args))
    if args.dtls_listen is not None:
        raise UsageError("--dtls-listen is served by one process: run coaps:// without --processes")
    host, port = parse_listen(args.listen)
    if port == 0:
        raise UsageError("--processes needs a fixed port in --listen (they share it)")
    check_port_free(host, port)

    def command(index: int, ready_fd: int) -> list[str]:
        argv = [sys.executable, "-m", "cloud.cli", "--log-level", args.log_level, "serve"]
        argv += ["--listen", args.listen, "--data", args.data, "--worker"]
        argv += ["--ready-fd", str(ready_fd)]
        if args.storage is not None:
            argv += ["--storage", args.storage]
        argv += ["--allow-any-device"] if args.allow_any_device else []
        argv += ["--insecure"] if args.insecure else []
        argv += ["--no-fast-path"] if args.no_fast_path else []
        argv += ratelimit.worker_argv(args) + (prunecli.worker_argv(args) if index == 0 else [])
        if index == 0 and args.http is not None:  # one dashboard, in the first worker
            argv += ["--http", args.http]
            argv += ["--http-cert", args.http_cert] if args.http_cert else []
            argv += ["--http-key", args.http_key] if args.http_key else []
        return argv

    def announce() -> None:
        uri = f"coap://{f'[{host}]' if ':' in host else host}:{port}"
        print(
            f"edge-agent-cloud listening on {uri} ({args.processes} processes), {_where(args)}",
            flush=True,
        )

    try:
        return processes.run(args.processes, command, announce)
    except processes.WorkerFailed as err:
        raise CommandError(err.code if err.code > 0 else EX_UNAVAILABLE, f"error: {err}") from None


# -- devices --------------------------------------------------------------------------------------


def _credential_path(args: argparse.Namespace, name: str, many: bool) -> Path:
    """Where a principal's credential file goes: --credential-out (a directory when several
    principals are named), else DATA/credentials/NAME.json."""
    out = getattr(args, "credential_out", None)
    if out is None:
        return Path(args.data) / "credentials" / f"{name}.json"
    return Path(out) / f"{name}.json" if many or Path(out).is_dir() else Path(out)


def _psk(args: argparse.Namespace) -> bytes | None:
    """The DTLS PSK of ``--psk-file``, read and checked before anything is registered."""
    psk_file = getattr(args, "psk_file", None)
    if psk_file is None:
        return None
    if not Path(psk_file).is_file():
        raise CommandError(EX_NOINPUT, f"error: --psk-file {psk_file}: not a file")
    psk = Path(psk_file).read_bytes().strip()
    if not 1 <= len(psk) <= PSK_BYTES:
        raise UsageError(f"{psk_file}: a PSK is 1 to {PSK_BYTES} bytes, not {len(psk)}")
    return psk


def _issue(
    args: argparse.Namespace,
    storage: SQLiteStorage,
    name: str,
    role: str,
    many: bool,
    psk: bytes | None,
) -> None:
    cred = issue_credential(storage, name, role, time.time(), psk=psk)
    path = _credential_path(args, name, many)
    try:
        cred.write(path)
    except OSError as err:  # issued (the old one is replaced): say how to get a file
        line = os_error_line(
            err,
            f"{name}: the credential was issued but not written:",
            f"fix that, then {args.command} rekey {name} issues one and writes it",
        )
        raise CommandError(os_error_code(err), f"error: {line}") from None
    print(f"{name}: credential (generation {cred.generation}) written to {path}")
    if len(name.encode()) > PSK_IDENTITY_BYTES:
        print(
            f"{name}: note: longer than {PSK_IDENTITY_BYTES} bytes, the longest DTLS PSK "
            "identity tinydtls takes: it can use OSCORE, not coaps://"
        )


def _print_tokens(storage: SQLiteStorage, names: list[str]) -> int:
    """operators token: each operator's dashboard password (cloud/webauth.py)."""
    creds = {c.principal: (c, revoked) for c, revoked in storage.credentials()}
    for name in names:
        cred, revoked = creds.get(name, (None, True))
        if cred is None or revoked or cred.role != "operator":
            print(f"error: {name} is not an operator with a valid credential", file=sys.stderr)
            return EX_FAIL
        print(dashboard_token(cred) if len(names) == 1 else f"{name} {dashboard_token(cred)}")
    return EX_OK


def cmd_principals(args: argparse.Namespace) -> int:
    """devices, operators and gateways add|rekey|revoke; operators token."""
    role = {"operators": "operator", "gateways": "gateway"}.get(args.command, "device")
    names = [_device(n) for n in args.ids]
    out = getattr(args, "credential_out", None)
    if out is not None:  # before anything is registered: a credential that cannot be written
        folder = Path(out) if len(names) > 1 or Path(out).is_dir() else Path(out).parent
        writable_dir(folder, "--credential-out directory", "choose a writable path")
    psk = _psk(args) if args.action in ("add", "rekey") else None
    # only add creates an endpoint's data: the others act on principals it holds already (a
    # mistyped --data was an empty endpoint created and "has no credential", exit 0)
    existing = args.action != "add"
    storage = _open(args.data, existing=existing, storage=args.storage)
    try:
        if args.action == "token":
            return _print_tokens(storage, names)
        known = {c.principal: revoked for c, revoked in storage.credentials()}
        for name in names:
            if args.action == "revoke":
                done = storage.revoke(name, time.time())
                print(f"{name}: {'revoked' if done else 'has no credential'}")
                continue
            if role == "device" and args.action == "add":
                added = storage.add_device(name, time.time())
                if not added and name in known and not known[name]:
                    print(f"{name}: already registered (devices rekey {name} makes a new one)")
                    continue
            elif args.action == "add" and name in known and not known[name]:
                print(f"{name}: already has a credential ({args.command} rekey {name})")
                continue
            if args.action == "rekey" and name not in known:
                raise UsageError(f"{name} has no credential to re-key; use add")
            _issue(args, storage, name, role, len(names) > 1, psk)
    finally:
        storage.close()
    return EX_OK


def cmd_devices(args: argparse.Namespace) -> int:
    if args.action in ("add", "rekey", "revoke"):
        return cmd_principals(args)
    storage = _open(args.data, existing=True, storage=args.storage)
    try:
        infos = storage.devices()
    finally:
        storage.close()
    if args.json:
        json.dump([dataclasses.asdict(info) for info in infos], sys.stdout, indent=2)
        print()
        return EX_OK
    print(f"{'device':<24} {'records':>8} {'last seq':>9} {'desired rev':>11}  last seen")
    for info in infos:
        seen = terminal.when(info.last_seen) if info.last_seen else "never"
        last = "-" if info.last_seq is None else str(info.last_seq)
        print(f"{info.id:<24} {info.records:>8} {last:>9} {info.desired_rev:>11}  {seen}")
    return EX_OK


# -- export ---------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    device = _device(args.device)
    since = parse_since(args.since)
    storage = _open(args.data, existing=True, storage=args.storage)
    try:
        if storage.device(device) is None:
            raise UnknownDevice.of(device, args.data)
        stored = storage.records(device, since)
        feats = storage.features(device, since)
    finally:
        storage.close()
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8", newline="") as out:
                count = export.write(stored, out, args.format, feats)
        except OSError as err:  # opening, or writing (a full disk): name the file
            err.filename = err.filename or args.output
            raise CommandError(
                os_error_code(err), "error: " + os_error_line(err, "--output", "choose another")
            ) from None
        print(f"{count} rows from {len(stored)} records -> {args.output}", file=sys.stderr)
    else:
        export.write(stored, sys.stdout, args.format, feats)
    return EX_OK


# -- desired / reported ---------------------------------------------------------------------------


def _print_entries(doc: dict[str, Any]) -> None:
    print(terminal.dumps(doc, indent=2, sort_keys=True))  # whatever a device stored prints


def _operator_client(uri: str, credential: str | None) -> Any:
    """The checked --server and the operator's OSCORE context of --credential (None without
    one): 64 for a --server that is no coap:// URI, 66 for a missing file, 65 for one that is
    not a credential."""
    from agent.wire.credentials import Credential, CredentialError
    from agent.wire.oscore import ClientContext

    if not uri.startswith("coap://") or not uri.removeprefix("coap://").strip("/"):
        raise UsageError(f"--server {uri}: give the endpoint as coap://HOST:PORT")
    if credential is None:
        return None
    if not Path(credential).is_file():
        raise CommandError(
            EX_NOINPUT,
            f"error: --credential {credential}: no such file; an operator's credential comes "
            "from `edge-agent-cloud operators add --credential-out FILE`",
        )
    try:
        cred = Credential.read(Path(credential))
    except CredentialError as err:
        raise CommandError(EX_DATAERR, f"error: --credential {err}") from None
    return ClientContext(cred, Path(credential + ".oscore.json"))


async def _put_desired(
    uri: str, device: str, changes: dict[str, Any], credential: str | None
) -> int:
    """PUT over the network as an operator: OSCORE with the operator's credential file (its
    context state beside it, FILE.oscore.json); plain CoAP only without one (an endpoint
    started with --insecure)."""
    import aiocoap
    from aiocoap import Code, Message

    client = _operator_client(uri, credential)
    ctx = await aiocoap.Context.create_client_context(
        transports=["oscore", "udp6"] if client else ["udp6"]
    )
    if client is not None:
        ctx.client_credentials[f"{uri.rstrip('/')}/*"] = client.context
    try:
        request = Message(
            code=Code.PUT,
            uri=f"{uri.rstrip('/')}/state/{device}/desired",
            payload=records.dumps(changes),
            content_format=CF_CBOR,
        )
        async with asyncio.timeout(REQUEST_TIMEOUT):
            response = await ctx.request(request).response
    except (TimeoutError, aiocoap.error.Error, OSError) as err:
        print(f"error: no answer from {uri}: {err or type(err).__name__}", file=sys.stderr)
        return EX_UNAVAILABLE
    finally:
        await ctx.shutdown()
        if client is not None:
            client.close()
    if not response.code.is_successful():
        text = response.payload.decode("utf-8", "replace")
        refused = response.code in (Code.UNAUTHORIZED, Code.FORBIDDEN)
        fix = (
            "; the endpoint takes desired state from an operator's credential only: "
            "--credential FILE of `edge-agent-cloud operators add`"
            if refused
            else ""
        )
        print(f"error: {response.code}: {text}{fix}", file=sys.stderr)
        return EX_NOPERM if refused else EX_DATAERR
    _print_entries(records.loads(response.payload))
    return EX_OK


def cmd_desired(args: argparse.Namespace) -> int:
    device = _device(args.device)
    if args.action == "set":
        if not args.assignments:
            raise UsageError("desired set: give at least one KEY=VALUE")
        try:
            changes = dict(statedoc.parse_assignment(a) for a in args.assignments)
        except StateError as err:
            raise UsageError(str(err)) from None
        if args.server:
            return asyncio.run(_put_desired(args.server, device, changes, args.credential))
        if not args.data:
            raise UsageError("desired set: give --data DIR or --server URI")
        storage = _open(args.data, storage=args.storage)
        try:
            limit = Limits().desired_doc_bytes
            doc, changed = storage.put_desired(device, changes, time.time(), None, limit)
        finally:
            storage.close()
        _print_entries({"rev": doc.rev, "changed": changed})
        return EX_OK
    if not args.data:
        raise UsageError("desired show: give --data DIR")
    storage = _open(args.data, existing=True, storage=args.storage)
    try:
        doc = storage.desired(device)
    finally:
        storage.close()
    _print_entries(records.loads(doc.to_cbor()))
    return EX_OK


def cmd_reported(args: argparse.Namespace) -> int:
    device = _device(args.device)
    storage = _open(args.data, existing=True, storage=args.storage)
    try:
        if storage.device(device) is None:
            raise UnknownDevice.of(device, args.data)
        entries = storage.reported(device)
    finally:
        storage.close()
    _print_entries({k: [e.version, e.value] for k, e in entries.items()})
    return EX_OK


# -- the parser -----------------------------------------------------------------------------------


def _principal_actions(dsub: Any, role: str) -> None:
    what = f"{role}s"
    for action, text in (
        ("add", f"register {what} and write each one's credential file"),
        ("rekey", "new credentials (the old ones are refused from now on)"),
        ("revoke", "refuse the principal from now on"),
    ):
        q = dsub.add_parser(action, help=text)
        q.add_argument("--data", required=True)
        q.add_argument("ids", nargs="+", metavar="ID")
        if action != "revoke":
            q.add_argument(
                "--credential-out",
                help="the credential file (a directory with several IDs); "
                "default DATA/credentials/ID.json",
            )
            if role == "device":
                q.add_argument(
                    "--psk-file", help="this DTLS PSK (1-16 bytes) instead of a random one"
                )


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="edge-agent-cloud", description="The reference CoAP cloud endpoint of edge-agent."
    )
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the endpoint")
    p.add_argument("--listen", default=f"{DEFAULT_HOST}:{DEFAULT_PORT}", help="HOST:PORT")
    p.add_argument("--data", required=True, help="data directory (created if missing)")
    p.add_argument(
        "--dtls-listen",
        metavar="HOST:PORT",
        help="also serve coaps:// (DTLS-PSK, identity = device id) on this address and port; "
        "a concrete address, not 0.0.0.0 or ::",
    )
    p.add_argument(
        "--allow-any-device", action="store_true", help="register unknown devices on first contact"
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="also serve unauthenticated plain CoAP as if from the device named in the path "
        '(agents with security = "none"; closed test networks only)',
    )
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="also serve the read-only web dashboard (docs/dashboard.md), e.g. 127.0.0.1:8080; "
        "a network address needs an operator and --http-cert/--http-key",
    )
    p.add_argument("--http-cert", metavar="FILE", help="the dashboard's TLS certificate (PEM)")
    p.add_argument("--http-key", metavar="FILE", help="the dashboard's TLS private key (PEM)")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="N endpoint processes on the one --listen address (SO_REUSEPORT; docs/fleet.md)",
    )
    p.add_argument(
        "--no-fast-path",
        action="store_true",
        help="answer single-datagram OSCORE ingest through aiocoap's generic path too "
        "(cloud/fastpath.py; for comparison)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("devices", help="the device registry")
    dsub = p.add_subparsers(dest="action", required=True)
    _principal_actions(dsub, "device")
    q = dsub.add_parser("list", help="list registered devices")
    q.add_argument("--data", required=True)
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)
    commandcli.add_show(dsub, _open)  # devices show (cloud/commandcli.py)

    p = sub.add_parser("operators", help="operators' credentials (desired state over the network)")
    dsub = p.add_subparsers(dest="action", required=True)
    _principal_actions(dsub, "operator")
    q = dsub.add_parser("token", help="print operators' dashboard passwords (serve --http)")
    q.add_argument("--data", required=True)
    q.add_argument("ids", nargs="+", metavar="NAME")
    p.set_defaults(func=cmd_principals)

    p = sub.add_parser("export", help="print the records a device sent")
    p.add_argument("--data", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--since", help="only records with time >= T (Unix seconds or ISO 8601)")
    p.add_argument("--format", choices=export.FORMATS, default="csv")
    p.add_argument("--output", help="write to this file instead of standard output")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("desired", help="desired state of a device")
    dsub = p.add_subparsers(dest="action", required=True)
    q = dsub.add_parser("set", help="set desired keys (KEY=VALUE, VALUE as JSON or text)")
    q.add_argument("--data")
    q.add_argument("--server", help="coap://HOST:PORT of a running endpoint")
    q.add_argument("--credential", help="with --server: the operator's credential file")
    q.add_argument("--device", required=True)
    q.add_argument("assignments", nargs="*", metavar="KEY=VALUE")
    q = dsub.add_parser("show", help="print the desired document")
    q.add_argument("--data", required=True)
    q.add_argument("--device", required=True)
    p.set_defaults(func=cmd_desired)

    p = sub.add_parser("reported", help="reported state of a device")
    dsub = p.add_subparsers(dest="action", required=True)
    q = dsub.add_parser("show", help="print the reported state")
    q.add_argument("--data", required=True)
    q.add_argument("--device", required=True)
    p.set_defaults(func=cmd_reported)

    modelcli.add_parser(sub, _open)
    migrate.add_parser(sub)
    learncli.add_parser(sub, _open, modelcli.signing_key)
    gatewaycli.add_parser(sub, _open, cmd_principals, _principal_actions)
    commandcli.add_parser(sub, _open)
    releasecli.add_parser(sub, _open, _put_desired)
    groupcli.add_parser(sub, _open)  # groups of devices for releases
    prunecli.add_parser(sub, _open, sub.choices["serve"])  # prune, serve --retain-days
    ratelimit.add_arguments(sub.choices["serve"])  # serve --device-rate, --device-burst
    _storage_option(parser)
    return parser


def _storage_option(parser: argparse.ArgumentParser) -> None:
    """``--storage SPEC`` beside every ``--data`` (the database; --data keeps the files)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _storage_option(sub)
    if any("--data" in a.option_strings for a in parser._actions):
        parser.add_argument(
            "--storage",
            metavar="SPEC",
            type=_storage_spec,
            help="the database: postgresql://USER@HOST/DB (docs/fleet.md) or sqlite:DIR; "
            "default: SQLite in --data",
        )


def _storage_spec(text: str) -> str:
    """An argparse type: a --storage a user means (a mistyped scheme, ``mysql://x``, was taken as
    a directory of that name and an empty endpoint created in it)."""
    if "://" in text and not text.startswith(STORAGE_SCHEMES):
        raise argparse.ArgumentTypeError(
            f"{text.partition('://')[0]}://: not a storage; give postgresql://USER@HOST/DB or "
            "sqlite:DIR"
        )
    return text


def storage_error_code(cause: BaseException | None) -> int:
    """The exit code of a storage that cannot be used, by what is behind it: the OS error's; a
    file that is not a database 65; a database server that does not answer 69; else 74."""
    if isinstance(cause, OSError):
        return os_error_code(cause)
    if isinstance(cause, sqlite3.DatabaseError) and (
        "not a database" in str(cause) or "malformed" in str(cause)
    ):
        return EX_DATAERR
    if type(cause).__module__.startswith("psycopg") and "connection" in str(cause):
        return EX_UNAVAILABLE
    return EX_IOERR


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes (agent/exits.py, sysexits.h): 0 done, 1 a refused principal (operators
    token), 64 usage, 65 bad data (a refused request, a corrupt model or database), 66 a missing
    input (no endpoint data, an unknown device, a missing file), 69 unavailable (no answer, an
    address not of this host, a database server that does not answer), 73 cannot create, 74 I/O
    error, 75 an address or database in use, 77 permission denied, 141 standard output closed
    early (``... | head``)."""
    args = build_parser().parse_args(argv)
    if args.func is cmd_serve:  # the other commands print their results; they log nothing
        logsetup.setup(args.log_level)
    try:
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `export ... | head`: the reader has what it wanted
        return stdout_closed()
    except CommandError as err:
        print(err, file=sys.stderr)
        return err.code
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EX_USAGE
    except UnknownDevice as err:
        data = getattr(args, "data", None) or "DIR"
        device = err.device or getattr(args, "device", None) or "ID"
        print(
            f"error: {err}; register it: edge-agent-cloud devices add --data {data} {device}",
            file=sys.stderr,
        )
        return EX_NOINPUT
    except (StateError, DocumentTooLarge, CredentialChanged, DataRefused) as err:
        print(f"error: {err}", file=sys.stderr)
        return EX_DATAERR
    except StorageUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return storage_error_code(err.__cause__)
    except OSError as err:
        # a message made for the operator already (listen errors), else the file and errno
        text = err.strerror if err.filename is None and err.strerror else os_error_line(err)
        print(f"error: {text}", file=sys.stderr)
        return os_error_code(err)
    except KeyboardInterrupt:
        return EX_OK


if __name__ == "__main__":
    sys.exit(main())
