"""Which data formats a release reads and writes; can it run on the data directory as it is, and
can the release before it run on what it will write? Both decided before the switch (docs/ota.md).

Every durable kind of data in the data directory has a format version:

- ``queue``: the durable queue's SQLite schema (``PRAGMA user_version``, read from the file's
  first 100 bytes: nothing is opened for writing, no journal is touched);
- ``state``: the reported/desired state and command files (agent/sync/statedata.py and
  agent/service/commands.py), ``calibration``: the detector's commissioning statistics,
  ``models``: the model cache and its index, ``security``: the credential and the OSCORE
  sequence state, ``learning``: a federated round's files.

A release states the versions it reads (:data:`READS`, a range per kind) and the one it writes
(:data:`WRITES`). The agent records, in ``DATA/formats.json`` and before it writes anything, the
versions it writes and where its queue is (:func:`stamp`); at start it refuses a data directory
holding a version outside what it reads (:func:`check_and_stamp`: a release installed by hand
over newer data).

Before a switch the root helper (agent/ota/updater.py) asks two releases, each with its own
Python (``releases/V/bin/python -I -m agent.ota.compat``):

1. the new one, ``--data-dir DATA``: does it read every version on disk (forward);
2. both, ``--describe``: the new release's :data:`WRITES` must be within the running release's
   :data:`READS`, so that a rollback finds data it reads (backward). A format therefore changes
   in two releases: one that reads the new version while still writing the old, then one that
   writes it (expand, then contract); a release that skips the first step is refused before
   the switch, and the running one stays.

The first question is asked as root, of a data directory the agent owns: ``formats.json`` and
the queue file it names are read through agent/ota/bootcheck.py :func:`~bootcheck.open_data`
(no link followed, no FIFO waited on, a regular file, bounded), and the queue it names is read
only inside the data directory: a path outside it (or through a link) is not read at all, so
neither the header of a file elsewhere nor a stall on a FIFO can be had by naming it there.

Exit status 0: readable (``--describe``: the JSON printed); 1: not (one line per problem).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import struct
import sys
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.files import loads_json, read_json, write_atomic
from agent.ota import bootcheck
from agent.store.settings import APPLICATION_ID, SCHEMA_VERSION

log = logging.getLogger(__name__)

QUEUE_FILE = "queue.db"  # [store] path's default, relative to the data directory
FORMATS_FILE = "formats.json"  # DATA/formats.json: what the last release to run writes

#: kind -> the oldest and newest version this release reads
READS: dict[str, tuple[int, int]] = {
    "queue": (SCHEMA_VERSION, SCHEMA_VERSION),
    "state": (1, 1),
    "calibration": (1, 1),
    "models": (1, 1),
    "security": (1, 1),
    "learning": (1, 1),
}
#: kind -> the version this release writes
WRITES: dict[str, int] = {
    "queue": SCHEMA_VERSION,
    "state": 1,
    "calibration": 1,
    "models": 1,
    "security": 1,
    "learning": 1,
}
MAX_KINDS = 64  # formats.json is the agent's file; a larger map is not one it wrote
MAX_FORMATS_BYTES = 1 << 16  # formats.json is a few hundred bytes; no more is read
HEADER_BYTES = 100  # the SQLite header: all that is read of the queue file


def _version(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def queue_version(path: Path, data_dir: Path | None = None) -> int | None:
    """The queue file's schema version; None when there is none (no file, or not the store's).
    With ``data_dir``, ``path`` (the agent's record) is read only inside it, without following
    a link (bootcheck.open_data); a path elsewhere is not read. Either way a regular file only,
    opened without blocking, and its first :data:`HEADER_BYTES` bytes only."""
    try:
        if data_dir is None:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        else:
            relative = inside(data_dir, path)
            if relative is None:
                log.warning("event=queue_not_read reason=outside_the_data_directory")
                return None
            fd = bootcheck.open_data(data_dir, relative)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            header = f.read(HEADER_BYTES)
    except OSError:
        return None
    if len(header) < HEADER_BYTES or header[:16] != b"SQLite format 3\x00":
        return None  # not a database the store can use at all: it moves it aside at start
    version, app = struct.unpack(">I", header[60:64])[0], struct.unpack(">I", header[68:72])[0]
    if app not in (0, APPLICATION_ID):
        return None
    return version


def inside(data_dir: Path, path: Path) -> str | None:
    """``path`` (absolute, or relative to ``data_dir``) as a path relative to ``data_dir``,
    by its spelling alone (nothing is resolved: links are refused when it is opened); None
    when it is not below ``data_dir``."""
    base = os.path.normpath(os.path.abspath(data_dir))
    relative = os.path.relpath(os.path.normpath(os.path.join(base, path)), base)
    if relative == os.curdir or relative.split(os.sep)[0] == os.pardir:
        return None
    return relative


def recorded(data_dir: Path) -> tuple[dict[str, int], Path | None]:
    """``DATA/formats.json``: the versions the last release wrote, and its queue file. Missing
    or unreadable (a link, not a regular file, larger than :data:`MAX_FORMATS_BYTES`): nothing
    recorded (a data directory from before the record, or a fresh one)."""
    try:
        doc = loads_json(bootcheck.read_data(data_dir, FORMATS_FILE, MAX_FORMATS_BYTES))
    except (OSError, ValueError):
        return {}, None
    if not isinstance(doc, dict):
        return {}, None
    formats = doc.get("formats")
    found: dict[str, int] = {}
    if isinstance(formats, dict) and len(formats) <= MAX_KINDS:
        for kind, value in formats.items():
            version = _version(value)
            if isinstance(kind, str) and version is not None:
                found[kind] = version
    queue = doc.get("queue")
    return found, Path(queue) if isinstance(queue, str) and queue else None


def on_disk(data_dir: Path, queue: Path | None = None) -> tuple[dict[str, int], Path]:
    """The format versions in ``data_dir``: the record, and the queue's own header (which wins:
    it is the file itself); and the queue file read. ``queue`` is the caller's (the agent's
    [store] path at its start); the one the record names, or the default, is the data
    directory's and is read only inside it (:func:`queue_version`)."""
    found, recorded_queue = recorded(data_dir)
    if queue is not None:
        path, version = queue, queue_version(queue)
    else:
        path = recorded_queue or Path(QUEUE_FILE)
        version = queue_version(path, data_dir)
        path = data_dir / path
    if version is not None:
        found["queue"] = version
    return found, path


def problems(data_dir: Path, queue: Path | None = None) -> list[str]:
    """What this release cannot read in ``data_dir``; empty when it can read everything. A kind
    this release does not know is data it would ignore, not a reason to refuse."""
    out = []
    found, path = on_disk(data_dir, queue)
    for kind, version in sorted(found.items()):
        low, high = READS.get(kind, (version, version))
        if not low <= version <= high:
            shown = "".join(c if c.isprintable() else "?" for c in str(path))[:200]
            where = f"{shown}: queue schema" if kind == "queue" else kind
            out.append(f"{where} version {version}, this release reads {low}..{high}")
    return out


def rollback_problems(writes: dict[str, int], reads: dict[str, tuple[int, int]]) -> list[str]:
    """What a release writing ``writes`` would leave that one reading ``reads`` cannot read."""
    out = []
    for kind, version in sorted(writes.items()):
        low, high = reads.get(kind, (version, version))
        if not low <= version <= high:
            out.append(
                f"it writes {kind} version {version}, which the running release (reads "
                f"{low}..{high}) cannot read after a rollback"
            )
    return out


def describe() -> dict[str, Any]:
    return {"reads": {k: list(v) for k, v in READS.items()}, "writes": dict(WRITES)}


def parse_description(text: str) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    """(writes, reads) from ``--describe`` output; ValueError when it is not one."""
    doc = loads_json(text)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    reads_doc, writes_doc = doc.get("reads"), doc.get("writes")
    if not isinstance(reads_doc, dict) or not isinstance(writes_doc, dict):
        raise ValueError("no reads/writes")
    writes: dict[str, int] = {}
    for kind, value in writes_doc.items():
        version = _version(value)
        if version is None:
            raise ValueError(f"writes {kind!r}: not a version")
        writes[str(kind)] = version
    reads: dict[str, tuple[int, int]] = {}
    for kind, pair in reads_doc.items():
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ValueError(f"reads {kind!r}: not a range")
        low, high = _version(pair[0]), _version(pair[1])
        if low is None or high is None or low > high:
            raise ValueError(f"reads {kind!r}: not a range")
        reads[str(kind)] = (low, high)
    return writes, reads


def stamp(data_dir: Path, queue: Path) -> None:
    """Record this release's :data:`WRITES` and its queue file (before it writes anything).
    Rewritten only when it differs, so a start costs no write in the common case."""
    doc = {"formats": dict(WRITES), "queue": str(queue)}
    path = data_dir / FORMATS_FILE
    try:
        if read_json(path) == doc:
            return
    except (OSError, ValueError):
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(doc, sort_keys=True).encode())


def check_and_stamp(data_dir: Path, queue: Path) -> None:
    """At the agent's start, before the queue opens: ConfigError (exit 78: restarting does not
    help) when the data directory holds a version this release does not read; else
    :func:`stamp`. A record that cannot be written (a full or read-only disk) is logged: the
    store has its own answers to those, and the agent must still start."""
    found = problems(data_dir, queue)
    if found:
        raise ConfigError(
            str(data_dir / FORMATS_FILE),
            "",
            "; ".join(found) + ": written by a newer release; run that release, or move the "
            "data directory away",
        )
    try:
        stamp(data_dir, queue)
    except OSError as err:
        log.warning("event=formats_not_recorded path=%s error=%r", data_dir / FORMATS_FILE, err)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.ota.compat")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--data-dir", help="can this release read it")
    what.add_argument(
        "--describe", action="store_true", help="print the versions it reads and writes (JSON)"
    )
    parser.add_argument("--queue", default=None, help=f"the queue file (default DATA/{QUEUE_FILE})")
    args = parser.parse_args(argv)
    if args.describe:
        print(json.dumps(describe(), sort_keys=True))
        return 0
    found = problems(Path(args.data_dir), Path(args.queue) if args.queue else None)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
