"""``edge-agent-cloud gateways``: gateways' credentials and the devices behind them
(docs/security.md "Gateways", docs/protocol.md "Gateways").

    edge-agent-cloud gateways add|rekey|revoke --data DIR GW [GW ...] [--credential-out FILE]
    edge-agent-cloud gateways attach --data DIR GW DEVICE [DEVICE ...]
    edge-agent-cloud gateways detach --data DIR DEVICE [DEVICE ...]
    edge-agent-cloud gateways list --data DIR [--json]

``add``, ``rekey`` and ``revoke`` are those of ``operators``, with the role ``gateway``; a name
that is a principal of another role (a device, an operator) is refused. ``attach`` puts
registered devices behind a gateway (a device is behind one gateway at most: attaching it again
moves it), ``detach`` takes them from behind it. A running endpoint on the same storage notices
either within a second (cloud/relayroutes.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from agent.exits import EX_DATAERR, EX_NOINPUT, EX_OK, EX_USAGE, CommandError
from agent.wire.batch import DEVICE_ID
from cloud.storage import Storage, UnknownDevice

ROLE = "gateway"


def add_parser(
    sub: Any,
    open_storage: Callable[..., Storage],
    principals: Callable[[argparse.Namespace], int],
    principal_actions: Callable[[Any, str], None],
) -> None:
    """The ``gateways`` subcommand. ``open_storage(data, existing=, storage=)``,
    ``principals(args)`` (add/rekey/revoke) and ``principal_actions(dsub, role)`` (their
    arguments) are cloud/cli.py's, passed in: it imports this module."""
    p = sub.add_parser("gateways", help="gateways' credentials and the devices behind them")
    dsub = p.add_subparsers(dest="action", required=True)
    principal_actions(dsub, ROLE)
    q = dsub.add_parser("attach", help="put registered devices behind a gateway")
    q.add_argument("--data", required=True)
    q.add_argument("gateway", metavar="GW")
    q.add_argument("devices", nargs="+", metavar="DEVICE")
    q = dsub.add_parser("detach", help="take devices from behind their gateway")
    q.add_argument("--data", required=True)
    q.add_argument("devices", nargs="+", metavar="DEVICE")
    q = dsub.add_parser("list", help="each gateway and the devices behind it")
    q.add_argument("--data", required=True)
    q.add_argument("--json", action="store_true")

    def command(args: argparse.Namespace) -> int:
        if args.action in ("add", "rekey", "revoke"):
            existing = args.action != "add"  # revoke, rekey: a --data that holds an endpoint
            _only_gateways(
                open_storage(args.data, existing=existing, storage=args.storage), args.ids
            )
            return principals(args)
        storage = open_storage(args.data, existing=True, storage=args.storage)
        try:
            if args.action == "attach":
                return _attach(storage, args)
            if args.action == "detach":
                return _detach(storage, args)
            return _list(storage, args.json)
        finally:
            storage.close()

    p.set_defaults(func=command)


def _names(texts: list[str]) -> list[str]:
    for text in texts:
        if not DEVICE_ID.match(text):
            raise CommandError(
                EX_USAGE,
                f"error: {text!r} is not a valid name (a letter, then letters, digits, _ . -)",
            )
    return texts


def _roles(storage: Storage) -> dict[str, tuple[str, bool]]:
    """principal -> (role, revoked)."""
    return {c.principal: (c.role, revoked) for c, revoked in storage.credentials()}


def _only_gateways(storage: Storage, names: list[str]) -> None:
    """A principal of another role never becomes a gateway by ``gateways add|rekey``."""
    try:
        roles = _roles(storage)
    finally:
        storage.close()
    for name in names:
        role = roles.get(name, (ROLE, False))[0]
        if role != ROLE:
            raise CommandError(
                EX_DATAERR, f"error: {name} is a principal of the role {role}, not a gateway"
            )


def _attach(storage: Storage, args: argparse.Namespace) -> int:
    gateway = _names([args.gateway])[0]
    devices = _names(args.devices)
    role, revoked = _roles(storage).get(gateway, ("", True))
    if role != ROLE or revoked:
        raise CommandError(
            EX_NOINPUT,
            f"error: {gateway} is not a gateway with a valid credential; make it one: "
            f"edge-agent-cloud gateways add --data {args.data} {gateway}",
        )
    try:
        before = storage.attach(gateway, devices, time.time())
    except UnknownDevice as err:
        missing = " ".join(d for d in devices if storage.device(d) is None) or "ID"
        raise CommandError(
            EX_NOINPUT,
            f"error: {err}; nothing attached; register it: "
            f"edge-agent-cloud devices add --data {args.data} {missing}",
        ) from None
    for device, old in before.items():
        moved = "" if old in (None, gateway) else f" (moved from {old})"
        print(f"{device}: behind {gateway}{moved}")
    return EX_OK


def _detach(storage: Storage, args: argparse.Namespace) -> int:
    devices = _names(args.devices)
    gone = storage.detach(devices)
    for device in devices:
        old = gone.get(device)
        print(f"{device}: " + ("behind no gateway" if old is None else f"detached from {old}"))
    return EX_OK


def _list(storage: Storage, as_json: bool) -> int:
    roles = _roles(storage)
    behind: dict[str, list[str]] = {n: [] for n, (r, _) in roles.items() if r == ROLE}
    for device, gateway in storage.relays().items():
        behind.setdefault(gateway, []).append(device)
    rows = [
        {
            "gateway": name,
            "revoked": roles.get(name, (ROLE, True))[1],
            "devices": sorted(devices),
        }
        for name, devices in sorted(behind.items())
    ]
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return EX_OK
    print(f"{'gateway':<24} {'status':<8} devices")
    for row in rows:
        status = "revoked" if row["revoked"] else "active"
        print(f"{row['gateway']:<24} {status:<8} {', '.join(row['devices']) or '-'}")
    return EX_OK
