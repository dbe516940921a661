"""How many records the endpoint holds of each device, kept in the device's row
(``devices.records``), so that reading it costs one row and not a scan of the device's records.

``GET /devices/{id}`` answers it (docs/protocol.md), and a device asks that resource as its link
probe every 30 s when idle (agent/sync/link.py); ``edge-agent-cloud devices`` and the federated
coordinator list every device with it. Counted with ``count(*)``, each read scanned
the device's index entries: 31 ms per million records on SQLite, per probe.

- SQLite (cloud/storage.py): ingest adds the records it stored to the row it already updates
  (``last_seen``), a load (``edge-agent-cloud migrate``) the rows it copied, a prune
  (cloud/retention.py) subtracts what each of its deletes removed, each in the transaction that
  changes the records. The column is added to a file made before it and counted once then
  (:func:`upgrade_sqlite`); the file's schema version is 2 from then on, which an endpoint
  release from before it refuses to open (it would store records without counting them). A
  gateway's store stays at version 1 and is counted again at each gateway start
  (:func:`stamp`).
- PostgreSQL (schema version 9, :data:`PG_MIGRATION`): statement-level triggers on
  ``record_keys`` (one key per stored record; ingest, load and prune insert and delete keys
  only) add and subtract the rows each statement inserted or deleted, grouped by device: every
  process of a fleet counts, of whatever release, from the migration on. Each trigger locks the
  device rows in id order before it updates them, as ingest does (cloud/pgstorage.py: ingest
  holds them already when it inserts keys), so a prune's delete waits for a row an ingest holds
  without holding one that the ingest waits for.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping

COLUMN = ("devices", "records", "INTEGER NOT NULL DEFAULT 0")
GATEWAY_VERSION = 1  # a gateway's store: the version the gateway release before the count opens

_RECOUNT = (
    "UPDATE devices SET records = (SELECT count(*) FROM records r WHERE r.device = devices.id)"
)


def upgrade_sqlite(db: sqlite3.Connection) -> None:
    """In the transaction that opens a SQLite file: the column where it is missing, counted."""
    table, column, kind = COLUMN
    if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        db.execute(_RECOUNT)


def stamp(db: sqlite3.Connection, version: int, gateway_table: str) -> None:
    """The schema version a SQLite file is given at open: ``version``, but
    :data:`GATEWAY_VERSION` in a gateway's store (it has ``gateway_table``): on a machine of
    both roles the gateway runs the release the agent's update installs and rolls back (one
    venv, docs/ota.md), and the release before the count refuses a version above it. Such a
    store is counted again at each gateway start (:func:`recount`, agent/gateway/storeparts.py),
    so what that release stored without counting is counted then."""
    found = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (gateway_table,)
    ).fetchone()
    db.execute(f"PRAGMA user_version={version if found is None else GATEWAY_VERSION}")


def recount(db: sqlite3.Connection) -> None:
    """Each device's count taken again from its records (a gateway's store, at start), and the
    file at :data:`GATEWAY_VERSION` (its first open had it at the endpoint's version)."""
    db.execute(_RECOUNT)
    db.execute(f"PRAGMA user_version={GATEWAY_VERSION}")


def add(db: sqlite3.Connection, devices: Iterable[str], sign: int = 1) -> None:
    """Add (``sign`` -1: subtract) one record to each device for each time it is in ``devices``."""
    change(db, {device: sign * n for device, n in Counter(devices).items()})


def change(db: sqlite3.Connection, counts: Mapping[str, int]) -> None:
    """Add ``counts[device]`` (negative: subtract) to each device's count."""
    db.executemany(
        "UPDATE devices SET records = records + ? WHERE id = ?",
        [(n, device) for device, n in counts.items()],
    )


#: PostgreSQL schema version 9 (cloud/pgschema.py): the column, the triggers, then the count.
PG_MIGRATION = (
    "ALTER TABLE devices ADD COLUMN records BIGINT NOT NULL DEFAULT 0",
    """CREATE FUNCTION count_keys_added() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM 1 FROM devices WHERE id IN (SELECT device FROM added) ORDER BY id FOR UPDATE;
        UPDATE devices d SET records = d.records + n.c
        FROM (SELECT device, count(*) AS c FROM added GROUP BY device) n WHERE d.id = n.device;
        RETURN NULL;
    END $$""",
    """CREATE FUNCTION count_keys_removed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM 1 FROM devices WHERE id IN (SELECT device FROM removed) ORDER BY id FOR UPDATE;
        UPDATE devices d SET records = d.records - n.c
        FROM (SELECT device, count(*) AS c FROM removed GROUP BY device) n WHERE d.id = n.device;
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER record_keys_added AFTER INSERT ON record_keys REFERENCING NEW TABLE AS added"
    " FOR EACH STATEMENT EXECUTE FUNCTION count_keys_added()",
    "CREATE TRIGGER record_keys_removed AFTER DELETE ON record_keys"
    " REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION count_keys_removed()",
    # counted once the triggers are there: making them waits for the statements that change
    # the keys (an older endpoint's prune does not lock the device rows), so none is missed
    "UPDATE devices d SET records = (SELECT count(*) FROM record_keys k WHERE k.device = d.id)",
)
