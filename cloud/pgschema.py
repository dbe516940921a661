"""The PostgreSQL schema of the cloud endpoint: versioned migrations and the daily partitions of
the records table (:class:`cloud.pgstorage.PostgresStorage` uses both).

Migrations
    :data:`MIGRATIONS` is the list of every schema change ever made, in order; the schema's
    version is how many of them were applied (``schema_version`` has one row per migration).
    :func:`migrate` applies the missing ones at start in ONE transaction under an advisory lock,
    so that many endpoint processes starting at once apply each exactly once and none sees half a
    schema. A database whose version is above :data:`SCHEMA_VERSION` was made by a newer
    edge-agent: it is refused (:class:`SchemaTooNew`), never written to. A migration is never
    edited once released: a change is a new entry.

Records and uniqueness
    ``records`` (the bodies) is partitioned by day of ``received``, the endpoint's clock when it
    stored the record, in UTC: partitions follow the endpoint's clock, not a device's (a device
    with a wrong clock, or a hostile one, cannot make the endpoint create partitions for 1970 or
    2100), inserts of a day go to one partition (its indexes stay hot), and retention drops the
    partitions of old days (cloud/pgretention.py). PostgreSQL enforces a unique constraint on a
    partitioned table only if it contains the partition key, and ``(device, seq, received)``
    would let the same record be stored again on another day. So exactly-once is kept by
    ``record_keys``, a plain table with PRIMARY KEY ``(device, seq)`` written in the same
    transaction as the body: the insert of a key that exists does nothing, and its body is not
    written. Two transactions inserting the same key serialize on that index entry (the second
    waits for the first to commit or roll back), which is the guarantee; ``record_keys`` also
    carries ``received``, so the stored copy of a duplicate is found in its own partition. A
    prune deletes the keys of a partition before it drops it, once each device's pruned floor
    covers them: ingest stores no record at or below the floor, so a record resent after it was
    pruned is a conflict, never stored twice (cloud/retention.py).

    There is no DEFAULT partition (attaching a new day would have to scan it): partitions are
    made ahead of time for today and tomorrow at start, and on demand before an insert for a day
    that has none (:func:`ensure_partition`, under an advisory lock and idempotent).

Arrival
    ``record_arrival`` is a SEQUENCE: numbers are unique and taken in the order records are
    stored; a rolled-back transaction leaves a gap. See :mod:`cloud.storebase` for the contract.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import Connection, sql

from cloud import (
    commandstore,
    devicecount,
    featurestore,
    learnstore,
    relaystore,
    releasestore,
    retention,
)

#: Advisory lock keys (pg_advisory_xact_lock): "edgeschm" and "edgepart" as 64-bit numbers.
MIGRATION_LOCK = int.from_bytes(b"edgeschm", "big") - 2**63
PARTITION_LOCK = int.from_bytes(b"edgepart", "big") - 2**63
RECORDS = "records"

_V1 = (
    """CREATE TABLE meta (
        name TEXT COLLATE "C" PRIMARY KEY,
        value BIGINT NOT NULL
    )""",
    """CREATE TABLE devices (
        id TEXT COLLATE "C" PRIMARY KEY,
        registered DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION,
        desired_rev BIGINT NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE record_keys (
        device TEXT COLLATE "C" NOT NULL,
        seq BIGINT NOT NULL,
        received DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device, seq)
    )""",
    "CREATE SEQUENCE record_arrival AS BIGINT",
    """CREATE TABLE records (
        device TEXT COLLATE "C" NOT NULL,
        seq BIGINT NOT NULL,
        kind TEXT COLLATE "C" NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        time DOUBLE PRECISION NOT NULL,
        received DOUBLE PRECISION NOT NULL,
        arrival BIGINT NOT NULL,
        body BYTEA NOT NULL
    ) PARTITION BY RANGE (received)""",
    "CREATE INDEX records_by_seq ON records (device, seq)",
    "CREATE INDEX records_by_time ON records (device, time)",
    "CREATE INDEX records_alerts ON records (device, time) WHERE kind = 'alert'",
    """CREATE TABLE reported (
        device TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        version BIGINT NOT NULL,
        value BYTEA NOT NULL,
        updated DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device, key)
    )""",
    """CREATE TABLE desired (
        device TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        version BIGINT NOT NULL,
        value BYTEA NOT NULL,
        updated DOUBLE PRECISION NOT NULL,
        blocked BIGINT,
        PRIMARY KEY (device, key)
    )""",
    """CREATE TABLE credentials (
        principal TEXT COLLATE "C" PRIMARY KEY,
        role TEXT NOT NULL,
        kid BYTEA NOT NULL UNIQUE,
        doc TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        revoked DOUBLE PRECISION
    )""",
    """CREATE TABLE oscore_sequence (
        principal TEXT COLLATE "C" PRIMARY KEY,
        reserved BIGINT NOT NULL
    )""",
    # cloud/linkhistory.py's table; a value is a text (link/state) or a number (RTT, loss)
    """CREATE TABLE link_history (
        device TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        time DOUBLE PRECISION NOT NULL,
        version BIGINT NOT NULL,
        value_text TEXT,
        value_num DOUBLE PRECISION
    )""",
    "CREATE INDEX link_history_by_key ON link_history (device, key, time)",
)

#: Version 2: validation verdicts (cloud/inference.py; ``n`` is the order they were stored in,
#: the first verdict of a seq is its lowest) and published models, file bytes and all
#: (cloud/models.py: every endpoint caches the versions it serves in its own --data).
_V2 = (
    "CREATE SEQUENCE verdict_order AS BIGINT",
    """CREATE TABLE window_verdicts (
        n BIGINT PRIMARY KEY DEFAULT nextval('verdict_order'),
        device TEXT COLLATE "C" NOT NULL,
        seq BIGINT NOT NULL,
        digest TEXT COLLATE "C" NOT NULL,
        body BYTEA NOT NULL,
        UNIQUE (device, seq, digest)
    )""",
    "ALTER SEQUENCE verdict_order OWNED BY window_verdicts.n",
    """CREATE TABLE models (
        name TEXT COLLATE "C" NOT NULL,
        version TEXT COLLATE "C" NOT NULL,
        manifest BYTEA NOT NULL,
        data BYTEA NOT NULL,
        published DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (name, version)
    )""",
)

#: Every migration, in order: migration ``i`` (from 1) takes the schema from version i-1 to i.
#: Version 3: federated learning's jobs, masters and uploads (cloud/learnstore.py).
_V3 = learnstore.PG_MIGRATION

#: Version 4: features records (cloud/featurestore.py, docs/protocol.md "Features records").
_V4 = featurestore.PG_MIGRATION

#: Version 5: which gateway each device is behind (cloud/relaystore.py, docs/security.md).
_V5 = relaystore.PG_MIGRATION

#: Version 6: remote commands and log uploads (cloud/commandstore.py).
_V6 = commandstore.PG_MIGRATION

#: Version 7: agent releases in blocks, groups of devices, release history (cloud/releasestore.py).
_V7 = releasestore.PG_MIGRATION

#: Version 8: retention: each device's pruned floor, verdicts' receiving time (cloud/retention.py).
_V8 = retention.PG_MIGRATION

#: Version 9: each device's count of records, kept by triggers (cloud/devicecount.py).
_V9 = devicecount.PG_MIGRATION

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2, _V3, _V4, _V5, _V6, _V7, _V8, _V9)
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(Exception):
    """The database's schema is newer than this code's."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(
            f"schema version {found} is newer than this endpoint's ({known}); upgrade edge-agent"
        )
        self.found = found
        self.known = known


def migrate(
    conn: Connection[Any],
    storage_id: int,
    migrations: tuple[tuple[str, ...], ...] = MIGRATIONS,
) -> tuple[int, int]:
    """Bring the schema up to ``len(migrations)`` in one transaction (module docstring) and
    store ``storage_id`` if the database has none yet. Returns (version before, version now);
    :class:`SchemaTooNew` if the database is ahead. ``conn`` must not be in autocommit mode."""
    known = len(migrations)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        found = int(row[0]) if row else 0
        if found > known:
            raise SchemaTooNew(found, known)
        for version in range(found + 1, known + 1):
            for statement in migrations[version - 1]:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, applied) VALUES (%s, %s)",
                (version, time.time()),
            )
        conn.execute(
            "INSERT INTO meta (name, value) VALUES ('storage_id', %s) ON CONFLICT DO NOTHING",
            (storage_id,),
        )
    return found, known


def day_of(when: float) -> datetime:
    """Midnight UTC of the day ``when`` (seconds since the epoch) falls in."""
    moment = datetime.fromtimestamp(when, UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def partition_name(day: datetime) -> str:
    return f"{RECORDS}_{day:%Y%m%d}"


def ensure_partition(conn: Connection[Any], when: float) -> str:
    """Make the partition of ``records`` for the day ``when`` falls in, unless it exists; in its
    own transaction (``conn`` must be idle). Returns its name."""
    day = day_of(when)
    name = partition_name(day)
    low = day.timestamp()
    high = (day + timedelta(days=1)).timestamp()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
        row = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
        if row is None or row[0] is None:
            conn.execute(
                sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                    sql.Identifier(name),
                    sql.Identifier(RECORDS),
                    sql.Literal(low),
                    sql.Literal(high),
                )
            )
    return name


def partitions(conn: Connection[Any]) -> list[str]:
    """The partitions of ``records``, by name (day) ascending."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = to_regclass(%s) ORDER BY c.relname",
        (RECORDS,),
    ).fetchall()
    return [str(r[0]) for r in rows]
