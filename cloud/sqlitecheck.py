"""The damage check of the endpoint's (and the gateway's) SQLite file at open.

``PRAGMA quick_check`` reads the whole file: 20-45 ms warm and about 0.3 s cold for 100,000
records (11 MB), tens of seconds for a gigabyte on an SD card. Every open checks, before anything
is written (damage at rest follows a clean stop as well as a crash), except the opens of a
process that has checked the file itself moments before (``check=False``): the gateway's server
after the gateway registered its devices, the daily prune of a serving endpoint.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cloud.storebase import StorageUnavailable


def quick_check(db: sqlite3.Connection, path: Path) -> None:
    """:func:`damaged` if ``PRAGMA quick_check`` finds a damaged page or b-tree."""
    rows = db.execute("PRAGMA quick_check(1)").fetchall()
    text = " ".join(str(rows[0][0]).split()).removeprefix("*** in database main *** ")
    if text != "ok":
        raise damaged(path, text) from sqlite3.DatabaseError(f"disk image is malformed: {text}")


def damaged(path: Path, problem: str) -> StorageUnavailable:
    """The one line that refuses a damaged file (raised from a "malformed" error: exit 65)."""
    return StorageUnavailable(
        f"{path}: the database is damaged ({problem[:160]}); the endpoint will not use it: "
        'recover it or restore a copy (docs/ops.md "A damaged database")'
    )
