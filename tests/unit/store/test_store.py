"""Contract tests of the durable queue (agent/store/) on real SQLite files.

The contract suite runs against both durability modes. Time is virtual: leases expire by
advancing the clock, never by sleeping. The files live on a tmpfs (/dev/shm) when there is one:
these tests check behaviour, not the disk, and fsync on a busy disk would dominate their time
(the crash tests in test_store_crash.py use the real disk).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import agent.store.settings as store_mod
from agent.errors import StoreError, StoreFull
from agent.store.queue import NewRecord, Store
from agent.store.report import queue_report, read_report
from agent.store.settings import DEFAULT_PRIORITY, StoreSettings
from agent.wire.records import Kind
from drivers.base import OptionError, Options
from drivers.clock import VirtualClock
from tests.unit.store.damage import corrupt_under_the_store


@pytest.fixture(params=["full", "normal"])
def durability(request: pytest.FixtureRequest) -> str:
    return request.param


def make_settings(directory: Path, durability: str = "full", **kw: Any) -> StoreSettings:
    return StoreSettings(path=directory / "q" / "queue.db", durability=durability, **kw)


def run(clock: VirtualClock, fn: Callable[[], Awaitable[Any]]) -> Any:
    return clock.run(fn())


def rec(kind: Kind, payload: bytes = b"p", **kw: Any) -> NewRecord:
    return NewRecord(kind, payload, **kw)


# --- the contract, in both durability modes ----------------------------------------------------


def test_put_returns_increasing_seqs_and_batch_hands_back_the_records(
    qdir: Path, durability: str, vclock: VirtualClock
) -> None:
    settings = make_settings(qdir, durability)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        a = await st.put([rec(Kind.TELEMETRY, b"t1"), rec(Kind.TELEMETRY, b"t2")])
        b = await st.put([rec(Kind.EVENT, b"e1", created=123.5)])
        assert len(a) == 2 and len(b) == 1
        assert a[0] < a[1] < b[0]
        got = await st.batch(10, 1 << 20)
        by_seq = {r.seq: r for r in got}
        assert set(by_seq) == {*a, *b}
        t1 = by_seq[a[0]]
        assert (t1.kind, t1.payload, t1.attempts) == (Kind.TELEMETRY, b"t1", 0)
        assert t1.priority == DEFAULT_PRIORITY[Kind.TELEMETRY]
        assert t1.created == vclock.time()
        assert by_seq[b[0]].created == 123.5
        await st.close()

    run(vclock, main)


def test_batch_delivers_by_priority_then_by_age(
    qdir: Path, durability: str, vclock: VirtualClock
) -> None:
    settings = make_settings(qdir, durability)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        t = await st.put([rec(Kind.TELEMETRY), rec(Kind.TELEMETRY)])
        s = await st.put([rec(Kind.STATE)])
        e = await st.put([rec(Kind.EVENT)])
        a = await st.put([rec(Kind.ALERT), rec(Kind.ALERT)])
        urgent = await st.put([rec(Kind.TELEMETRY, priority=1)])
        got = [r.seq for r in await st.batch(100, 1 << 20)]
        assert got == [a[0], a[1], urgent[0], e[0], s[0], t[0], t[1]]
        await st.close()

    run(vclock, main)


def test_batch_respects_max_records_and_max_bytes(
    qdir: Path, durability: str, vclock: VirtualClock
) -> None:
    settings = make_settings(qdir, durability)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        seqs = await st.put([rec(Kind.TELEMETRY, bytes(100)) for _ in range(10)])
        first = await st.batch(3, 1 << 20)
        assert [r.seq for r in first] == seqs[:3]
        second = await st.batch(100, 250)  # two 100-byte payloads fit, the third does not
        assert [r.seq for r in second] == seqs[3:5]
        big = await st.put([rec(Kind.ALERT, bytes(5000))])
        alone = await st.batch(100, 10)  # one record is always handed out, even if too big
        assert [r.seq for r in alone] == big
        assert await st.batch(0, 1 << 20) == []
        await st.close()

    run(vclock, main)


def test_leased_records_return_only_after_the_lease_expires(
    qdir: Path, durability: str, vclock: VirtualClock
) -> None:
    settings = make_settings(qdir, durability, lease_seconds=30.0)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        seqs = await st.put([rec(Kind.EVENT), rec(Kind.EVENT)])
        first = await st.batch(1, 1 << 20)
        assert [r.seq for r in first] == seqs[:1]
        assert [r.seq for r in await st.batch(10, 1 << 20)] == seqs[1:]
        assert await st.batch(10, 1 << 20) == []
        assert (await st.stats()).leased == 2
        await vclock.sleep(29.0)
        assert await st.batch(10, 1 << 20) == []
        await vclock.sleep(2.0)
        again = await st.batch(10, 1 << 20)
        assert [r.seq for r in again] == seqs
        assert [r.attempts for r in again] == [1, 1]  # an expired lease counts as an attempt
        await st.close()

    run(vclock, main)


def test_nack_returns_records_at_once_and_counts_an_attempt(
    qdir: Path, durability: str, vclock: VirtualClock
) -> None:
    settings = make_settings(qdir, durability)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        seqs = await st.put([rec(Kind.TELEMETRY) for _ in range(3)])
        got = await st.batch(3, 1 << 20)
        await st.nack([got[1].seq])
        again = await st.batch(10, 1 << 20)
        assert [(r.seq, r.attempts) for r in again] == [(seqs[1], 1)]
        await st.nack([seqs[1]])
        await st.ack([seqs[0], seqs[2]])
        final = await st.batch(10, 1 << 20)
        assert [(r.seq, r.attempts) for r in final] == [(seqs[1], 2)]
        await st.close()

    run(vclock, main)


def test_acked_records_never_return_and_leases_do_not_survive_a_restart(
    qdir: Path, durability: str, vclock: VirtualClock
) -> None:
    settings = make_settings(qdir, durability)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        seqs = await st.put([rec(Kind.EVENT, bytes([i])) for i in range(6)])
        got = await st.batch(6, 1 << 20)
        await st.ack([r.seq for r in got[:3]])
        await st.nack([got[3].seq])
        await st.close()  # got[4:] stay leased, never acked

        st = await Store.open(settings, clock=vclock)
        again = await st.batch(100, 1 << 20)
        assert [r.seq for r in again] == seqs[3:]
        assert [r.attempts for r in again] == [1, 0, 0]
        stats = await st.stats()
        assert stats.kinds[Kind.EVENT].depth == 3
        assert stats.depth == 3
        await st.close()

    run(vclock, main)


def test_sequence_numbers_keep_rising_after_everything_was_acked(
    qdir: Path, durability: str, vclock: VirtualClock
) -> None:
    settings = make_settings(qdir, durability)

    async def main() -> None:
        last = 0
        for _ in range(3):
            st = await Store.open(settings, clock=vclock)
            seqs = await st.put([rec(Kind.STATE) for _ in range(5)])
            assert seqs[0] > last
            assert seqs == list(range(seqs[0], seqs[0] + 5))
            await st.ack(seqs)
            assert (await st.stats()).depth == 0
            last = (await st.stats()).last_seq
            assert last == seqs[-1]
            await st.close()

    run(vclock, main)


def test_group_commit_joins_puts_that_arrive_together(
    qdir: Path, durability: str, vclock: VirtualClock
) -> None:
    settings = make_settings(qdir, durability)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        before = (await st.stats()).commits
        results = await asyncio.gather(*(st.put([rec(Kind.TELEMETRY)]) for _ in range(200)))
        seqs = [r[0] for r in results]
        assert len(set(seqs)) == 200
        assert seqs == sorted(seqs)  # committed in the order they were put
        commits = (await st.stats()).commits - before
        assert 1 <= commits <= 2  # not one transaction per put
        await st.close()

    run(vclock, main)


def test_close_commits_puts_still_in_flight(
    qdir: Path, durability: str, vclock: VirtualClock
) -> None:
    settings = make_settings(qdir, durability)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        tasks = [asyncio.create_task(st.put([rec(Kind.EVENT, bytes([i]))])) for i in range(20)]
        await asyncio.sleep(0)
        await st.close()
        seqs = [t.result()[0] for t in tasks]
        with pytest.raises(StoreError, match="closed"):
            await st.put([rec(Kind.EVENT)])
        st = await Store.open(settings, clock=vclock)
        assert [r.seq for r in await st.batch(100, 1 << 20)] == seqs
        await st.close()

    run(vclock, main)


def test_bad_records_are_refused(qdir: Path, durability: str, vclock: VirtualClock) -> None:
    settings = make_settings(qdir, durability, budget_bytes=1 << 20)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        with pytest.raises(ValueError, match="priority"):
            await st.put([rec(Kind.EVENT, priority=256)])
        with pytest.raises(ValueError, match="priority"):
            await st.put([rec(Kind.EVENT, priority=-1)])
        with pytest.raises(TypeError, match="payload"):
            await st.put([NewRecord(Kind.EVENT, "text")])  # type: ignore[arg-type]
        with pytest.raises(StoreFull, match="split it"):
            await st.put([rec(Kind.TELEMETRY, bytes(200_000))])
        assert await st.put([]) == []
        assert await st.put([NewRecord(Kind.EVENT, bytearray(b"ok"))])
        assert (await st.stats()).depth == 1
        await st.close()

    run(vclock, main)


def test_stats_and_queue_report(qdir: Path, durability: str, vclock: VirtualClock) -> None:
    settings = make_settings(qdir, durability)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        await st.put([rec(Kind.TELEMETRY, bytes(100)) for _ in range(4)])
        await st.put([rec(Kind.ALERT, bytes(10))])
        await vclock.sleep(3600.0)
        await st.batch(1, 1 << 20)
        stats = await st.stats()
        assert stats.kinds[Kind.TELEMETRY].depth == 4
        assert stats.kinds[Kind.TELEMETRY].bytes == 400
        assert stats.kinds[Kind.ALERT].bytes == 10
        assert stats.payload_bytes == 410
        assert stats.leased == 1
        assert stats.oldest_age == 3600.0
        assert stats.db_bytes > 0 and stats.file_bytes >= stats.db_bytes
        assert stats.to_dict()["kinds"]["alert"] == {"depth": 1, "bytes": 10, "evicted": 0}

        # the CLI reads the file while the agent holds it open
        text = await queue_report(settings, clock=vclock)
        assert "telemetry" in text and "1 h 0 min" in text
        data = json.loads(await queue_report(settings, as_json=True, clock=vclock))
        assert data["kinds"]["telemetry"] == {"depth": 4, "bytes": 400, "evicted": 0}
        assert data["depth"] == 5
        assert data["oldest_age_s"] == 3600.0
        assert data["last_seq"] == stats.last_seq
        await st.close()

    run(vclock, main)


# --- one store per file, configuration ------------------------------------------------------


def test_a_second_store_on_the_same_file_is_refused(qdir: Path, vclock: VirtualClock) -> None:
    settings = make_settings(qdir)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        with pytest.raises(StoreError, match="in use by another process"):
            await Store.open(settings, clock=vclock)
        await st.close()
        st = await Store.open(settings, clock=vclock)  # the lock went with the first store
        await st.close()

    run(vclock, main)


def test_queue_report_on_a_missing_or_damaged_file(qdir: Path, vclock: VirtualClock) -> None:
    settings = make_settings(qdir)
    with pytest.raises(StoreError, match="no queue at"):
        read_report(settings)
    settings.path.parent.mkdir(parents=True)
    settings.path.write_bytes(b"garbage" * 100)
    with pytest.raises(StoreError, match="damaged"):
        read_report(settings)


def test_settings_from_options_defaults_and_key_errors(tmp_path: Path) -> None:
    s = StoreSettings.from_options(Options({}, prefix="store."), tmp_path)
    assert s.path == tmp_path / "queue.db"
    assert (s.durability, s.budget_bytes) == ("full", 256 * 1024 * 1024)
    assert (s.lease_seconds, s.memory_ring) == (60.0, 1000)

    raw = {
        "path": "sub/q.db",
        "budget_mb": 1.5,
        "durability": "normal",
        "lease_seconds": 5,
        "memory_ring": 7,
    }
    s = StoreSettings.from_options(Options(raw, prefix="store."), tmp_path)
    assert s.path == tmp_path / "sub" / "q.db"
    assert (s.budget_bytes, s.durability, s.lease_seconds, s.memory_ring) == (
        1536 * 1024,
        "normal",
        5.0,
        7,
    )
    assert StoreSettings.from_options(Options({"path": "/abs/q.db"}), tmp_path).path == Path(
        "/abs/q.db"
    )
    bad = [
        ({"budget_mb": 0.1}, "store.budget_mb"),
        ({"durability": "off"}, "store.durability"),
        ({"lease_seconds": 0}, "store.lease_seconds"),
        ({"memory_ring": -1}, "store.memory_ring"),
        ({"path": ""}, "store.path"),
        ({"budget": 5}, "store.budget"),
    ]
    for table, key in bad:
        with pytest.raises(OptionError) as err:
            StoreSettings.from_options(Options(table, prefix="store."), tmp_path)
        assert err.value.key == key


# --- sequence numbers across lost and damaged files -------------------------------------------


def test_a_lost_database_restarts_above_the_side_file(qdir: Path, vclock: VirtualClock) -> None:
    settings = make_settings(qdir)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        old = await st.put([rec(Kind.EVENT) for _ in range(10)])
        await st.close()
        settings.path.unlink()
        st = await Store.open(settings, clock=vclock)
        new = await st.put([rec(Kind.EVENT)])
        assert new[0] > old[-1] + store_mod.SEQ_BLOCK - 10  # above the reservation
        await st.close()

        # Both files gone (say the data directory was wiped): a new time-based epoch, which is
        # above everything issued as long as fewer than a million numbers went out per second.
        shutil.rmtree(settings.path.parent)
        await vclock.sleep(1.0)
        st = await Store.open(settings, clock=vclock)
        newer = await st.put([rec(Kind.EVENT)])
        assert newer[0] > new[0]
        assert newer[0] > vclock.time() * store_mod.SEQ_EPOCH_SCALE
        await st.close()

    run(vclock, main)


def test_after_a_normal_session_commits_lost_to_power_are_not_reissued(
    qdir: Path, vclock: VirtualClock
) -> None:
    """With synchronous=NORMAL a power cut may roll the file back by a few commits. Simulate it
    by putting back an older copy of the file: the next session must still start above every
    number the lost session issued."""
    settings = make_settings(qdir, "normal")
    snapshot = qdir / "snapshot.db"

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        await st.put([rec(Kind.EVENT)])
        await st.close()
        shutil.copy(settings.path, snapshot)
        st = await Store.open(settings, clock=vclock)
        issued = await st.put([rec(Kind.EVENT) for _ in range(20)])
        await st.close()
        shutil.copy(snapshot, settings.path)  # the last commits "never reached the disk"
        st = await Store.open(settings, clock=vclock)
        after = await st.put([rec(Kind.EVENT)])
        assert after[0] > max(issued)
        await st.close()

    run(vclock, main)


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(10_000))


def _truncated(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2 + 100)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _foreign(path: Path) -> None:
    path.unlink()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (text TEXT)")
    conn.commit()
    conn.close()


def _zeroed_pages(path: Path) -> None:
    """Header intact, table pages wiped: only quick_check finds it (after an unclean stop)."""
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = 0 WHERE key = 'clean'")
    conn.commit()
    conn.close()
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(4096 * 2)
        f.write(b"\xa5" * (size - 4096 * 2))


@pytest.mark.parametrize(
    "damage", [_garbage, _truncated, _empty, _foreign, _zeroed_pages], ids=lambda f: f.__name__
)
def test_a_corrupt_database_is_moved_aside_and_a_new_one_starts_above_old_seqs(
    qdir: Path,
    vclock: VirtualClock,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], None],
) -> None:
    settings = make_settings(qdir)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        payloads: dict[int, bytes] = {}
        for _ in range(20):
            batch = [rec(Kind.TELEMETRY, os.urandom(400)) for _ in range(20)]
            old = await st.put(batch)
            payloads.update(zip(old, (r.payload for r in batch), strict=True))
        await st.close()
        damage(settings.path)

        with caplog.at_level(logging.ERROR, logger="agent.store"):
            st = await Store.open(settings, clock=vclock)
        aside = [
            p
            for p in settings.path.parent.glob("queue.db.corrupt-*")
            if not p.name.endswith(("-wal", "-shm"))
        ]
        assert len(aside) == 1
        assert any(str(aside[0]) in r.getMessage() for r in caplog.records)
        new = await st.put([rec(Kind.ALERT)])
        assert new[0] > old[-1]
        got = await st.batch(1000, 1 << 30)
        assert got[0].seq == new[0]
        salvaged = got[1:]
        # every row that came back is one that was put, under its own number, unchanged
        assert all(payloads.get(r.seq) == r.payload for r in salvaged)
        assert [r.seq for r in salvaged] == sorted(r.seq for r in salvaged)
        if damage is _truncated:  # half the pages survive: rows on them are salvaged
            assert 0 < len(salvaged) < len(payloads)
        elif damage is not _zeroed_pages:
            assert salvaged == []  # nothing readable was left
        await st.close()

    run(vclock, main)


def test_corrupt_copies_are_pruned(qdir: Path, vclock: VirtualClock) -> None:
    settings = make_settings(qdir)

    async def main() -> None:
        for _ in range(store_mod.KEEP_CORRUPT + 2):
            st = await Store.open(settings, clock=vclock)
            await st.put([rec(Kind.EVENT)])
            await st.close()
            _garbage(settings.path)
            await vclock.sleep(1.0)  # a distinct timestamp for each copy
        st = await Store.open(settings, clock=vclock)
        await st.close()
        aside = [p for p in settings.path.parent.glob("queue.db.corrupt-*") if "-wal" not in p.name]
        assert len(aside) == store_mod.KEEP_CORRUPT

    run(vclock, main)


def test_a_newer_schema_is_refused_not_moved_aside(qdir: Path, vclock: VirtualClock) -> None:
    settings = make_settings(qdir)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        await st.close()
        conn = sqlite3.connect(settings.path)
        conn.execute(f"PRAGMA user_version = {store_mod.SCHEMA_VERSION + 1}")
        conn.close()
        with pytest.raises(StoreError, match="schema version"):
            await Store.open(settings, clock=vclock)
        assert not list(settings.path.parent.glob("queue.db.corrupt-*"))

    run(vclock, main)


def test_corruption_found_while_running_replaces_the_file_and_keeps_going(
    qdir: Path, vclock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(qdir)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        old = []
        for _ in range(30):
            old += await st.put([rec(Kind.TELEMETRY, os.urandom(300)) for _ in range(20)])
        corrupt_under_the_store(settings.path)
        with caplog.at_level(logging.ERROR, logger="agent.store"):
            got = await st.batch(10_000, 1 << 30)
        # the rows on the pages that were not overwritten are salvaged, under their numbers
        assert 0 < len(got) < len(old)
        assert {r.seq for r in got} <= set(old)
        assert any("salvaged=" in r.getMessage() for r in caplog.records)
        aside = [p for p in settings.path.parent.glob("queue.db.corrupt-*") if "-wal" not in p.name]
        assert len(aside) == 1
        new = await st.put([rec(Kind.ALERT)])
        assert new[0] > old[-1]
        assert [r.seq for r in await st.batch(10, 1 << 20)] == new
        await st.close()

    run(vclock, main)


def test_a_locked_database_is_an_error_not_corruption(
    qdir: Path, vclock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(qdir)
    monkeypatch.setattr("agent.store.database.BUSY_TIMEOUT_SECONDS", 0.05)
    monkeypatch.setattr("agent.store.dbfile.BUSY_TIMEOUT_SECONDS", 0.05)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        await st.put([rec(Kind.EVENT)])
        await st.close()
        other = sqlite3.connect(settings.path, isolation_level=None)
        other.execute("PRAGMA locking_mode = EXCLUSIVE")
        other.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreError, match="cannot open") as err:
                await Store.open(settings, clock=vclock)
            assert not isinstance(err.value, StoreFull)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert not list(settings.path.parent.glob("queue.db.corrupt-*"))
        st = await Store.open(settings, clock=vclock)  # the records are still there
        assert len(await st.batch(10, 1 << 20)) == 1
        await st.close()

    run(vclock, main)


def test_counts_are_checked_against_the_rows_after_an_unclean_stop(
    qdir: Path, vclock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(qdir)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        await st.put([rec(Kind.STATE, bytes(10)) for _ in range(3)])
        await st.close()
        conn = sqlite3.connect(settings.path)
        conn.execute("UPDATE kinds SET depth = 99, bytes = 5 WHERE kind = 2")
        conn.execute("UPDATE meta SET value = 0 WHERE key = 'clean'")
        conn.commit()
        conn.close()
        with caplog.at_level(logging.WARNING, logger="agent.store.database"):
            st = await Store.open(settings, clock=vclock)
        assert any("kind_counts_repaired" in r.getMessage() for r in caplog.records)
        state = (await st.stats()).kinds[Kind.STATE]
        assert (state.depth, state.bytes) == (3, 30)
        await st.close()
        assert read_report(settings)["kinds"]["state"]["depth"] == 3  # repaired on disk too

    run(vclock, main)
