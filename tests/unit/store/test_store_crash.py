"""Crash tests of the store: a real writer process (tests/unit/store/store_writer.py) is
SIGKILLed at random moments, again and again, and after every kill the queue file must hold every
sequence number the writer was told was committed, exactly once, with intact payloads, a database
that passes integrity_check, and sequence numbers that only ever grow.

The writers are forked from a multiprocessing forkserver that has the writer module loaded, so
each of the many restarts costs a fork rather than a new interpreter.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import select
import signal
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.store import store_writer

KILLS = 50  # SIGKILLs of the put writer (the issue asks for at least 50)
LEASE_KILLS = 12


@pytest.fixture(scope="module")
def ctx() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([store_writer.__name__])
    return context


@pytest.fixture
def spawn(ctx: multiprocessing.context.BaseContext) -> Iterator[Callable[..., Writer]]:
    """Start writers; any still running when the test ends (say, after a failed assertion)
    is killed, so none is left filling the disk."""
    started: list[Writer] = []

    def start(directory: Path, durability: str, mode: str, seed: int) -> Writer:
        w = Writer(ctx, directory, durability, mode, seed)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join(10)


class Writer:
    """A writer process and the lines it reported on its pipe before it died."""

    def __init__(
        self,
        ctx: multiprocessing.context.BaseContext,
        directory: Path,
        durability: str,
        mode: str,
        seed: int,
    ) -> None:
        self.reader, writer = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(  # type: ignore[attr-defined]
            target=store_writer.run, args=(writer, str(directory), durability, mode, seed)
        )
        self.proc.start()
        writer.close()
        self.buf = b""
        self.lines: list[tuple[str, list[str]]] = []

    def _take(self, data: bytes) -> None:
        self.buf += data
        *complete, self.buf = self.buf.split(b"\n")
        for raw in complete:
            tag, *values = raw.decode().split()
            self.lines.append((tag, values))

    def read_for(self, seconds: float, until: str | None = None) -> None:
        """Collect output for ``seconds``, or until a line tagged ``until`` arrives."""
        fd = self.reader.fileno()
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                break
            data = os.read(fd, 65536)
            if not data:
                break
            self._take(data)
            if until is not None and any(tag == until for tag, _ in self.lines):
                return

    def _drain(self) -> None:
        fd = self.reader.fileno()
        while select.select([fd], [], [], 0)[0]:
            data = os.read(fd, 65536)
            if not data:
                break
            self._take(data)
        self.reader.close()

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(30)
        assert self.proc.exitcode == -signal.SIGKILL
        self._drain()
        assert self.buf == b"", "a line was cut by the kill"

    def finish(self, timeout: float = 30) -> None:
        self.proc.join(timeout)
        assert self.proc.exitcode == 0
        self._drain()

    def seqs(self, tag: str) -> list[int]:
        return [int(v.split(":")[0]) for t, values in self.lines if t == tag for v in values]

    def saw(self, tag: str) -> bool:
        return any(t == tag for t, _ in self.lines)


def check_file(path: Path) -> dict[int, tuple[int, int]]:
    """Check the file as a plain SQLite reader; return {seq: (kind, attempts)}."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute("SELECT seq, kind, attempts, payload FROM records").fetchall()
        for seq, _kind, _attempts, payload in rows:
            assert zlib.crc32(payload[4:]).to_bytes(4, "big") == payload[:4], f"seq {seq} torn"
        # The per-kind mirror is written in the same transactions as the rows.
        actual = dict(conn.execute("SELECT kind, count(*) FROM records GROUP BY kind").fetchall())
        for kind, depth in conn.execute("SELECT kind, depth FROM kinds"):
            assert actual.get(kind, 0) == depth
        hwm = conn.execute("SELECT value FROM meta WHERE key = 'seq_hwm'").fetchone()[0]
        assert all(seq <= hwm for seq, *_ in rows)
    finally:
        conn.close()
    seqs = [r[0] for r in rows]
    assert len(seqs) == len(set(seqs))
    return {seq: (kind, attempts) for seq, kind, attempts, _ in rows}


def test_sigkill_loses_no_committed_record_and_never_reuses_a_seq(
    tmp_path: Path, spawn: Callable[..., Writer]
) -> None:
    rng = random.Random(20240503)
    reported: set[int] = set()
    highest_seen = 0
    for i in range(KILLS):
        durability = "full" if i % 2 == 0 else "normal"
        w = spawn(tmp_path, durability, "put", rng.randrange(1 << 30))
        if rng.random() < 0.2:
            w.read_for(rng.uniform(0.0, 0.03))  # may die in open(): create, recover, check
        else:
            w.read_for(30.0, until="ready")
            assert w.saw("ready")
            w.read_for(rng.uniform(0.0, 0.1))
        w.kill()
        new = w.seqs("put")
        assert len(new) == len(set(new))
        assert not reported & set(new), "a sequence number was issued twice"
        if new:
            assert min(new) > highest_seen, "a new sequence number is not above all earlier ones"
        reported.update(new)
        if not (tmp_path / "queue.db").exists():
            assert not reported  # killed before the very first queue was created
            continue
        rows = check_file(tmp_path / "queue.db")
        missing = reported - rows.keys()
        assert not missing, f"committed records lost after kill {i}: {sorted(missing)[:5]}"
        highest_seen = max([highest_seen, *rows.keys(), *new])
    assert len(reported) > 1000  # the writers did real work between the kills


def test_leases_after_sigkill_acked_never_return_unacked_come_back(
    tmp_path: Path, spawn: Callable[..., Writer]
) -> None:
    rng = random.Random(7)
    acked: set[int] = set()
    for i in range(LEASE_KILLS):
        w = spawn(tmp_path, "full" if i % 2 else "normal", "lease", rng.randrange(1 << 30))
        w.read_for(30.0, until="ready")
        assert w.saw("ready")
        w.read_for(rng.uniform(0.02, 0.15))
        w.kill()
        acked.update(w.seqs("acked"))
        attempted = set(w.seqs("acking"))
        leased_not_acked = set(w.seqs("leased")) - attempted

        d = spawn(tmp_path, "full", "drain", 0)
        d.finish()
        got = set(d.seqs("got"))
        assert not got & acked, "an acknowledged record came back"
        assert leased_not_acked <= got, "a leased, unacknowledged record was not delivered again"
        assert set(w.seqs("put")) - attempted <= got | acked
        rows = check_file(tmp_path / "queue.db")
        assert got == rows.keys()  # drain leased everything in the queue
    assert acked  # the writers did acknowledge records
