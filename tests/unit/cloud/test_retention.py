"""Retention (cloud/retention.py, cloud/pgretention.py, cloud/prunecli.py) on both backends (the
fixtures of tests/unit/cloud/test_storage_contract.py): a prune removes what was received before
the cutoff and keeps the rest, never lets a pruned seq be stored again as new, changes nothing on
a dry run, and lets an endpoint on the same storage go on meanwhile. No timing assertions."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from agent.wire.batch import WireRecord
from agent.wire.features import ChannelFeatures, FeaturesBody
from cloud import cli, prunecli
from cloud.retention import DAY, PruneBusy, cutoff, day_start
from cloud.storage import IngestResult, SQLiteStorage, Storage
from drivers.clock import VirtualClock
from tests.unit.cloud.test_storage_contract import (
    DEV,
    T0,
    Backend,
    alert,
    backend,
    copy_all,
    empty,
    storage,
    telemetry,
)

__all__ = ["backend", "empty", "storage"]  # the fixtures, used by name

OLD = T0 - 3 * DAY  # received three days before T0 (another day, another partition)
BEFORE = T0 - DAY  # prune(BEFORE): what was received before midnight of T0 - 1 day goes
CF = ChannelFeatures(1.0, 0.5, 2.0, 1.25, 0.5, 3.0, 1.5, (0.25, 0.0))


def features(*seqs: int, sensor: str = "vib") -> WireRecord:
    return FeaturesBody(sensor, seqs, T0 + seqs[0], T0 + seqs[-1], {"x_g": CF}).to_record()


def acked(result: IngestResult) -> list[int]:
    return sorted(set(result.seqs) - set(result.conflicts))


def everything(s: Storage) -> dict[str, list[tuple[object, ...]]]:
    return {t: s.dump(t, None, 10_000) for t in ("devices", "records", "features", "verdicts")}


def fill(s: Storage) -> None:
    """Old: seqs 1-5 (and an alert, 6), a features record over 10-14, two verdicts; new: seqs
    20-22, a features record over 30-32, a verdict; another device with old records only."""
    s.add_device(DEV, OLD)
    s.add_device("b-2", OLD)
    s.ingest(DEV, [telemetry(n) for n in range(1, 6)] + [alert(6)], OLD)
    s.ingest(DEV, [features(10, 12, 14)], OLD + 60)
    s.ingest("b-2", [telemetry(n) for n in (7, 8)], OLD + 120)
    s.put_verdicts([(DEV, 6, "aa", b"old"), ("b-2", 7, "aa", b"old-b")], OLD)
    s.ingest(DEV, [telemetry(n) for n in (20, 21, 22)], T0)
    s.ingest(DEV, [features(30, 31, 32)], T0)
    s.put_verdicts([(DEV, 21, "aa", b"new")], T0)


def test_the_cutoff_is_the_midnight_utc_that_starts_the_day() -> None:
    assert day_start(T0) == 1_699_920_000.0  # 2023-11-14T00:00:00Z
    assert cutoff(T0, 2) == day_start(T0) - 2 * DAY
    assert cutoff(day_start(T0), 1) == day_start(T0) - DAY


def test_prune_removes_what_is_older_and_keeps_what_is_newer(backend: Backend) -> None:
    s = backend.open()
    fill(s)
    s.ingest(DEV, [telemetry(40)], day_start(BEFORE) - 1)  # the last second before the cutoff
    s.ingest(DEV, [telemetry(41)], day_start(BEFORE))  # the first second after it: kept
    result = s.prune(BEFORE)
    assert (result.records, result.features, result.verdicts) == (9, 1, 2)
    assert result.devices == 2 and not result.dry_run and not result.stopped
    assert result.before == day_start(BEFORE)
    assert s.seqs(DEV) == [20, 21, 22, 41] and s.seqs("b-2") == []
    assert [f.first_seq for f in s.features(DEV)] == [30]
    assert s.verdict(DEV, 6) is None and s.verdict("b-2", 7) is None
    assert s.verdict(DEV, 21) == b"new"
    assert s.table_count("records") == 4 and s.table_count("verdicts") == 1
    if backend.name == "postgresql":  # whole day partitions dropped, the keys with them
        assert result.partitions == ("records_20231111", "records_20231112")
        assert result.free_bytes is None
        names = {r[0] for r in backend.sql("SELECT relname FROM pg_class WHERE relkind = 'r'")}
        assert not names & set(result.partitions)
        assert backend.sql("SELECT count(*) FROM record_keys") == [(4,)]
    else:
        assert result.partitions == () and result.free_bytes is not None  # whole free pages
    again = s.prune(BEFORE)  # nothing left to remove
    assert (again.records, again.features, again.verdicts, again.devices) == (0, 0, 0, 0)
    assert again.partitions == ()


def test_a_pruned_seq_sent_again_is_a_conflict_never_stored_twice(storage: Storage) -> None:
    """A device whose ack was lost sends a record again after its copy was pruned: it is not
    stored under its number again (conflict: the device renumbers it above "last")."""
    fill(storage)
    storage.prune(BEFORE)
    again = storage.ingest(DEV, [telemetry(3), telemetry(21)], T0 + 10)
    assert again.conflicts == (3,) and acked(again) == [21]
    assert (again.new, again.duplicate, again.last) == (0, 1, 22)
    assert storage.seqs(DEV) == [20, 21, 22]
    # the device moves above "last" (agent/sync/uplink.py) and sends it again: stored once
    assert storage.ingest(DEV, [telemetry(23)], T0 + 11).new == 1
    # every record of b-2 was pruned: "last" still says how far it numbered
    resent = storage.ingest("b-2", [telemetry(7)], T0 + 12)
    assert (resent.conflicts, resent.new, resent.last) == ((7,), 0, 8)
    assert storage.seqs("b-2") == []
    # above the floor is as before
    assert storage.ingest("b-2", [telemetry(9)], T0 + 13).new == 1


def test_a_seq_below_the_floor_never_stored_is_a_conflict_too(storage: Storage) -> None:
    """A record left in a device's queue longer than the period (seq 4, never sent while 5
    was): not lost, not taken for the pruned one: a conflict, renumbered by the device."""
    storage.add_device(DEV, OLD)
    storage.ingest(DEV, [telemetry(3), telemetry(5)], OLD)
    storage.prune(BEFORE)
    late = storage.ingest(DEV, [telemetry(4)], T0)
    assert late.conflicts == (4,) and late.last == 5 and storage.seqs(DEV) == []


def test_features_records_and_verdicts_are_pruned_and_their_seqs_covered(
    storage: Storage,
) -> None:
    fill(storage)
    storage.prune(BEFORE)
    # a reading the pruned features record stood for, and the features record itself, again
    reading = storage.ingest(DEV, [telemetry(12)], T0 + 20)
    assert reading.conflicts == (12,) and reading.new == 0
    record = storage.ingest(DEV, [features(10, 12, 14)], T0 + 21)
    assert sorted(record.conflicts) == [10, 12, 14] and record.new == 0
    assert [f.first_seq for f in storage.features(DEV)] == [30]
    # a features record over new seqs above the floor is stored as before
    assert acked(storage.ingest(DEV, [features(50, 51)], T0 + 22)) == [50, 51]


def test_dry_run_changes_nothing(backend: Backend) -> None:
    s = backend.open()
    fill(s)
    before = everything(s)
    dry = s.prune(BEFORE, dry_run=True)
    assert everything(s) == before
    assert dry.dry_run and dry.free_bytes is None
    assert (dry.records, dry.features, dry.verdicts, dry.devices) == (8, 1, 2, 2)
    assert s.ingest(DEV, [telemetry(3)], T0).duplicate == 1  # still held, no floor yet
    done = s.prune(BEFORE)
    assert (done.records, done.features, done.verdicts) == (dry.records, dry.features, 2)
    assert done.partitions == dry.partitions


class _StopAfter(threading.Event):
    """A stop flag that is set once it has been looked at ``n`` times."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_a_stopped_prune_is_consistent_and_the_next_one_finishes(backend: Backend) -> None:
    s = backend.open()
    s.add_device(DEV, OLD)
    for day in range(3):  # three old days (partitions), 30 records each
        seqs = range(100 * day, 100 * day + 30)
        s.ingest(DEV, [telemetry(n) for n in seqs], OLD - day * DAY)
    first = s.prune(BEFORE, stop=_StopAfter(1), batch=10)
    assert first.stopped and 0 < first.records < 90
    held = set(s.seqs(DEV))
    for seq in (0, 29, 100, 129, 200, 229):  # each old seq: held (a duplicate) or a conflict
        result = s.ingest(DEV, [telemetry(seq)], T0)
        assert result.new == 0 and (seq in held) == (result.conflicts == ())
    rest = s.prune(BEFORE, batch=10)
    assert not rest.stopped and first.records + rest.records == 90 and s.seqs(DEV) == []


def test_an_endpoint_ingesting_during_a_prune_goes_on(backend: Backend) -> None:
    """Two storage objects on one database: one prunes in many short transactions, the other
    ingests meanwhile as a serving endpoint does; every ingest is stored (SQLite: its busy
    handler waits for one of the prune's transactions, never the whole prune; PostgreSQL: the
    partitions are detached concurrently, the keys deleted in batches)."""
    server = backend.open()
    server.add_device(DEV, OLD)
    for day in range(2):
        base = 10_000 * day
        server.ingest(DEV, [telemetry(base + n) for n in range(1_000)], OLD - day * DAY)
    outcome: list[object] = []

    def prune() -> None:  # in a thread of its own, with a connection of its own
        pruner = backend.open()
        backend.opened.remove(pruner)
        try:
            outcome.append(pruner.prune(BEFORE, batch=50))
        except Exception as err:  # reported below
            outcome.append(err)
        finally:
            pruner.close()

    thread = threading.Thread(target=prune)
    thread.start()
    sent = []
    during = 0  # ingests committed while the prune was still running
    seq = 100_000
    while thread.is_alive() or not sent:
        result = server.ingest(DEV, [telemetry(seq)], T0 + len(sent))
        assert result.new == 1
        during += thread.is_alive()
        sent.append(seq)
        seq += 1
        time.sleep(0.002)  # a busy endpoint, not one that never lets go of the file
    thread.join()
    assert during > 0  # 40 transactions with pauses between them: the two did overlap
    (done,) = outcome
    assert not isinstance(done, Exception), done
    assert done.records == 2_000  # type: ignore[union-attr]
    assert server.seqs(DEV) == sent


def test_a_prune_that_finds_the_file_locked_too_long_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that never lets go (here: a transaction left open): the prune gives up with
    PruneBusy (the command exits 75), having removed nothing it did not account for."""
    from cloud import retention

    s = SQLiteStorage(tmp_path / "cloud.sqlite3")
    try:
        fill(s)
        s.db.execute("PRAGMA busy_timeout = 10")
        monkeypatch.setattr(retention, "BUSY_TRIES", 2)
        other = sqlite3.connect(tmp_path / "cloud.sqlite3", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(PruneBusy, match="stayed locked"):
            s.prune(BEFORE)
        other.execute("ROLLBACK")
        other.close()
        assert s.prune(BEFORE).records == 8
    finally:
        s.close()


def test_the_floors_travel_with_a_migrate(storage: Storage, empty: Storage) -> None:
    fill(storage)
    storage.prune(BEFORE)
    copy_all(storage, empty)
    assert empty.ingest(DEV, [telemetry(3)], T0).conflicts == (3,)
    assert empty.ingest(DEV, [telemetry(60)], T0).new == 1


def as_older(path: Path, *statements: str) -> None:
    """Make the SQLite file at ``path`` look as an older endpoint left it: ``statements``."""
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


def test_a_sqlite_file_of_an_older_endpoint_gets_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "cloud.sqlite3"
    SQLiteStorage(path).close()
    as_older(
        path,
        "ALTER TABLE devices DROP COLUMN pruned",
        "ALTER TABLE window_verdicts DROP COLUMN received",
        "INSERT INTO window_verdicts (device, seq, digest, body) VALUES ('d', 1, 'a', x'')",
    )
    s = SQLiteStorage(path)
    try:
        (row,) = s.dump("verdicts", None, 10)
        assert row[5] is not None  # received: when the endpoint found it (now)
        assert s.prune(row[5] - DAY).verdicts == 0 and s.prune(row[5] + 2 * DAY).verdicts == 1
    finally:
        s.close()


# -- the command ----------------------------------------------------------------------------------


def _data(tmp_path: Path) -> Path:
    s = SQLiteStorage.in_dir(tmp_path / "data")
    try:
        fill(s)  # T0 is 2023: "old" and "new" alike are older than a few days now
        s.ingest(DEV, [telemetry(90)], time.time())  # received now: kept
    finally:
        s.close()
    return tmp_path / "data"


def test_the_command_says_what_it_would_remove_and_what_it_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _data(tmp_path)
    argv = ["prune", "--data", str(data), "--older-than-days", "2"]
    assert cli.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove what was received before" in out and "(2 days)" in out
    assert "records     11\n" in out and "dry run: nothing changed" in out
    assert cli.main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["storage"] == str(data) and doc["older_than_days"] == 2
    assert (doc["records"], doc["features"], doc["verdicts"]) == (11, 2, 3)
    assert doc["devices"] == 2 and doc["partitions"] == [] and doc["dry_run"] is False
    assert doc["free_bytes"] >= 0 and doc["before"].endswith("T00:00:00Z")
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "removed what was received before" in out and "records     0\n" in out
    assert "inside the file, reused by new records" in out


def _run(argv: list[str]) -> int:
    """``edge-agent-cloud ARGV``'s exit code (argparse's usage errors exit from inside)."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--older-than-days", "0"], 64, "1 or more"),
        (["--older-than-days", "x"], 64, "1 or more"),
        ([], 64, "--older-than-days"),
        (["--data", "MISSING", "--older-than-days", "3"], 66, "no endpoint data here"),
        (["--older-than-days", "3"], 64, "give --data DIR or --storage SPEC"),
        (["--storage", "mysql://x", "--older-than-days", "3"], 64, "not a storage"),
    ],
)
def test_the_command_refuses_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int, says: str
) -> None:
    argv = ["prune", *(str(tmp_path / "none") if a == "MISSING" else a for a in args)]
    assert _run(argv) == code
    assert says in capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # nothing made


def test_the_command_on_postgresql_drops_partitions(
    pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from cloud.pgstorage import PostgresStorage

    s = PostgresStorage(pg_dsn)
    try:
        fill(s)
    finally:
        s.close()
    assert cli.main(["prune", "--storage", pg_dsn, "--older-than-days", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "records_20231111" in doc["partitions"] and "records_20231114" in doc["partitions"]
    assert (doc["records"], doc["features"], doc["verdicts"]) == (11, 2, 3)
    assert doc["free_bytes"] is None and "***" in doc["storage"]  # no password printed


def test_an_interrupted_postgresql_prune_is_finished_by_the_next(pg_dsn: str) -> None:
    """A prune that stopped between detaching a partition and dropping it: the next one finds
    the detached day table, deletes its keys and drops it."""
    backend = Backend("postgresql", pg_dsn)
    s = backend.open()
    try:
        fill(s)
        backend.sql("ALTER TABLE records DETACH PARTITION records_20231111")
        result = s.prune(BEFORE)
        assert result.partitions == ("records_20231111",) and result.records == 8
        assert backend.sql("SELECT to_regclass('records_20231111')") == [(None,)]
        assert s.ingest(DEV, [telemetry(3)], T0).conflicts == (3,)
        assert backend.sql("SELECT count(*) FROM record_keys") == [(3,)]
    finally:
        s.close()


def test_one_prune_at_a_time_on_postgresql(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Two hosts of a fleet start their daily prune at once: one prunes, the other is told."""
    import psycopg

    from cloud.pgretention import PRUNE_LOCK
    from cloud.pgstorage import PostgresStorage

    s = PostgresStorage(pg_dsn)
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(%s)", (PRUNE_LOCK,))
            with pytest.raises(PruneBusy, match="another prune is running"):
                s.prune(BEFORE)
            code = cli.main(["prune", "--storage", pg_dsn, "--older-than-days", "2"])
            assert code == 75 and "another prune is running" in capsys.readouterr().err
        assert s.prune(BEFORE).records == 0  # the lock went with the other session
    finally:
        s.close()


# -- serve --retain-days --------------------------------------------------------------------------


def test_serving_prunes_at_start_and_then_daily(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    s = SQLiteStorage.in_dir(data)
    fill(s)
    s.close()
    clock = VirtualClock(start_wall=T0 + DAY)  # "now" is a day after T0: OLD goes first

    async def serve_two_days() -> None:
        retainer = prunecli.Retainer(str(data), 2, clock).start()
        await clock.sleep(prunecli.RETAIN_INTERVAL * 1.5)
        s = SQLiteStorage.in_dir(data)
        try:
            s.ingest(DEV, [telemetry(70)], clock.time() - 4 * DAY)  # old by the next prune
        finally:
            s.close()
        await clock.sleep(prunecli.RETAIN_INTERVAL)
        await retainer.stop()

    with caplog.at_level(logging.INFO, logger="cloud.retention"):
        clock.run(serve_two_days())
    lines = [r.getMessage() for r in caplog.records if "event=retention_pruned" in r.getMessage()]
    assert len(lines) == 3, lines  # at start, after a day, after two
    assert "older_than_days=2" in lines[0] and " records=8 " in lines[0]
    assert " records=0 " in lines[1] and " records=4 " in lines[2]  # T0's day, and seq 70
    assert " free_bytes=" in lines[0] and "before=2023-11-13T00:00:00Z" in lines[0]


def test_a_failing_prune_is_logged_and_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "cloud.sqlite3").write_bytes(b"not a database at all" * 100)
    clock = VirtualClock()
    retainer = prunecli.Retainer(str(tmp_path), 3, clock)
    with caplog.at_level(logging.INFO, logger="cloud.retention"):
        delay = clock.run(retainer.once())
    assert delay == prunecli.RETRY_INTERVAL
    assert any("event=retention_failed" in r.getMessage() for r in caplog.records)
