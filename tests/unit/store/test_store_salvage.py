"""Hostile disk: a queue file corrupted at rest (after a clean stop, so no check runs at open)
opens every time, and every row still readable from the damaged file is delivered under its own
sequence number.

"Readable" is established independently of the salvage code: a point lookup of each sequence
number on a copy of the damaged file.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from agent.store.queue import NewRecord, Store
from agent.store.settings import PAGE_SIZE, StoreSettings
from agent.wire.records import Kind
from drivers.clock import VirtualClock

pytestmark = pytest.mark.timeout(60)


def _fill(settings: StoreSettings, vclock: VirtualClock, n: int) -> dict[int, bytes]:
    async def main() -> dict[int, bytes]:
        st = await Store.open(settings, clock=vclock)
        out: dict[int, bytes] = {}
        for _ in range(n // 50):
            batch = [NewRecord(Kind.TELEMETRY, os.urandom(200)) for _ in range(50)]
            seqs = await st.put(batch)
            out.update(zip(seqs, (r.payload for r in batch), strict=True))
        await st.close()  # a clean stop: the next open skips quick_check
        return out

    return vclock.run(main())


def _queued(settings: StoreSettings, vclock: VirtualClock) -> dict[int, bytes]:
    """What the queue holds after an open (and its salvage), by seq."""

    async def main() -> dict[int, bytes]:
        st = await Store.open(settings, clock=vclock)
        got = await st.batch(1_000_000, 1 << 40)
        await st.close()
        return {r.seq: r.payload for r in got}

    return vclock.run(main())


def _page_of(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(
            conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[
                0
            ]
        )
    finally:
        conn.close()


def _leaf_pages(path: Path) -> list[int]:
    """Table-leaf pages (b-tree page type 0x0D) of the file, by page number (1-based)."""
    data = path.read_bytes()
    return [
        i // PAGE_SIZE + 1
        for i in range(PAGE_SIZE, len(data), PAGE_SIZE)
        if data[i] == 0x0D  # page 1 carries the file header first; it is never a records leaf
    ]


def _smash(path: Path, page: int) -> None:
    with path.open("r+b") as f:
        f.seek((page - 1) * PAGE_SIZE)
        f.write(b"\xa5" * PAGE_SIZE)


def _readable(path: Path, seqs: list[int], scratch: Path) -> dict[int, bytes]:
    """Point lookups on a copy: which rows the damaged file still gives back."""
    copy = scratch / "lookup.db"
    shutil.copy(path, copy)
    conn = sqlite3.connect(copy)
    out: dict[int, bytes] = {}
    try:
        for seq in seqs:
            try:
                row = conn.execute("SELECT payload FROM records WHERE seq = ?", (seq,)).fetchone()
            except sqlite3.DatabaseError:
                continue
            if row is not None:
                out[seq] = row[0]
    finally:
        conn.close()
    return out


@pytest.mark.parametrize("where", ["meta_page", "records_leaves", "first_and_last_leaves"])
def test_hostile_disk_queue_corrupted_at_rest_opens_and_salvages_every_readable_row(
    qdir: Path, vclock: VirtualClock, where: str, tmp_path: Path
) -> None:
    settings = StoreSettings(path=qdir / "queue.db")
    put = _fill(settings, vclock, 2000)
    leaves = _leaf_pages(settings.path)
    assert len(leaves) > 10
    if where == "meta_page":
        _smash(settings.path, _page_of(settings.path, "meta"))
    elif where == "records_leaves":
        for page in (leaves[3], leaves[len(leaves) // 2], leaves[-2]):
            _smash(settings.path, page)
    else:  # min(seq) and max(seq) unreadable: the keys must be found from the high-water mark
        for page in (leaves[2], leaves[-1]):
            _smash(settings.path, page)
    readable = _readable(settings.path, sorted(put), tmp_path)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)  # never raises for a corrupt file
        got = await st.batch(10_000, 1 << 30)
        assert {r.seq: r.payload for r in got} == readable
        stats = await st.stats()
        assert stats.depth == len(readable)
        new = await st.put([NewRecord(Kind.ALERT, b"after")])
        assert new[0] > max(put)
        await st.close()
        st = await Store.open(settings, clock=vclock)  # and the new file is sound
        assert len(await st.batch(10_000, 1 << 30)) == len(readable) + 1
        await st.close()

    vclock.run(main())
    if where != "meta_page":
        assert 0 < len(readable) < len(put)  # the damage was real, and not total
    else:
        assert readable == put  # the records pages were untouched: nothing is lost


_KILLED_WRITER = """
import asyncio, os, sys
from pathlib import Path
from agent.store.queue import NewRecord, Store
from agent.store.settings import StoreSettings
from agent.wire.records import Kind

async def main():
    st = await Store.open(StoreSettings(path=Path(sys.argv[1])))
    for i in range(20):
        await st.put([NewRecord(Kind.TELEMETRY, bytes([i]) * 300) for _ in range(20)])
    os._exit(0)  # as SIGKILL: no close, no checkpoint; the WAL holds the commits

asyncio.run(main())
"""


def test_a_main_file_shorter_than_its_header_with_the_wal_beside_it_is_not_corrupt(
    qdir: Path, vclock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """What a checkpoint cut short by a full disk leaves: page 1 already says the new size, the
    pages after it are still only in the WAL. SQLite reads them from the WAL; moving the file
    aside would throw a sound queue away."""
    import struct
    import subprocess
    import sys

    path = qdir / "queue.db"
    root = Path(__file__).resolve().parents[3]
    subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path)], check=True, cwd=root)
    assert path.with_name("queue.db-wal").stat().st_size > 32
    with path.open("r+b") as f:
        header = bytearray(f.read(100))
        counter, _pages = struct.unpack(">II", header[24:32])
        size = path.stat().st_size
        header[28:32] = struct.pack(">I", size // PAGE_SIZE + 2)  # "the file is 2 pages short"
        header[92:96] = struct.pack(">I", counter)  # and the header's size is valid
        f.seek(0)
        f.write(header)

    async def main() -> None:
        with caplog.at_level(logging.ERROR, logger="agent.store"):
            st = await Store.open(StoreSettings(path=path), clock=vclock)
        got = await st.batch(10_000, 1 << 30)
        assert len(got) == 400
        await st.close()

    vclock.run(main())
    assert not [r for r in caplog.records if "queue_corrupt" in r.getMessage()]


_CUT_SALVAGE = """
import asyncio, os, sys
from pathlib import Path
import agent.store.database as database
import agent.store.salvage as salvage
from agent.store.queue import Store
from agent.store.settings import StoreSettings

chunks = [0]
insert = salvage._insert

def mid_copy(*args):
    done = insert(*args)
    chunks[0] += 1
    if chunks[0] == 2:
        os._exit(9)  # the power goes (or SIGKILL) with two chunks of the old file copied
    return done

def before_create(*args):
    os._exit(9)  # the power goes (or the disk is full) once the damaged file is moved aside

if sys.argv[2] == "mid_copy":
    salvage._insert = mid_copy
else:
    database.create = before_create
asyncio.run(Store.open(StoreSettings(path=Path(sys.argv[1]))))
"""


def _crash_in_salvage(path: Path, cut: str) -> None:
    """The queue at ``path`` damaged (its meta page: every records page intact), then opened by
    a child process that dies at ``cut`` (see _CUT_SALVAGE)."""
    import subprocess
    import sys

    _smash(path, _page_of(path, "meta"))
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run([sys.executable, "-c", _CUT_SALVAGE, str(path), cut], cwd=root)
    assert done.returncode == 9


@pytest.mark.parametrize("cut", ["mid_copy", "before_create"])
def test_a_salvage_cut_short_by_a_crash_goes_on_at_the_next_start(
    qdir: Path, vclock: VirtualClock, cut: str
) -> None:
    """Hostile disk, then a crash: the queue is found corrupt and moved aside, and the process
    dies while its rows are being copied into the new file (``mid_copy``: the next start finds a
    sound new queue file), or before the new file is made (``before_create``, as when a full
    disk fails it: the next start finds no queue file at all). The rows not copied yet must
    still come back from the moved-aside copy, and the new queue must number above every seq
    the old one issued."""
    settings = StoreSettings(path=qdir / "queue.db")
    put = _fill(settings, vclock, 2000)
    _crash_in_salvage(settings.path, cut)
    assert settings.path.exists() == (cut == "mid_copy")

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        got = await st.batch(10_000, 1 << 30)
        assert {r.seq: r.payload for r in got} == put
        new = await st.put([NewRecord(Kind.ALERT, b"after")])
        assert new[0] > max(put)
        await st.close()

    vclock.run(main())


def _first_records_leaf(path: Path, first_seq: int) -> int:
    """The table-leaf page whose first cell is the row ``first_seq`` (read from the file's
    bytes: a cell starts with its payload size and its rowid, both varints)."""
    data = path.read_bytes()

    def varint(at: int) -> tuple[int, int]:
        value = 0
        for i in range(9):
            byte = data[at + i]
            if i == 8:
                return (value << 8) | byte, at + 9
            value = (value << 7) | (byte & 0x7F)
            if byte < 0x80:
                return value, at + i + 1
        raise AssertionError("unreachable")

    for page in _leaf_pages(path):
        base = (page - 1) * PAGE_SIZE
        if int.from_bytes(data[base + 3 : base + 5], "big") == 0:
            continue
        cell = base + int.from_bytes(data[base + 8 : base + 10], "big")
        _, at = varint(cell)
        if varint(at)[0] == first_seq:
            return page
    raise AssertionError("no leaf starts with the first seq")


def test_hostile_disk_a_deep_queue_whose_first_leaf_is_damaged_salvages_every_readable_row(
    qdir: Path, vclock: VirtualClock, tmp_path: Path
) -> None:
    """A long outage left 150,000 records queued; then the page with the oldest ones is
    overwritten, so the smallest seq cannot be read. Every row a point lookup still reads must
    come back, not only those within 100,000 of the high-water mark."""
    settings = StoreSettings(path=qdir / "queue.db")

    async def fill() -> list[int]:
        st = await Store.open(settings, clock=vclock)
        seqs: list[int] = []
        for _ in range(150):
            seqs += await st.put([NewRecord(Kind.TELEMETRY, os.urandom(16)) for _ in range(1000)])
        await st.close()
        return seqs

    put = vclock.run(fill())
    _smash(settings.path, _first_records_leaf(settings.path, put[0]))
    readable = _readable(settings.path, put, tmp_path)
    assert len(put) - 1000 < len(readable) < len(put)  # one leaf's rows are gone

    assert _queued(settings, vclock) == readable


def test_a_salvage_cut_short_goes_on_when_the_queue_holding_its_mark_is_damaged_too(
    qdir: Path, vclock: VirtualClock
) -> None:
    """Hostile disk twice: a damaged queue's salvage is cut short (a crash after two chunks), so
    the new queue holds the mark of the moved-aside file; then that new queue is damaged too (its
    header says it is cut short) before the next start. Its own rows are salvaged, and the first
    file's salvage must go on as well: its rows past the mark are in no other file."""
    settings = StoreSettings(path=qdir / "queue.db")
    put = _fill(settings, vclock, 2000)
    _crash_in_salvage(settings.path, "mid_copy")
    conn = sqlite3.connect(settings.path)  # the new queue, with the first two chunks
    marks = conn.execute("SELECT key FROM meta WHERE key LIKE 'salvage:%'").fetchall()
    copied = [r[0] for r in conn.execute("SELECT seq FROM records ORDER BY seq")]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    assert len(marks) == 1 and 0 < len(copied) < len(put)
    with settings.path.open("ab") as f:
        f.write(b"\xa5" * 100)  # cut short, as seen at open: moved aside before anything else

    assert _queued(settings, vclock) == put


def test_hostile_disk_a_damaged_queue_moved_aside_under_an_earlier_clock_is_not_pruned(
    qdir: Path, vclock: VirtualClock
) -> None:
    """Three damaged copies are kept from earlier years (the newest three are kept); then the
    queue is found damaged at a boot before the clock is set (a device without a real-time
    clock starts at 1970, or a clock stepped back): its copy is named by that earlier time.
    It must be salvaged, not deleted as the oldest copy before its rows were read."""
    settings = StoreSettings(path=qdir / "queue.db")
    put = _fill(settings, vclock, 2000)  # the virtual clock is at 2023
    for year in (2024, 2025, 2026):
        settings.path.with_name(f"queue.db.corrupt-{year}0101T000000Z").write_bytes(b"x" * 4096)
    _smash(settings.path, _page_of(settings.path, "meta"))  # every records page is intact

    assert _queued(settings, vclock) == put


@pytest.mark.parametrize(
    "note", ['["' + "q" * 300 + '"]', '["queue.db", "queue.db.seq"]', '{"a": 1}', "[1, 2"]
)
def test_hostile_disk_a_garbled_salvage_note_does_not_stop_the_queue(
    qdir: Path, vclock: VirtualClock, note: str
) -> None:
    """The note of damaged files to salvage (queue.db.salvage) corrupted at rest or written by
    someone else: a name too long for the filesystem, the live queue's own files, not a list,
    not JSON. The queue opens with its records (never a traceback at every start: a restart
    loop), treats no file but a moved-aside copy as damaged, and drops the note."""
    settings = StoreSettings(path=qdir / "queue.db")
    put = _fill(settings, vclock, 100)
    settings.path.with_name("queue.db.salvage").write_text(note)

    async def main() -> None:
        st = await Store.open(settings, clock=vclock)
        got = await st.batch(1000, 1 << 30)
        assert {r.seq: r.payload for r in got} == put
        assert (await st.stats()).salvaged == 0
        await st.close()

    vclock.run(main())
    assert not settings.path.with_name("queue.db.salvage").exists()
