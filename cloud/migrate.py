"""``edge-agent-cloud migrate --from SPEC --to SPEC``: copy a whole storage into an empty one,
typically an endpoint's SQLite data directory into PostgreSQL (docs/fleet.md, "PostgreSQL").

What is copied: every logical table of :data:`cloud.storebase.TABLES` (devices with their
registration time, last contact and desired revision; credentials, revoked ones too; records
with their seq, kind, times, body and arrival number, so their arrival order is kept; reported
and desired state with versions and blocked markers; the link history; validation verdicts in
the order they were stored; published models; which gateway each device is behind; groups and
the release history), the published agent releases (:func:`copy_releases`), then the storage's
identity.

- **Streaming**: each table is read in chunks in key order (:meth:`Storage.dump`) and each chunk
  is written in one transaction (:meth:`Storage.load`): memory is bounded by a chunk, whatever
  the size of the storage.
- **Empty targets only**: a target that holds any device, record, credential, state, verdict or
  model is refused (exit 73), so nothing is ever merged into another deployment's data.
- **Restartable**: the target is marked with the source's id when the copy starts
  (:meth:`Storage.set_migration`: the target checked empty and unmarked, and the mark set only
  if absent, in one transaction, so of two migrates started at once into one target the second
  is refused, exit 73); the same command run again after an interruption reads the
  source again and copies only the rows the target does not hold (each chunk is one
  transaction, and a load leaves out keys already there). A target marked by another source is
  refused.
- **Counters**: records keep their arrival numbers and the target's arrival counter goes past
  them; the OSCORE sender sequence counters are copied as the larger of the two, so the target
  endpoint never hands out a sequence number (a nonce) the source already used.
- **Identity**: the target takes the source's storage id when, and only when, every table's
  count was verified. It is the same deployment moved: devices pin the id of the storage that
  first acknowledged them (agent/sync, ``endpoint-store.json``) and refuse an endpoint naming
  another one, so a target with a new id would strand every device's queue. Stop the endpoints
  on the source before migrating, and never run both afterwards.
- **Releases**: each published release the target does not hold is written to a scratch file
  in ``$TMPDIR`` (never whole in memory: a release is up to tens of MB), checked against its
  signed manifest and published on the target with the same manifest and time, one release per
  transaction; a release whose stored file no longer matches its manifest (it could not be
  served either) is not copied and is named in the output. A version the target holds with
  another manifest is refused (exit 73).
- **Verification**: at the end every table's row count is compared (exit 75 and "run it again"
  when the source changed meanwhile: an endpoint still running on it).

A SQLite source's ``verdicts.db`` (the verdicts of an endpoint before they moved into the
storage) is imported into the source first, as that endpoint's next start would have done.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from agent.exits import EX_CANTCREAT, EX_NOINPUT, EX_OK, EX_TEMPFAIL, EX_USAGE, CommandError
from agent.ota.release import ReleaseError, check_file
from cloud.inference import VERDICTS_FILE, import_legacy_verdicts
from cloud.releases import read_manifest
from cloud.storage import DB_NAME, Storage, describe_storage, open_storage
from cloud.storebase import TABLES, MigrationRefused
from cloud.storesql import key_of

CHUNK = 5000  # rows per transaction
MODEL_CHUNK = 4  # model versions per transaction (a file is up to about 1 MB)
PROGRESS = 10.0  # seconds between two progress lines of a long table

Say = Callable[[str], None]


def add_parser(sub: Any) -> None:
    """The ``migrate`` subcommand, on the command line's subparsers."""
    p = sub.add_parser("migrate", help="copy a whole storage into an empty one (docs/fleet.md)")
    p.add_argument("--from", dest="source", required=True, metavar="SPEC", help="sqlite:DIR")
    p.add_argument("--to", dest="target", required=True, metavar="SPEC", help="postgresql://...")
    p.add_argument("--chunk", type=int, default=CHUNK, help=f"rows per transaction ({CHUNK})")
    p.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    if _where(args.source) == _where(args.target):
        raise CommandError(EX_USAGE, "error: migrate: --from and --to name the same storage")
    if args.chunk < 1:
        raise CommandError(EX_USAGE, "error: migrate: --chunk must be 1 or more")
    source = open_source(args.source)
    try:
        target = open_storage(args.target)
        try:
            migrate(source, target, args.chunk, print)
        finally:
            target.close()
    finally:
        source.close()
    return EX_OK


def _where(spec: str) -> str:
    """What a spec names, to tell two specs of one storage (``sqlite:DIR`` and ``DIR/``)."""
    if spec.startswith(("postgresql://", "postgres://")):
        return describe_storage(spec).replace("postgres://", "postgresql://", 1)
    return str(Path(spec.removeprefix("sqlite:")).resolve())


def open_source(spec: str) -> Storage:
    """The storage to copy from: it must exist (a SQLite directory is not created), and a
    SQLite directory's ``verdicts.db`` is imported into it first."""
    if spec.startswith(("postgresql://", "postgres://")):
        return open_storage(spec)
    folder = Path(spec.removeprefix("sqlite:"))
    if not (folder / DB_NAME).is_file():
        raise CommandError(
            EX_NOINPUT,
            f"error: {folder}: no endpoint data here (no {DB_NAME}); give --from sqlite:DIR",
        )
    source = open_storage(spec)
    try:
        legacy = import_legacy_verdicts(source, folder / VERDICTS_FILE)
    except BaseException:
        source.close()
        raise
    if legacy:
        print(f"imported {legacy} verdicts of {folder / VERDICTS_FILE} into the source first")
    return source


def migrate(
    source: Storage, target: Storage, chunk: int = CHUNK, say: Say = print
) -> dict[str, int]:
    """Copy ``source`` into ``target`` (the module docstring); the rows copied per table.
    CommandError when the target is refused or the counts differ at the end."""
    source_id = source.storage_id()
    mark = target.migration()
    if mark is not None and mark != source_id:
        raise CommandError(
            EX_CANTCREAT,
            f"error: the target is being filled by a migrate from another storage ({mark}, not "
            f"{source_id}); finish that one, or start over with an empty target",
        )
    if mark is None:
        held = {name: target.table_count(name) for name in TABLES if name != "sequences"}
        held["releases"] = len(target.releases())
        if any(held.values()):
            what = ", ".join(f"{name} {n}" for name, n in held.items() if n)
            raise CommandError(
                EX_CANTCREAT,
                f"error: the target holds data already ({what}); migrate copies into an empty "
                "storage only (a new database, or sqlite:DIR of an empty directory)",
            )
        try:  # the check again and the mark, in one transaction (another migrate at once)
            target.set_migration(source_id)
        except MigrationRefused as err:
            raise CommandError(
                EX_CANTCREAT,
                f"error: {err}; migrate copies into an empty storage only, one migrate at a time",
            ) from None
    else:
        say(f"resuming the unfinished migrate from storage {source_id}")
    copied = {name: _copy(source, target, name, chunk, say) for name in TABLES}
    copied["releases"], unusable = copy_releases(source, target, say)
    _verify(source, target, say, unusable)
    target.set_migration(source_id, done=True)
    say(f"done: the target is storage {source_id} (the source's id: the same deployment)")
    return copied


def _copy(source: Storage, target: Storage, name: str, chunk: int, say: Say) -> int:
    """One table, chunk by chunk. Always from its first key: :meth:`Storage.load` leaves out
    a row written once that the target holds already (one range query a chunk) and replaces a
    row that may change, so a run again after an interruption, or after the source changed,
    copies what is missing and brings the rest up to date."""
    size = min(chunk, MODEL_CHUNK) if name == "models" else chunk
    after = None
    copied = seen = 0
    started = last = time.monotonic()
    while True:
        rows = source.dump(name, after, size)
        if not rows:
            break
        copied += target.load(name, rows)
        seen += len(rows)
        after = key_of(TABLES[name], rows[-1])
        if time.monotonic() - last >= PROGRESS:
            last = time.monotonic()
            print(f"{name}: {seen} rows ({seen / (last - started):.0f}/s)", file=sys.stderr)
    say(f"{name:<13} {copied:>10} rows copied")
    return copied


def copy_releases(source: Storage, target: Storage, say: Say) -> tuple[int, set[str]]:
    """The published releases the target does not hold, each through a scratch file checked
    against its manifest (module docstring): (releases copied, versions left out because their
    stored file does not match their manifest)."""
    held = {r.version: r.manifest for r in target.releases()}
    copied, unusable = 0, set()
    with tempfile.TemporaryDirectory(prefix="edge-agent-migrate-") as scratch:
        part = Path(scratch) / "release"
        for stored in source.releases():
            if stored.version in held:
                if held[stored.version] != stored.manifest:
                    raise CommandError(
                        EX_CANTCREAT,
                        f"error: the target holds release {stored.version} with another "
                        "manifest; migrate copies into an empty storage only",
                    )
                continue
            manifest = read_manifest(stored)
            size = source.release_file(stored.version, part)
            try:
                if manifest is None or size is None:
                    raise ReleaseError("missing or unreadable")
                check_file(manifest, part)
            except ReleaseError:
                unusable.add(stored.version)
                say(
                    f"release {stored.version}: not copied, its stored file does not match its "
                    "signed manifest (publish it again)"
                )
                continue
            copied += target.put_release(stored.version, stored.manifest, part, stored.published)
    say(f"{'releases':<13} {copied:>10} copied")
    return copied, unusable


def _verify(source: Storage, target: Storage, say: Say, unusable: Collection[str] = ()) -> None:
    differ = []
    for name in TABLES:
        if name == "sequences":
            continue
        have, want = target.table_count(name), source.table_count(name)
        if have != want:
            differ.append(f"{name}: source {want}, target {have}")
    want_releases = {r.version for r in source.releases()} - unusable
    have_releases = {r.version for r in target.releases()}
    if want_releases - have_releases:
        differ.append(f"releases missing: {', '.join(sorted(want_releases - have_releases))}")
    mine = dict(_all(target, "sequences"))
    for principal, reserved in _all(source, "sequences"):
        have = mine.get(principal)
        if have is None or have < reserved:
            differ.append(f"sequence of {principal}: source {reserved}, target {have}")
    if differ:
        raise CommandError(
            EX_TEMPFAIL,
            f"error: the copy differs from the source ({'; '.join(differ)}): the source changed "
            "during the migrate (stop every endpoint on it) - run the same command again to "
            "copy the rest",
        )
    counts = ", ".join(f"{name} {source.table_count(name)}" for name in TABLES)
    say(f"verified: {counts}, releases {len(want_releases)}")


def _all(storage: Storage, name: str) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    after = None
    while rows := storage.dump(name, after, CHUNK):
        out += rows
        after = key_of(TABLES[name], rows[-1])
    return out
