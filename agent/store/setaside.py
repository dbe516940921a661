"""Records set aside: queued records the endpoint refused on their own (docs/protocol.md,
"Delivery semantics", *Set aside*), moved out of the queue into ``rejected/`` beside it, one file
each, so that a record the endpoint did not store is never deleted while no copy of it is kept on
the device.

A file is written durably (temporary file, fsync, rename, fsync of the directory) *before* its
record leaves the queue; a crash in between leaves the record in both places, never in none. The
area is bounded (:data:`MAX_SET_ASIDE_BYTES`, each file counted as at least one 4 KiB block, so at
most 4,096 files): when a record does not fit, :class:`SetAsideFull` is raised and the record stays
in the queue.

File format (``rejected/seq-<seq>.cbor``), one deterministic CBOR map::

    {"v": 1, "seq": uint, "kind": tstr, "priority": uint, "created": float,
     "payload": bstr, "answer": tstr, "time": float}

``payload`` is the record's body as the queue held it, ``answer`` what the endpoint said (``"4.00
..."``), ``time`` the wall time it was set aside. ``cbor2.loads(path.read_bytes())`` reads it.

**Back into the queue** (the ``requeue`` command, :meth:`agent.store.queue.Store.requeue`): each
file is read strictly (:meth:`SetAside.read`; a file that is not one stays where it is and is
counted), put into the queue as a new record (a new seq: its old one may be stored at the endpoint
as something else), and removed once that put is committed. A crash between the commit and the
removal would leave the record in both places; so the files of a batch are named in
``.requeuing`` (written durably) before the put, and the next requeue first removes, of those,
each whose record (kind, created time and body) is in the queue already.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cbor2

from agent.errors import StoreError, StoreFull
from agent.files import fsync_dir, read_json, write_atomic
from agent.store.dbfile import is_full
from agent.store.settings import MAX_PRIORITY
from agent.wire.records import Kind, RecordError, loads_bounded

log = logging.getLogger(__name__)

SET_ASIDE_DIR = "rejected"
MAX_SET_ASIDE_BYTES = 16 << 20
BLOCK = 4096  # a file takes at least one block of the disk
FORMAT_VERSION = 1
#: The file naming the set-aside files of a requeue in progress (module docstring).
REQUEUING = ".requeuing"


class SetAsideFull(StoreFull):
    """The set-aside area is full: the record stays in the queue."""


class Refused(Protocol):
    """What is kept of a queued record (:class:`agent.store.queue.Record` has these)."""

    seq: int
    kind: str
    priority: int
    created: float
    payload: bytes


@dataclass(frozen=True)
class Kept:
    """One set-aside record as read back from its file."""

    path: Path
    seq: int
    kind: Kind
    priority: int
    created: float
    payload: bytes


def _seq_of(name: str) -> int | None:
    """The seq a set-aside file's name says (``seq-<seq>.cbor``), or None."""
    if not (name.startswith("seq-") and name.endswith(".cbor")):
        return None
    digits = name[4:-5]
    if not digits.isascii() or not digits.isdigit() or len(digits) > 19:
        return None
    return int(digits)


def decode_kept(path: Path, data: bytes, cap: int) -> Kept:
    """A set-aside file's record; :class:`ValueError` says why ``data`` is not one."""
    try:
        doc = loads_bounded(data, cap, max_depth=2)
    except RecordError as err:
        raise ValueError(str(err)) from None
    if not isinstance(doc, dict) or doc.get("v") != FORMAT_VERSION:
        raise ValueError(f"not a set-aside record of version {FORMAT_VERSION}")
    seq, kind, priority = doc.get("seq"), doc.get("kind"), doc.get("priority")
    created, payload = doc.get("created"), doc.get("payload")
    if type(seq) is not int or seq < 1 or seq != _seq_of(path.name):
        raise ValueError("its seq is not the one its name says")
    if kind not in {k.value for k in Kind}:
        raise ValueError(f"unknown kind {str(kind)[:32]!r}")
    if type(priority) is not int or not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be an integer 0..{MAX_PRIORITY}")
    if type(created) is not float or created != created or abs(created) == float("inf"):
        raise ValueError("created must be a finite float")
    if type(payload) is not bytes:
        raise ValueError("payload must be bytes")
    return Kept(path, seq, Kind(kind), priority, created, payload)


def holding(conn: sqlite3.Connection, items: list[tuple[int, float, bytes]]) -> list[bool]:
    """For each (kind code, created, payload), whether a record the queue of ``conn`` holds is
    that one (one scan of the queue: for the rare recovery of an interrupted requeue)."""
    want: dict[tuple[int, float], list[int]] = {}
    for i, (code, created, _) in enumerate(items):
        want.setdefault((code, created), []).append(i)
    found = [False] * len(items)
    rows = conn.execute("SELECT kind, created, payload FROM records")
    for code, created, payload in rows:
        for i in want.get((code, created), ()):
            found[i] = found[i] or items[i][2] == payload
    return found


@dataclass(frozen=True)
class SetAsideStats:
    count: int
    bytes: int  # as counted against the cap (each file at least one block)


def _cost(size: int) -> int:
    return max(BLOCK, size)


class SetAside:
    """The set-aside area of one queue. Its methods do blocking file I/O: call them on the
    store's writer thread."""

    def __init__(self, directory: Path, cap_bytes: int | None = None) -> None:
        self.dir = directory
        self.cap = MAX_SET_ASIDE_BYTES if cap_bytes is None else cap_bytes

    def stats(self) -> SetAsideStats:
        """Read from the directory (an operator may have taken files out)."""
        count = used = 0
        try:
            with os.scandir(self.dir) as entries:
                for entry in entries:
                    if entry.name.endswith(".cbor") and entry.is_file(follow_symlinks=False):
                        count += 1
                        used += _cost(entry.stat(follow_symlinks=False).st_size)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("event=set_aside_unreadable dir=%s error=%r", self.dir, str(err))
        return SetAsideStats(count, used)

    def write(self, records: Sequence[Refused], answer: str, wall_now: float) -> None:
        """Keep ``records`` durably, all or (on an error) those written before it; raises
        SetAsideFull when they do not fit, StoreError when a file cannot be written."""
        docs = [(r.seq, self._encode(r, answer, wall_now)) for r in records]
        used = self.stats().bytes
        need = sum(_cost(len(data)) for _, data in docs)
        if used + need > self.cap:
            raise SetAsideFull(
                f"the set-aside area {self.dir} is full ({used} of {self.cap} bytes): "
                f"{len(docs)} refused record(s) stay in the queue; read and remove its files"
            )
        for seq, data in docs:
            path = self.dir / f"seq-{seq}.cbor"
            try:
                write_atomic(path, data, mode=0o600)
            except OSError as err:
                if is_full(err, self.dir):
                    raise StoreFull(
                        f"cannot set record {seq} aside in {self.dir}: the disk is full"
                    ) from err
                raise StoreError(f"cannot set record {seq} aside in {self.dir}: {err}") from err

    def read(self, only: int | None = None) -> tuple[list[Kept], list[str]]:
        """The set-aside records (the one of seq ``only``, or all), oldest seq first, and why each
        file that is not one is not (it stays where it is)."""
        kept: list[Kept] = []
        bad: list[str] = []
        for _, path in self._files(only):
            try:
                with open(path, "rb") as f:  # the cap + 1: a larger file is no record of ours
                    data = f.read(self.cap + 1)
                kept.append(decode_kept(path, data, self.cap))
            except (OSError, ValueError) as err:
                bad.append(f"{path.name}: {err}")
        return kept, bad

    def _files(self, only: int | None) -> list[tuple[int, Path]]:
        try:
            with os.scandir(self.dir) as entries:
                found = [
                    (seq, Path(entry.path))
                    for entry in entries
                    if (seq := _seq_of(entry.name)) is not None
                    and (only is None or seq == only)
                    and entry.is_file(follow_symlinks=False)
                ]
        except FileNotFoundError:
            return []
        except OSError as err:
            raise StoreError(f"cannot read the set-aside area {self.dir}: {err}") from err
        return sorted(found)

    def mark(self, kept: Sequence[Kept]) -> None:
        """Name ``kept`` in :data:`REQUEUING`, durably, before they are put into the queue."""
        write_atomic(self.dir / REQUEUING, json.dumps([k.path.name for k in kept]).encode())

    def marked(self) -> list[Kept]:
        """The records of a requeue a crash interrupted (their files still here), else []."""
        path = self.dir / REQUEUING
        if not path.exists():
            return []
        try:
            names = read_json(path)
        except (OSError, ValueError) as err:
            log.warning("event=requeuing_unreadable path=%s error=%r", path, str(err))
            return []
        if not isinstance(names, list):
            return []
        wanted = {n for n in names if isinstance(n, str) and _seq_of(n) is not None}
        kept, _ = self.read()
        return [k for k in kept if k.path.name in wanted]

    def remove(self, kept: Sequence[Kept]) -> None:
        """Remove the files of ``kept`` (their records are in the queue) and the mark, durably."""
        for k in kept:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(k.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / REQUEUING)
        fsync_dir(self.dir)

    @staticmethod
    def _encode(rec: Refused, answer: str, wall_now: float) -> bytes:
        return cbor2.dumps(
            {
                "v": FORMAT_VERSION,
                "seq": rec.seq,
                "kind": str(rec.kind),
                "priority": rec.priority,
                "created": float(rec.created),
                "payload": bytes(rec.payload),
                "answer": answer,
                "time": float(wall_now),
            },
            canonical=True,
        )
