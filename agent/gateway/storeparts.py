"""The gateway's own parts of its store (the schema is the endpoint's, cloud/storage.py) and the
prune of what the cloud acknowledged (docs/gateway.md "What the store keeps"):
:func:`prepare_store` creates them once, at start; :func:`prune` drops forwarded records
``[gateway] keep_forwarded`` after the gateway received them, never one the cloud did not take
nor one held for later (``relay_held``). Used by the forwarder (agent/gateway/relay.py).
"""

from __future__ import annotations

import logging
from typing import Any

from agent.gateway import later
from cloud import devicecount
from cloud.storage import PRUNED_TABLE
from drivers.clock import WALL_FLOOR

log = logging.getLogger(__name__)

PRUNE_BATCH = 20_000  # records dropped in one transaction at most (ingest waits for it)
#: A record of the forwarded prefix the prune may drop: not its device's newest, not held.
DROPPABLE = (
    "seq < (SELECT max(r.seq) FROM records AS r WHERE r.device = records.device) AND "
    "NOT EXISTS (SELECT 1 FROM relay_held AS k WHERE k.device = records.device AND "
    "k.seq = records.seq AND k.features = 0)"
)


def prepare_store(s: Any) -> None:
    """The gateway's own parts of its store (the schema is the endpoint's, cloud/storage.py): an
    index on ``records.arrival`` for the forwarding passes, the highest seq dropped per device
    and the records the cloud did not take (:func:`prune`), and the queue of features records to
    forward, a row per features record stored, written by a trigger in the ingest's own
    transaction (the one that acknowledges the record to its device). Created once; the features
    records stored before it are queued then (an earlier gateway stored them and never forwarded
    them)."""
    with s._tx() as db:  # a failed statement (a full disk) may have ended the transaction
        db.execute("CREATE INDEX IF NOT EXISTS records_by_arrival ON records (arrival)")
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {PRUNED_TABLE} (device TEXT PRIMARY KEY, "
            "through INTEGER NOT NULL) WITHOUT ROWID"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS relay_kept (device TEXT NOT NULL, seq INTEGER NOT NULL, "
            "features INTEGER NOT NULL, PRIMARY KEY (device, seq, features)) WITHOUT ROWID"
        )
        later.prepare(db)  # records the cloud asked for later (agent/gateway/later.py)
        devicecount.recount(db)  # the release before kept no count (cloud/devicecount.py)
        queued = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'relay_features'"
        ).fetchone()
        if queued is None:
            db.execute(
                "CREATE TABLE relay_features (n INTEGER PRIMARY KEY AUTOINCREMENT, "
                "device TEXT NOT NULL, first_seq INTEGER NOT NULL)"
            )
            db.execute(
                "INSERT INTO relay_features (device, first_seq) SELECT device, first_seq "
                "FROM features ORDER BY received, device, first_seq"
            )
            db.execute(
                "CREATE TRIGGER relay_features_queued AFTER INSERT ON features BEGIN "
                "INSERT INTO relay_features (device, first_seq) VALUES (NEW.device, NEW.first_seq);"
                " END"
            )


def prune(
    s: Any, arrival: int, queued: int, before: float, most: int = PRUNE_BATCH, *, now: float
) -> int:
    """Drop what the cloud acknowledged (arrival up to ``arrival``, features queued up to
    ``queued``) and the gateway received before ``before`` (``[gateway] keep_forwarded`` ago),
    at most ``most`` records in one transaction, oldest first. A record the cloud answered with
    a conflict (it holds another under its seq) stays (``relay_kept``): the gateway holds the
    only copy; so does one it asked for later or refused (``relay_later``: its device's rate
    limit, a device not attached to the gateway at the cloud, ...). Each
    device's newest record stays: it is the ``last`` of the device's acks, by which a device
    that lost its store learns to number above it. The highest seq dropped per
    device is kept (:data:`PRUNED_TABLE`): a record under a seq at or below it that the store
    does not hold is answered as a conflict (cloud/storage.py), so the device sends it again
    under a new number rather than have the cloud keep another record under its number. A time
    of receipt after ``now`` (the wall clock was set back since) is set to ``now`` first
    (:func:`_received_since_set_back`), and so is one from before the wall clock was set
    (:func:`_received_while_unset`). Returns the records and features dropped."""
    with s._tx() as db:  # a failed statement (a full disk) may have ended the transaction
        # records arrive in arrival order, so those old enough are a prefix: where it ends
        find = (
            "SELECT arrival, received FROM records WHERE arrival <= ? AND received >= ? "
            "ORDER BY arrival LIMIT 1"
        )
        row = db.execute(find, (arrival, before)).fetchone()
        if _received_since_set_back(db, row, now):
            row = db.execute(find, (arrival, before)).fetchone()
        upto = _prefix(db, arrival if row is None else row[0] - 1, most)
        if _received_while_unset(db, upto, now):
            row = db.execute(find, (arrival, before)).fetchone()
            upto = _prefix(db, arrival if row is None else row[0] - 1, most)
        newest = DROPPABLE
        for device, through, count in db.execute(
            f"SELECT device, max(seq), count(*) FROM records WHERE arrival <= ? AND {newest}"
            " GROUP BY device",
            (upto,),
        ).fetchall():
            db.execute(
                f"INSERT INTO {PRUNED_TABLE} (device, through) VALUES (?, ?) ON CONFLICT "
                "(device) DO UPDATE SET through = max(through, excluded.through)",
                (device, through),
            )
            devicecount.change(db, {device: -count})  # these go below (cloud/devicecount.py)
        dropped = db.execute(
            f"DELETE FROM records WHERE arrival <= ? AND {newest}", (upto,)
        ).rowcount
        forwarded = (
            "SELECT q.device, q.first_seq, f.received FROM relay_features AS q JOIN features AS f "
            "ON f.device = q.device AND f.first_seq = q.first_seq "
            "WHERE q.n <= ? AND f.received < ? AND NOT EXISTS (SELECT 1 FROM relay_held AS k "
            "WHERE k.device = q.device AND k.seq = q.first_seq AND k.features = 1) "
            "ORDER BY q.n LIMIT ?"
        )
        gone = db.execute(forwarded, (queued, before, most)).fetchall()
        if now >= WALL_FLOOR and any(r[2] < WALL_FLOOR for r in gone):
            _restamp_unset(db, now)  # received while the clock was not set: kept a while yet
            gone = db.execute(forwarded, (queued, before, most)).fetchall()
        if gone:
            dropped += db.executemany(
                "DELETE FROM features WHERE device = ? AND first_seq = ?",
                [(device, first_seq) for device, first_seq, _ in gone],
            ).rowcount
        db.execute(
            "DELETE FROM relay_features WHERE n <= ? AND NOT EXISTS (SELECT 1 FROM features AS f "
            "WHERE f.device = relay_features.device AND f.first_seq = relay_features.first_seq)",
            (queued,),
        )
    return dropped


def _prefix(db: Any, upto: int, most: int) -> int:
    """``upto``, or less so that at most ``most`` records the prune may drop are at or below
    it. Records it never drops (held, each device's newest) do not count: more than ``most`` of
    them at the front of the store stopped every prune for good."""
    row = db.execute(
        f"SELECT arrival FROM records WHERE arrival <= ? AND {DROPPABLE} "
        "ORDER BY arrival LIMIT 1 OFFSET ?",
        (upto, most),
    ).fetchone()
    return upto if row is None else row[0] - 1


def _received_since_set_back(db: Any, first: tuple[int, float] | None, now: float) -> bool:
    """When the first record not old enough (``first``: arrival, received) or the first features
    record queued was received after ``now``, the wall clock was set back since (NTP, an
    operator, an RTC battery): every time of receipt after ``now`` becomes ``now``, so that what
    came before the step goes ``keep`` after this prune rather than when the clock reaches its
    time again (years, maybe: the prefix of records old enough would end at it until then and
    the store would grow unbounded). Scans both tables, once per step back. True if it did."""
    feats = db.execute(
        "SELECT f.received FROM relay_features AS q JOIN features AS f ON f.device = q.device "
        "AND f.first_seq = q.first_seq ORDER BY q.n LIMIT 1"
    ).fetchone()
    if not ((first is not None and first[1] > now) or (feats is not None and feats[0] > now)):
        return False
    for table in ("records", "features"):
        n = db.execute(f"UPDATE {table} SET received = ? WHERE received > ?", (now, now)).rowcount
        if n:
            log.warning("event=gateway_clock_set_back table=%s received_after_now=%d", table, n)
    return True


def _received_while_unset(db: Any, upto: int, now: float) -> bool:
    """Records the gateway received while its wall clock was not set (before 2025: no RTC, no
    NTP yet, the cloud's time not learned) hold times of receipt decades old, so once the clock
    is set they looked ``keep_forwarded`` old at once: a record forwarded then was dropped at the
    next prune, and its device, sending it again because its ack was lost, was answered as a
    conflict and sent it under a new number (the cloud stored it twice). The first prune with
    the clock set that meets such a record at or below arrival ``upto`` (what it would drop, at
    most its batch) sets every such time to ``now`` (:func:`_restamp_unset`), so they go
    ``keep_forwarded`` after it; the features records the prune would drop are looked at where
    it selects them. True if it set any."""
    if now < WALL_FLOOR:
        return False
    unset = db.execute(
        "SELECT 1 FROM records WHERE arrival <= ? AND received < ? LIMIT 1", (upto, WALL_FLOOR)
    ).fetchone()
    if unset is None:
        return False
    _restamp_unset(db, now)
    return True


def _restamp_unset(db: Any, now: float) -> None:
    """Every time of receipt before 2025, of records and features records, becomes ``now``."""
    for table in ("records", "features"):
        n = db.execute(
            f"UPDATE {table} SET received = ? WHERE received < ?", (now, WALL_FLOOR)
        ).rowcount
        if n:
            log.warning("event=gateway_clock_set table=%s received_while_unset=%d", table, n)
