"""Writers that meet (cloud/storebase.py's contract under concurrency), and values a database
refuses. Two storage objects on one database stand for two endpoint processes (the fixtures of
tests/unit/cloud/test_storage_contract.py).

A race is made deterministic, never timed: process A's call runs in a transaction the test holds
open (:func:`hold`: its own code, on a connection of the test's), process B's call runs in a
thread until PostgreSQL reports it waiting for a lock (a bounded poll of ``pg_stat_activity``),
then the test commits A and B finishes. Where SQLite has no such interleaving (one writer at a
time), the test runs on PostgreSQL alone; what both must do alike runs on both.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from agent.wire.batch import WireRecord
from agent.wire.statedoc import Entry
from cloud.storage import Storage, StorageUnavailable
from cloud.storebase import DataRefused, MigrationRefused
from tests.unit.cloud.test_storage_contract import (
    DEV,
    T0,
    Backend,
    backend,
    empty,
    pg,
    storage,
    telemetry,
)
from tests.unit.cloud.test_storage_features import acked, features, reading

__all__ = ["backend", "empty", "pg", "storage"]  # the fixtures, used by name

LOCK_POLLS = 1000  # rounds of 10 ms a test waits at most for B to wait on A's lock
JOIN_TIMEOUT = 30.0  # seconds: B ends once A committed


@contextmanager
def hold(storage: Any, dsn: str) -> Iterator[Any]:
    """Every call of ``storage`` (a PostgresStorage) runs in ONE transaction on a connection of
    the test's, left open until the test commits it (the connection yielded): another process's
    transaction caught before its commit. Partitions are still made as the storage makes them."""
    import psycopg

    conn = psycopg.connect(dsn)
    run = storage._run

    def held(fn: Callable[[Any], Any], before: Callable[[Any], None] | None = None) -> Any:
        if before is not None:
            run(lambda _conn: None, before)
        return fn(conn)

    storage._run = held
    try:
        yield conn
    finally:
        conn.rollback()  # what the test did not commit (a failing assertion) goes
        conn.close()
        storage._run = run


class Meanwhile:
    """``fn()`` in a thread (process B): its result or its exception, after :meth:`join`."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as err:  # handed to the test by join()
            self.error = err

    def join(self) -> Any:
        self._thread.join(JOIN_TIMEOUT)
        assert not self._thread.is_alive(), "process B never finished"
        if self.error is not None:
            raise self.error
        return self.result


def wait_for_lock(pg: Backend) -> None:
    """Until a session of the test's database waits for a lock (B, behind A's transaction)."""
    for _ in range(LOCK_POLLS):
        (waiting,) = pg.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        )[0]
        if waiting:
            return
        time.sleep(0.01)
    raise AssertionError("process B never waited for process A's transaction")


def behind(pg: Backend, a_conn: Any, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` (process B) until it waits on A's transaction, commit A, B's answer."""
    b = Meanwhile(fn)
    try:
        wait_for_lock(pg)
    finally:
        a_conn.commit()
    return b.join()


# -- features records against readings (audit r1_pg_features_race.py) ---------------------------


def test_a_reading_ingested_while_a_features_record_holding_it_commits_is_stored_once(
    pg: Backend,
) -> None:
    """Process A stores a features record of seqs 10, 12, 14; before it commits, process B
    ingests the reading of seq 12. B looked for features records before it locked the device,
    missed A's (not committed yet) and stored the reading too: seq 12 held twice. B now locks
    the device first and sees A's record once A committed."""
    a, b = pg.open(), pg.open()
    a.add_device(DEV, T0)
    with hold(a, pg.target) as a_conn:
        first = a.ingest(DEV, [features(10, 12, 14)], T0)
        assert acked(first) == [10, 12, 14]
        result = behind(pg, a_conn, lambda: b.ingest(DEV, [reading(12)], T0 + 1))
    assert acked(result) == [12]
    assert (result.new, result.duplicate, result.conflicts) == (0, 1, ())
    assert b.seqs(DEV) == []  # not a record: the features record holds it
    (stored,) = b.features(DEV)
    assert stored.decoded().seqs == (10, 12, 14)


def test_a_features_record_ingested_while_a_reading_it_holds_commits_is_not_stored(
    pg: Backend,
) -> None:
    """The other order: the reading first (A, held open), then the features record (B)."""
    a, b = pg.open(), pg.open()
    a.add_device(DEV, T0)
    with hold(a, pg.target) as a_conn:
        a.ingest(DEV, [reading(12)], T0)
        result = behind(pg, a_conn, lambda: b.ingest(DEV, [features(10, 12, 14)], T0 + 1))
    assert acked(result) == [12]  # 10 and 14 are sent again, in a features record of their own
    assert b.features(DEV) == [] and b.seqs(DEV) == [12]


# -- numbered rows of one device (audit r8_pg_rmw.py) ----------------------------------------------


def test_commands_sent_by_two_processes_at_once_both_get_an_id(pg: Backend) -> None:
    """Both read the newest id, then insert the next: B collided with A's id on the primary
    key and failed (5.03; exit 74 at the command line). B now waits for A's lock on the device
    and takes the next id."""
    a, b = pg.open(), pg.open()
    a.add_device(DEV, T0)
    with hold(a, pg.target) as a_conn:
        first = a.add_command(DEV, "restart", {}, T0)  # the same millisecond for both
        second = behind(pg, a_conn, lambda: b.add_command(DEV, "selftest", {}, T0))
    assert second == first + 1
    assert [(c.id, c.name) for c in b.commands(DEV)] == [(second, "selftest"), (first, "restart")]


def test_log_uploads_of_two_processes_at_once_are_both_kept(pg: Backend) -> None:
    a, b = pg.open(), pg.open()
    a.add_device(DEV, T0)
    with hold(a, pg.target) as a_conn:
        assert a.put_log_upload(DEV, None, 1, 0, b"first", T0) == 1
        second = behind(pg, a_conn, lambda: b.put_log_upload(DEV, None, 1, 0, b"second", T0))
    assert second == 2
    assert [u["body"] for u in b.log_uploads(DEV, 10)] == [b"second", b"first"]


def test_a_log_upload_sent_again_is_kept_once(storage: Storage) -> None:
    """A resend after a lost answer (a new message id: not a CoAP duplicate) carries the same
    body; it was stored twice. The protocol gives an upload no id: the body is its identity."""
    first = storage.put_log_upload(DEV, T0, 2, 0, b"upload-1", T0 + 1)
    assert storage.put_log_upload(DEV, T0, 2, 0, b"upload-1", T0 + 2) == first
    assert [u["body"] for u in storage.log_uploads(DEV, 10)] == [b"upload-1"]
    assert storage.log_uploads(DEV)[0]["received"] == T0 + 1  # the first copy stays
    assert storage.put_log_upload(DEV, T0, 3, 0, b"upload-2", T0 + 3) == first + 1


# -- the migration mark (audit: two migrates into one target) -------------------------------------


def test_the_migration_mark_is_set_only_on_an_empty_unmarked_target(
    storage: Storage, empty: Storage
) -> None:
    """The check and the mark are one transaction: a target marked meanwhile by another migrate,
    or holding data, is refused and keeps its mark; the mark used to be overwritten."""
    empty.set_migration("00000000000000aa")
    with pytest.raises(MigrationRefused, match="00000000000000aa"):
        empty.set_migration("00000000000000bb")
    with pytest.raises(MigrationRefused):
        empty.set_migration("00000000000000aa")  # a second migrate from the same source, too
    assert empty.migration() == "00000000000000aa"
    with pytest.raises(MigrationRefused, match="devices"):
        storage.set_migration("00000000000000aa")  # holds a device
    assert storage.migration() is None


def test_two_migrates_marking_one_target_at_once_mark_it_once(pg: Backend) -> None:
    """Both found the target empty and unmarked, then both marked it (the second overwrote the
    first) and both copied. The second now waits on the first's mark and is refused."""
    a, b = pg.open(), pg.open()  # an empty database: two migrates' targets
    with hold(a, pg.target) as a_conn:
        a.set_migration("00000000000000aa")
        with pytest.raises(MigrationRefused):
            behind(pg, a_conn, lambda: b.set_migration("00000000000000bb"))
    assert b.migration() == "00000000000000aa"


def test_migrate_refuses_a_target_another_migrate_marked_after_its_check(
    storage: Storage, empty: Storage
) -> None:
    """cloud/migrate.py between its look at the mark and its own mark: another migrate (from
    another source) marks the target. The copy used to go on over the other one's."""
    from agent.exits import EX_CANTCREAT, CommandError
    from cloud.migrate import migrate

    class Raced:
        def __init__(self, target: Storage) -> None:
            self._target = target

        def migration(self) -> str | None:
            seen = self._target.migration()
            self._target.set_migration("00000000000000cc")  # the other migrate, meanwhile
            return seen

        def __getattr__(self, name: str) -> Any:
            return getattr(self._target, name)

    storage.ingest(DEV, [telemetry(1)], T0)
    with pytest.raises(CommandError) as refused:
        migrate(storage, Raced(empty), 10, lambda _line: None)  # type: ignore[arg-type]
    assert refused.value.code == EX_CANTCREAT
    assert empty.migration() == "00000000000000cc" and empty.table_count("devices") == 0


# -- values the database refuses (audit r7_pg_nul_text.py) ---------------------------------------


def test_text_with_nul_is_refused_as_the_requests_fault_and_nothing_is_stored(
    pg: Backend,
) -> None:
    """PostgreSQL's TEXT refuses NUL (SQLite stores it). That was StorageUnavailable: 5.03, and
    the device sent the same PUT again forever. Now DataRefused (the server answers 4.00), its
    text free of the storage's address (it goes to the peer)."""
    s = pg.open()
    s.add_device(DEV, T0)
    entries = {"link/state": Entry(1, "up\x00"), "queue/depth": Entry(1, 5)}
    with pytest.raises(DataRefused) as refused:
        s.put_reported(DEV, entries, T0)
    assert isinstance(refused.value, StorageUnavailable)  # for callers that know no better
    text = str(refused.value)
    assert "NUL" in text or "0x00" in text
    host = pg.target.split("@", 1)[1].split("/", 1)[0]
    assert host not in text and "postgresql://" not in text
    assert s.reported(DEV) == {}  # the whole PUT, not a part of it
    assert s.put_reported(DEV, {"queue/depth": Entry(1, 5)}, T0).versions == {"queue/depth": 1}


def test_a_refused_value_in_an_ingest_group_refuses_its_batch_alone(pg: Backend) -> None:
    """One batch of a group commit holds a value the database refuses (a seq beyond bigint, a
    kind with NUL: kinds of DataError the server raises; put_reported's NUL above is refused by
    the driver). The group's transaction failed whole, every waiter got 5.03; now each batch
    goes alone and only that batch is refused."""
    s = pg.open()
    for device in ("a-1", "b-2"):
        s.add_device(device, T0)
    nul_kind = WireRecord(7, "tele\x00metry", T0, b"\xa0")
    results = s.ingest_many(
        [
            ("a-1", [telemetry(1)], False),
            ("b-2", [telemetry(2**63)], False),
            ("b-2", [nul_kind], False),
            ("a-1", [telemetry(2)], False),
        ],
        T0,
    )
    assert [type(r).__name__ for r in results] == [
        "IngestResult",
        "DataRefused",
        "DataRefused",
        "IngestResult",
    ]
    assert s.seqs("a-1") == [1, 2] and s.seqs("b-2") == []
    with pytest.raises(DataRefused):
        s.ingest("b-2", [telemetry(2**63)], T0)  # alone: raised, as before


def test_a_failure_of_the_database_is_still_unavailable_not_refused(backend: Backend) -> None:
    """Only values are the request's fault: a database that fails stays StorageUnavailable."""
    s = backend.open()
    s.add_device(DEV, T0)
    backend.fail_inserts_of(DEV)
    with pytest.raises(StorageUnavailable) as failed:
        s.ingest_many([(DEV, [telemetry(1)], False), ("other", [telemetry(2)], True)], T0)
    assert not isinstance(failed.value, DataRefused)
