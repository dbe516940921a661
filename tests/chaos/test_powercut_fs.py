"""The power-cut filesystem (tools/powercut) itself: what a cut keeps and what it loses, for plain
files, for the agent's atomic file replacement, and for SQLite in WAL mode with synchronous=FULL
under cuts at random moments while a child process commits.

Attack: a power cut that loses unsynced writes.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.files import fsync_dir, write_atomic
from tests.chaos import sqlite_writer
from tests.chaos.child import Child
from tools.powercut import PowerCutFS
from tools.powercut.journal import Journal, key_of
from tools.powercut.pending import PAGE, PendingFile

SQLITE_CUTS = 20
ROOT = Path(__file__).resolve().parents[2]


def put(path: Path, data: bytes, *, sync: bool, offset: int | None = None) -> None:
    """Write ``data`` (at ``offset``, or replacing the file), fsync it if ``sync``."""
    flags = os.O_WRONLY | os.O_CREAT | (0 if offset is not None else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        os.pwrite(fd, data, offset or 0)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def durable(path: Path, data: bytes) -> None:
    put(path, data, sync=True)
    fsync_dir(path.parent)


# -- data ------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_unsynced_data_is_lost_at_a_cut_and_read_until_then(powercut: PowerCutFS) -> None:
    m = powercut.mountpoint
    durable(m / "kept", b"")
    put(m / "kept", b"in the page cache only", sync=False)
    assert (m / "kept").read_bytes() == b"in the page cache only"  # reads see pending data
    put(m / "never-synced", b"x" * 10_000, sync=False)
    fsync_dir(m)  # its name is durable, its data is not
    stats = powercut.stats()
    assert stats.pending_files == 2
    assert stats.pending_bytes >= PAGE * 4
    assert stats.fsyncs == 1 and stats.dirsyncs == 2

    powercut.cut()
    assert (m / "kept").read_bytes() == b""
    assert (m / "never-synced").read_bytes() == b""
    assert powercut.stats().pending_bytes == 0


@pytest.mark.timeout(30)
def test_fsynced_and_fdatasynced_data_is_kept(powercut: PowerCutFS) -> None:
    m = powercut.mountpoint
    durable(m / "a", b"fsynced")
    fd = os.open(m / "b", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"fdatasynced" * 1000)
    os.fdatasync(fd)
    os.close(fd)
    fsync_dir(m)
    assert powercut.stats().fdatasyncs == 1
    powercut.cut()
    assert (m / "a").read_bytes() == b"fsynced"
    assert (m / "b").read_bytes() == b"fdatasynced" * 1000


@pytest.mark.timeout(30)
def test_a_partly_synced_file_keeps_exactly_the_synced_part(powercut: PowerCutFS) -> None:
    m = powercut.mountpoint
    rng = random.Random(5)
    first = rng.randbytes(3 * PAGE + 123)
    durable(m / "f", first)
    put(m / "f", b"overwritten", sync=False, offset=100)  # inside a synced page
    put(m / "f", rng.randbytes(5000), sync=False, offset=len(first))  # appended
    fd = os.open(m / "f", os.O_WRONLY)
    os.ftruncate(fd, 2 * PAGE + 7)  # and cut short, all unsynced
    os.close(fd)
    assert (m / "f").stat().st_size == 2 * PAGE + 7
    powercut.cut()
    assert (m / "f").read_bytes() == first


@pytest.mark.timeout(30)
def test_truncate_and_extend_read_zeros_and_an_fsync_through_any_handle_keeps_them(
    powercut: PowerCutFS,
) -> None:
    m = powercut.mountpoint
    durable(m / "f", b"A" * 6000)
    w = os.open(m / "f", os.O_WRONLY)
    r = os.open(m / "f", os.O_RDONLY)
    os.ftruncate(w, 10)
    os.pwrite(w, b"B", 8000)  # the bytes between are a hole: zeros, not the old A's
    want = b"A" * 10 + bytes(7990) + b"B"
    assert os.pread(r, 10_000, 0) == want
    os.fsync(r)  # the read-only handle's fsync makes the file's pending data durable
    os.close(w)
    os.close(r)
    powercut.cut()
    assert (m / "f").read_bytes() == want


# -- namespace -------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_rename_over_after_fsync_keeps_the_new_file(powercut: PowerCutFS) -> None:
    m = powercut.mountpoint
    durable(m / "state.json", b'{"old": true}')
    write_atomic(m / "state.json", b'{"new": true}')  # the agent's own: tmp, fsync, rename, dir
    powercut.cut()
    assert (m / "state.json").read_bytes() == b'{"new": true}'
    assert sorted(p.name for p in m.iterdir()) == ["state.json"]


@pytest.mark.timeout(30)
def test_a_rename_without_a_directory_fsync_is_undone(powercut: PowerCutFS) -> None:
    """The strict model: an fsynced file renamed over the old one, but the directory never
    fsynced: the old file comes back and the new name goes (its creation was not durable)."""
    m = powercut.mountpoint
    durable(m / "state.json", b"old")
    put(m / "tmp", b"new", sync=True)
    os.replace(m / "tmp", m / "state.json")
    assert powercut.stats().journal_ops == 2
    powercut.cut()
    assert sorted(p.name for p in m.iterdir()) == ["state.json"]
    assert (m / "state.json").read_bytes() == b"old"


@pytest.mark.timeout(30)
def test_namespace_operations_are_durable_in_order_up_to_a_directory_fsync(
    powercut: PowerCutFS,
) -> None:
    m = powercut.mountpoint
    durable(m / "gone", b"removed, then restored")
    (m / "d").mkdir()
    durable(m / "d" / "x", b"x")  # fsync of d: mkdir d (before it) is durable too
    (m / "gone").unlink()
    os.rename(m / "d" / "x", m / "y")
    (m / "e").mkdir()
    os.symlink("y", m / "link")
    assert powercut.stats().journal_ops == 4
    rolled = powercut.cut().rolled_back
    assert rolled == 4
    assert sorted(p.name for p in m.iterdir()) == ["d", "gone"]
    assert (m / "d" / "x").read_bytes() == b"x"
    assert (m / "gone").read_bytes() == b"removed, then restored"

    (m / "gone").unlink()
    fsync_dir(m)
    powercut.cut()
    assert sorted(p.name for p in m.iterdir()) == ["d"]


@pytest.mark.timeout(30)
def test_a_clean_close_makes_everything_durable(tmp_path: Path) -> None:
    (tmp_path / "disk").mkdir()
    with PowerCutFS(tmp_path / "disk") as fs:
        (fs.mountpoint / "sub").mkdir()
        (fs.mountpoint / "sub" / "f").write_bytes(b"closed cleanly")
    assert (tmp_path / "disk" / "sub" / "f").read_bytes() == b"closed cleanly"
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["sub"]  # no trash left


@pytest.mark.timeout(30)
def test_the_command_line_cuts_on_sigusr1_and_unmounts_cleanly_on_sigint(tmp_path: Path) -> None:
    disk, mnt = tmp_path / "disk", tmp_path / "mnt"
    disk.mkdir()
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.powercut", str(mnt), str(disk)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "mounted at" in proc.stdout.readline()
        durable(mnt / "kept", b"synced")
        put(mnt / "lost", b"not synced", sync=False)
        proc.send_signal(signal.SIGUSR1)
        assert proc.stdout.readline().startswith("powercut: cut pending_files=1 ")
        assert sorted(p.name for p in mnt.iterdir()) == ["kept"]
        assert (mnt / "kept").read_bytes() == b"synced"
        proc.send_signal(signal.SIGUSR2)
        assert proc.stdout.readline().startswith("powercut: stats ")
        put(mnt / "kept", b"clean unmount", sync=False)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.ismount(mnt)
    assert (disk / "kept").read_bytes() == b"clean unmount"


# -- the models, without FUSE ----------------------------------------------------------------------

_contents = st.one_of(
    st.binary(max_size=3 * PAGE),
    st.builds(lambda n, fill: bytes([fill]) * n, st.integers(0, 3 * PAGE), st.integers(1, 255)),
)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 5 * PAGE), st.binary(min_size=1, max_size=PAGE)),
        st.tuples(st.just("truncate"), st.integers(0, 5 * PAGE), st.just(b"")),
        st.tuples(st.just("read"), st.integers(0, 6 * PAGE), st.integers(0, 3 * PAGE)),
    ),
    max_size=30,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(initial=_contents, ops=_ops)
@pytest.mark.timeout(60)
def test_pending_pages_read_and_flush_like_a_plain_file(
    tmp_path: Path, initial: bytes, ops: list[tuple[str, int, object]]
) -> None:
    scratch = tmp_path / "backing"
    scratch.write_bytes(initial)
    model = bytearray(initial)
    p = PendingFile(os.open(scratch, os.O_RDWR))
    try:
        for op, at, arg in ops:
            if op == "write":
                assert isinstance(arg, bytes)
                model.extend(bytes(max(0, at - len(model))))
                model[at : at + len(arg)] = arg
                p.write(at, arg)
            elif op == "truncate":
                del model[at:]
                model.extend(bytes(at - len(model)))
                p.truncate(at)
            else:
                assert isinstance(arg, int)
                assert p.read(at, arg) == bytes(model[at : at + arg])
            assert p.size == len(model)
        assert p.read(0, len(model) + PAGE) == bytes(model)
        assert scratch.read_bytes() == initial  # nothing reached the backing file yet
        p.flush(host_fsync=False)
        assert scratch.read_bytes() == bytes(model)
        assert p.read(0, len(model) + 1) == bytes(model)
    finally:
        p.close()


NAMES = ("a", "b", "d", "d/a", "d/b", "e")
OPS = ("create", "create", "mkdir", "unlink", "rmdir", "rename", "rename", "rename", "sync")


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every name under ``root`` with its content (None for a directory)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = Path(full).read_bytes()
    return out


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rnd=st.randoms(use_true_random=False), steps=st.integers(1, 40))
@pytest.mark.timeout(60)
def test_journal_rollback_restores_the_namespace_as_of_the_last_durable_point(
    tmp_path: Path, rnd: random.Random, steps: int
) -> None:
    """A random walk of namespace operations and directory fsyncs on a real directory; the
    rollback at the end must give back exactly the tree as of the last durable point."""
    root, trash = tmp_path / "root", tmp_path / "trash"
    for d in (root, trash):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
    journal = Journal(str(trash))
    history = [_tree(root)]  # the tree after each journalled operation; [0] is durable
    touched: list[set[tuple[int, int]]] = []  # the directories each journalled operation changed
    for n in range(steps):
        op = rnd.choice(OPS)
        existing = [name for name in NAMES if os.path.lexists(root / name)]
        source = rnd.choice(existing) if existing and op in ("unlink", "rmdir", "rename") else None
        p = str(root / (source or rnd.choice(NAMES)))
        q = str(root / rnd.choice(NAMES))
        before = len(journal)
        dirs = {
            key_of(os.lstat(os.path.dirname(x)))
            for x in (p, q)
            if os.path.isdir(os.path.dirname(x))
        }
        try:
            if op == "create":
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                os.write(fd, f"file {n}".encode())
                os.close(fd)
                journal.created(p)
            elif op == "mkdir":
                os.mkdir(p)
                journal.created(p, directory=True)
            elif op in ("unlink", "rmdir"):
                journal.remove(p, directory=op == "rmdir")
            elif op == "rename":
                journal.rename(p, q)
            else:
                synced = key_of(os.lstat(p if os.path.isdir(p) else root))
                done = journal.commit(synced)
                # exactly up to the last operation that changed the synced directory
                assert done == max((i + 1 for i, t in enumerate(touched) if synced in t), default=0)
                history, touched = history[done:], touched[done:]
        except OSError:
            pass
        if len(journal) > before:
            history.append(_tree(root))
            touched.append(dirs if op == "rename" else {key_of(os.lstat(os.path.dirname(p)))})
        assert len(history) == len(journal) + 1 == len(touched) + 1
    journal.rollback()
    assert _tree(root) == history[0]


# -- SQLite ----------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_sqlite_wal_index_is_shared_between_processes_through_the_mmapped_shm(
    powercut: PowerCutFS,
) -> None:
    """The -shm file is mmapped MAP_SHARED by every connection: this one must see what another
    process committed through it (FUSE without direct_io keeps one page cache per file)."""
    db = powercut.mountpoint / "shared.db"
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        assert conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
        conn.execute("CREATE TABLE t (x)")
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0
        other = (
            "import sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "for i in range(50):\n"
            "    c.execute('INSERT INTO t VALUES (?)', (i,))\n"
            "c.close()\n"
        )
        subprocess.run([sys.executable, "-c", other, str(db)], check=True, timeout=20)
        assert (powercut.mountpoint / "shared.db-wal").exists()  # not checkpointed away
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 50
    finally:
        conn.close()


def _check_db(path: Path) -> dict[int, int]:
    """integrity_check and every row's CRC; returns {id: crc}."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 't'").fetchall():
            return {}  # cut before the first CREATE TABLE committed
        rows = conn.execute("SELECT id, crc, body FROM t").fetchall()
    finally:
        conn.close()
    for rowid, crc, body in rows:
        assert zlib.crc32(body) == crc, f"row {rowid} torn"
    return {rowid: crc for rowid, crc, _ in rows}


@pytest.mark.parametrize("torn", [False, True], ids=["strict", "torn"])
@pytest.mark.timeout(90)
def test_sqlite_wal_full_loses_no_committed_transaction_over_cuts(
    powercut: PowerCutFS, torn: bool
) -> None:
    """A child commits (inserts and deletes) in WAL mode with synchronous=FULL; the power is cut
    at random moments, in open, in commits and in checkpoints. Every transaction the child saw
    committed is there after each cut, entirely, and the database passes integrity_check. With
    ``torn``, the cuts also write a random part of the unsynced overwrites and keep a random
    part of the unsynced namespace operations."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([sqlite_writer.__name__])
    db = powercut.mountpoint / "test.db"
    rng = random.Random(2024 + torn)
    live: set[int] = set()  # committed inserts not committed deleted
    dead: set[int] = set()  # committed deletes
    commits = 0
    cuts = SQLITE_CUTS if not torn else SQLITE_CUTS // 2
    for i in range(cuts):
        child = Child(ctx, sqlite_writer.run, str(db), rng.randrange(1 << 30))
        try:
            if rng.random() < 0.2:
                child.read_for(rng.uniform(0.0, 0.05))  # may die while opening or recovering
            else:
                child.read_for(30.0, until="ready")
                assert child.tagged("ready") == [["wal"]]  # WAL and its mmapped -shm work
                child.read_for(rng.uniform(0.02, 0.3))
            stats = powercut.cut(
                kill=[child.pid], torn=(rng.randrange(1 << 30), 0.5) if torn else None
            )
            child.reap()
        finally:
            child.kill()
        maybe_gone = {int(v) for values in child.tagged("deleting") for v in values}
        for values in child.tagged("commit"):
            ins, gone = (v.split("=")[1] for v in values)
            new = {int(x) for x in ins.split(",") if x}
            deleted = {int(x) for x in gone.split(",") if x}
            live = (live | new) - deleted
            dead |= deleted
            commits += 1
        if not db.exists():
            assert not live and not dead, f"cut {i}: the database vanished"
            continue
        rows = _check_db(db)
        missing = live - maybe_gone - rows.keys()
        assert not missing, f"cut {i}: committed rows lost: {sorted(missing)[:5]} ({stats})"
        back = dead & rows.keys()
        assert not back, f"cut {i}: committed deletes undone: {sorted(back)[:5]}"
        live = (live - maybe_gone) | (live & maybe_gone & rows.keys())
    assert commits > 5 * cuts  # the children did real work between the cuts
