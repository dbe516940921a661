"""``edge-agent-cloud commands send|list``, ``logs show`` and ``devices show``: remote commands, the
log windows devices upload, and one device's page (docs/ops.md).

``commands send --data DIR --device ID NAME [KEY=VALUE...]`` records the command (``sent``, with
a fresh id: cloud/commandstore.py) and sets the desired key ``command/NAME`` to ``{"id",
"args"}``; a running endpoint on the same storage notices the change within a second and notifies
the device, which runs it once and reports the outcome (docs/protocol.md "Remote commands and
logs"). ``devices show`` prints what the endpoint knows of a device: its registration, records,
reported version and model slots, its recent commands and their results, and its last log
upload; :func:`release_history` is the place for over-the-air updates' history.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from agent.exits import EX_DATAERR, EX_NOINPUT, EX_OK, EX_USAGE, CommandError
from agent.wire import commands as wire
from agent.wire import statedoc
from agent.wire.batch import DEVICE_ID
from agent.wire.logupload import LogUploadError, decode_upload
from agent.wire.statedoc import Entry
from cloud import terminal
from cloud.releasecli import release_lines, release_page
from cloud.storebase import UnknownDevice

#: Desired-document limit of a ``commands send`` (as the endpoint's, cloud/server.py Limits).
DESIRED_DOC_BYTES = 1024
SHOWN_COMMANDS = 10


def add_parser(sub: Any, open_storage: Any) -> None:
    """The ``commands`` subcommand; ``open_storage(data, existing=, storage=)`` is
    cloud/cli.py's (passed in: it imports this module)."""
    p = sub.add_parser("commands", help="remote commands to devices (docs/ops.md)")
    dsub = p.add_subparsers(dest="action", required=True)
    q = dsub.add_parser("send", help="send a command: " + ", ".join(wire.NAMES))
    q.add_argument("--data", required=True)
    q.add_argument("--device", required=True)
    q.add_argument("name", help="|".join(wire.NAMES))
    q.add_argument("args", nargs="*", metavar="KEY=VALUE", help="e.g. since=1700000000")
    q = dsub.add_parser("list", help="a device's recent commands and their results")
    q.add_argument("--data", required=True)
    q.add_argument("--device", required=True)
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_commands, open_storage=open_storage)
    p = sub.add_parser("logs", help="log windows devices uploaded (the logs command)")
    dsub = p.add_subparsers(dest="action", required=True)
    q = dsub.add_parser("show", help="print the newest upload's lines")
    q.add_argument("--data", required=True)
    q.add_argument("--device", required=True)
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_logs, open_storage=open_storage)


def add_show(dsub: Any, open_storage: Any) -> None:
    """``devices show`` (a subcommand of cloud/cli.py's ``devices``)."""
    q = dsub.add_parser("show", help="one device: version, models, commands, logs")
    q.add_argument("--data", required=True)
    q.add_argument("device", metavar="ID")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_show, open_storage=open_storage)


def _device(text: str) -> str:
    if not DEVICE_ID.match(text):
        raise CommandError(EX_USAGE, f"error: {text!r} is not a valid device id")
    return text


def parse_args(name: str, texts: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` arguments (VALUE as JSON if it parses), checked for command ``name``."""
    args: dict[str, Any] = {}
    for text in texts:
        key, sep, raw = text.partition("=")
        if not sep or not key:
            raise CommandError(EX_USAGE, f"error: {text[:60]!r}: expected KEY=VALUE")
        try:
            args[key] = json.loads(raw)
        except (ValueError, RecursionError):
            args[key] = raw
    try:
        return wire.check_args(name, args)
    except wire.CommandError as err:
        raise CommandError(EX_USAGE, f"error: {err}") from None


def send(storage: Any, device: str, name: str, args: dict[str, Any], now: float) -> int:
    """Record the command and set its desired key; its id. The desired key's checks
    (:func:`agent.wire.statedoc.check_desired`) apply: :class:`StateError` and nothing kept."""
    value: dict[str, Any] = {"id": 1, "args": args} if args else {"id": 1}
    statedoc.check_desired(f"command/{name}", value)  # size and shape before anything is kept
    command_id = storage.add_command(device, name, args, now)
    value["id"] = command_id
    try:
        storage.put_desired(device, {f"command/{name}": value}, now, None, DESIRED_DOC_BYTES)
    except BaseException:
        storage.drop_command(device, command_id)
        raise
    return command_id


def cmd_commands(args: argparse.Namespace) -> int:
    device = _device(args.device)
    if args.action == "send":
        command_args = parse_args(args.name, args.args)
        storage = args.open_storage(args.data, existing=True, storage=args.storage)
        try:
            command_id = send(storage, device, args.name, command_args, time.time())
        finally:
            storage.close()
        print(json.dumps({"device": device, "command": args.name, "id": command_id}))
        return EX_OK
    storage = args.open_storage(args.data, existing=True, storage=args.storage)
    try:
        rows = storage.commands(device, SHOWN_COMMANDS)
    finally:
        storage.close()
    if args.json:
        print(terminal.dumps([r.to_json() for r in rows], indent=2))
        return EX_OK
    for line in command_lines(rows):
        print(line)
    return EX_OK


def command_lines(rows: list[Any]) -> list[str]:
    if not rows:
        return ["(no commands)"]
    out = [f"{'id':>14} {'command':<9} {'status':<8} {'sent':<25} {'done':<25} result"]
    for r in rows:
        result = "" if r.result is None else terminal.dumps(r.result)
        when_sent, when_done = terminal.when(r.sent), terminal.when(r.at)
        out.append(
            f"{r.id:>14} {r.name:<9} {r.status:<8} {when_sent:<25} {when_done:<25} {result[:200]}"
        )
    return out


def release_history(storage: Any, device: str, reported: dict[str, Entry]) -> dict[str, Any]:
    """Over-the-air updates of ``device``: cloud/releasecli.py :func:`release_page`."""
    return release_page(storage, device, reported)


def device_page(storage: Any, device: str) -> dict[str, Any]:
    """Everything ``devices show`` prints, as JSON-ready data."""
    info = storage.device(device)
    if info is None:
        raise UnknownDevice.of(device)  # the command line says how to register it
    reported = storage.reported(device)
    version = reported.get("agent/version")
    models = {
        k.removeprefix("model/"): terminal.jsonable(e.value)
        for k, e in reported.items()
        if k.startswith("model/")
    }
    page: dict[str, Any] = {
        "device": device,
        "registered": info.registered,
        "last_seen": info.last_seen,
        "records": info.records,
        "last_seq": info.last_seq,
        "desired_rev": info.desired_rev,
        "version": None if version is None else terminal.jsonable(version.value),
        "models": models,
        "releases": release_history(storage, device, reported),
        "commands": [terminal.jsonable(r.to_json()) for r in storage.commands(device)],
    }
    logs = getattr(storage, "last_log_upload", None)
    if callable(logs):
        page["last_logs"] = logs(device)
    return terminal.jsonable(page)  # whatever a device stored prints as JSON


def cmd_show(args: argparse.Namespace) -> int:
    device = _device(args.device)
    storage = args.open_storage(args.data, existing=True, storage=args.storage)
    try:
        page = device_page(storage, device)
        rows = storage.commands(device, SHOWN_COMMANDS)
    finally:
        storage.close()
    if args.json:
        print(terminal.dumps(page, indent=2, sort_keys=True))
        return EX_OK
    print(f"device       {device}")
    print(f"registered   {terminal.when(page['registered'])}")
    print(f"last seen    {terminal.when(page['last_seen'])}")
    print(f"records      {page['records']} (last seq {page['last_seq']})")
    version = page["version"]  # as the device reports it
    shown = (
        version if isinstance(version, str) else "-" if version is None else terminal.dumps(version)
    )
    print(f"version      {terminal.safe(shown)}")
    for slot, model in sorted(page["models"].items()):
        print(f"model/{slot:<6} {terminal.dumps(model)}")
    for line in release_lines(page["releases"]):  # cloud/releasecli.py
        print(line)
    if page.get("last_logs"):
        print(f"last logs    {terminal.dumps(page['last_logs'])}")
    print("commands")
    for line in command_lines(rows):
        print("  " + line)
    return EX_OK


def cmd_logs(args: argparse.Namespace) -> int:
    device = _device(args.device)
    storage = args.open_storage(args.data, existing=True, storage=args.storage)
    try:
        found = storage.log_uploads(device, 1)
    finally:
        storage.close()
    if not found:
        raise CommandError(
            EX_NOINPUT,
            f"error: no logs from {device} yet; ask for them: edge-agent-cloud commands send "
            f"--data {args.data} --device {device} logs since=UNIX_TIME",
        )
    upload = found[0]
    try:
        lines = decode_upload(upload["body"]).lines()
    except LogUploadError as err:
        raise CommandError(EX_DATAERR, f"error: stored upload {upload['n']}: {err}") from None
    if args.json:
        meta = {k: v for k, v in upload.items() if k != "body"}
        print(terminal.dumps({**meta, "lines": lines}, indent=2))
        return EX_OK
    print(
        f"# {device} upload {upload['n']} at {terminal.when(upload['received'])}: "
        f"{upload['count']} lines since {terminal.when(upload['since'])}, "
        f"{upload['left_out']} older left out"
    )
    for line in lines:
        print(terminal.safe(line))  # the device's text: no escape sequence reaches the terminal
    return EX_OK
