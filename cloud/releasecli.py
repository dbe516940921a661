"""``edge-agent-cloud releases keygen|publish|list|assign|status``: signed agent releases
(cloud/releases.py, docs/ota.md).

``keygen`` makes the release key (``DATA/releases/release.key`` and ``.pub``; its own role: the
model key cannot sign a release). ``publish BUNDLE --version V`` signs the offline wheel bundle
that ``tools/flash bundle`` builds and stores it in the storage (``--storage SPEC``, or SQLite's
files in ``--data``). ``list`` prints the published releases. ``assign V (--device ID... |
--group NAME)`` sets desired ``agent/version`` to the release and its SHA-256 (from the stored
manifest) on those devices (cloud/groupcli.py): in the storage (a running endpoint on it notifies
the devices within a second), or with ``--server URI [--credential FILE]`` by a PUT to a running
endpoint, as ``desired set --server`` does (the release and the group still come from the
storage). ``assign V --group NAME --percent P [--force]`` is a staged roll-out and ``status V
[--group NAME]`` says where a release stands (cloud/rollout.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from agent.errors import ModelError
from agent.exits import EX_NOINPUT, EX_OK, EX_USAGE, CommandError
from agent.modelstore.signing import load_private_key
from cloud import groupcli, modelcli, rollout, terminal
from cloud.models import Direct
from cloud.releases import KEY_FILE, RELEASES_DIR, ReleaseRegistry
from cloud.releasestore import UnknownGroup


def add_parser(sub: Any, open_storage: Any, put_desired: Any) -> None:
    """The ``releases`` subcommand of cloud/cli.py; ``open_storage`` and ``put_desired`` (the
    PUT of ``desired set --server``) are cloud/cli.py's (passed in: it imports this module)."""
    p = sub.add_parser("releases", help="signed agent releases (docs/ota.md)")
    dsub = p.add_subparsers(dest="action", required=True)
    modelcli.add_keygen(dsub, "the release signing key", f"{RELEASES_DIR}/{KEY_FILE}")
    q = dsub.add_parser("publish", help="sign a wheel bundle (tools/flash bundle) as VERSION")
    q.add_argument("bundle", metavar="BUNDLE")
    q.add_argument("--data", required=True)
    q.add_argument("--version", required=True)
    q.add_argument("--key", help="release key (default: DIR/releases/release.key)")
    q.add_argument(
        "--rollback-index",
        type=int,
        default=0,
        metavar="N",
        help="devices that confirmed a release of index N take no release below N again "
        "(raise it with a security fix; default 0)",
    )
    q = dsub.add_parser("list", help="published releases")
    q.add_argument("--data", required=True)
    q.add_argument("--json", action="store_true")
    q = dsub.add_parser("assign", help="set desired agent/version to VERSION on devices")
    q.add_argument("version", metavar="VERSION")
    who = q.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", action="append", metavar="ID", help="a device (repeatable)")
    who.add_argument("--group", metavar="NAME", help="every member, and members added later")
    q.add_argument(
        "--percent",
        type=float,
        help="with --group: a staged roll-out to this share of the members (docs/ota.md)",
    )
    q.add_argument(
        "--force", action="store_true", help="with --group: go on although devices rolled back"
    )
    q.add_argument("--data", required=True)
    q.add_argument("--server", help="set it through this running endpoint (coap://HOST:PORT)")
    q.add_argument("--credential", help="with --server: the operator's credential file")
    q = dsub.add_parser("status", help="where VERSION stands on the devices (of a group)")
    q.add_argument("version", metavar="VERSION")
    q.add_argument("--group", metavar="NAME", help="the group's members only")
    q.add_argument("--data", required=True)
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_releases, open_storage=open_storage, put_desired=put_desired)


def cmd_releases(args: argparse.Namespace) -> int:
    try:
        if args.action == "keygen":
            return modelcli.keygen(args, "releases", Path(RELEASES_DIR) / KEY_FILE, "release key")
        if args.action == "assign":
            return cmd_assign(args)
        if args.action == "status":
            return cmd_status(args)
        # without --storage the store is SQLite's files in --data (cloud/releases.py)
        with modelcli.registry_storage(args) as storage:
            registry = ReleaseRegistry(Path(args.data) / RELEASES_DIR, storage and Direct(storage))
            if args.action == "publish":
                version = groupcli.check("release version", args.version)
                key_path = Path(args.key) if args.key else Path(args.data) / RELEASES_DIR / KEY_FILE
                m, new = registry.publish(
                    Path(args.bundle), version, load_private_key(key_path), args.rollback_index
                )
                done = "published release" if new else "already published, the same file:"
                index = f", rollback index {m.rollback_index}" if m.rollback_index else ""
                print(f"{done} {m.version}: {m.size} bytes, sha256 {m.sha256}, key {m.key}{index}")
                return EX_OK
            items = registry.list()
    except ModelError as err:
        return modelcli.model_error(err, by_cause=False)
    return modelcli.print_published(
        items,
        args.json,
        f"{'version':<16} {'bytes':>11} {'sha256':<16} {'key':<16} {'arch':<8} published",
        lambda p, when: (
            f"{p.version:<16} {p.size:>11} {p.sha256[:16]} {p.key:<16} {p.arch:<8} {when}"
        ),
    )


def cmd_assign(args: argparse.Namespace) -> int:
    """``releases assign`` (the module docstring)."""
    version = groupcli.check("release version", args.version)
    group = None if args.group is None else groupcli.check("group", args.group)
    devices = groupcli.devices_of(args.device or [])
    if (args.percent is not None or args.force) and group is None:
        raise CommandError(EX_USAGE, "error: --percent and --force go with --group")
    percent = 100.0 if args.percent is None else rollout.check_percent(args.percent)
    storage = args.open_storage(args.data, existing=True, storage=args.storage)
    try:
        manifest = ReleaseRegistry(Path(args.data) / RELEASES_DIR, Direct(storage)).stored(version)
        if manifest is None:
            raise CommandError(
                EX_NOINPUT,
                f"error: release {version} is not published (edge-agent-cloud releases list "
                f"--data {args.data}); publish it first",
            )
        now = time.time()
        if group is not None:
            devices = _group_step(
                storage, group, version, manifest.sha256, percent, args.force, now
            )
            reason = f"group {group}" + ("" if percent == 100 else f" {percent:g}%")
        else:
            groupcli.require_devices(storage, devices)
            reason = "device"
        write = None if args.server is None else _through(args)
        revs = groupcli.assign(storage, devices, version, manifest.sha256, reason, now, write)
    finally:
        storage.close()
    out = {"version": version, "sha256": manifest.sha256, "group": group, "revs": revs}
    if group is not None:
        out["percent"] = percent
    print(json.dumps(out))
    return EX_OK


def _members(storage: Any, group: str) -> list[str]:
    """The members of ``group``; the operator's error when there is no such group."""
    found = storage.groups(group)
    if not found:
        raise groupcli.group_error(UnknownGroup(f"no group {group!r}"), group)
    return list(found[0].members)


def _group_step(
    storage: Any,
    group: str,
    version: str,
    sha256: str,
    percent: float,
    force: bool,
    now: float,
) -> list[str]:
    """The members a ``--group`` assignment sets (cloud/rollout.py): all at 100 % (and the group
    takes the release), the staged share below; refused when members rolled it back."""
    members = _members(storage, group)
    latest = rollout.standing(storage.release_outcomes(version), members)
    stop = rollout.stoppers(latest)
    if stop and not force:
        raise rollout.refuse_to_go_on(version, group, stop)
    if percent < 100:
        return rollout.staged(members, version, percent)
    try:
        return list(storage.set_group_release(group, version, sha256, now).members)
    except UnknownGroup as err:  # removed meanwhile
        raise groupcli.group_error(err, group) from None


def cmd_status(args: argparse.Namespace) -> int:
    """``releases status`` (cloud/rollout.py)."""
    version = groupcli.check("release version", args.version)
    group = None if args.group is None else groupcli.check("group", args.group)
    storage = args.open_storage(args.data, existing=True, storage=args.storage)
    try:
        members = None if group is None else _members(storage, group)
        latest = rollout.standing(storage.release_outcomes(version), members)
    finally:
        storage.close()
    s = rollout.summary(version, latest, members)
    if args.json:
        print(json.dumps({**s, "group": group}, indent=2))
    else:
        print("\n".join(rollout.status_lines(s, group)))
    return EX_OK


def _through(args: argparse.Namespace) -> Any:
    """The desired write of ``releases assign --server``: ``desired set --server``'s PUT."""

    def write(device: str, changes: dict[str, Any]) -> None:
        code = asyncio.run(args.put_desired(args.server, device, changes, args.credential))
        if code != EX_OK:
            raise CommandError(code, f"error: {device}: {args.server} did not take agent/version")

    return write


def release_page(storage: Any, device: str, reported: dict[str, Any]) -> dict[str, Any]:
    """The releases part of ``devices show``: the last outcome the device reports, its groups
    and its release history (reported outcomes and assignments, newest first)."""
    entry = reported.get("agent/update")
    return {
        "last_update": None if entry is None else terminal.jsonable(entry.value),
        "groups": storage.device_groups(device),
        "history": [row.to_json() for row in storage.release_history(device)],
    }


def release_lines(page: dict[str, Any]) -> list[str]:
    """``devices show``'s lines for :func:`release_page`."""
    out = [f"groups       {' '.join(page['groups']) or '-'}"]
    if page["last_update"] is not None:
        out.append(f"last update  {terminal.dumps(page['last_update'])}")
    out.append("releases" if page["history"] else "releases     (no history)")
    for row in page["history"]:
        when = row["at"] if row["at"] is not None else row["received"]
        reason = terminal.safe(row["reason"] or "")  # the device's words
        line = f"  {terminal.when(when):<25} {row['version']:<16} {row['result']:<12} {reason}"
        out.append(line.rstrip())
    return out
