"""A queue file corrupted at rest, and an independent count of what is still readable in it.

:func:`damage` is the whole step, on a stopped agent's ``queue.db``:

1. copy the intact file and read every row of ``records`` from the copy (seq -> payload);
2. find the table's leaf pages by walking its b-tree from the root page (SQLite file format,
   section 1.6: interior table pages are type 0x05, their cells start with the left child's page
   number and the right-most child is in the page header; leaf table pages are type 0x0D);
3. overwrite a few of them (never all) with random bytes whose first byte is not a valid page
   type, through the file system the agent uses, and fsync;
4. copy the damaged file and look every row up by itself (``SELECT payload FROM records WHERE
   seq = ?``): a row is *readable* when the lookup returns its payload unchanged.

The salvage the agent then does is judged against the readable rows, and the rows that were not
readable are the ones the corruption destroyed (they are not counted as lost).
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import struct
from dataclasses import dataclass, field
from pathlib import Path

TABLE = "records"
INTERIOR_TABLE, LEAF_TABLE = 0x05, 0x0D
PAGE_TYPES = {0x02, 0x05, 0x0A, 0x0D}


class DamageError(RuntimeError):
    """The queue file could not be read or damaged as planned."""


@dataclass
class Damage:
    """One corruption: the rows before, the pages overwritten, what stayed readable."""

    rows: dict[int, bytes] = field(default_factory=dict)  # seq -> payload, before
    leaves: list[int] = field(default_factory=list)  # leaf pages of the table, in key order
    corrupted: list[int] = field(default_factory=list)  # the pages overwritten
    readable: set[int] = field(default_factory=set)  # seqs whose point lookup still works
    checkpointed: bool = False  # a WAL was left and had to be checkpointed first
    note: str = ""

    @property
    def destroyed(self) -> set[int]:
        return set(self.rows) - self.readable


def _rows(path: Path) -> tuple[dict[int, bytes], int]:
    """(seq -> payload, root page of the table) of an intact copy."""
    db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        (root,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
        ).fetchone()
        rows = {seq: bytes(p) for seq, p in db.execute(f"SELECT seq, payload FROM {TABLE}")}
    finally:
        db.close()
    return rows, int(root)


def leaf_pages(data: bytes, root: int) -> list[int]:
    """The leaf pages of the table b-tree rooted at ``root``, left to right."""
    page_size = struct.unpack(">H", data[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    out: list[int] = []
    stack = [root]
    seen: set[int] = set()
    while stack:
        page = stack.pop()
        if page in seen or page < 1 or page * page_size > len(data):
            raise DamageError(f"b-tree walk: bad page number {page}")
        seen.add(page)
        base = (page - 1) * page_size
        head = base + (100 if page == 1 else 0)
        kind = data[head]
        if kind == LEAF_TABLE:
            out.append(page)
            continue
        if kind != INTERIOR_TABLE:
            raise DamageError(f"b-tree walk: page {page} has type 0x{kind:02x}")
        cells = struct.unpack(">H", data[head + 3 : head + 5])[0]
        rightmost = struct.unpack(">I", data[head + 8 : head + 12])[0]
        children = []
        for i in range(cells):
            (offset,) = struct.unpack(">H", data[head + 12 + 2 * i : head + 14 + 2 * i])
            children.append(struct.unpack(">I", data[base + offset : base + offset + 4])[0])
        children.append(rightmost)
        stack.extend(reversed(children))  # popped left to right
    return out


def _readable(path: Path, rows: dict[int, bytes]) -> set[int]:
    db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    ok: set[int] = set()
    try:
        for seq, payload in rows.items():
            try:
                row = db.execute(f"SELECT payload FROM {TABLE} WHERE seq = ?", (seq,)).fetchone()
            except sqlite3.DatabaseError:
                continue
            if row is not None and bytes(row[0]) == payload:
                ok.add(seq)
    finally:
        db.close()
    return ok


def damage(queue_db: Path, workdir: Path, pages: int, rng: random.Random) -> Damage:
    """Corrupt up to ``pages`` leaf pages of the stopped agent's ``queue_db`` (see the module
    docstring); copies (intact and damaged) are kept in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    result = Damage()
    wal = queue_db.with_name(queue_db.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        # a clean stop checkpoints; if it did not, the WAL would hide damage to the main file
        db = sqlite3.connect(queue_db, isolation_level=None)
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
        result.checkpointed = True
    intact = workdir / "intact.db"
    shutil.copyfile(queue_db, intact)
    result.rows, root = _rows(intact)
    data = intact.read_bytes()
    page_size = struct.unpack(">H", data[16:18])[0]
    result.leaves = leaf_pages(data, root)
    count = min(pages, len(result.leaves) - 1)
    if count < 1:
        result.note = f"the table has {len(result.leaves)} leaf page(s): nothing damaged"
        result.readable = set(result.rows)
        return result
    result.corrupted = sorted(rng.sample(result.leaves, count))
    fd = os.open(queue_db, os.O_RDWR)
    try:
        for page in result.corrupted:
            garbage = bytearray(rng.randbytes(page_size))
            garbage[0] = rng.choice([b for b in range(256) if b not in PAGE_TYPES])
            os.pwrite(fd, bytes(garbage), (page - 1) * page_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    damaged = workdir / "damaged.db"
    shutil.copyfile(queue_db, damaged)
    result.readable = _readable(damaged, result.rows)
    return result
