"""Features records at the endpoint: the ``features`` table and the ingest rules that keep each
reading stored once, whether it came as a reading or inside a features record (written once for
both databases, over :class:`cloud.storebase.Sql`).

A features record (agent/wire/features.py) stands for the readings with the seqs it names. The
endpoint treats those seqs like the seqs of records (docs/protocol.md, "Features records"):

- stored: none of its seqs is held (by a record or another features record): the row is
  inserted and every seq is acknowledged (``new`` counts the readings);
- the same record again (same first seq and body): a duplicate, every seq acknowledged;
- otherwise some seqs are held already. The record is not stored. A seq held by a reading or a
  features record of the same sensor is acknowledged (the reading is stored, in the other form:
  the device sent it again after a lost ack at another link level); a seq held by anything
  else is a conflict (named, never acknowledged); the other seqs are not acknowledged, so the
  device sends those readings again (in a features record of their own);
- a record (a reading) whose seq a stored features record holds: acknowledged as a duplicate if
  it is a reading of that sensor, else a conflict; it is not stored.

:func:`prepass` runs before a backend stores a batch's records, :func:`store` after, both in the
ingest transaction; :func:`merge` adds their outcome to the backend's :class:`IngestResult`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.wire.batch import FEATURES, CodecError, WireRecord
from agent.wire.features import MAX_SPAN, FeaturesBody, claimed_seqs
from agent.wire.records import Kind, RecordError, TelemetryBody
from cloud.storebase import TABLES, IngestResult, Sql

log = logging.getLogger("cloud.storage")

TABLE = TABLES["features"]
COLUMNS = TABLE.columns

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    device TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    sensor TEXT NOT NULL,
    t0 REAL NOT NULL,
    t1 REAL NOT NULL,
    count INTEGER NOT NULL,
    received REAL NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (device, first_seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS features_by_time ON features (device, t1);
"""

PG_MIGRATION = (
    """CREATE TABLE features (
        device TEXT COLLATE "C" NOT NULL,
        first_seq BIGINT NOT NULL,
        last_seq BIGINT NOT NULL,
        sensor TEXT COLLATE "C" NOT NULL,
        t0 DOUBLE PRECISION NOT NULL,
        t1 DOUBLE PRECISION NOT NULL,
        count BIGINT NOT NULL,
        received DOUBLE PRECISION NOT NULL,
        body BYTEA NOT NULL,
        PRIMARY KEY (device, first_seq)
    )""",
    "CREATE INDEX features_by_time ON features (device, t1)",
)


@dataclass(frozen=True)
class StoredFeatures:
    """A features record as the endpoint holds it."""

    device: str
    first_seq: int
    last_seq: int
    sensor: str
    t0: float
    t1: float
    count: int
    received: float
    body: bytes

    def decoded(self) -> FeaturesBody:
        return FeaturesBody.from_cbor(self.body)


@dataclass
class Outcome:
    """What the features rules did to one batch (added to the backend's result)."""

    acked: list[int] = field(default_factory=list)
    conflicts: list[int] = field(default_factory=list)
    new: int = 0
    duplicate: int = 0


def _held_features(
    db: Sql, device: str, lo: int, hi: int, only: set[int] | None = None
) -> dict[int, tuple[str, int, bytes]]:
    """seq -> (sensor, first seq, body) of the stored features records holding seqs in lo..hi
    (``only``: just those of these seqs)."""
    rows = db.execute(
        "SELECT sensor, first_seq, last_seq, body FROM features WHERE device = ?"
        " AND first_seq >= ? AND first_seq <= ? AND last_seq >= ?",
        (device, max(0, lo - MAX_SPAN), hi, lo),
    ).fetchall()
    out: dict[int, tuple[str, int, bytes]] = {}
    for sensor, first, last, body in rows:
        body = bytes(body)
        seqs = _stored_seqs(device, int(first), int(last), body)
        if isinstance(seqs, range) and only is not None:  # a whole span: the few wanted in it
            seqs = [s for s in only if s in seqs]
        for seq in seqs:
            if lo <= seq <= hi and (only is None or seq in only):
                out[seq] = (sensor, first, body)
    return out


def _stored_seqs(device: str, first: int, last: int, body: bytes) -> Sequence[int]:
    """The seqs a stored features record holds. A body today's decoder refuses (stored by a
    release that checked less, or damaged at rest) is read for its seqs alone, or, when not even
    those decode, stands for every seq of its row's first..last: it never fails the ingest (of
    its device, and of the other batches of the transaction)."""
    try:
        return FeaturesBody.from_cbor(body).seqs
    except CodecError as err:  # debug: every ingest of the device near it reads it again
        log.debug("event=features_undecodable device=%s first=%d error=%r", device, first, str(err))
    try:
        return claimed_seqs(body)
    except CodecError:
        return range(first, min(last, first + MAX_SPAN) + 1)


def _held_records(db: Sql, device: str, lo: int, hi: int) -> dict[int, str | None]:
    """seq -> the sensor of the reading stored under it (None: not a reading, "": a record
    whose body has expired) for the records of the device in lo..hi."""
    if db.dialect == "postgresql":  # keys outlive the bodies of dropped partitions
        sql = (
            "SELECT k.seq, r.kind, r.body FROM record_keys k LEFT JOIN records r"
            " ON r.device = k.device AND r.seq = k.seq AND r.received = k.received"
            " WHERE k.device = ? AND k.seq >= ? AND k.seq <= ?"
        )
    else:
        sql = "SELECT seq, kind, body FROM records WHERE device = ? AND seq >= ? AND seq <= ?"
    out: dict[int, str | None] = {}
    for seq, kind, body in db.execute(sql, (device, lo, hi)).fetchall():
        out[int(seq)] = "" if kind is None else _sensor(kind, bytes(body))
    return out


def _sensor(kind: str, body: bytes) -> str | None:
    if kind != Kind.TELEMETRY.value:
        return None
    try:
        return TelemetryBody.from_cbor(body).sensor
    except RecordError:
        return None


def prepass(
    db: Sql, device: str, records: Sequence[WireRecord], check: bool = True
) -> tuple[list[WireRecord], list[WireRecord], Outcome]:
    """(the records the backend stores, the features records, the outcome so far): a record
    whose seq a stored features record holds is answered here and not stored. ``check``
    False: the device has no features records (skip the look-up)."""
    outcome = Outcome()
    feats = [r for r in records if r.kind == FEATURES]
    plain = [r for r in records if r.kind != FEATURES]
    if not check or not plain:
        return plain, feats, outcome
    seqs = {r.seq for r in plain}
    held = _held_features(db, device, min(seqs), max(seqs), seqs)
    if not held:
        return plain, feats, outcome
    kept = []
    for rec in plain:
        holder = held.get(rec.seq)
        if holder is None:
            kept.append(rec)
        elif _sensor(rec.kind, bytes(rec.body)) == holder[0]:
            outcome.acked.append(rec.seq)
            outcome.duplicate += 1
        else:
            _conflict(outcome, device, rec.seq)
    return kept, feats, outcome


def store(db: Sql, device: str, feats: Sequence[WireRecord], now: float, outcome: Outcome) -> None:
    """Apply the features rules to ``feats`` (bodies already checked by the codec). A seq at or
    below the device's pruned floor (cloud/retention.py) that nothing holds counts as held by
    another record: a conflict, as for a record under it."""
    floor = _pruned(db, device) if feats else -1
    for rec in feats:
        body = FeaturesBody.from_cbor(bytes(rec.body))
        raw = bytes(rec.body)
        wanted = set(body.seqs)
        by_features = _held_features(db, device, body.first, body.last, wanted)
        same = any(f == body.first and b == raw for _, f, b in by_features.values())
        if same:
            outcome.acked.extend(body.seqs)
            outcome.duplicate += body.count
            continue
        by_records = _held_records(db, device, body.first, body.last)
        held: dict[int, str | None] = {}
        if by_features or by_records or body.first <= floor:
            held = {s: h[0] for s, h in by_features.items() if s in wanted}
            held.update({s: h for s, h in by_records.items() if s in wanted})
            held.update({s: None for s in body.seqs if s <= floor and s not in held})
        if not held:
            db.execute(
                f"INSERT INTO features ({', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    device,
                    body.first,
                    body.last,
                    body.sensor,
                    body.t0,
                    body.t1,
                    body.count,
                    now,
                    raw,
                ),
            )
            outcome.acked.extend(body.seqs)
            outcome.new += body.count
            continue
        for seq in body.seqs:
            if seq not in held:
                continue  # not acknowledged: the device sends it again
            if held[seq] in (body.sensor, ""):
                outcome.acked.append(seq)
                outcome.duplicate += 1
            else:
                _conflict(outcome, device, seq)
        log.info(
            "event=features_overlap device=%s first=%d last=%d held=%d action=not_stored",
            device,
            body.first,
            body.last,
            len(held),
        )


def _pruned(db: Sql, device: str) -> int:
    """The device's pruned floor (-1: none)."""
    row = db.execute("SELECT pruned FROM devices WHERE id = ?", (device,)).fetchone()
    return -1 if row is None or row[0] is None else int(row[0])


def _conflict(outcome: Outcome, device: str, seq: int) -> None:
    outcome.conflicts.append(seq)
    log.warning("event=seq_conflict device=%s seq=%d detail=held_by_other_record", device, seq)


def devices_with_features(db: Sql, devices: Sequence[str]) -> set[str]:
    """Which of ``devices`` have features records stored (the others skip the prepass)."""
    names = sorted(set(devices))
    if not names:
        return set()
    marks = ", ".join("?" * len(names))
    rows = db.execute(f"SELECT DISTINCT device FROM features WHERE device IN ({marks})", names)
    return {r[0] for r in rows.fetchall()}


def merge(db: Sql, device: str, result: IngestResult, outcome: Outcome) -> IngestResult:
    """``result`` (the backend's, for the batch's other records) with ``outcome`` added; its
    ``last`` counts the features records' seqs too."""
    if not (outcome.acked or outcome.conflicts):
        return result
    (top,) = db.execute("SELECT max(last_seq) FROM features WHERE device = ?", (device,)).fetchone()
    last = max((x for x in (result.last, top) if x is not None), default=None)
    return IngestResult(
        (*result.seqs, *outcome.acked, *outcome.conflicts),
        result.new + outcome.new,
        result.duplicate + outcome.duplicate,
        result.conflict + len(outcome.conflicts),
        (*result.conflicts, *outcome.conflicts),
        last,
    )


def read(
    db: Sql, device: str, since: float | None = None, limit: int | None = None
) -> list[StoredFeatures]:
    """The device's features records in seq order; ``since``: those whose last reading is at or
    after it."""
    sql = f"SELECT {', '.join(COLUMNS)} FROM features WHERE device = ?"
    args: list[Any] = [device]
    if since is not None:
        sql += " AND t1 >= ?"
        args.append(since)
    sql += " ORDER BY first_seq"
    if limit is not None:
        sql += " LIMIT ?"
        args.append(limit)
    return [StoredFeatures(*row[:-1], bytes(row[-1])) for row in db.execute(sql, args).fetchall()]
