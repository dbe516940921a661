"""Renumbering: queued records moved to fresh sequence numbers, a new epoch above a floor, in
one transaction (for records the endpoint holds *another* record under: docs/protocol.md,
"Delivery semantics")."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING

from agent.errors import StoreError, StoreFull
from agent.store.dbfile import in_chunks, is_full
from agent.store.seqfile import SeqMark
from agent.store.settings import SEQ_BLOCK
from agent.wire.batch import MAX_SEQ

if TYPE_CHECKING:
    from agent.store.database import Db

log = logging.getLogger(__name__)


def renumber(db: Db, seqs: Sequence[int], floor: int) -> dict[int, int]:
    """Move the queued records ``seqs`` to fresh numbers above ``floor`` and above every
    number issued so far, in one transaction (a new epoch when ``floor`` is higher); later
    puts number above them. The new high-water mark is reserved in the side file before the
    commit, as for puts, so no number repeats after a crash or a lost database."""
    conn = db._c()
    limit = MAX_SEQ - SEQ_BLOCK - len(seqs)
    if floor > limit:
        log.error(
            "event=seq_space_exhausted floor=%d limit=%d action=renumber_above_own",
            floor,
            limit,
        )
        floor = 0
    base = max(db.hwm, floor)
    reserved = db.reserved
    try:
        conn.execute("BEGIN IMMEDIATE")
        present: list[int] = []
        for chunk in in_chunks(sorted(set(seqs))):
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(f"SELECT seq FROM records WHERE seq IN ({marks})", chunk)
            present += [row[0] for row in rows]
        moved = {old: base + i for i, old in enumerate(sorted(present), 1)}
        conn.executemany(
            "UPDATE records SET seq = ?, attempts = attempts + 1 WHERE seq = ?",
            [(new, old) for old, new in moved.items()],
        )
        hwm = base + len(moved)
        if hwm != db.hwm:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'seq_hwm'", (hwm,))
            if hwm > reserved:
                reserved = hwm + SEQ_BLOCK
                db.seqfile.write(SeqMark(reserved, db.s.durability))
        conn.execute("COMMIT")
    except (sqlite3.Error, OSError) as err:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        if is_full(err, db.dir):
            raise StoreFull(f"queue {db.path}: renumbering: the disk is full") from err
        raise StoreError(f"queue {db.path}: renumbering failed: {err}") from err
    db.hwm, db.reserved = hwm, reserved
    db.commits += 1
    for old in moved:
        db.leases.pop(old, None)
    return moved
