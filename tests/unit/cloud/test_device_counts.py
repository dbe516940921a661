"""Each device's count of records is kept in its row (cloud/devicecount.py): it is what the
records are after ingest (new, duplicates, conflicts, a batch that fails in the database), a
prune (stopped, or beside an endpoint that ingests), a load, and an upgrade of a database made
before it. Both storages (the fixtures of tests/unit/cloud/test_storage_contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.storage import SQLiteStorage, Storage, StorageUnavailable
from tests.unit.cloud.test_retention import BEFORE, OLD, as_older, fill
from tests.unit.cloud.test_storage_contract import (
    DEV,
    T0,
    Backend,
    backend,
    copy_all,
    empty,
    pg,
    storage,
    telemetry,
)
from tests.unit.cloud.test_storage_races import Meanwhile, wait_for_lock

__all__ = ["backend", "empty", "pg", "storage"]  # the fixtures, used by name


def counted(s: Storage) -> dict[str, int]:
    """Each device's count as the storage answers it; checked against its records."""
    infos = {info.id: info.records for info in s.devices()}
    assert infos == {d: len(s.seqs(d)) for d in infos}
    assert all(s.device(d).records == n for d, n in infos.items())  # type: ignore[union-attr]
    return infos


def test_the_count_follows_ingest_prune_and_load(backend: Backend, empty: Storage) -> None:
    s = backend.open()
    fill(s)
    assert counted(s) == {DEV: 9, "b-2": 2}
    again = s.ingest(DEV, [telemetry(20), telemetry(20, 9.0), telemetry(23), telemetry(23)], T0)
    assert (again.new, again.duplicate, again.conflicts) == (1, 3, (20,))
    assert counted(s)[DEV] == 10
    backend.fail_inserts_of("b-2")
    with pytest.raises(StorageUnavailable):  # the group fails whole: nothing counted
        s.ingest_many([(DEV, [telemetry(24)], False), ("b-2", [telemetry(9)], False)], T0)
    assert counted(s) == {DEV: 10, "b-2": 2}
    backend.sql("DROP TRIGGER boom" + ("" if backend.name == "sqlite" else " ON records"))
    assert s.ingest(DEV, [telemetry(24)], T0).new == 1
    assert counted(s) == {DEV: 11, "b-2": 2}
    copy_all(s, empty)
    assert counted(empty) == {DEV: 11, "b-2": 2}
    copy_all(s, empty)  # twice copies nothing
    assert counted(empty) == {DEV: 11, "b-2": 2}
    assert s.prune(BEFORE).records == 8
    assert counted(s) == {DEV: 5, "b-2": 0}
    assert s.prune(BEFORE).records == 0
    assert counted(s) == {DEV: 5, "b-2": 0}
    s.add_device("c-3", T0)
    assert counted(s)["c-3"] == 0


def test_a_prune_beside_an_ingesting_endpoint_counts_what_it_removed(backend: Backend) -> None:
    """Another storage object prunes in small batches, stopped after some, while this one
    ingests into the same devices between the batches."""
    s = backend.open()
    pruner = backend.open()
    for device in (DEV, "b-2"):
        s.add_device(device, OLD)
        s.ingest(device, [telemetry(n) for n in range(1, 41)], OLD)
    stop = _Stop(s)
    first = pruner.prune(BEFORE, stop=stop, batch=7)  # type: ignore[arg-type]
    counted(s)
    rest = pruner.prune(BEFORE, batch=7)
    assert first.records + rest.records == 80
    assert counted(s) == {DEV: stop.sent, "b-2": stop.sent}


class _Stop:
    """A stop event for a prune that is set after its third check; each check first ingests one
    record of each device through ``s`` (a serving endpoint between the prune's batches)."""

    def __init__(self, s: Storage) -> None:
        self.s = s
        self.sent = 0
        self.checks = 0

    def is_set(self) -> bool:
        self.checks += 1
        self.sent += 1
        for device in (DEV, "b-2"):
            assert self.s.ingest(device, [telemetry(1000 + self.sent)], T0).new == 1
        return self.checks > 3


def test_a_sqlite_file_made_before_the_count_is_counted_once_at_open(tmp_path: Path) -> None:
    path = tmp_path / "cloud.sqlite3"
    s = SQLiteStorage(path)
    fill(s)
    s.close()
    as_older(path, "ALTER TABLE devices DROP COLUMN records", "PRAGMA user_version = 1")
    s = SQLiteStorage(path)
    try:
        assert counted(s) == {DEV: 9, "b-2": 2}
        assert s.db.execute("PRAGMA user_version").fetchone()[0] == 2  # older endpoints refuse
    finally:
        s.close()


def _schema_8(pg_dsn: str) -> Backend:
    """A database of two devices' records, back at schema version 8 (an older endpoint's)."""
    from cloud.pgstorage import PostgresStorage

    s = PostgresStorage(pg_dsn)
    fill(s)
    s.close()
    b = Backend("postgresql", pg_dsn)
    for statement in (
        "DROP TRIGGER record_keys_added ON record_keys",
        "DROP TRIGGER record_keys_removed ON record_keys",
        "DROP FUNCTION count_keys_added",
        "DROP FUNCTION count_keys_removed",
        "ALTER TABLE devices DROP COLUMN records",
        "DELETE FROM schema_version WHERE version = 9",
    ):
        b.sql(statement)
    return b


def test_a_postgresql_database_of_schema_8_is_counted_by_the_migration(pg_dsn: str) -> None:
    from cloud.pgstorage import PostgresStorage

    _schema_8(pg_dsn)
    s = PostgresStorage(pg_dsn)
    try:
        assert counted(s) == {DEV: 9, "b-2": 2}
        s.ingest("b-2", [telemetry(50)], T0)
        assert counted(s) == {DEV: 9, "b-2": 3}
    finally:
        s.close()


def test_keys_an_older_endpoint_removes_while_the_migration_counts_are_not_counted(
    pg_dsn: str,
) -> None:
    """Defect: migration 9 counted the keys before it made the triggers. An endpoint of an
    earlier release still running (an upgrade one process at a time) prunes without locking
    the device rows: keys its statement removed and committed after the count's snapshot, and
    before the trigger was there, stayed counted for good (b-2 counted 2 with no record). Now
    the triggers are made first: making them waits for the statement, the count after sees it."""
    import psycopg

    from cloud.pgstorage import PostgresStorage

    b = _schema_8(pg_dsn)
    old = psycopg.connect(pg_dsn)  # the older endpoint's prune, its delete not committed yet
    try:
        old.execute("DELETE FROM record_keys WHERE device = 'b-2'")
        opened = Meanwhile(lambda: PostgresStorage(pg_dsn))  # this release's first start
        try:
            wait_for_lock(b)
        finally:
            old.commit()
        s = opened.join()
    finally:
        old.close()
    try:
        assert counted(s) == {DEV: 9, "b-2": 0}
    finally:
        s.close()


def test_a_prunes_count_locks_the_device_rows_in_id_order_as_ingest_does(pg: Backend) -> None:
    """Defect: the trigger of a prune's key delete updated the devices' rows in the order its
    plan met them (here c-3 before b-2), while ingest locks them in id order: with b-2 locked by
    an ingest of both devices (its first lock), the prune took c-3 and waited for b-2; the
    ingest, locking c-3 next, waited for the prune: a deadlock, and PostgreSQL aborted one of
    them. Now the trigger locks the rows in id order first: it waits for b-2 holding nothing,
    and the ingest goes on."""
    import psycopg

    s = pg.open()
    for device in ("c-3", "b-2"):
        s.add_device(device, OLD)
        s.ingest(device, [telemetry(1), telemetry(2)], OLD)
    ingest = psycopg.connect(pg.target)  # an ingest of both devices, between its two locks
    try:
        ingest.execute("SELECT 1 FROM devices WHERE id = 'b-2' FOR UPDATE")
        prune = Meanwhile(lambda: pg.sql("DELETE FROM record_keys WHERE seq = 1"))
        try:
            wait_for_lock(pg)
            ingest.execute("SELECT 1 FROM devices WHERE id = 'c-3' FOR UPDATE")
        finally:
            ingest.commit()
        prune.join()
    finally:
        ingest.close()
    assert counted(s) == {"b-2": 1, "c-3": 1}


def test_reading_a_devices_count_does_not_scan_its_records(tmp_path: Path) -> None:
    """Defect: GET /devices/{id} (a device's link probe, every 30 s when idle) counted the
    device's records with count(*): SQLite stepped through every index entry of the device, 31
    ms per million records per probe. Now the count is read from the device's row: SQLite's
    virtual machine steps no more for 20,000 records than for 20 (it stepped some 60,000
    instructions more)."""
    s = SQLiteStorage(tmp_path / "cloud.sqlite3")
    try:
        steps = []
        for n in (20, 20_000):
            s.add_device(f"d-{n}", T0)
            for first in range(0, n, 4096):
                seqs = range(first + 1, min(n, first + 4096) + 1)
                s.ingest(f"d-{n}", [telemetry(q) for q in seqs], T0)
            ticks = [0]

            def tick(ticks: list[int] = ticks) -> int:
                ticks[0] += 1
                return 0

            s.db.set_progress_handler(tick, 100)  # every 100 instructions
            info = s.device(f"d-{n}")
            s.db.set_progress_handler(None, 0)
            assert info is not None and info.records == n and info.last_seq == n
            steps.append(ticks[0])
        assert steps[1] <= steps[0] + 2, steps
    finally:
        s.close()
