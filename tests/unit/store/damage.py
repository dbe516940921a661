"""Damage done to a queue file under a running store (not a test module itself)."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def corrupt_under_the_store(path: Path) -> None:
    """Another connection checkpoints, the pages after the eighth are overwritten with garbage,
    and a write from that connection makes the store's connection drop its page cache: its next
    read finds the damage."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with path.open("r+b") as f:
        f.seek(4096 * 8)
        f.write(b"\x5a" * (path.stat().st_size - 4096 * 8))
    conn.execute("PRAGMA user_version = 1")
    conn.close()
