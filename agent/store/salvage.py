"""Salvage: every row still readable from a queue file that was moved aside as corrupt, copied
into the new queue with its own sequence number, and counted.

A damaged SQLite file usually fails on some pages only. The scan walks the ``records`` table in
sequence order through one cursor; when a step fails it records the last good sequence number and
looks for the next position where a seek succeeds (doubling the distance, then halving it back to
the first readable key), so one bad page costs the rows on that page, not the rest of the file.
The damaged copy is opened read-only and stays on disk (``KEEP_CORRUPT`` copies are kept) for an
operator who wants to look at it.

Salvaged rows keep their sequence numbers: a row that the endpoint already stored under its number
is deduplicated there, and one that it did not is delivered once.

A salvage may be cut short (a crash or a power cut while it copies, a disk that fills). Before a
damaged file is moved aside its new name is noted durably in ``<queue>.salvage``
(:func:`note_aside`); the new queue then takes a mark per noted file (``meta`` key
``salvage:<file name>``, its value the last sequence number copied) and the note is removed
(:func:`adopt`, which also takes over the marks a noted file holds: a queue damaged before the
salvage it held was done); the mark is advanced in the transaction of each chunk and removed in
the one that ends the copy. So a crash at any step, or a new queue that could not be created (a full
disk), leaves the next open a damaged file to salvage, from where the last copy stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.files import fsync_dir, read_json, write_atomic
from agent.store.settings import BUSY_TIMEOUT_SECONDS, CODE_KIND
from agent.wire.batch import MAX_SEQ

log = logging.getLogger(__name__)

Row = tuple[int, int, int, float, int, bytes]
"""(seq, kind code, priority, created, attempts, payload), as the records table holds them."""

MAX_SPANS = 10_000  # damaged spans skipped before the rest of a file is given up on
MAX_LOOKUPS = 100_000  # point lookups per damaged span
_CHUNK = 256  # rows per range read
_COLUMNS = "SELECT seq, kind, priority, created, attempts, payload FROM records"
_SELECT = f"{_COLUMNS} WHERE seq > ? ORDER BY seq LIMIT ?"
_ONE = f"{_COLUMNS} WHERE seq = ?"


MARK = "salvage:"  # meta key prefix of a salvage not finished yet (+ the damaged file's name)


@dataclass(frozen=True)
class Damaged:
    """A queue file moved aside: where it went and what its metadata still says."""

    path: Path  # the moved-aside copy (its WAL, if any, beside it as ``<name>-wal``)
    hwm: int | None  # the highest sequence number readable from it
    start: int = 0  # rows up to this sequence number were copied already (a resumed salvage)

    @property
    def mark(self) -> str:
        return MARK + self.path.name


def _answers(path: Path, *queries: str) -> list[int]:
    """The integer answers of ``queries`` (each its first value) that the damaged file at
    ``path`` still gives; a query it cannot answer gives none."""
    return [row[0] for row in _rows(path, *queries) if isinstance(row[0], int)]


def _rows(path: Path, *queries: str) -> list[tuple[object, ...]]:
    """Every row the damaged file at ``path`` still gives for ``queries``."""
    found: list[tuple[object, ...]] = []
    try:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS
        )
    except sqlite3.Error:
        return found
    try:
        for query in queries:
            with contextlib.suppress(sqlite3.Error):
                found += conn.execute(query).fetchall()
    finally:
        conn.close()
    return found


def readable_hwm(path: Path) -> int | None:
    """The highest sequence number readable from a damaged file, if any."""
    found = _answers(
        path, "SELECT value FROM meta WHERE key = 'seq_hwm'", "SELECT max(seq) FROM records"
    )
    return max(found, default=None)


def _note(queue: Path) -> Path:
    return queue.with_name(queue.name + ".salvage")


def _noted(queue: Path) -> list[str]:
    """The names of the damaged files moved aside (or about to be) and not adopted yet."""
    try:
        names = read_json(_note(queue))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        log.warning("event=salvage_note_unreadable path=%s error=%s", _note(queue), err)
        return []
    names = names if isinstance(names, list) else []
    return [n for n in names if _aside(queue, n)]


def _aside(queue: Path, name: object) -> bool:
    """A name :func:`note_aside` writes (``<queue>.corrupt-...``): never the live queue's own
    files, nor one the filesystem refuses (a garbled or forged note)."""
    return (
        isinstance(name, str)
        and name.startswith(queue.name + ".corrupt-")
        and not name.endswith(("-wal", "-shm"))
        and "/" not in name
        and "\0" not in name
        and len(name.encode("utf-8", "replace")) <= 255
    )


def pending(queue: Path) -> set[str]:
    """The names of the damaged files whose salvage is not done: noted, or marked in a noted
    file (the queue being moved aside)."""
    names = _noted(queue)
    marks = (key for n in names for key, _ in _marks(queue, queue.parent / n))
    return {*names, *(key[len(MARK) :] for key in marks)}


def note_aside(queue: Path, target: Path) -> None:
    """Note, durably, that the damaged ``queue`` goes to ``target`` (before it is moved)."""
    write_atomic(_note(queue), json.dumps([*_noted(queue), target.name]).encode())


def adopt(
    conn: sqlite3.Connection, queue: Path, durable: contextlib.AbstractContextManager[None]
) -> list[Damaged]:
    """Every salvage the queue of ``conn`` (at ``queue``) has to do: the damaged files noted
    (:func:`note_aside`) are marked in it first, in a transaction run within ``durable`` (synced
    whatever the queue's durability: dbfile.durably), then the note is removed; returns each
    file with where its copy stopped (a crash, a power cut or a full disk may have cut it
    short)."""
    names = [n for n in _noted(queue) if (queue.parent / n).exists()]
    if names:
        # and the salvages a noted file had not finished itself (its own marks): their rows
        # past the mark are in no other file
        marks = [(MARK + n, 0) for n in names]
        marks += [m for n in names for m in _marks(queue, queue.parent / n)]
        with durable:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", marks)
            conn.execute("COMMIT")
    if _note(queue).exists():
        _note(queue).unlink()
        fsync_dir(queue.parent)
    rows = conn.execute(
        "SELECT key, value FROM meta WHERE key >= ? AND key < ?", (MARK, MARK[:-1] + ";")
    ).fetchall()
    paths = [(queue.parent / key[len(MARK) :], int(start)) for key, start in rows]
    return [Damaged(path, readable_hwm(path), start) for path, start in paths]


def _marks(queue: Path, damaged: Path) -> list[tuple[str, int]]:
    """The salvage marks a damaged queue file still holds, of files that are still there."""
    rows = _rows(damaged, f"SELECT key, value FROM meta WHERE key LIKE '{MARK}%'")
    return [
        (key, start)
        for key, start in rows
        if isinstance(key, str)
        and isinstance(start, int)
        and _aside(queue, key[len(MARK) :])
        and (damaged.parent / key[len(MARK) :]).is_file()
    ]


@dataclass(frozen=True)
class Salvage:
    """What a salvage recovered: ``lost`` is None when the damaged file did not say how many
    records it held."""

    salvaged: int
    lost: int | None
    unreadable_spans: int  # places where the scan had to skip forward
    hwm: int | None  # the highest sequence number salvaged


def _valid(row: tuple[object, ...]) -> bool:
    seq, code, pri, created, attempts, payload = row
    return (
        isinstance(seq, int)
        and seq > 0
        and code in CODE_KIND
        and isinstance(pri, int)
        and isinstance(created, int | float)
        and isinstance(attempts, int)
        and isinstance(payload, bytes)
    )


def _first_after(conn: sqlite3.Connection, pos: int) -> int | None:
    """The first sequence number above ``pos`` that a range seek reaches: -1 when the seek works
    and finds nothing beyond, None when the seek itself fails."""
    try:
        got = conn.execute(
            "SELECT seq FROM records WHERE seq > ? ORDER BY seq LIMIT 1", (pos,)
        ).fetchone()
    except sqlite3.DatabaseError:
        return None
    return int(got[0]) if got and isinstance(got[0], int) else -1


def _skip(conn: sqlite3.Connection, pos: int, stop: int) -> int | None:
    """After a range scan failed past ``pos``: the smallest position from which a range seek
    works again (doubling the distance, then bisecting back), or None when none does up to
    ``stop``. Rows in between may still be readable by point lookups (a seek can fail on a
    damaged neighbour page that a lookup of the key itself never visits)."""
    step = 1
    fail = pos
    found: int | None = None
    while fail < stop:
        probe = min(pos + step, stop)  # the last probe is ``stop`` itself
        if _first_after(conn, probe) is not None:
            found = probe
            break
        fail = probe
        step *= 2
    if found is None:
        return None
    lo, hi = fail, found  # a seek from lo fails, from hi works: narrow it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _first_after(conn, mid) is None:
            lo = mid
        else:
            hi = mid
    return hi


def _bound(conn: sqlite3.Connection, which: str) -> int | None:
    """min(seq) or max(seq), where the file still gives it (None: not readable)."""
    try:
        row = conn.execute(f"SELECT {which}(seq) FROM records").fetchone()
    except sqlite3.DatabaseError:
        return None
    return int(row[0]) if row and isinstance(row[0], int) else None


def _lookups(conn: sqlite3.Connection, first: int, last: int) -> list[Row]:
    """Point lookups of every sequence number in ``first..last`` (bounded by
    :data:`MAX_LOOKUPS`): the queue numbers its rows densely, so a damaged span is short."""
    out: list[Row] = []
    for seq in range(first, min(last, first + MAX_LOOKUPS - 1) + 1):
        try:
            row = conn.execute(_ONE, (seq,)).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row is not None and _valid(row):
            out.append(row)
    return out


def _untruncate(path: Path) -> None:
    """A file cut short (not a whole number of pages, or shorter than its header says) is made
    readable where it can be: cut to whole pages, and its in-header size marked stale so SQLite
    counts pages from the file's size. Changes only the moved-aside copy."""
    try:
        with path.open("r+b") as f:
            header = f.read(100)
            if len(header) < 100 or header[:16] != b"SQLite format 3\x00":
                return
            page = struct.unpack(">H", header[16:18])[0]
            page = 65536 if page == 1 else page
            if page < 512 or page & (page - 1):
                return
            size = f.seek(0, 2)
            counter, pages = struct.unpack(">II", header[24:32])
            if size % page == 0 and pages * page <= size:
                return
            f.truncate(size - size % page)
            f.seek(92)
            f.write(struct.pack(">I", (counter + 1) & 0xFFFFFFFF))  # "valid-for" != counter
    except OSError as err:
        log.warning("event=salvage_untruncate_failed path=%s error=%s", path, err)


def copy(damaged: Damaged, into: sqlite3.Connection) -> Salvage:
    """Copy every valid row readable from the damaged queue file (sequence numbers above
    ``damaged.start``, up to its high-water mark where known) into the new queue ``into``,
    streaming (a committed transaction per chunk, each advancing the file's mark, so memory
    stays bounded and a crash or a disk that fills keeps what went in and the next open goes on
    from there), then bring the new queue's per-kind counters and high-water mark up to date and,
    when the copy got to the end, remove the mark. The read-only connections' shared memory file
    is removed afterwards."""
    path = damaged.path
    _untruncate(path)
    done = spans = 0
    hwm: int | None = None
    finished = False
    try:
        with _reader(path) as conn:
            if conn is not None:
                scan = _Scan(conn, MAX_SEQ if damaged.hwm is None else damaged.hwm, damaged.start)
                try:
                    for chunk in scan:
                        if not _insert(into, chunk, damaged.mark):
                            break
                        done += len(chunk)
                        hwm = max(hwm or 0, chunk[-1][0])
                    else:
                        finished = True
                except sqlite3.Error as err:  # not a page error: give up on the rest
                    log.warning("event=salvage_stopped path=%s error=%s", path, err)
                    finished = True
                spans = scan.spans
            else:
                finished = True
        expected = expected_rows(path)
    finally:
        with contextlib.suppress(OSError):
            path.with_name(path.name + "-shm").unlink()
    _recount(into, damaged.mark if finished else None)
    lost = None if expected is None or damaged.start else max(0, expected - done)
    return Salvage(done, lost, spans, hwm)


class _Scan:
    """The rows of a damaged file in sequence order, in chunks; ``spans`` counts the damaged
    places skipped."""

    def __init__(self, conn: sqlite3.Connection, stop: int, start: int = 0) -> None:
        self.conn = conn
        self.stop = stop
        self.start = start  # rows up to this one were copied already
        self.spans = 0

    def __iter__(self) -> Iterator[list[Row]]:
        conn = self.conn
        # start just below the smallest key and end at the largest, where they can be read;
        # an unreadable smallest one: from 0, the first seek that works again is found past the
        # damage (sequence numbers start at an epoch, about 2**50, so that takes ~100 seeks)
        first, last = _bound(conn, "min"), _bound(conn, "max")
        pos = max(0 if first is None else first - 1, self.start)
        self.stop = max(self.stop, last or 0)
        single = 0  # after a failed range read: rows read one at a time, to find the damage
        while self.spans < MAX_SPANS:
            limit = 1 if single else _CHUNK
            try:
                chunk = conn.execute(_SELECT, (pos, limit)).fetchall()
            except sqlite3.DatabaseError:
                if limit > 1:
                    single = _CHUNK
                    continue
                self.spans += 1
                resume = _skip(conn, pos, self.stop)
                # the damaged keys lie just above pos and just below resume, or the high-water
                # mark when no seek works any more (dense numbering)
                top = self.stop if resume is None else resume
                found = _lookups(conn, pos + 1, min(top, pos + MAX_LOOKUPS // 2))
                low = max(pos + MAX_LOOKUPS // 2 + 1, top - MAX_LOOKUPS // 2 + 1)
                found += _lookups(conn, low, top)
                if found:
                    yield found
                if resume is None:
                    return
                pos = resume
                continue
            if not chunk:
                return
            good = [r for r in chunk if _valid(r)]
            if good:
                yield good
            last = chunk[-1][0]
            if not isinstance(last, int) or last <= pos:
                return
            pos = last
            single = max(0, single - 1)


@contextlib.contextmanager
def _reader(path: Path) -> Iterator[sqlite3.Connection | None]:
    try:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS
        )
    except sqlite3.Error as err:
        log.warning("event=salvage_unreadable path=%s error=%s", path, err)
        yield None
        return
    try:
        yield conn
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.close()


def expected_rows(path: Path) -> int | None:
    """How many records the file's own per-kind counters say it held, if they are readable."""
    found = _answers(path, "SELECT sum(depth) FROM kinds")
    return found[0] if found else None


def _insert(conn: sqlite3.Connection, chunk: list[Row], mark: str) -> bool:
    """One committed chunk of salvaged rows, the file's mark advanced to its last; False when
    the disk is full or failing (what went in stays)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT OR IGNORE INTO records (seq, kind, priority, created, attempts, payload) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            chunk,
        )
        conn.execute("UPDATE meta SET value = ? WHERE key = ?", (chunk[-1][0], mark))
        conn.execute("COMMIT")
    except sqlite3.OperationalError as err:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        log.error("event=salvage_incomplete error=%s", err)
        return False
    return True


def _recount(conn: sqlite3.Connection, done: str | None) -> None:
    """The counters and the high-water mark from the rows; the mark ``done`` removed."""
    conn.execute("BEGIN IMMEDIATE")
    if done is not None:
        conn.execute("DELETE FROM meta WHERE key = ?", (done,))
    conn.execute(
        "UPDATE kinds SET depth = (SELECT count(*) FROM records r WHERE r.kind = kinds.kind), "
        "bytes = (SELECT coalesce(sum(length(payload)), 0) FROM records r "
        "WHERE r.kind = kinds.kind)"
    )
    conn.execute(
        "UPDATE meta SET value = max(value, (SELECT coalesce(max(seq), 0) FROM records)) "
        "WHERE key = 'seq_hwm'"
    )
    conn.execute("COMMIT")
