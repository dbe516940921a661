"""Set-aside records put back into the queue (the ``requeue`` command), on real SQLite files and
a real set-aside directory: all or one, files that are not records, a requeue a crash
interrupted, and the command's checks and result."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import cbor2
import pytest

from agent.errors import StoreFull
from agent.service.commands import CommandRunner, requeue_probe
from agent.store.queue import NewRecord, Record, Store
from agent.store.setaside import REQUEUING, SetAside
from agent.store.settings import StoreSettings
from agent.wire import commands as wire
from agent.wire.records import Kind
from drivers.clock import VirtualClock


def settings(qdir: Path) -> StoreSettings:
    return StoreSettings(path=qdir / "queue.db")


async def _set_aside(st: Store, payloads: list[bytes]) -> list[Record]:
    await st.put(
        [NewRecord(Kind.EVENT, p, priority=7, created=100.0 + i) for i, p in enumerate(payloads)]
    )
    batch = await st.batch(len(payloads), 1 << 20)
    await st.set_aside(batch, "4.00 cannot decode")
    return batch


async def _queued(st: Store) -> list[Record]:
    return await st.batch(1000, 1 << 30)


def test_requeue_puts_every_set_aside_record_back_as_a_new_record(
    qdir: Path, vclock: VirtualClock
) -> None:
    async def main() -> None:
        st = await Store.open(settings(qdir), clock=vclock)
        aside = await _set_aside(st, [b"\xa1", b"\xa2", b"\xa3"])
        assert (await st.stats()).depth == 0
        done = await st.requeue()
        assert done.error is None and not done.unreadable and done.recovered == 0
        assert sorted(done.moved) == [r.seq for r in aside]
        assert all(new > max(done.moved) for new in done.moved.values())  # new numbers
        back = await _queued(st)
        assert [(r.seq, r.kind, r.priority, r.created, r.payload) for r in back] == [
            (done.moved[r.seq], r.kind, r.priority, r.created, r.payload) for r in aside
        ]
        stats = await st.stats()
        assert stats.set_aside == 0 and stats.depth == 3
        assert not (await st.requeue()).moved  # nothing left to move
        await st.close()

    vclock.run(main())
    assert sorted(p.name for p in (qdir / "rejected").iterdir()) == []


def test_requeue_of_one_seq_leaves_the_others_set_aside(qdir: Path, vclock: VirtualClock) -> None:
    async def main() -> None:
        st = await Store.open(settings(qdir), clock=vclock)
        aside = await _set_aside(st, [b"\xa1", b"\xa2"])
        done = await st.requeue(aside[1].seq)
        assert list(done.moved) == [aside[1].seq]
        assert [r.payload for r in await _queued(st)] == [b"\xa2"]
        assert (await st.stats()).set_aside == 1
        assert not (await st.requeue(10**6)).moved  # no such record: nothing done
        await st.close()

    vclock.run(main())


def test_files_that_are_no_set_aside_record_stay_and_are_named(
    qdir: Path, vclock: VirtualClock
) -> None:
    area = qdir / "rejected"

    async def main() -> None:
        st = await Store.open(settings(qdir), clock=vclock)
        (good,) = await _set_aside(st, [b"\xa1"])
        (area / "seq-900.cbor").write_bytes(b"\x81" * 5000)  # nested 5000 deep
        doc = cbor2.loads((area / f"seq-{good.seq}.cbor").read_bytes())
        (area / "seq-901.cbor").write_bytes(cbor2.dumps(doc))  # its seq is not its name's
        (area / "seq-902.cbor").write_bytes(cbor2.dumps({**doc, "seq": 902, "kind": "x"}))
        (area / "seq-903.cbor").write_bytes(cbor2.dumps({**doc, "seq": 903, "created": "1"}))
        (area / "seq-904.cbor").write_bytes(b"")
        (area / "notes.txt").write_text("an operator's file: not ours, not counted")
        done = await st.requeue()
        assert list(done.moved) == [good.seq]
        names = [u.split(":")[0] for u in done.unreadable]
        assert names == [f"seq-{n}.cbor" for n in range(900, 905)]
        assert "not the one its name says" in done.unreadable[1]
        assert "unknown kind" in done.unreadable[2]
        assert [r.payload for r in await _queued(st)] == [b"\xa1"]
        await st.close()

    vclock.run(main())
    left = sorted(p.name for p in area.iterdir())
    assert left == ["notes.txt"] + [f"seq-{n}.cbor" for n in range(900, 905)]


def test_a_requeue_interrupted_after_its_commit_puts_nothing_twice(
    qdir: Path, vclock: VirtualClock
) -> None:
    """The crash between the put's commit and the files' removal: the next requeue removes the
    files of records queued already, and moves the rest once."""
    area = qdir / "rejected"

    async def main() -> None:
        st = await Store.open(settings(qdir), clock=vclock)
        aside = await _set_aside(st, [b"\xa1", b"\xa2", b"\xa3"])
        kept, _ = SetAside(area).read()
        SetAside(area).mark(kept)  # what requeue writes first
        await st.put([NewRecord(Kind.EVENT, b"\xa1", priority=7, created=100.0)])  # committed
        await st.close()  # ... and the power went: files and mark still there

        st = await Store.open(settings(qdir), clock=vclock)
        done = await st.requeue()
        assert done.recovered == 1
        assert sorted(done.moved) == [r.seq for r in aside[1:]]
        assert sorted(r.payload for r in await _queued(st)) == [b"\xa1", b"\xa2", b"\xa3"]
        await st.close()

    vclock.run(main())
    assert list(area.iterdir()) == []


def test_a_mark_that_is_damaged_is_set_aside_like_any_unreadable_file(
    qdir: Path, vclock: VirtualClock
) -> None:
    area = qdir / "rejected"

    async def main() -> None:
        st = await Store.open(settings(qdir), clock=vclock)
        await _set_aside(st, [b"\xa1"])
        (area / REQUEUING).write_text("[" * 100_000)
        done = await st.requeue()
        assert len(done.moved) == 1 and done.recovered == 0
        await st.close()

    vclock.run(main())
    assert list(area.iterdir()) == []


def test_a_full_disk_stops_a_requeue_and_what_was_not_moved_stays_set_aside(
    qdir: Path, vclock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    area = qdir / "rejected"

    async def main() -> None:
        st = await Store.open(settings(qdir), clock=vclock)
        aside = await _set_aside(st, [b"\xa1", b"\xa2"])

        async def full(records: list[NewRecord]) -> list[int]:
            raise StoreFull("the disk is full")

        monkeypatch.setattr(st, "put", full)
        done = await st.requeue()
        assert not done.moved and done.error == "the disk is full"
        monkeypatch.undo()
        assert sorted(p.name for p in area.iterdir() if p.suffix == ".cbor") == [
            f"seq-{r.seq}.cbor" for r in aside
        ]
        done = await st.requeue()  # space back: the mark of the failed try is no harm
        assert sorted(done.moved) == [r.seq for r in aside] and done.recovered == 0
        assert len(await _queued(st)) == 2
        await st.close()

    vclock.run(main())


def test_the_requeue_command_checks_its_argument_and_reports_what_it_did(
    qdir: Path, vclock: VirtualClock
) -> None:
    for bad in (0, -1, 1.5, "3", True, 2**63):
        with pytest.raises(wire.CommandError, match="seq must be"):
            wire.check_args("requeue", {"seq": bad})
    assert wire.check_args("requeue", {"seq": 3}) == {"seq": 3}
    (qdir / "rejected").mkdir(parents=True)
    pokes: list[int] = []

    async def main() -> dict:
        st = await Store.open(settings(qdir), clock=vclock)
        aside = await _set_aside(st, [b"\xa1", b"\xa2"])
        (qdir / "rejected" / "seq-77.cbor").write_bytes(b"\xff")
        runner = CommandRunner(
            qdir, clock_time=vclock.time, requeue=requeue_probe(st, lambda: pokes.append(1))
        )
        runner.apply("requeue", {"id": 5, "args": {"seq": 0}})  # refused, never run
        runner.apply("requeue", {"id": 6})
        name, command_id, args = runner._queue.get_nowait()
        await runner.execute(name, command_id, args)
        await st.close()
        return {"aside": aside, "done": runner.done["requeue"]}

    out = vclock.run(main())
    done = out["done"]
    assert done["id"] == 6 and done["status"] == "failed"  # seq-77.cbor could not be read
    first = out["aside"][0].seq
    assert done["result"]["requeued"] == 2 and done["result"]["unreadable"] == 1
    assert done["result"]["left"] == 1 and done["result"]["first"].startswith(f"seq {first} is now")
    assert done["result"]["error"].startswith("seq-77.cbor: not valid CBOR")
    assert pokes == [1]
    saved = json.loads((qdir / "commands.json").read_text())
    assert saved["requeue"]["id"] == 6


def test_requeue_from_the_agent_is_not_blocked_by_the_writer(
    qdir: Path, vclock: VirtualClock
) -> None:
    """Puts and acks of the running agent go on while a requeue runs (one writer thread)."""

    async def main() -> None:
        st = await Store.open(settings(qdir), clock=vclock)
        await _set_aside(st, [bytes([0xA0 + i % 16]) for i in range(600)])  # > one chunk
        done, seqs = await asyncio.gather(
            st.requeue(), st.put([NewRecord(Kind.TELEMETRY, b"\xa0")])
        )
        assert len(done.moved) == 600 and len(seqs) == 1
        assert (await st.stats()).depth == 601
        await st.close()

    vclock.run(main())
