"""Can a release read the data directory as it is? Decided before the switch (docs/ota.md).

The root helper runs this module with the *new* release's Python (``releases/V/bin/python -I -m
agent.ota.compat --data-dir DATA``) after the install and before the switch, so the question is
answered by the code that will run: the durable queue's schema version (the SQLite header's
``user_version``, read from the file's first 100 bytes: nothing is opened for writing, no
journal is touched) must be one this release reads. A release that cannot read the queue is
refused and the running one stays; the calibration, state and model cache files are JSON and
CBOR documents that every release reads field by field (unknown fields are ignored).

Exit status 0: readable; 1: not (one line per problem on stdout).
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

from agent.store.settings import APPLICATION_ID, SCHEMA_VERSION

QUEUE_FILE = "queue.db"  # [store] path's default, relative to the data directory


def problems(data_dir: Path, queue: Path | None = None) -> list[str]:
    """What this release cannot read in ``data_dir``; empty when it can read everything."""
    path = queue or data_dir / QUEUE_FILE
    try:
        with open(path, "rb") as f:
            header = f.read(100)
    except FileNotFoundError:
        return []  # no queue yet: the release makes its own
    except OSError as err:
        return [f"{path}: cannot read ({err})"]
    if len(header) < 100 or header[:16] != b"SQLite format 3\x00":
        return []  # not a database the store can use at all: it moves it aside at start
    version, app = struct.unpack(">I", header[60:64])[0], struct.unpack(">I", header[68:72])[0]
    if app not in (0, APPLICATION_ID) or version == SCHEMA_VERSION:
        return []
    return [f"{path}: queue schema version {version}, this release reads {SCHEMA_VERSION}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.ota.compat")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--queue", default=None, help=f"the queue file (default DATA/{QUEUE_FILE})")
    args = parser.parse_args(argv)
    found = problems(Path(args.data_dir), Path(args.queue) if args.queue else None)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
