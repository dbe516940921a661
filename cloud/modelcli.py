"""``edge-agent-cloud models keygen|publish|list``: the model registry (cloud/models.py, signed and
versioned models; docs/protocol.md, "Models").

``keygen`` makes the Ed25519 signing key (``DATA/models/signing.key`` and ``.pub``, or
``--out KEYFILE``). ``publish FILE --name N --version V`` signs a model file with its manifest
entry and stores it (``--storage SPEC``, or SQLite's files in ``--data``). ``list`` prints the
published versions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from agent.errors import ModelError
from agent.exits import (
    EX_CANTCREAT,
    EX_DATAERR,
    EX_NOINPUT,
    EX_OK,
    EX_USAGE,
    CommandError,
    os_error_code,
)
from agent.modelstore.signing import MAX_ROLLBACK_INDEX, load_private_key, write_keypair
from cloud.models import Direct, ModelRegistry, entry_for
from cloud.storage import Storage

KEY_FILE = "signing.key"  # models keygen/publish: the default key under DATA/models


def add_parser(sub: Any, open_storage: Any) -> None:
    """The ``models`` subcommand of cloud/cli.py; ``open_storage`` is cloud/cli.py's (passed in:
    it imports this module)."""
    p = sub.add_parser("models", help="the model registry (signed, versioned models)")
    dsub = p.add_subparsers(dest="action", required=True)
    add_keygen(dsub, "an Ed25519 signing key", f"models/{KEY_FILE}")
    q = dsub.add_parser("publish", help="sign a model file and publish it as NAME VERSION")
    q.add_argument("file", metavar="FILE")
    q.add_argument("--data", required=True)
    q.add_argument("--name", required=True)
    q.add_argument("--version", required=True)
    q.add_argument("--key", help="signing key (default: DIR/models/signing.key)")
    q.add_argument("--manifest", help="manifest.json with the model's entry (default: beside FILE)")
    q.add_argument("--entry", help="the entry's name in that manifest (default: by file name)")
    q.add_argument(
        "--rollback-index",
        type=int,
        default=None,
        metavar="N",
        help="devices that ran a version of index N take no version of this model below N "
        "again (default: the entry's, else 0)",
    )
    q = dsub.add_parser("list", help="published model versions")
    q.add_argument("--data", required=True)
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models, open_storage=open_storage)


def add_keygen(dsub: Any, what: str, default: str) -> None:
    """The ``keygen`` action of a registry's subcommand (models, releases)."""
    q = dsub.add_parser("keygen", help=f"make {what} (KEYFILE and KEYFILE.pub)")
    q.add_argument("--data", help=f"default KEYFILE: DIR/{default}")
    q.add_argument("--out", help="the private key file to write (not overwritten)")


def keygen(args: argparse.Namespace, command: str, default: Path, label: str) -> int:
    """``COMMAND keygen``: the key pair at ``--out``, else at ``--data``/``default``; an
    existing key is never overwritten (73)."""
    if not (args.out or args.data):
        raise CommandError(EX_USAGE, f"error: {command} keygen: give --out KEYFILE or --data DIR")
    out = Path(args.out) if args.out else Path(args.data) / default
    if out.exists():
        raise CommandError(
            EX_CANTCREAT, f"error: {out} exists; not overwritten (move it away first)"
        )
    private, public = write_keypair(out)
    print(f"{label} {private} (keep it secret), public key {public} (for devices)")
    return EX_OK


def signing_key(args: argparse.Namespace) -> Path:
    """``--key``, else the registry's key in ``--data``."""
    if args.key:
        return Path(args.key)
    return Path(args.data) / "models" / KEY_FILE


def cmd_models(args: argparse.Namespace) -> int:
    try:
        if args.action == "keygen":
            return keygen(args, "models", Path("models") / KEY_FILE, "signing key")
        with registry_storage(args) as storage:
            registry = ModelRegistry(Path(args.data) / "models", storage and Direct(storage))
            if args.action == "publish":
                file = Path(args.file)
                if not file.is_file():
                    raise CommandError(EX_NOINPUT, f"error: {file}: no such file (a model file)")
                data = file.read_bytes()
                manifest_path = Path(args.manifest) if args.manifest else None
                entry = entry_for(file, manifest_path, args.entry)
                if args.rollback_index is not None:
                    if not 0 <= args.rollback_index <= MAX_ROLLBACK_INDEX:
                        raise CommandError(
                            EX_USAGE, f"error: --rollback-index must be 0..{MAX_ROLLBACK_INDEX}"
                        )
                    entry.pop("rollback_index", None)
                    if args.rollback_index:
                        entry["rollback_index"] = args.rollback_index
                key = load_private_key(signing_key(args))
                m = registry.publish(data, args.name, args.version, entry, key)
                sha = f"sha256 {m.sha256}, key {m.key}"
                print(f"published {m.name} {m.version}: {m.size} bytes, {sha}")
                return EX_OK
            items = registry.list()
    except ModelError as err:
        return model_error(err)
    return print_published(
        items,
        args.json,
        f"{'model':<24} {'version':<12} {'bytes':>9} {'sha256':<16} {'key':<16} published",
        lambda p, when: (
            f"{p.name:<24} {p.version:<12} {p.size:>9} {p.sha256[:16]} {p.key:<16} {when}"
        ),
    )


@contextlib.contextmanager
def registry_storage(args: argparse.Namespace) -> Iterator[Storage | None]:
    """The storage of a registry command: ``--storage`` opened (and closed after), or None: the
    registry keeps SQLite's files in ``--data``. A ``list`` of a ``--data`` that does not exist
    is a mistyped one (66), not an empty list."""
    if args.action == "list" and args.storage is None and not Path(args.data).is_dir():
        raise CommandError(
            EX_NOINPUT,
            f"error: {args.data}: no such directory; give the --data DIR that "
            "`edge-agent-cloud serve` uses",
        )
    storage = None if args.storage is None else args.open_storage(args.data, storage=args.storage)
    try:
        yield storage
    finally:
        if storage is not None:
            storage.close()


def model_error(err: ModelError, by_cause: bool = True) -> int:
    """A signing or registry error: one line; the code of the OS error behind it (``by_cause``),
    else 65 (releases: a directory that is not a bundle is bad data, docs/ota.md)."""
    print(f"error: {err}", file=sys.stderr)
    cause = err.__cause__
    return os_error_code(cause) if by_cause and isinstance(cause, OSError) else EX_DATAERR


def print_published(
    items: Sequence[Any], as_json: bool, header: str, row: Callable[[Any, str], str]
) -> int:
    """A registry's ``list``: JSON (``to_dict`` of each), or a table of ``row(item, when)``
    lines under ``header`` (``when``: its publication time, ISO 8601 UTC)."""
    if as_json:
        json.dump([p.to_dict() for p in items], sys.stdout, indent=2)
        print()
        return EX_OK
    print(header)
    for p in items:
        print(row(p, dt.datetime.fromtimestamp(p.published, dt.UTC).isoformat(timespec="seconds")))
    return EX_OK
