"""``edge-agent-cloud groups add|remove|list``: groups of devices for agent releases, and the
assignment of a release to devices (``releases assign``, cloud/releasecli.py; docs/ota.md).

A group is stored in the storage (cloud/releasestore.py) with its members and the release
assigned to it last. Assigning a release sets desired ``agent/version`` = ``{"version",
"sha256"}`` on each device through the storage's desired-state write (the one ``desired set
--data`` uses: a new version of the key, a new revision of the document, so a running endpoint
on that storage notices it and notifies the device's observation), and puts the assignment in
the device's release history. A device added to a group that has a release gets it at once.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from agent.exits import EX_NOINPUT, EX_OK, EX_USAGE, CommandError
from agent.modelstore.signing import NAME_RE
from agent.wire import statedoc
from agent.wire.batch import DEVICE_ID
from cloud.releasestore import UnknownGroup
from cloud.storebase import UnknownDevice

KEY = "agent/version"
#: The desired document's limit, as the endpoint's (cloud/server.py Limits.desired_doc_bytes).
DESIRED_DOC_BYTES = 1024


def add_parser(sub: Any, open_storage: Any) -> None:
    """The ``groups`` subcommand; ``open_storage(data, existing=, storage=)`` is cloud/cli.py's."""
    p = sub.add_parser("groups", help="groups of devices for agent releases (docs/ota.md)")
    dsub = p.add_subparsers(dest="action", required=True)
    q = dsub.add_parser("add", help="add devices to a group (made when new)")
    q.add_argument("name", metavar="NAME")
    q.add_argument("devices", nargs="+", metavar="DEVICE")
    q.add_argument("--data", required=True)
    q = dsub.add_parser("remove", help="take devices out of a group (their release stays)")
    q.add_argument("name", metavar="NAME")
    q.add_argument("devices", nargs="+", metavar="DEVICE")
    q.add_argument("--data", required=True)
    q = dsub.add_parser("list", help="groups, their members and releases")
    q.add_argument("name", metavar="NAME", nargs="?")
    q.add_argument("--data", required=True)
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_groups, open_storage=open_storage)


def check(what: str, text: str) -> str:
    """A group name or release version (1-64 letters, digits, ``_ . + -``); usage error if not."""
    if not isinstance(text, str) or not NAME_RE.match(text):
        shown = text[:70] if isinstance(text, str) else text
        raise CommandError(
            EX_USAGE,
            f"error: {what} {shown!r}: use 1-64 letters, digits, '_', '.', '+', '-' "
            "(starting with a letter or digit)",
        )
    return text


def devices_of(texts: Sequence[str]) -> list[str]:
    for text in texts:
        if not DEVICE_ID.match(text):
            raise CommandError(EX_USAGE, f"error: {text[:70]!r} is not a valid device id")
    return list(dict.fromkeys(texts))


def assign(
    storage: Any,
    devices: Sequence[str],
    version: str,
    sha256: str,
    reason: str,
    now: float,
    write: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, int | None]:
    """Set desired ``agent/version`` on each device (the module docstring); the document's
    revision of each. A device whose document would grow over its limit is refused
    (:class:`cloud.storebase.DocumentTooLarge`) after the ones before it were set. ``write``:
    another way to set it (``releases assign --server``: a PUT to a running endpoint), which
    raises CommandError when it is not taken; the revision is then not known here."""
    value = {"version": version, "sha256": sha256}
    statedoc.check_desired(KEY, value)
    revs: dict[str, int | None] = {}
    for device in devices:
        changed = True
        if write is None:
            doc, keys = storage.put_desired(device, {KEY: value}, now, None, DESIRED_DOC_BYTES)
            revs[device], changed = doc.rev, bool(keys)
        else:  # the endpoint writes the same storage: changed unless it holds the value
            entry = storage.desired(device).entries.get(KEY)
            changed = entry is None or entry.value != value
            write(device, {KEY: value})
            revs[device] = None
        if changed:
            storage.note_assignment(device, version, reason, now)
    return revs


def require_devices(storage: Any, devices: Sequence[str]) -> None:
    """UnknownDevice for the first of ``devices`` that is not registered (nothing written)."""
    for device in devices:
        if storage.device(device) is None:
            raise UnknownDevice.of(device)


def cmd_groups(args: argparse.Namespace) -> int:
    name = None if args.name is None else check("group", args.name)
    devices = devices_of(getattr(args, "devices", []))
    storage = args.open_storage(args.data, existing=True, storage=args.storage)
    try:
        if args.action == "add":
            assert name is not None
            now = time.time()
            group, added = storage.group_add(name, devices, now)
            out: dict[str, Any] = {"group": name, "added": added}
            if group.version is not None and added:  # the group's release, to its new members
                reason = f"group {name}"
                out["release"] = group.assignment()
                out["revs"] = assign(storage, added, group.version, group.sha256, reason, now)
            print(json.dumps(out))
            return EX_OK
        if args.action == "remove":
            assert name is not None
            try:
                removed = storage.group_remove(name, devices)
            except UnknownGroup as err:
                raise group_error(err, name) from None
            print(json.dumps({"group": name, "removed": removed}))
            return EX_OK
        groups = storage.groups(name)
    finally:
        storage.close()
    if name is not None and not groups:
        raise group_error(UnknownGroup(f"no group {name!r}"), name)
    if args.json:
        print(json.dumps([g.to_json() for g in groups], indent=2))
        return EX_OK
    if not groups:
        print("(no groups)")
    for g in groups:
        release = "-" if g.version is None else f"{g.version} (sha256 {g.sha256[:16]})"
        print(f"{g.name:<20} release {release}  members {len(g.members)}: {' '.join(g.members)}")
    return EX_OK


def group_error(err: UnknownGroup, name: str) -> CommandError:
    """The operator's line for a group that does not exist."""
    return CommandError(
        EX_NOINPUT, f"error: {err}; make it: edge-agent-cloud groups add {name} DEVICE..."
    )
