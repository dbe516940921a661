"""Renumbering: queued records moved to fresh sequence numbers, a new epoch above a floor, in
one transaction (for records the endpoint holds *another* record under: docs/protocol.md,
"Delivery semantics").

Where an alert record went is kept with it, in the same transaction: the meta row
``moved:<old seq>`` holds its new seq (the :data:`MAX_MOVES` newest such moves), so that whatever
names the alert by its seq (a validation waiting in agent/sync/routing.py, its verdict) follows
it, also when it learns of the renumbering only after a restart (:func:`moved_alerts`)."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING

from agent.errors import StoreError
from agent.store.dbfile import durably, in_chunks, txn_failed
from agent.store.seqfile import SeqMark
from agent.store.settings import KIND_CODE, SEQ_BLOCK, SEQ_HEADROOM
from agent.wire.batch import MAX_SEQ
from agent.wire.records import Kind

if TYPE_CHECKING:
    from agent.store.database import Db

log = logging.getLogger(__name__)

#: The meta key prefix of a renumbered alert record (+ its old seq, 20 digits): its new seq.
MOVED = "moved:"
#: Renumbered alert records remembered (the newest moves); more than the validations waiting.
MAX_MOVES = 4096
_ALERT = KIND_CODE[Kind.ALERT]


def _moved_key(seq: int) -> str:
    return f"{MOVED}{seq:020d}"


def renumber(db: Db, seqs: Sequence[int], floor: int) -> dict[int, int]:
    """Move the queued records ``seqs`` to fresh numbers above ``floor`` and above every
    number issued so far, in one transaction (a new epoch when ``floor`` is higher); later
    puts number above them. The new high-water mark is reserved in the side file before the
    commit, as for puts, so no number repeats after a crash or a lost database."""
    conn = db._c()
    limit = MAX_SEQ - SEQ_HEADROOM
    if floor > limit:
        log.error(
            "event=seq_floor_refused floor=%d limit=%d action=renumber_above_own",
            floor,
            limit,
        )
        floor = 0
    base = max(db.hwm, floor)
    if base + len(seqs) > MAX_SEQ:
        raise StoreError(
            f"queue {db.path}: sequence space exhausted (last seq {db.hwm}): cannot renumber "
            f"{len(seqs)} record(s)"
        )
    reserved = db.reserved
    try:
        with durably(conn, db.s.durability):
            conn.execute("BEGIN IMMEDIATE")
            present: list[int] = []
            alerts: set[int] = set()
            for chunk in in_chunks(sorted(set(seqs))):
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(f"SELECT seq, kind FROM records WHERE seq IN ({marks})", chunk)
                for seq, kind in rows:
                    present.append(seq)
                    if kind == _ALERT:
                        alerts.add(seq)
            moved = {old: base + i for i, old in enumerate(sorted(present), 1)}
            conn.executemany(
                "UPDATE records SET seq = ?, attempts = attempts + 1 WHERE seq = ?",
                [(new, old) for old, new in moved.items()],
            )
            if alerts:
                _keep_moves(conn, {old: moved[old] for old in alerts})
            hwm = base + len(moved)
            if hwm != db.hwm:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'seq_hwm'", (hwm,))
                if hwm > reserved:
                    reserved = hwm + SEQ_BLOCK
                    db.seqfile.write(SeqMark(reserved, db.s.durability))
            conn.execute("COMMIT")
    except (sqlite3.Error, OSError) as err:
        raise txn_failed(conn, err, db.dir, db.path, "renumbering") from err
    db.hwm, db.reserved = hwm, reserved
    db.commits += 1
    for old in moved:
        db.leases.pop(old, None)
    return moved


def _keep_moves(conn: sqlite3.Connection, moves: dict[int, int]) -> None:
    """Note where the alert records ``moves`` went; only the :data:`MAX_MOVES` newest stay."""
    conn.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
        [(_moved_key(old), new) for old, new in moves.items()],
    )
    end = MOVED[:-1] + ";"  # the first key after every MOVED one
    conn.execute(  # the newest moves went to the highest numbers
        "DELETE FROM meta WHERE key >= ? AND key < ? AND value < (SELECT value FROM meta"
        " WHERE key >= ? AND key < ? ORDER BY value DESC LIMIT 1 OFFSET ?)",
        (MOVED, end, MOVED, end, MAX_MOVES - 1),
    )


def moved_alerts(db: Db, seqs: Sequence[int]) -> dict[int, int]:
    """``{old: new}`` for the alert records ``seqs`` that renumberings moved, ``new`` their
    number now (after one renumbering or several)."""
    conn = db._c()
    out: dict[int, int] = {}
    try:
        for seq in seqs:
            now = seq
            while (
                row := conn.execute(
                    "SELECT value FROM meta WHERE key = ?", (_moved_key(now),)
                ).fetchone()
            ) is not None and row[0] > now:  # new numbers are higher: no cycle
                now = row[0]
            if now != seq:
                out[seq] = now
    except sqlite3.Error as err:
        raise StoreError(
            f"queue {db.path}: cannot read where records were renumbered: {err}"
        ) from err
    return out


def within_space(puts: Sequence[Sequence[object]], hwm: int, path: str) -> list[int]:
    """The puts (their indexes) the sequence space above ``hwm`` still has numbers for; the
    others are said in one line (the store refuses them alone)."""
    room = MAX_SEQ - hwm
    fit: list[int] = []
    for i, recs in enumerate(puts):
        if len(recs) <= room:
            fit.append(i)
            room -= len(recs)
    if len(fit) < len(puts):
        refused = sum(len(puts[i]) for i in range(len(puts)) if i not in fit)
        log.error(
            "event=seq_space_exhausted path=%s last_seq=%d records_refused=%d", path, hwm, refused
        )
    return fit


def exhausted(path: str, hwm: int, n: int) -> str:
    """The refusal of ``n`` records by a queue whose sequence space is used up."""
    return (
        f"queue {path}: sequence space exhausted (last seq {hwm} of {MAX_SEQ}); {n} record(s) "
        "not stored: this queue cannot number more records (docs/store.md, Sequence numbers)"
    )
