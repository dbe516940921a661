"""``edge-agent-cloud releases keygen|publish|list``: signed agent releases (cloud/releases.py,
docs/ota.md).

``keygen`` makes the release key (``DATA/releases/release.key`` and ``.pub``; its own role: the
model key cannot sign a release). ``publish BUNDLE --version V`` signs and stores the offline
wheel bundle that ``tools/flash bundle`` builds. ``list`` prints the published releases.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from agent.errors import ModelError
from agent.exits import EX_CANTCREAT, EX_DATAERR, EX_OK, EX_USAGE
from agent.modelstore.signing import load_private_key, write_keypair
from cloud.releases import KEY_FILE, RELEASES_DIR, ReleaseRegistry


def add_parser(sub: Any) -> None:
    """The ``releases`` subcommand of cloud/cli.py."""
    p = sub.add_parser("releases", help="signed agent releases (docs/ota.md)")
    dsub = p.add_subparsers(dest="action", required=True)
    q = dsub.add_parser("keygen", help="make the release signing key (KEYFILE and KEYFILE.pub)")
    q.add_argument("--data", help="default KEYFILE: DIR/releases/release.key")
    q.add_argument("--out", help="the private key file to write (not overwritten)")
    q = dsub.add_parser("publish", help="sign a wheel bundle (tools/flash bundle) as VERSION")
    q.add_argument("bundle", metavar="BUNDLE")
    q.add_argument("--data", required=True)
    q.add_argument("--version", required=True)
    q.add_argument("--key", help="release key (default: DIR/releases/release.key)")
    q = dsub.add_parser("list", help="published releases")
    q.add_argument("--data", required=True)
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_releases)


def cmd_releases(args: argparse.Namespace) -> int:
    try:
        if args.action == "keygen":
            if not (args.out or args.data):
                print("error: releases keygen: give --out KEYFILE or --data DIR", file=sys.stderr)
                return EX_USAGE
            out = Path(args.out) if args.out else Path(args.data) / RELEASES_DIR / KEY_FILE
            if out.exists():
                print(f"error: {out} exists; not overwritten (move it away first)", file=sys.stderr)
                return EX_CANTCREAT
            private, public = write_keypair(out)
            print(f"release key {private} (keep it secret), public key {public} (for devices)")
            return EX_OK
        registry = ReleaseRegistry(Path(args.data) / RELEASES_DIR)
        if args.action == "publish":
            key_path = Path(args.key) if args.key else Path(args.data) / RELEASES_DIR / KEY_FILE
            m = registry.publish(Path(args.bundle), args.version, load_private_key(key_path))
            print(f"published release {m.version}: {m.size} bytes, sha256 {m.sha256}, key {m.key}")
            return EX_OK
        items = registry.list()
    except ModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return EX_DATAERR
    if args.json:
        json.dump([p.to_dict() for p in items], sys.stdout, indent=2)
        print()
        return EX_OK
    print(f"{'version':<16} {'bytes':>11} {'sha256':<16} {'key':<16} {'arch':<8} published")
    for p in items:
        when = dt.datetime.fromtimestamp(p.published, dt.UTC).isoformat(timespec="seconds")
        print(f"{p.version:<16} {p.size:>11} {p.sha256[:16]} {p.key:<16} {p.arch:<8} {when}")
    return EX_OK
