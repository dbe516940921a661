"""Records the endpoint refused (set aside: kept in files before they leave the queue), and the
end of the sequence space, on real SQLite files and a real set-aside directory."""

from __future__ import annotations

import logging
from pathlib import Path

import cbor2
import pytest

from agent.errors import StoreError
from agent.service.status import format_status
from agent.store.queue import NewRecord, Store
from agent.store.report import format_report, read_report
from agent.store.seqfile import SeqFile, SeqMark
from agent.store.setaside import SetAsideFull
from agent.store.settings import SEQ_HEADROOM, StoreSettings
from agent.wire.batch import MAX_SEQ
from agent.wire.records import Kind
from drivers.clock import VirtualClock


def settings(qdir: Path) -> StoreSettings:
    return StoreSettings(path=qdir / "queue.db")


def test_set_aside_keeps_a_file_of_each_record_before_it_leaves_the_queue(
    qdir: Path, vclock: VirtualClock
) -> None:
    async def main() -> list[int]:
        st = await Store.open(settings(qdir), clock=vclock)
        seqs = await st.put([NewRecord(Kind.EVENT, b"\xa0", created=12.5) for _ in range(3)])
        batch = await st.batch(2, 1 << 20)
        await st.set_aside(batch, "4.00 cannot decode")
        stats = await st.stats()
        assert stats.depth == 1 and stats.set_aside == 2
        assert [r.seq for r in await st.batch(10, 1 << 20)] == seqs[2:]
        await st.close()
        return seqs

    seqs = vclock.run(main())
    report = read_report(settings(qdir))  # edge-agent queue
    assert report["set_aside"] == 2 and "set aside (refused by the endpoint): 2" in format_report(
        report
    )
    assert "set aside 2" in format_status({"queue": {"depth": {}, "set_aside": 2}})
    area = qdir / "rejected"
    assert sorted(p.name for p in area.iterdir()) == sorted(f"seq-{s}.cbor" for s in seqs[:2])
    doc = cbor2.loads((area / f"seq-{seqs[0]}.cbor").read_bytes())
    assert doc == {
        "v": 1,
        "seq": seqs[0],
        "kind": "event",
        "priority": 10,
        "created": 12.5,
        "payload": b"\xa0",
        "answer": "4.00 cannot decode",
        "time": vclock.time(),
    }


def test_a_full_set_aside_area_refuses_and_the_record_stays_queued(
    qdir: Path, vclock: VirtualClock
) -> None:
    area = qdir / "rejected"
    area.mkdir(parents=True)
    with (area / "seq-1.cbor").open("wb") as f:  # sparse: counts 16 MiB, takes no room
        f.truncate(16 << 20)

    async def main() -> None:
        st = await Store.open(settings(qdir), clock=vclock)
        (seq,) = await st.put([NewRecord(Kind.EVENT, b"\xa0")])
        batch = await st.batch(1, 1 << 20)
        with pytest.raises(SetAsideFull, match="is full"):
            await st.set_aside(batch, "4.00")
        assert (await st.stats()).depth == 1
        assert not (area / f"seq-{seq}.cbor").exists()
        await st.close()

    vclock.run(main())


def test_a_put_beyond_the_sequence_space_is_refused_in_one_clear_error(
    qdir: Path, vclock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """It used to fail inside SQLite ("Python int too large to convert to SQLite INTEGER")."""
    caplog.set_level(logging.ERROR, logger="agent.store")
    SeqFile(settings(qdir).seq_path).write(SeqMark(MAX_SEQ - 2, "normal"))  # starts above it

    async def main() -> None:
        st = await Store.open(settings(qdir), clock=vclock)
        assert st.last_seq == MAX_SEQ - 2
        assert await st.put([NewRecord(Kind.EVENT, b"\xa0")]) == [MAX_SEQ - 1]
        with pytest.raises(StoreError, match="sequence space exhausted"):
            await st.put([NewRecord(Kind.EVENT, b"\xa0")] * 2)
        assert await st.put([NewRecord(Kind.EVENT, b"\xa0")]) == [MAX_SEQ]
        with pytest.raises(StoreError, match="sequence space exhausted"):
            await st.put([NewRecord(Kind.EVENT, b"\xa0")])
        assert (await st.stats()).depth == 2
        await st.close()

    vclock.run(main())
    assert "event=seq_space_exhausted" in caplog.text


def test_renumber_refuses_a_floor_that_leaves_less_than_the_headroom(
    qdir: Path, vclock: VirtualClock
) -> None:
    async def main() -> None:
        st = await Store.open(settings(qdir), clock=vclock)
        (seq,) = await st.put([NewRecord(Kind.EVENT, b"\xa0")])
        moved = await st.renumber([seq], MAX_SEQ - SEQ_HEADROOM + 1)
        assert moved == {seq: seq + 1}  # above its own numbers only
        moved = await st.renumber([seq + 1], MAX_SEQ - SEQ_HEADROOM)
        assert moved == {seq + 1: MAX_SEQ - SEQ_HEADROOM + 1}
        await st.close()

    vclock.run(main())
