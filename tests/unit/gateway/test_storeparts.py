"""The gateway's own parts of its store and its prune (agent/gateway/storeparts.py) on a real
SQLite store that fills.

Attack named: a disk that fills. On SQLITE_FULL SQLite may have rolled the transaction back
already; a ROLLBACK by hand then raised "cannot rollback - no transaction is active" in place of
the real error, which the operator never saw."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.gateway.storeparts import prepare_store, prune
from agent.wire.batch import WireRecord
from agent.wire.records import TelemetryBody
from cloud.storage import DB_NAME, SQLiteStorage
from tests.unit.gateway.test_forward_requests import _features

T0 = 1_700_000_000.0
DEVICES = 3000  # each a row of relay_pruned: more than the store's free pages hold


def _reading(seq: int) -> WireRecord:
    return WireRecord(seq, "telemetry", T0, TelemetryBody("m", T0, {"a": 1.5}).to_cbor())


def _full(s: SQLiteStorage) -> int:
    """No page more for ``s``; the pages it has."""
    (pages,) = s.db.execute("PRAGMA page_count").fetchone()
    s.db.execute(f"PRAGMA max_page_count = {pages}")
    return int(pages)


@pytest.mark.timeout(60)
def test_a_prune_on_a_full_store_raises_the_real_error_and_drops_nothing(tmp_path: Path) -> None:
    s = SQLiteStorage.in_dir(tmp_path / "store")
    try:
        prepare_store(s)
        devices = [f"d{i}" for i in range(DEVICES)]
        s.ingest_many([(d, [_reading(1), _reading(2)], True) for d in devices], T0)
        pages = _full(s)
        with pytest.raises(Exception, match="full") as raised:
            prune(s, 10**9, 10**9, T0 + 10, now=T0 + 10)
        assert "no transaction is active" not in str(raised.value)
        assert not s.db.in_transaction
        assert s.db.execute("SELECT count(*) FROM records").fetchone()[0] == 2 * DEVICES
        assert s.db.execute("SELECT count(*) FROM relay_pruned").fetchone()[0] == 0
        s.db.execute(f"PRAGMA max_page_count = {pages * 100}")  # space freed
        assert prune(s, 10**9, 10**9, T0 + 10, now=T0 + 10) == DEVICES  # each device's newest stays
        assert s.db.execute("SELECT count(*) FROM relay_pruned").fetchone()[0] == DEVICES
        assert {i.records for i in s.devices()} == {1}
    finally:
        s.close()


@pytest.mark.timeout(60)
def test_prepare_store_on_a_full_store_raises_the_real_error_and_can_run_again(
    tmp_path: Path,
) -> None:
    s = SQLiteStorage.in_dir(tmp_path / "store")
    try:
        s.ingest_many([(f"d{i}", [_reading(1), _reading(2)], True) for i in range(DEVICES)], T0)
        pages = _full(s)
        with pytest.raises(Exception, match="full") as raised:
            prepare_store(s)
        assert "no transaction is active" not in str(raised.value)
        assert not s.db.in_transaction
        s.db.execute(f"PRAGMA max_page_count = {pages * 100}")
        prepare_store(s)
        queued = s.db.execute("SELECT count(*) FROM relay_features").fetchone()[0]
        assert queued == 0
    finally:
        s.close()


DAY = 86_400.0
KEEP = 7 * DAY


def _count(s: SQLiteStorage, device: str) -> int:
    """The device's records, which its row's count (cloud/devicecount.py) says too: the prune
    subtracts what it drops (before, the row kept counting them)."""
    n = int(s.db.execute("SELECT count(*) FROM records WHERE device = ?", (device,)).fetchone()[0])
    info = s.device(device)
    assert info is not None and info.records == n
    return n


@pytest.mark.timeout(60)
def test_a_clock_set_back_by_years_does_not_stop_the_prune(tmp_path: Path) -> None:
    """The gateway received records at T0, then its wall clock was set back two years (a bad NTP
    server, an RTC battery): those records look received in the future. Before: the prune drops
    a prefix in arrival order up to the first record not yet old enough; one from the future was
    never old enough, so nothing was dropped for two years and the gateway's disk filled. Now a
    time of receipt later than the prune's ``now`` counts as ``now``: every record goes ``keep``
    after the first prune that finds the clock set back."""
    s = SQLiteStorage.in_dir(tmp_path / "store")
    try:
        prepare_store(s)
        s.ingest_many([("d1", [_reading(q) for q in range(1, 11)], True)], T0)
        back = T0 - 2 * 365 * DAY  # the clock set back
        s.ingest_many([("d1", [_reading(q) for q in range(11, 21)], True)], back)
        s.ingest_many([("d2", [_reading(1), _reading(2)], True)], back)
        assert prune(s, 10**9, 10**9, back - KEEP, now=back) == 0  # nothing old enough yet
        later = back + KEEP + DAY  # the cloud took everything; a week and a day later
        assert prune(s, 10**9, 10**9, later - KEEP, now=later) == 19 + 1
        assert _count(s, "d1") == 1 and _count(s, "d2") == 1  # each device's newest stays
    finally:
        s.close()


@pytest.mark.timeout(60)
def test_records_received_before_the_clock_was_set_stay_keep_forwarded_after_it(
    tmp_path: Path,
) -> None:
    """A gateway without an RTC received records while its wall clock read 1970 (no NTP yet,
    the cloud's time not learned), then its clock was set. Before: those times of receipt were
    decades old, so the first prune after the cloud took them dropped them at once; a device
    that sent one again (its ack lost) was answered as a conflict and sent it under a new
    number, and the cloud stored it twice. Now they count as received when the clock was set:
    they go ``keep_forwarded`` after that."""
    s = SQLiteStorage.in_dir(tmp_path / "store")
    try:
        prepare_store(s)
        boot = 1_000.0  # 1970 plus uptime
        s.ingest_many([("d1", [_reading(q) for q in range(1, 11)], True)], boot)
        s.ingest_many([("d2", [_reading(1), _reading(2)], True)], boot + 5)
        assert prune(s, 10**9, 10**9, boot - KEEP, now=boot + 10) == 0  # unset: as before
        set_at = 1_800_000_000.0  # the clock set (NTP, the cloud's time)
        assert prune(s, 10**9, 10**9, set_at - KEEP, now=set_at) == 0  # kept: a week from now
        assert _count(s, "d1") == 10 and _count(s, "d2") == 2
        later = set_at + KEEP + DAY
        assert prune(s, 10**9, 10**9, later - KEEP, now=later) == 9 + 1
        assert _count(s, "d1") == 1 and _count(s, "d2") == 1  # each device's newest stays
    finally:
        s.close()


@pytest.mark.timeout(60)
def test_features_records_received_before_the_clock_was_set_stay_keep_forwarded_after_it(
    tmp_path: Path,
) -> None:
    """As for readings: a features record the gateway received while its clock read 1970 is
    dropped ``keep_forwarded`` after the clock was set, not at the first prune after it."""
    s = SQLiteStorage.in_dir(tmp_path / "store")
    try:
        prepare_store(s)
        boot = 1_000.0
        s.ingest_many([("d3", [_features(1, 4), _features(5, 4)], True)], boot)
        stored = "SELECT count(*) FROM features WHERE device = 'd3'"
        assert s.db.execute(stored).fetchone()[0] == 2
        set_at = 1_800_000_000.0
        assert prune(s, 10**9, 10**9, set_at - KEEP, now=set_at) == 0
        assert s.db.execute(stored).fetchone()[0] == 2
        later = set_at + KEEP + DAY
        assert prune(s, 10**9, 10**9, later - KEEP, now=later) == 2
        assert s.db.execute(stored).fetchone()[0] == 0
    finally:
        s.close()


@pytest.mark.timeout(60)
def test_records_held_at_the_front_do_not_stop_the_prune(tmp_path: Path) -> None:
    """More records the prune never drops (held: the cloud asked for them later) at the front
    of the store than one prune's batch. Before: the batch counted them, so every prune's
    window held only them and nothing behind them was ever dropped (the store grew for good).
    Now the batch counts only what the prune may drop."""
    s = SQLiteStorage.in_dir(tmp_path / "store")
    try:
        prepare_store(s)
        s.ingest_many([("held", [_reading(q) for q in range(1, 61)], True)], T0)
        s.db.executemany(
            "INSERT INTO relay_later (device, seq, features) VALUES ('held', ?, 0)",
            [(q,) for q in range(1, 61)],
        )
        s.ingest_many([("d1", [_reading(q) for q in range(1, 21)], True)], T0)
        later = T0 + KEEP + DAY
        assert prune(s, 10**9, 10**9, later - KEEP, most=50, now=later) == 19
        assert _count(s, "held") == 60 and _count(s, "d1") == 1
    finally:
        s.close()


def test_a_gateway_store_stays_open_to_the_release_before_the_count(tmp_path: Path) -> None:
    """Defect: the store's schema version went to 2 at the gateway's first start with each
    device's count of records (cloud/devicecount.py), and the release before refuses a version
    above 1; on a machine of both roles the gateway runs the release the agent's update installs
    (docs/ota.md: one venv), so an update rolled back left a gateway that no longer opened its
    store at its next start. Now a gateway's store stays at version 1 and the count is taken
    again at each start, so what the release before stored uncounted is counted."""
    s = SQLiteStorage.in_dir(tmp_path)
    prepare_store(s)  # the gateway's start
    s.ingest_many([("d1", [_reading(1), _reading(2)], True)], T0)
    s.close()
    SQLiteStorage.in_dir(tmp_path, check=False).close()  # the server's
    db = sqlite3.connect(tmp_path / DB_NAME)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1  # what the release reads
        db.execute(  # a record the release before stored, not counted
            "INSERT INTO records (device, seq, kind, created, time, received, arrival, body)"
            " VALUES ('d1', 3, 'telemetry', ?, ?, ?, 3, x'')",
            (T0, T0, T0),
        )
        db.commit()
    finally:
        db.close()
    s = SQLiteStorage.in_dir(tmp_path)
    try:
        prepare_store(s)
        assert [i.records for i in s.devices()] == [3]
    finally:
        s.close()
