"""The writer process of the SQLite power-cut test (not a test module itself).

:func:`run` commits transactions forever to a table in WAL mode with ``synchronous=FULL`` and
reports on a pipe, one line per event, so the test can cut the power at any moment and check what
survived:

- ``ready <journal mode>`` once the database is open;
- ``deleting <id> ...`` before a transaction that deletes rows (it may or may not survive);
- ``commit ins=<id>,... del=<id>,...`` after COMMIT returned: both are durable from here on.

Every line goes out in one os.write shorter than PIPE_BUF, so a kill never leaves half a line.
Bodies are stored with their CRC32, so the test can tell a torn row. The test starts it from a
multiprocessing forkserver with this module preloaded.
"""

from __future__ import annotations

import os
import random
import sqlite3
import zlib

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS t ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, crc INTEGER NOT NULL, body BLOB NOT NULL)"
)


def run(conn: object, path: str, seed: int) -> None:
    """Process target: ``conn`` is the write end of a multiprocessing Pipe."""
    fd = conn.fileno()  # type: ignore[attr-defined]
    rng = random.Random(seed)
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA wal_autocheckpoint = 32")  # checkpoint often, so cuts land in them too
    db.execute(SCHEMA)
    mine: list[int] = []  # rows this session inserted and did not delete
    os.write(fd, f"ready {mode}\n".encode())
    while True:
        gone = rng.sample(mine, min(len(mine), rng.choice((0, 0, 1, 3))))
        if gone:
            os.write(fd, ("deleting " + " ".join(map(str, gone)) + "\n").encode())
        db.execute("BEGIN IMMEDIATE")
        new = []
        for _ in range(rng.choice((1, 1, 3, 10))):
            body = rng.randbytes(rng.choice((10, 200, 3000, 9000)))
            cur = db.execute("INSERT INTO t (crc, body) VALUES (?, ?)", (zlib.crc32(body), body))
            new.append(int(cur.lastrowid or 0))
        for rowid in gone:
            db.execute("DELETE FROM t WHERE id = ?", (rowid,))
        db.execute("COMMIT")
        mine = [r for r in mine if r not in gone] + new
        line = f"commit ins={','.join(map(str, new))} del={','.join(map(str, gone))}\n"
        os.write(fd, line.encode())
